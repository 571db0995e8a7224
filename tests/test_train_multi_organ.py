"""Phase 5 training: the loss with missing annotations, class weights, checkpoints, exact resume,
non-finite loss, early stopping, and data-parallel training under torchrun (2 CPU processes)."""
from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_multi_organ as tm
from thoracic_seg import organs, precision, training
from thoracic_seg.layout import PROCESSED_FORMAT, slice_label_bits
from thoracic_seg.losses import (
    dice_counts, dice_from_counts, marginal_cross_entropy, multi_organ_loss, soft_dice_loss,
)
from thoracic_seg.precision import Precision
from unet_multi_organ import load_checkpoint_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE, SLICES = 32, 4
NO_HEART = [True, True, True, True, True, False, True, True]
TINY = dict(base_channels=4, batch_size=4, lr=1e-3, device="cpu", workers=0, log_every=1, amp=False)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # run() then leaves the thread count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# A tiny training cache in the phase 3 format, and its split files
# --------------------------------------------------------------------------------------------
def patient_arrays(seed: int, heart_annotated: bool) -> tuple[np.ndarray, np.ndarray]:
    """(4, 32, 32) float16 image and uint8 mask. Per slice: right and left lung 8x8 = 64 px
    each, spinal cord 2x2 = 4 px, heart 4x4 = 16 px (visible in the image, labelled only when
    annotated); GTV 2x2 = 4 px inside the right lung on slices 1 and 2."""
    mask = np.zeros((SLICES, SIZE, SIZE), dtype=np.uint8)
    mask[:, 8:16, 4:12] = organs.RIGHT_LUNG
    mask[:, 8:16, 20:28] = organs.LEFT_LUNG
    mask[:, 24:26, 15:17] = organs.SPINAL_CORD
    mask[1:3, 10:12, 6:8] = organs.GTV
    image = np.zeros(mask.shape, dtype=np.float32)
    image[mask == organs.RIGHT_LUNG] = image[mask == organs.LEFT_LUNG] = -1.5
    image[mask == organs.SPINAL_CORD] = 2.0
    image[mask == organs.GTV] = 1.0
    image[:, 18:22, 14:18] = 1.5  # heart
    if heart_annotated:
        mask[:, 18:22, 14:18] = organs.HEART
    image += np.random.default_rng(seed).normal(0, 0.1, image.shape)
    return image.astype(np.float16), mask


def write_patient(root: Path, pid: str, seed: int, annotated: list[bool]) -> None:
    image, mask = patient_arrays(seed, annotated[organs.HEART])
    folder = root / "processed" / "training_cache" / pid
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "ct.npy", image)
    np.save(folder / "mask.npy", mask)
    meta = {"format": PROCESSED_FORMAT, "patient_id": pid, "shape_zyx": list(mask.shape), "annotated": annotated,
            "ptv": {"source": "contoured"},
            "window": [-1000, 400], "mean": -500.0, "std": 400.0, "size": SIZE,
            "orientation": {"stored": "LPS", "network": "LPS"},
            "original_shape_zyx": list(mask.shape), "original_spacing_xyz": [1.0, 1.0, 2.5],
            "original_origin_xyz": [0.0, 0.0, 0.0], "original_direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
            "slice_labels": slice_label_bits(mask)}
    (folder / "meta.json").write_text(json.dumps(meta))


def write_splits(splits: Path, train: list[str], val: list[str], test: list[str]) -> None:
    splits.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        (splits / f"{name}.txt").write_text("".join(f"{pid}\n" for pid in ids))


@pytest.fixture
def cache(tmp_path) -> tuple[Path, Path]:
    """(data_root, splits_dir): train P1 P2 (all annotated) P3 (no heart), val P4, P5 (no heart)."""
    root = tmp_path / "data"
    for i, annotated in enumerate([[True] * 8, [True] * 8, NO_HEART, [True] * 8, NO_HEART], start=1):
        write_patient(root, f"P{i}", seed=i, annotated=annotated)
    write_splits(tmp_path / "splits", ["P1", "P2", "P3"], ["P4", "P5"], [])
    return root, tmp_path / "splits"


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def test_marginal_ce_hand_values():
    # One pixel labelled background, 3 classes, equal logits: p = 1/3 each.
    logits, target = torch.zeros(1, 3, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long)
    annotated = torch.tensor([[True, True, True]])
    assert marginal_cross_entropy(logits, target, annotated).item() == pytest.approx(math.log(3))
    # Class 2 unannotated: it joins background, p(background or 2) = 2/3.
    annotated = torch.tensor([[True, True, False]])
    assert marginal_cross_entropy(logits, target, annotated).item() == pytest.approx(-math.log(2 / 3))
    # A pixel of an annotated class is unaffected by the merge: -log(1/3).
    target = torch.ones(1, 1, 1, dtype=torch.long)
    assert marginal_cross_entropy(logits, target, annotated).item() == pytest.approx(math.log(3))


def test_marginal_ce_equals_weighted_cross_entropy_when_everything_is_annotated():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 8, 16, 16), torch.randint(0, 8, (2, 16, 16))
    weights = torch.arange(1.0, 9.0)
    annotated = torch.ones(2, 8, dtype=torch.bool)
    expected = F.cross_entropy(logits, target, weight=weights)
    assert torch.allclose(marginal_cross_entropy(logits, target, annotated, weights), expected, atol=1e-6)


