"""The U-Net of phase 5: architecture size, shapes, input checks and the checkpoint format."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from thoracic_seg import organs
from unet_multi_organ import (
    UNetMultiOrgan, build_checkpoint, count_parameters, label_table, load_checkpoint_model,
    preprocessing_from_cache, unwrap_model,
)

PREPROCESSING = {"window": [-1000.0, 400.0], "size": 32, "zscore": "per_patient"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_default_network_has_31_036_936_parameters():
    model = UNetMultiOrgan()
    assert count_parameters(model) == 31_036_936
    assert model.config == {"in_channels": 1, "out_channels": 8, "base_channels": 64}


# Hand count for width c (convs without bias + BatchNorm weight/bias; transposed convs and the
# output conv with bias): inc 9c^2+13c; down1-4 54c^2+8c, 216c^2+16c, 864c^2+32c, 3456c^2+64c;
# up1-4 2240c^2+40c, 560c^2+20c, 140c^2+10c, 35c^2+5c; outc 8c+8  ->  7574c^2 + 216c + 8.
@pytest.mark.parametrize("base, expected", [(4, 122_056), (8, 486_472), (16, 1_942_408),
                                            (64, 7574 * 64**2 + 216 * 64 + 8)])
def test_parameter_count_follows_the_hand_count(base, expected):
    assert count_parameters(UNetMultiOrgan(base_channels=base)) == expected


@pytest.mark.parametrize("batch, height, width", [(1, 32, 32), (3, 32, 32), (3, 48, 64)])
def test_output_shape_is_logits_per_class(batch, height, width):
    model = UNetMultiOrgan(base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 1, height, width))
    assert out.shape == (batch, 8, height, width)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("height, width", [(40, 40), (32, 24), (8, 8)])
def test_size_not_divisible_by_16_is_refused_naming_the_size(height, width):
    model = UNetMultiOrgan(base_channels=4)
    with pytest.raises(ValueError, match=f"input size {height}x{width} is not divisible by 16"):
        model(torch.zeros(1, 1, height, width))


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\), got \(2, 3, 32, 32\)"):
        UNetMultiOrgan(base_channels=4)(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("kwargs", [{"base_channels": 0}, {"out_channels": -1}, {"in_channels": 1.5},
                                    {"base_channels": True}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        UNetMultiOrgan(**kwargs)


def test_label_table_comes_from_organs():
    table = label_table()
    assert table == {str(s.label): s.key for s in organs.STRUCTURES}
    assert table["0"] == "background" and table["5"] == "heart" and len(table) == 8


def _write_checkpoint(tmp_path: Path, base: int = 4) -> tuple[Path, UNetMultiOrgan]:
    torch.manual_seed(0)
    model = UNetMultiOrgan(base_channels=base)
    checkpoint = build_checkpoint(model, preprocessing=PREPROCESSING, epoch=3, val_loss=0.25,
                                  val_dice={"heart": 0.5})
    path = tmp_path / "best.pth"
    torch.save(checkpoint, path)
    return path, model


def test_checkpoint_loads_with_weights_only_and_restores_the_model(tmp_path):
    path, model = _write_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "unet_multi_organ" and raw["format_version"] == 1
    assert raw["model_config"] == {"in_channels": 1, "out_channels": 8, "base_channels": 4}
    assert raw["labels"]["7"] == "spinal_cord"
    assert raw["preprocessing"] == PREPROCESSING
    assert raw["epoch"] == 3 and raw["val_loss"] == 0.25 and raw["val_dice"] == {"heart": 0.5}

    loaded, checkpoint = load_checkpoint_model(path, "cpu")
    assert not loaded.training  # ready for inference
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert checkpoint["epoch"] == 3


def test_checkpoint_of_a_wrapped_model_stores_the_plain_weights(tmp_path):
    model = UNetMultiOrgan(base_channels=4)

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(model)) is model
    checkpoint = build_checkpoint(Wrapper(model), preprocessing=PREPROCESSING, epoch=1, val_loss=1.0)
    assert set(checkpoint["model_state"]) == set(model.state_dict())


def test_load_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.pth: not a unet_multi_organ checkpoint \(torch.load failed"):
        load_checkpoint_model(path)


def test_load_refuses_someone_elses_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": UNetMultiOrgan(base_channels=4).state_dict()}, path)
    with pytest.raises(ValueError, match=r"other.pth: not a unet_multi_organ checkpoint \(format None"):
        load_checkpoint_model(path)


def test_load_refuses_weights_that_do_not_match_the_config(tmp_path):
    path, _ = _write_checkpoint(tmp_path, base=4)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"]["base_channels"] = 8
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"weights do not match model_config .*'base_channels': 8"):
        load_checkpoint_model(path)


def test_load_refuses_a_newer_format_and_a_missing_file(tmp_path):
    path, _ = _write_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["format_version"] = 2
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="format version 2 is not supported"):
        load_checkpoint_model(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint_model(tmp_path / "missing.pth")


def test_preprocessing_is_read_from_the_cache_meta(tmp_path):
    folder = tmp_path / "training_cache" / "P1"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"window": [-900, 300], "size": 96}))
    assert preprocessing_from_cache(tmp_path / "training_cache") == {
        "window": [-900.0, 300.0], "size": 96, "zscore": "per_patient", "crop": None}
    with pytest.raises(ValueError, match="no <patient>/meta.json in training cache"):
        preprocessing_from_cache(tmp_path / "empty")


def test_preprocessing_carries_the_crop_settings_and_refuses_a_mixed_cache(tmp_path):
    """Phase 3's --crop-body settings (not the per-patient box) go into the checkpoint; a cache
    where some patients were cropped and others not (or with another margin, or to a field of
    view) is refused."""
    cache = tmp_path / "training_cache"
    crop = {"method": "body", "threshold_hu": -500, "margin_mm": 10}
    for patient, box in (("P1", [3, 13, 24]), ("P2", [0, 5, 40])):
        (cache / patient).mkdir(parents=True)
        (cache / patient / "meta.json").write_text(json.dumps(
            {"window": [-1000, 400], "size": 32, "crop": {**crop, "box_yx": box}}))
    assert preprocessing_from_cache(cache) == {
        "window": [-1000.0, 400.0], "size": 32, "zscore": "per_patient", "crop": crop}
    (cache / "P3").mkdir()
    (cache / "P3" / "meta.json").write_text(json.dumps({"window": [-1000, 400], "size": 32, "crop": None}))
    with pytest.raises(ValueError, match=re.escape(
            f"training cache {cache} mixes preprocessings: P1 has window [-1000.0, 400.0], size 32, body crop "
            "(> -500 HU, margin 10 mm), P3 has window [-1000.0, 400.0], size 32, no crop; re-run "
            "normalize_ct_and_masks.py --overwrite with one setting for every patient")):
        preprocessing_from_cache(cache)
    (cache / "P3" / "meta.json").write_text(json.dumps(
        {"window": [-1000, 400], "size": 32, "crop": {**crop, "margin_mm": 5, "box_yx": [0, 0, 9]}}))
    with pytest.raises(ValueError, match=r"P3 has .*body crop \(> -500 HU, margin 5 mm\)"):
        preprocessing_from_cache(cache)
    (cache / "P3" / "meta.json").write_text(json.dumps({"window": [-1000, 400], "size": 32, "crop": {"method": "ring"}}))
    with pytest.raises(ValueError, match=r"P3/meta.json: unknown crop \{'method': 'ring'\}"):
        preprocessing_from_cache(cache)
    fov = {"method": "fov", "threshold_hu": -500, "fov_mm": 380}   # --crop-body --fov-mm: another crop
    (cache / "P3" / "meta.json").write_text(json.dumps(
        {"window": [-1000, 400], "size": 32, "crop": {**fov, "box_yx": [-5, 12, 389]}}))
    with pytest.raises(ValueError, match=r"P1 has .*body crop \(> -500 HU, margin 10 mm\), P3 has .*size 32, "
                                         r"380 mm field of view on the body \(> -500 HU\); re-run"):
        preprocessing_from_cache(cache)
    for patient in ("P1", "P2"):
        (cache / patient / "meta.json").write_text(json.dumps(
            {"window": [-1000, 400], "size": 32, "crop": {**fov, "box_yx": [60, 70, 389]}}))
    assert preprocessing_from_cache(cache) == {
        "window": [-1000.0, 400.0], "size": 32, "zscore": "per_patient", "crop": fov}


def test_resolve_device_never_falls_back_silently(monkeypatch):
    from thoracic_seg.precision import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:1: torch .* sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda:1")
    for bad in ("gpu", "mps"):
        with pytest.raises(ValueError, match=f"device must be auto, cpu, cuda or cuda:N, got '{bad}'"):
            resolve_device(bad)


def test_checkpoint_records_its_context_slices_and_a_mismatch_is_refused(tmp_path):
    from unet_multi_organ import build_checkpoint, checkpoint_context_slices

    preprocessing = {"window": [-1000, 400], "size": 32, "zscore": "per_patient"}
    model = UNetMultiOrgan(in_channels=5, out_channels=8, base_channels=4)
    record = build_checkpoint(model, preprocessing=preprocessing, context_slices=2, epoch=1, val_loss=0.5)
    assert record["context_slices"] == 2 and record["model_config"]["in_channels"] == 5
    assert checkpoint_context_slices(record) == 2 == checkpoint_context_slices(record, 2)
    with pytest.raises(ValueError, match=r"best.pth: the network was trained with 2 context slice\(s\) per side "
                                         r"\(5 input channels\); this run asks for 0 \(1 channels\). "
                                         r"Use --context-slices 2"):
        checkpoint_context_slices(record, 0, "best.pth")
    assert checkpoint_context_slices({"model_config": {"in_channels": 1}}) == 0  # earlier versions
    with pytest.raises(ValueError, match="cannot see 1 neighbours per side"):
        build_checkpoint(model, preprocessing=preprocessing, context_slices=1, epoch=1, val_loss=0.5)
