"""benchmarks/calibrate_qa.py on a fake quality-benchmark work dir: four held-out patients in two folds, each
with one known defect and known Dice, so every count of the calibration table is known."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO_ROOT, load_benchmark
from test_qa import PHANTOM_SPACING, one_hot, phantom
from thoracic_seg import organs, qa
from thoracic_seg.layout import PROCESSED_FORMAT

KEYS = [s.key for s in organs.STRUCTURES[1:]]
LABELS = [s.label for s in organs.STRUCTURES[1:]]
ANNOTATED = [True, True, False, True, True, True, True, True]  # the PTV is grown from the GTV


@pytest.fixture(scope="module")
def calibrate():
    yield from load_benchmark("calibrate_qa")


def held_out(pid: str) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(labels, probabilities, Dice per structure key) of each fake held-out patient:
    A clean, all good; B without a heart (Dice 0); C with a 9 mm gap in the cord (Dice 0.6); D with an
    esophagus the network is unsure of (Dice 0.3) and a GTV that looks fine but scores 0.4."""
    labels = phantom()
    dice = dict.fromkeys(KEYS, 0.9)
    probabilities = one_hot(labels, 0.9)
    if pid == "B":
        labels[labels == organs.HEART] = 0
        probabilities = one_hot(labels, 0.9)
        dice["heart"] = 0.0
    elif pid == "C":
        labels[14:17][labels[14:17] == organs.SPINAL_CORD] = 0
        probabilities = one_hot(labels, 0.9)
        dice["spinal_cord"] = 0.6
    elif pid == "D":
        z, y, x = np.nonzero(labels == organs.ESOPHAGUS)
        probabilities[z, :, y, x] = 0.5 / 7
        probabilities[z, organs.ESOPHAGUS, y, x] = 0.5
        dice.update(esophagus=0.3, gtv=0.4)
    return labels, np.rint(probabilities * 255).astype(np.uint8), dice


def write_cache(root: Path, pid: str, labels: np.ndarray) -> None:
    """A phase 3 cache entry of ``labels`` (30 x 48 x 64, padded to 64 x 64) at the phantom's voxel size."""
    folder = root / "processed" / "training_cache" / pid
    folder.mkdir(parents=True)
    np.save(folder / "mask.npy", np.pad(labels, ((0, 0), (0, 16), (0, 0))))
    meta = {"format": PROCESSED_FORMAT, "patient_id": pid, "annotated": ANNOTATED, "size": 64,
            "orientation": {"stored": "LPS", "network": "LPS"}, "original_shape_zyx": [30, 64, 64],
            "original_spacing_xyz": list(PHANTOM_SPACING[::-1])}
    (folder / "meta.json").write_text(json.dumps(meta))