def test_soft_dice_hand_value():
    # Background + 1 class on 2x2 pixels, equal logits: p1 = 0.5 everywhere, one true pixel.
    # dice = (2 * 0.5 + 1) / (4 * 0.5 + 1 + 1) = 0.5
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[1, 0], [0, 0]]])
    annotated = torch.tensor([[True, True]])
    assert soft_dice_loss(logits, target, annotated).item() == pytest.approx(0.5)
    # Class unannotated in the only sample: nothing to score, loss 0.
    assert soft_dice_loss(logits, target.clamp(max=0), torch.tensor([[True, False]])).item() == 0.0


def test_perfect_prediction_gives_almost_zero_dice_loss():
    mask = torch.from_numpy(patient_arrays(0, heart_annotated=True)[1][:2].astype(np.int64))
    logits = 30.0 * F.one_hot(mask, 8).permute(0, 3, 1, 2).float()
    annotated = torch.ones(2, 8, dtype=torch.bool)
    assert soft_dice_loss(logits, mask, annotated).item() < 1e-4
    assert multi_organ_loss(logits, mask, annotated, torch.ones(8)).item() < 1e-4


def _logits_and_target(heart_annotated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.from_numpy(patient_arrays(0, heart_annotated)[1][:2].astype(np.int64))
    annotated = torch.ones(2, 8, dtype=torch.bool)
    annotated[0, organs.HEART] = heart_annotated
    return torch.randn(2, 8, SIZE, SIZE), mask, annotated


def _swap_heart_and_background_on_background(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    swapped = logits.clone()
    background = mask[0] == organs.BACKGROUND
    swapped[0, organs.BACKGROUND][background] = logits[0, organs.HEART][background]
    swapped[0, organs.HEART][background] = logits[0, organs.BACKGROUND][background]
    return swapped


def test_unannotated_heart_is_not_taught_as_background():
    logits, mask, annotated = _logits_and_target(heart_annotated=False)
    weights = torch.linspace(1, 3, 8)
    swapped = _swap_heart_and_background_on_background(logits, mask)
    assert not torch.equal(swapped, logits)
    before = multi_organ_loss(logits, mask, annotated, weights)
    after = multi_organ_loss(swapped, mask, annotated, weights)
    assert after.item() == pytest.approx(before.item(), abs=1e-6)


def test_annotated_heart_is_taught():
    logits, mask, annotated = _logits_and_target(heart_annotated=True)
    weights = torch.linspace(1, 3, 8)
    swapped = _swap_heart_and_background_on_background(logits, mask)
    before = multi_organ_loss(logits, mask, annotated, weights)
    after = multi_organ_loss(swapped, mask, annotated, weights)
    assert abs(after.item() - before.item()) > 1e-3


def test_dice_counts_skip_unannotated_pairs():
    target = torch.tensor([[[5, 5], [0, 0]], [[5, 0], [0, 0]]])
    prediction = torch.tensor([[[5, 0], [0, 0]], [[5, 5], [5, 5]]])
    annotated = torch.ones(2, 8, dtype=torch.bool)
    dice = dice_from_counts(dice_counts(prediction, target, annotated, 8))
    assert dice[5] == pytest.approx(2 * 2 / (5 + 3))  # (1 + 1) / ((1 + 4) + (2 + 1))
    annotated[1, 5] = False  # the second sample's heart is unknown: only the first is scored
    dice = dice_from_counts(dice_counts(prediction, target, annotated, 8))
    assert dice[5] == pytest.approx(2 * 1 / (1 + 2))
    assert math.isnan(dice[organs.GTV])  # neither present nor predicted


def test_loss_shape_errors():
    with pytest.raises(ValueError, match=r"annotated must be bool \(N, C\) = \(1, 8\)"):
        multi_organ_loss(torch.zeros(1, 8, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long),
                         torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target must be \(N, H, W\) = \(1, 4, 4\)"):
        multi_organ_loss(torch.zeros(1, 8, 4, 4), torch.zeros(4, 4, dtype=torch.long),
                         torch.ones(1, 8, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------------------------
def test_class_weights_count_only_annotating_patients(cache):
    root, _ = cache
    record = training.compute_class_weights(root, ["P1", "P2", "P3"])
    volume = SLICES * SIZE * SIZE  # 4096 pixels per patient
    # heart: 16 px x 4 slices in P1 and P2 only (P3 does not annotate it)
    assert record["pixel_counts"][organs.HEART] == 2 * 64
    assert record["annotated_pixels"][organs.HEART] == 2 * volume
    assert record["annotated_pixels"][organs.RIGHT_LUNG] == 3 * volume
    assert record["pixel_counts"][organs.GTV] == 3 * 2 * 4
    assert record["pixel_counts"][organs.PTV] == 0
    background = 3 * volume - 3 * (2 * 256 + 16) - 2 * 64  # all pixels minus labelled ones
    assert record["pixel_counts"][0] == background
    f_bg = background / (3 * volume)
    assert record["weights"][organs.HEART] == pytest.approx(math.sqrt(f_bg / (128 / (2 * volume))), abs=1e-5)
    assert math.sqrt(f_bg / (24 / (3 * volume))) > 10 and record["weights"][organs.GTV] == 10.0  # capped
    assert record["weights"][0] == 1.0 and record["weights"][organs.PTV] == 1.0  # PTV: never seen


def test_class_weights_cached_reused_and_recomputed_when_the_split_changes(cache, monkeypatch):
    root, splits = cache
    weights, reused = training.load_or_compute_class_weights(root, splits, ["P1", "P2", "P3"])
    assert not reused
    stored = json.loads((splits / "class_weights.json").read_text())
    assert stored["weights"] == weights and stored["n_patients"] == 3

    def forbidden(*args, **kwargs):
        raise AssertionError("class weights recomputed although cached")

    with monkeypatch.context() as patch:
        patch.setattr(training, "compute_class_weights", forbidden)
        assert training.load_or_compute_class_weights(root, splits, ["P3", "P1", "P2"]) == (weights, True)

    new_weights, reused = training.load_or_compute_class_weights(root, splits, ["P1", "P3"])
    assert not reused and new_weights != weights
    assert json.loads((splits / "class_weights.json").read_text())["fingerprint"] != stored["fingerprint"]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def test_epoch_sampler_shares_one_draw_across_ranks_and_depends_on_the_epoch():
    data = list(range(10))
    samplers = [training.EpochSampler(data, num_replicas=2, rank=r, seed=3, with_seeds=True) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(4)
    shares = [list(s) for s in samplers]
    indices = sorted(i for share in shares for i, _ in share)
    assert indices == data  # a permutation split between the ranks, nothing lost or repeated
    assert list(samplers[0]) == shares[0]  # same epoch, same draw and seeds
    samplers[0].set_epoch(5)
    assert list(samplers[0]) != shares[0]
    weighted = training.EpochSampler(data, seed=0, weights=torch.tensor([0.0] * 9 + [1.0]))
    assert list(weighted) == [9] * 10


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------
def test_training_writes_the_run_folder(cache):
    root, splits = cache
    out = cache[1].parent / "run"
    result = tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=2, **TINY)
    assert result.stop_reason == "epochs" and len(result.history) == 2
    for name in ("best_unet_multi_organ.pth", "last_checkpoint.pth", "history.csv", "history.json",
                 "training_curves.png", "train.log"):
        assert (out / name).is_file(), name
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["epoch", "train_loss", "val_loss"]
    assert [f"dice_{s.key}" for s in organs.STRUCTURES[1:]] == header[3:10]
    log_text = (out / "train.log").read_text()
    assert '"base_channels": 4' in log_text and '"lr": 0.001' in log_text
    row = json.loads((out / "history.json").read_text())[-1]
    assert row["train_slices"] == 12 and row["epoch"] == 2
    assert math.isnan(row["dice_ptv"]) or row["dice_ptv"] == 0.0  # PTV: never annotated here

    best = torch.load(out / "best_unet_multi_organ.pth", weights_only=True)
    assert best["preprocessing"] == {"window": [-1000.0, 400.0], "size": SIZE, "zscore": "per_patient", "crop": None}
    assert best["epoch"] == result.best_epoch and "optimizer_state" not in best
    model, _ = load_checkpoint_model(out / "best_unet_multi_organ.pth", "cpu")
    assert model.base_channels == 4
    last = torch.load(out / "last_checkpoint.pth", weights_only=True)
    assert last["epoch"] == 2 and last["epochs_without_improvement"] in (0, 1)


def test_checkpoints_carry_the_training_patients_structure_volumes(cache):
    """Prediction's quality check flags a volume outside the training patients': both checkpoints store
    their distribution per structure, over the patients annotating it, in ml of the cache's voxels."""
    root, splits = cache
    out = splits.parent / "volumes"
    tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=1, **TINY)
    voxel_ml = 2.5 * 1.0 * 1.0 / 1000  # 2.5 mm slices, 32 px of 1 mm resized to 32

    def same(ml: float, n: int = 3) -> dict:
        return {"n": n, **{k: pytest.approx(ml) for k in ("min_ml", "q1_ml", "median_ml", "q3_ml", "max_ml")}}

    for name in ("best_unet_multi_organ.pth", "last_checkpoint.pth"):
        record = torch.load(out / name, weights_only=True)["training_volumes"]
        assert (record["source"], record["patients"]) == (training.TRAINING_VOLUMES_SOURCE, 3)  # P1 P2 P3
        assert record["structures"] == {
            "gtv": same(8 * voxel_ml), "ptv": same(8 * voxel_ml),  # a contoured PTV: labels GTV + PTV
            "lung_right": same(248 * voxel_ml),  # 8 x 8 x 4 less the GTV's 2 x 2 x 2
            "lung_left": same(256 * voxel_ml), "heart": same(64 * voxel_ml, n=2),  # P3 has no heart contoured
            "esophagus": same(0.0), "spinal_cord": same(16 * voxel_ml)}
    from thoracic_seg.inference import Predictor

    assert Predictor.load(out / "best_unet_multi_organ.pth", device="cpu").training_volumes == record


def test_training_volumes_use_the_cache_voxel_size(cache):
    root, _ = cache
    meta_path = root / "processed" / "training_cache" / "P1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["original_shape_zyx"] = [SLICES, 64, 64]  # 64 px of 1 mm resized to 32: 2 x 2 mm pixels
    meta_path.write_text(json.dumps(meta))
    record = training.training_volumes(root, ["P1", "P2"])
    assert record["structures"]["lung_left"]["max_ml"] == pytest.approx(256 * 2.5 * 2 * 2 / 1000)
    assert record["structures"]["lung_left"]["min_ml"] == pytest.approx(256 * 2.5 / 1000)
    del meta["original_spacing_xyz"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"P1: .*meta.json has no grid geometry .*re-run normalize_ct_and_masks.py"):
        training.training_volumes(root, ["P1"])


def test_resume_continues_exactly(cache):
    root, splits = cache
    options = dict(data_root=root, splits_dir=splits, augment=True, tumour_oversampling=0.5,
                   lr_schedule="cosine", **TINY)
    straight = tm.run(output_dir=splits.parent / "straight", epochs=3, **options)
    tm.run(output_dir=splits.parent / "resumed", epochs=1, **options)
    resumed = tm.run(output_dir=splits.parent / "resumed", epochs=3,
                     resume=splits.parent / "resumed" / "last_checkpoint.pth", **options)
    assert len(resumed.history) == 3
    assert [row["lr"] for row in resumed.history] == pytest.approx([1e-3, (1e-3 + 1e-5) / 2, 1e-5])
    for a, b in zip(straight.history[1:], resumed.history[1:]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_resume_refuses_a_best_checkpoint_and_another_width(cache):
    root, splits = cache
    out = splits.parent / "run"
    tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=1, **TINY)
    with pytest.raises(ValueError, match="best checkpoints hold no optimizer state"):
        tm.run(data_root=root, splits_dir=splits, epochs=2, resume=out / "best_unet_multi_organ.pth")
    with pytest.raises(ValueError, match="--base-channels 8 differs from the resumed checkpoint's 4"):
        tm.run(data_root=root, splits_dir=splits, epochs=2, resume=out, **(TINY | {"base_channels": 8}))
    with pytest.raises(ValueError, match=r"--lr 0.5 differs from the resumed run's .*would not continue"):
        tm.run(data_root=root, splits_dir=splits, epochs=2, resume=out, **(TINY | {"lr": 0.5}))
    with pytest.raises(ValueError, match="already holds a training run: continue it with --resume"):
        tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=2, **TINY)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache, monkeypatch):
    root, splits = cache
    out = splits.parent / "run"
    real_loss = tm.multi_organ_loss
    calls = {"train": 0}

    def loss_going_nan(logits, *args):
        loss = real_loss(logits, *args)
        if torch.is_grad_enabled():  # training steps only (validation runs under no_grad)
            calls["train"] += 1
            if calls["train"] > 3:  # epoch 1 has 3 steps; the first of epoch 2 goes wrong
                return loss * float("nan")
        return loss

    monkeypatch.setattr(tm, "multi_organ_loss", loss_going_nan)
    with pytest.raises(training.NonFiniteLossError,
                       match=r"non-finite training loss at epoch 2, step 1: training stopped\. "
                             r"The last good checkpoint is .*last_checkpoint.pth \(epoch 1\)"):
        tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=3, **TINY)
    last = torch.load(out / "last_checkpoint.pth", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_main_reports_a_non_finite_loss_in_one_line(cache, monkeypatch, capsys):
    root, splits = cache
    monkeypatch.setattr(tm, "multi_organ_loss", lambda logits, *a: logits.sum() * float("inf"))
    argv = ["--data-root", str(root), "--splits-dir", str(splits), "--output-dir", str(splits.parent / "r"),
            "--base-channels", "4", "--device", "cpu", "--epochs", "1", "--log-every", "1"]
    assert tm.main(argv) == 1
    err = capsys.readouterr().err
    assert "ERROR train_multi_organ: non-finite training loss at epoch 1, step 1" in err
    assert "No checkpoint was written yet" in err and "Traceback" not in err


def test_early_stopping_on_the_validation_loss(cache, monkeypatch):
    root, splits = cache
    epochs_validated = []

    def worsening_validation(model, loader, weights, runtime):
        epochs_validated.append(1)
        return float(len(epochs_validated)), [0.5] * 8

    monkeypatch.setattr(tm, "validate", worsening_validation)
    result = tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "r", epochs=10,
                    patience=2, **TINY)
    # val loss 1, 2, 3: best at epoch 1, no improvement in epochs 2 and 3 -> stop after epoch 3
    assert [row["val_loss"] for row in result.history] == [1.0, 2.0, 3.0]
    assert result.best_epoch == 1 and result.stop_reason.startswith("early stopping")
    assert torch.load(result.best_checkpoint, weights_only=True)["epoch"] == 1


def test_max_steps_stops_mid_epoch_and_still_saves_with_bfloat16_on_cpu(cache):
    root, splits = cache
    result = tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "r", epochs=5,
                    max_steps=2, **(TINY | {"amp": True}))
    log_text = (splits.parent / "r" / "train.log").read_text()
    assert '"amp": "bfloat16"' in log_text
    assert '"grad_scaler": false' in log_text and '"channels_last": true' in log_text
    assert math.isfinite(result.history[0]["train_loss"])
    assert len(result.history) == 1 and result.history[0]["partial_epoch"] is True
    assert result.history[0]["train_slices"] == 8 and "--max-steps" in result.stop_reason
    assert result.best_checkpoint.is_file()