def write_work_dir(work: Path, *, with_volumes: bool = True) -> Path:
    """cells/baseline/fold-{0,1}-seed-0-steps-5: fold 0 holds out A B (trained on C D), fold 1 C D.
    Checkpoints with training volumes from three phantoms (x0.8, x1, x1.25), or without: then each fold's
    cache under data-root/ (A's heart there absurdly large, to show a held-out patient's volume is never used)."""
    import bench_quality as bench  # the benchmark's own cell keys (benchmarks/ is on sys.path once calibrate_qa is)
    import calibrate_qa  # registered by the calibrate fixture
    clean = qa.patient_volumes_ml(phantom(), PHANTOM_SPACING, ANNOTATED)
    record = qa.training_volume_record({f"P{k}": {s: v * k for s, v in clean.items()} for k in (0.8, 1.0, 1.25)}, "t")
    data_root = work / "data-64px-crop-body"
    for pid in "ABCD":
        big = phantom()
        if pid == "A":
            big[0:30, 0:48, 28:38] = organs.HEART
        write_cache(data_root, pid, big)
    for fold, (test, train) in enumerate([("AB", "CD"), ("CD", "AB")]):
        folder = work / "cells" / "baseline" / f"fold-{fold}-seed-0-steps-5"
        (folder / "held_out").mkdir(parents=True)
        (folder / "run").mkdir()
        checkpoint = {"ptv": {"source": "derived", "margin_mm": 10.0}, "train_config": {"data_root": str(data_root)},
                      **({"training_volumes": record} if with_volumes else {})}
        torch.save(checkpoint, folder / "run" / "last_checkpoint.pth")
        rows = []
        for pid in test:
            labels, probabilities, dice = held_out(pid)
            image = sitk.GetImageFromArray(labels)
            image.SetSpacing(PHANTOM_SPACING[::-1])
            sitk.WriteImage(image, str(folder / "held_out" / f"{pid}.nii.gz"))
            np.savez_compressed(folder / "held_out" / f"{pid}_probabilities.npz", probabilities=probabilities,
                                scale=255)
            variants = [(v, "original") for v in ("--postprocess", "none", "largest", "drop<10%", "drop<1%")]
            for postprocess, rendering in [*variants, ("--postprocess", "rerendered")]:
                for key, label in zip(KEYS, LABELS):  # only today's --postprocess of each structure on the
                    # original CTs is calibrated (a cell's own --postprocess rows may be an earlier rule's): 0.95 elsewhere
                    calibrated = (postprocess, rendering) == (calibrate_qa.row_variant(label, "--postprocess"), "original")
                    value = dice[key] if calibrated else 0.95
                    rows.append({"candidate": "baseline", "fold": fold, "seed": 0, "patient_id": pid, "structure": key,
                                 "annotated": True, "dice": value, "postprocess": postprocess, "rendering": rendering})
        cell = bench.Cell(bench.CANDIDATES[bench.BASELINE], fold, 0, tuple(train), tuple(test), 5)
        budget = bench.Budget(5, 64, "cpu", ("--crop-body",), ())
        key = bench.cell_key(cell, budget, {"train": "t", "score": "s"}, dict.fromkeys("ABCD", "fp"), (0,))
        (folder / "cell.json").write_text(json.dumps({"key": key, "record": {"checkpoint": "/moved/away.pth"},
                                                      "rows": rows}))
    return work


def test_todays_postprocess_of_each_structure_is_read_from_the_variant_with_its_rule(calibrate):
    assert [calibrate.row_variant(label, "--postprocess") for label in LABELS] == [
        "--postprocess", "--postprocess", "largest", "largest", "largest", "none", "none"]  # GTV, PTV: untouched
    assert {calibrate.row_variant(organs.HEART, v) for v in ("none", "drop<1%")} == {"none", "drop<1%"}


@pytest.mark.parametrize("fraction, variant", [(0.0, "none"), (2.0, "largest"), (0.01, "drop<1%"), (0.5, None)])
def test_a_rule_is_read_from_the_variant_with_its_fraction_or_refused(calibrate, monkeypatch, fraction, variant):
    from thoracic_seg import postprocess

    monkeypatch.setattr(postprocess, "POSTPROCESS_MIN_FRACTION", {organs.HEART: fraction})
    if variant is None:
        with pytest.raises(ValueError, match="removes Heart pieces under 0.5 of its largest, a rule the benchmark"):
            calibrate.row_variant(organs.HEART, "--postprocess")
    else:
        assert calibrate.row_variant(organs.HEART, "--postprocess") == variant
    assert calibrate.row_variant(organs.LEFT_LUNG, "--postprocess") == "none"  # not in the patched rule