def test_empty_validation_split_selects_on_the_training_loss(cache):
    root, splits = cache
    (splits / "val.txt").write_text("")
    result = tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "r", epochs=2, **TINY)
    assert all(math.isnan(row["val_loss"]) for row in result.history)
    best = min(result.history, key=lambda row: row["train_loss"])
    assert result.best_epoch == best["epoch"] and result.best_val_loss == best["train_loss"]
    assert "val.txt lists no patient" in (splits.parent / "r" / "train.log").read_text()


def test_missing_split_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="split file .*train.txt not found"):
        tm.run(data_root=tmp_path, splits_dir=tmp_path / "nosplits", output_dir=tmp_path / "r", **TINY)


@pytest.mark.parametrize("argv, message", [
    (["--tumour-oversampling", "1.5"], "must be a fraction in (0, 1), got 1.5"),
    (["--time-limit", "soon"], "expected seconds or a duration like 5m or 1.5h, got 'soon'"),
    (["--time-limit=-5m"], "--time-limit must be > 0 seconds, got -300.0"),
    (["--lr", "0"], "must be > 0, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tm.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"epochs": 0}, "^--epochs must be >= 1, got 0$"),
    ({"batch_size": -2}, "^--batch-size must be >= 1, got -2$"),
    ({"max_steps": 0}, "^--max-steps must be >= 1, got 0$"),
    ({"base_channels": 0}, "^--base-channels must be >= 1, got 0$"),
    ({"lr": 0.0}, r"^--lr must be > 0, got 0.0$"),
    ({"lr_schedule": "step"}, "^lr_schedule must be one of constant, cosine, got 'step'$"),
    ({"context_slices": 9}, "^context slices must be an integer in 0-8, got 9$"),
    ({"tumour_oversampling": 1.5}, r"^--tumour-oversampling must be a fraction in \(0, 1\), got 1.5$"),
    ({"time_limit": 0}, "^--time-limit must be > 0 seconds, got 0$"),
    ({"workers": -1}, "^--workers must be >= 0, got -1$"),
    ({"device": "tpu"}, "^--device must be auto, cuda or cpu, got tpu$"),
])
def test_bad_options_are_refused_by_the_configuration_before_any_work(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        training.TrainConfig(**options)
    with pytest.raises(ValueError, match=message):
        tm.run(output_dir=tmp_path / "r", **options)
    assert not (tmp_path / "r").exists()


def test_the_configuration_is_frozen_and_stored_with_the_run(cache):
    root, splits = cache
    config = training.TrainConfig(data_root=root, epochs=2)
    with pytest.raises(AttributeError):
        config.epochs = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        tm.run(data_root=root, splits_dir=splits, epoch=2)
    out = splits.parent / "run"
    tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=1, **TINY)
    stored = torch.load(out / "last_checkpoint.pth", weights_only=True)["train_config"]
    assert list(stored) == [f.name for f in dataclasses.fields(training.TrainConfig)]
    assert stored == training.TrainConfig(data_root=root, splits_dir=splits, output_dir=out, epochs=1,
                                          **TINY).jsonable()


def test_learning_rate_schedules():
    assert training.learning_rate(1e-3, 0.6, "constant") == 1e-3
    assert training.learning_rate(1e-3, 0.0, "cosine") == pytest.approx(1e-3)
    assert training.learning_rate(1e-3, 0.5, "cosine") == pytest.approx((1e-3 + 1e-5) / 2)
    assert training.learning_rate(1e-3, 1.0, "cosine") == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'step'"):
        training.learning_rate(1e-3, 0.0, "step")
    assert training.training_progress(1, 11) == 0.0 and training.training_progress(6, 11) == 0.5
    assert training.training_progress(3, 11, elapsed=90, time_limit=100) == 0.9  # time runs out first
    assert training.training_progress(11, 11, elapsed=10, time_limit=100) == 1.0
    assert training.training_progress(5, 1) == 0.0
    # --max-steps 1470 of 105-step epochs with --epochs 30: the schedule ends with the steps
    # (epoch 14 starts at 1365 steps, 93%), not at epoch 30 (45%).
    assert training.training_progress(14, 30, steps_done=1365, max_steps=1470) == pytest.approx(1365 / 1470)
    assert training.training_progress(14, 30, steps_done=1365) == pytest.approx(13 / 29)
    assert training.training_progress(29, 30, steps_done=10, max_steps=1470) == pytest.approx(28 / 29)


def test_duration_choices():
    assert tm._seconds("90") == 90 and tm._seconds("5m") == 300 and tm._seconds("1.5h") == 5400


@pytest.mark.parametrize("amp, native, expected", [
    (None, True, Precision(torch.bfloat16, False, True)),
    (None, False, Precision(None, False, True)),
    (True, False, Precision(torch.bfloat16, False, True)),
    (False, True, Precision(None, False, True)),
])
def test_runtime_takes_the_training_precision_policy(monkeypatch, amp, native, expected):
    """The table of the policy itself is in test_precision.py; here: setup_runtime follows it."""
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: native)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # leave the thread count alone
    assert training.setup_runtime("cpu", amp).precision == expected


# --------------------------------------------------------------------------------------------
# torchrun: 2 processes on CPU with gloo
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_end_with_identical_weights_and_one_checkpoint(cache, tmp_path):
    root, splits = cache
    out = tmp_path / "ddp"
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import train_multi_organ as tm
        result = tm.run(data_root={str(root)!r}, splits_dir={str(splits)!r}, output_dir={str(out)!r},
                        epochs=2, max_steps=3, base_channels=4, batch_size=2, lr=1e-3, device="cpu", amp=False,
                        workers=0, log_every=1)
        torch.save(result.model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
        print("history", result.history)
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    written = sorted(p.name for p in out.iterdir())
    assert written == ["best_unet_multi_organ.pth", "history.csv", "history.json",
                       "last_checkpoint.pth", "train.log", "training_curves.png"]
    saved = torch.load(out / "last_checkpoint.pth", weights_only=True)["model_state"]
    for name, value in rank0.items():
        assert torch.equal(saved[name], value), name
    # 12 training slices, 2 ranks x batch 2: 3 steps = 12 slices in total, seen once
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_slices"] == 12


# --------------------------------------------------------------------------------------------
# The PTV: derived (not taught, its margin stored with the run) or contoured (a label)
# --------------------------------------------------------------------------------------------
def _set_ptv(root: Path, pid: str, ptv: dict, ptv_annotated: bool, paint_ptv: bool = False) -> None:
    """Rewrite a cached patient as phase 3 would for a derived or a contoured PTV."""
    folder = root / "processed" / "training_cache" / pid
    meta = json.loads((folder / "meta.json").read_text())
    meta["ptv"], meta["annotated"][organs.PTV] = ptv, ptv_annotated
    if paint_ptv:  # a PTV contour around the GTV: a ring of label 2, the GTV keeps its voxels
        mask = np.load(folder / "mask.npy")
        ring = np.zeros(mask.shape, dtype=bool)
        ring[1:3, 9:13, 5:9] = True
        mask[ring & (mask != organs.GTV)] = organs.PTV
        np.save(folder / "mask.npy", mask)
        meta["slice_labels"] = slice_label_bits(mask)
    (folder / "meta.json").write_text(json.dumps(meta))


DERIVED = {"source": "derived", "margin_mm": 10.0}


def test_ptv_of_patients(cache):
    root, _ = cache
    assert training.ptv_of_patients(root, ["P1", "P2"]) == {"source": "contoured"}
    for pid in ("P1", "P2", "P3"):
        _set_ptv(root, pid, DERIVED, False)
    assert training.ptv_of_patients(root, ["P1", "P2", "P3"]) == DERIVED
    assert training.ptv_of_patients(root, ["P1", "P4"]) == {"source": "contoured", "margin_mm": 10.0}  # mixed
    _set_ptv(root, "P5", {"source": "none"}, False)
    assert training.ptv_of_patients(root, ["P5"]) == {"source": "none"}
    _set_ptv(root, "P3", {"source": "derived", "margin_mm": 5.0}, False)
    with pytest.raises(ValueError, match=r"derived with different margins \(5 mm: P3; 10 mm: P1, P2\); "
                                         "re-run extract_multi_organ_masks.py --overwrite"):
        training.ptv_of_patients(root, ["P1", "P2", "P3"])


def test_derived_ptv_is_not_taught_and_its_margin_travels_with_the_run(cache):
    root, splits = cache
    for pid in ("P1", "P2", "P3", "P4", "P5"):
        _set_ptv(root, pid, DERIVED, False)
    out = splits.parent / "derived"
    result = tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=1, **TINY)
    best = torch.load(out / "best_unet_multi_organ.pth", weights_only=True)
    assert best["ptv"] == DERIVED and math.isnan(result.history[-1]["dice_ptv"])  # not scored: not annotated
    weights = json.loads((splits / "class_weights.json").read_text())
    assert weights["annotated_pixels"][organs.PTV] == 0 and weights["weights"][organs.PTV] == 1.0