def test_the_table_counts_each_flag_in_each_dice_band(calibrate, tmp_path):
    report = calibrate.run(work_dir=write_work_dir(tmp_path))
    t = report["table"]
    assert {b: (c["n"], c["flagged"]) for b, c in t["bands"].items()} == {"poor": (3, 2), "fair": (1, 1),
                                                                          "good": (24, 0)}
    assert {code: n for code, n in t["bands"]["poor"]["by_flag"].items() if n} == {"missing": 1, "low_confidence": 1}
    assert {code: n for code, n in t["bands"]["fair"]["by_flag"].items() if n} == {"z_gap": 1}
    assert (t["poor_flagged"], t["good_flagged"], t["meets_targets"]) == (pytest.approx(2 / 3), 0.0, False)
    flagged = {(i["patient_id"], i["label"]): i["flags"] for i in report["items"] if i["flags"]}
    assert flagged == {("B", organs.HEART): ["missing"], ("C", organs.SPINAL_CORD): ["z_gap"],
                       ("D", organs.ESOPHAGUS): ["low_confidence"]}
    assert all(not i["not_checked"] for i in report["items"])  # volumes, probabilities: every check ran
    text = calibrate.format_report(report)
    assert "| missing | 1 | 0 | 0 |" in text
    assert "| **any flag** | 2 of 3 (67%) | 1 of 1 (100%) | 0 of 24 (0%) |" in text
    assert ("Targets: >= 80% of Dice < 0.5 flagged: 67% (NOT met); <= 20% of Dice >= 0.8 flagged: 0% (met)."
            in text)
    assert "| heart | 4 | 0.675 | 1 of 1 (100%) | 0 of 3 (0%) | missing 1 |" in text


def test_a_checkpoint_without_volumes_takes_its_folds_training_patients_only(calibrate, tmp_path):
    report = calibrate.run(work_dir=write_work_dir(tmp_path, with_volumes=False))
    heart_ml = qa.patient_volumes_ml(phantom(), PHANTOM_SPACING, ANNOTATED)["heart"]
    by_fold = {c["fold"]: c["features"][organs.HEART] for c in report["cases"] if c["patient_id"] in "AC"}
    assert by_fold[1]["training_n"] == 2 and by_fold[1]["training_max_ml"] > 10 * heart_ml  # trained on A (and B)
    assert (by_fold[0]["training_n"], by_fold[0]["training_min_ml"], by_fold[0]["training_max_ml"]) == (
        2, pytest.approx(heart_ml), pytest.approx(heart_ml))  # C and D: A's own volume never enters


def test_search_chooses_on_the_other_folds_and_applies_to_the_held_out_one(calibrate, tmp_path):
    report = calibrate.run(work_dir=write_work_dir(tmp_path), search=True, grid={"min_confidence": (0.5, 0.9)})
    search = report["search"]
    chosen = {f["fold"]: f["thresholds"]["min_confidence"] for f in search["per_fold"]}
    assert chosen == {0: 0.9, 1: 0.5}  # fold 1's unsure esophagus (0.50) teaches 0.9; fold 0 has nothing to teach
    assert (search["out_of_sample"]["bands"]["poor"]["flagged"], search["out_of_sample"]["poor_flagged"]) == (
        1, pytest.approx(1 / 3))  # B's heart; D's esophagus is judged with 0.5
    assert search["in_sample"]["thresholds"]["min_confidence"] == 0.9
    assert search["in_sample"]["tally"]["poor_flagged"] == pytest.approx(2 / 3)
    text = calibrate.format_report(report)
    assert "| 0 | min_confidence 0.9 | 50% | 0% | 100% | 0% |" in text
    assert "| 1 | min_confidence 0.5 | 100% | 0% | 0% | 0% |" in text


def test_main_writes_json_and_markdown_and_refuses_an_empty_work_dir(calibrate, tmp_path, capsys):
    work = write_work_dir(tmp_path / "work")
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    assert calibrate.main(["--work-dir", str(work), "--output", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert report["table"]["bands"]["poor"]["n"] == 3 and len(report["cases"]) == 4
    assert report["cases"][0]["features"][str(organs.HEART)]["training_n"] == 3
    assert md.read_text().startswith("Quality check on the held-out structures")
    assert "| flag |" in capsys.readouterr().out
    assert calibrate.main(["--work-dir", str(tmp_path / "empty"), "--output", str(out)]) == 1
    assert calibrate.main(["--work-dir", str(work), "--output", str(out), "--postprocess", "largest-ish"]) == 1


def test_help_runs_without_work(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "calibrate_qa.py"), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