def test_a_contoured_ptv_is_still_trained_and_scored_as_a_label(cache):
    root, splits = cache
    for pid in ("P1", "P4"):
        _set_ptv(root, pid, {"source": "contoured"}, True, paint_ptv=True)
    out = splits.parent / "contoured"
    result = tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=1, **TINY)
    best = torch.load(out / "best_unet_multi_organ.pth", weights_only=True)
    assert best["ptv"]["source"] == "contoured"
    assert not math.isnan(result.history[-1]["dice_ptv"])  # P4 (validation) has a PTV label: scored
    weights = json.loads((splits / "class_weights.json").read_text())
    assert weights["pixel_counts"][organs.PTV] == 2 * (16 - 4)  # P1's ring: 2 slices x (4x4 - GTV 2x2)


def test_a_cache_of_an_earlier_version_is_refused(cache):
    root, splits = cache
    meta_path = root / "processed" / "training_cache" / "P2" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["format"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="P2: .*earlier version.*re-run extract_multi_organ_masks.py --overwrite, "
                                         "then normalize_ct_and_masks.py --overwrite"):
        tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "old", epochs=1, **TINY)


# --------------------------------------------------------------------------------------------
# Resume after a cut: a fake clock (1 s per training step), never the wall clock
# --------------------------------------------------------------------------------------------
class Killed(Exception):
    """Stands for SIGKILL in-process: the run dies without writing anything more."""


class TrainingTrace:
    """A fake training clock (one second per training step, nothing else takes time) and a
    record of every step: the lr, and the bytes of the slices (with their augmentation) trained on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now, self.kill_at, self.steps = 0.0, None, []
        monkeypatch.setattr(training, "clock", lambda: self.now)
        real_loss, real_to_device, real_step = tm.multi_organ_loss, tm._to_device, torch.amp.GradScaler.step
        trace = self

        def loss(logits, *args):
            if torch.is_grad_enabled():  # a training step (validation runs under no_grad)
                trace.now += 1.0
                if trace.kill_at is not None and trace.now >= trace.kill_at:
                    trace.kill_at = None
                    raise Killed
            return real_loss(logits, *args)

        def to_device(batch, runtime):
            if torch.is_grad_enabled():
                trace.batch = tuple(image.numpy().tobytes() for image in batch["image"])
            return real_to_device(batch, runtime)

        def step(scaler, optimizer, *args, **kwargs):
            trace.steps.append((optimizer.param_groups[0]["lr"], trace.batch))
            return real_step(scaler, optimizer, *args, **kwargs)

        monkeypatch.setattr(tm, "multi_organ_loss", loss)
        monkeypatch.setattr(tm, "_to_device", to_device)
        monkeypatch.setattr(torch.amp.GradScaler, "step", step)


CUT_OPTIONS = dict(augment=True, tumour_oversampling=0.5, lr_schedule="cosine", **TINY)


def _same_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            if isinstance(value, float):
                assert row_b[key] == pytest.approx(value, abs=1e-6, nan_ok=True), (row_a["epoch"], key)
            else:
                assert row_b[key] == value, (row_a["epoch"], key)


def _same_weights(a: dict, b: dict) -> None:
    for name, value in a.items():
        assert torch.allclose(value.float(), b[name].float(), atol=1e-6), name


def test_a_killed_run_resumed_keeps_the_time_based_schedule_and_the_whole_run_time_limit(cache, monkeypatch):
    """--time-limit 10 s with 3 steps per epoch: epochs start at 0, 3, 6, 9 s and the limit cuts
    epoch 4 after its first step. Killed at 5 s (in epoch 2) and resumed, the run continues the
    clock of its checkpoint (3 s), not 0: same lr per step, same slices, same weights."""
    root, splits = cache
    trace = TrainingTrace(monkeypatch)
    straight = tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "straight", epochs=10,
                      time_limit=10, **CUT_OPTIONS)
    assert [row["lr"] for row in straight.history] == pytest.approx(
        [training.learning_rate(1e-3, t / 10, "cosine") for t in (0, 3, 6, 9)])
    assert straight.history[-1]["partial_epoch"] and len(trace.steps) == 10
    straight_steps, trace.steps, trace.now = trace.steps, [], 100.0  # another process, another clock

    out = splits.parent / "killed"
    trace.kill_at = 105.0
    with pytest.raises(Killed):
        tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=10, time_limit=10, **CUT_OPTIONS)
    last = torch.load(out / "last_checkpoint.pth", weights_only=True)
    assert (last["epoch"], last["steps_done"], last["training_seconds"]) == (1, 3, 3.0)
    trace.steps, trace.now = [], 1000.0
    resumed = tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=10, time_limit=10,
                     resume=out / "last_checkpoint.pth", **CUT_OPTIONS)
    assert trace.steps == straight_steps[3:]  # same lr, same slices and augmentations, step by step
    assert resumed.stop_reason == straight.stop_reason == "--time-limit"
    _same_history(straight.history, resumed.history)
    _same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert torch.load(out / "last_checkpoint.pth", weights_only=True)["training_seconds"] == 10.0


def test_an_epoch_cut_by_a_limit_is_finished_by_resume_as_if_never_cut(cache, monkeypatch):
    """Cut by --time-limit 2 s in epoch 1 (after 2 of its 3 steps), resumed with --max-steps 7
    (cut again in epoch 3, after 1 of its steps), resumed again without a limit: the same steps,
    lr, slices, history, weights and best checkpoint as a run never cut. The cut snapshots are
    made to validate best, so the best checkpoint they replaced must come back. (Both limits also
    end the cosine schedule; they are chosen where that does not move it: at epoch 1's start
    progress is 0 either way, and epoch 3 is the last epoch, at progress 1 either way.)"""
    root, splits = cache
    trace = TrainingTrace(monkeypatch)
    real_validate, real_train_one_epoch = tm.validate, tm.train_one_epoch
    cut = {"partial": False}

    def train_one_epoch(*args, **kwargs):
        part, cut["partial"] = real_train_one_epoch(*args, **kwargs)
        return part, cut["partial"]

    def validate(*args):  # a cut snapshot always looks best; complete epochs are scored as they are
        loss, dice = real_validate(*args)
        return (loss - 100.0 if cut["partial"] else loss), dice

    monkeypatch.setattr(tm, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(tm, "validate", validate)
    options = dict(data_root=root, splits_dir=splits, epochs=3, **CUT_OPTIONS)
    straight = tm.run(output_dir=splits.parent / "straight", **options)
    assert len(trace.steps) == 9 and not any(row["partial_epoch"] for row in straight.history)
    straight_steps, trace.steps = trace.steps, []

    out = splits.parent / "cut"
    first = tm.run(output_dir=out, time_limit=2, **options)
    assert [(row["epoch"], row["train_slices"], row["partial_epoch"]) for row in first.history] == [(1, 8, True)]
    last = torch.load(out / "last_checkpoint.pth", weights_only=True)
    assert last["cut_epoch"]["part"]["steps"] == 2 and last["cut_epoch"]["part"]["slices"] == 8
    assert "best_before" not in last["cut_epoch"]  # no earlier best checkpoint to keep
    again = tm.run(output_dir=out, time_limit=2, resume=out, **options)  # the limit is the whole run's
    assert again.stop_reason == "--time-limit" and len(trace.steps) == 2
    assert again.history[-1]["partial_epoch"]

    second = tm.run(output_dir=out, max_steps=7, resume=out, **options)
    assert [(row["epoch"], row["partial_epoch"]) for row in second.history] == [(1, False), (2, False), (3, True)]
    last = torch.load(out / "last_checkpoint.pth", weights_only=True)
    assert last["steps_done"] == 7 and last["cut_epoch"]["part"]["steps"] == 1
    best_complete = min(second.history[:2], key=lambda row: row["val_loss"])["epoch"]
    assert last["cut_epoch"]["best_before"]["epoch"] == best_complete  # the snapshot replaced it
    assert torch.load(out / "best_unet_multi_organ.pth", weights_only=True)["val_loss"] < -90

    final = tm.run(output_dir=out, resume=out, **options)
    assert trace.steps == straight_steps  # lr and slices of every step, across the three invocations
    _same_history(straight.history, final.history)
    _same_history(straight.history, json.loads((out / "history.json").read_text()))
    _same_weights(straight.model.state_dict(), final.model.state_dict())
    assert final.best_epoch == straight.best_epoch and final.best_val_loss == pytest.approx(straight.best_val_loss)
    best = torch.load(out / "best_unet_multi_organ.pth", weights_only=True)
    straight_best = torch.load(splits.parent / "straight" / "best_unet_multi_organ.pth", weights_only=True)
    assert best["epoch"] == straight_best["epoch"] and best["val_loss"] == pytest.approx(straight_best["val_loss"])
    _same_weights(straight_best["model_state"], best["model_state"])
    assert "cut_epoch" not in torch.load(out / "last_checkpoint.pth", weights_only=True)
    assert not (out / ".partial").exists()


def test_max_steps_ends_the_cosine_schedule(cache):
    """--epochs 30 --max-steps 6 with 3 steps an epoch: epochs 1 and 2 start at progress 0 and 3/6
    (not 1/29), so the second trains at the cosine's midpoint."""
    root, splits = cache
    result = tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "cosine-steps", epochs=30,
                    max_steps=6, patience=30, **CUT_OPTIONS)
    assert [row["lr"] for row in result.history] == pytest.approx(
        [training.learning_rate(TINY["lr"], p, "cosine") for p in (0.0, 0.5)])
    assert "max-steps (6 steps)" in result.stop_reason


def test_epoch_sampler_skips_the_part_of_a_cut_epoch():
    data = list(range(10))
    sampler = training.EpochSampler(data, num_replicas=2, rank=1, seed=3, with_seeds=True)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, skip=3)
    assert list(sampler) == whole[3:] and len(sampler) == 2
    with pytest.raises(ValueError, match="skip must be 0-5 .*got 6"):
        sampler.set_epoch(2, skip=6)


def test_slice_context_trains_a_2k_plus_1_channel_network_and_resume_keeps_k(cache):
    root, splits = cache
    out = splits.parent / "k1"
    tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=1, context_slices=1, **TINY)
    best = torch.load(out / "best_unet_multi_organ.pth", weights_only=True)
    assert best["context_slices"] == 1 and best["model_config"]["in_channels"] == 3
    with pytest.raises(ValueError, match="--context-slices 0 differs from the resumed run's 1"):
        tm.run(data_root=root, splits_dir=splits, output_dir=out, epochs=2, resume=out / "last_checkpoint.pth",
               **TINY)
    with pytest.raises(ValueError, match="context slices must be an integer in 0-8, got -1"):
        tm.run(data_root=root, splits_dir=splits, output_dir=splits.parent / "bad", context_slices=-1, **TINY)


def test_scanner_augmentation_is_stored_resumed_exactly_and_refused_when_changed(cache):
    """--augment-scanner threads into the configuration, the log and the last checkpoint; its slices
    depend only on (seed, epoch), so a resumed run ends with the weights of an uninterrupted one."""
    root, splits = cache
    assert tm.build_parser().parse_args(["--augment-scanner"]).augment_scanner is True
    assert tm.build_parser().parse_args([]).augment_scanner is False
    options = dict(data_root=root, splits_dir=splits, augment_scanner=True, context_slices=1, **TINY)
    straight = tm.run(output_dir=splits.parent / "straight", epochs=2, **options)
    tm.run(output_dir=splits.parent / "resumed", epochs=1, **options)
    resumed = tm.run(output_dir=splits.parent / "resumed", epochs=2, resume=splits.parent / "resumed", **options)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    last = torch.load(splits.parent / "straight" / "last_checkpoint.pth", weights_only=True)
    assert last["train_config"]["augment_scanner"] is True
    assert "ScannerAugmentation(p=0.5, kernel=(-1.0, 1.0)" in (splits.parent / "straight" / "train.log").read_text()
    plain = tm.run(output_dir=splits.parent / "plain", epochs=1, **(options | {"augment_scanner": False}))
    first = torch.load(splits.parent / "resumed" / "last_checkpoint.pth", weights_only=True)["history"][0]
    assert plain.history[0]["train_loss"] != first["train_loss"]  # the slices were re-rendered
    with pytest.raises(ValueError, match="--augment-scanner False differs from the resumed run's True"):
        tm.run(output_dir=splits.parent / "resumed", epochs=3, resume=splits.parent / "resumed",
               **(options | {"augment_scanner": False}))
