"""Every phase, in order, through each script's ``main()``: on the tiny synthetic cohort and on
the two real NSCLC-Radiomics sample patients (issue 5: "the same recipe runs on the two real
sample patients ... phases 2 -> 5 end to end, a short CPU training, without error").

Tiny settings only (64 px slices, base_channels 4, a few optimizer steps): these tests prove the
phases fit together and keep their geometry, not that the network learns (the demo does that).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import convert_dicom_to_nifti
import evaluate_multi_organ
import extract_multi_organ_masks
import normalize_ct_and_masks
import predict_multi_organ
import prepare_train_val_test_splits
import train_multi_organ
from thoracic_seg import organs
from thoracic_seg.layout import DataLayout

SIZE = "64"
TINY_TRAINING = ["--base-channels", "4", "--batch-size", "4", "--epochs", "1", "--max-steps", "3",
                 "--device", "cpu", "--workers", "0", "--lr", "1e-3"]


def _run_phases(data_root: Path, dicom_root: Path, run_dir: Path) -> dict:
    """Phases 2 -> 5b on ``dicom_root``; returns what the assertions need."""
    torch.set_num_threads(1)
    splits = data_root / "splits"
    common = ["--data-root", str(data_root), "--workers", "1"]
    assert convert_dicom_to_nifti.main([*common, "--dicom-root", str(dicom_root)]) == 0
    assert extract_multi_organ_masks.main([*common, "--dicom-root", str(dicom_root)]) == 0
    assert normalize_ct_and_masks.main([*common, "--size", SIZE]) == 0
    assert prepare_train_val_test_splits.main(
        ["--data-root", str(data_root), "--splits-dir", str(splits)]) == 0
    assert train_multi_organ.main(["--data-root", str(data_root), "--splits-dir", str(splits),
                                   "--output-dir", str(run_dir), *TINY_TRAINING]) == 0
    checkpoint = run_dir / "best_unet_multi_organ.pth"
    assert evaluate_multi_organ.main(["--data-root", str(data_root), "--splits-dir", str(splits),
                                      "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    test_ids = (splits / "test.txt").read_text().split()
    return {"splits": splits, "checkpoint": checkpoint, "test_ids": test_ids}


def _check_outputs(data_root: Path, run_dir: Path, test_ids: list[str]) -> None:
    layout = DataLayout(data_root)
    for pid in test_ids:
        ct = sitk.ReadImage(str(layout.ct_nifti / f"{pid}.nii.gz"))
        mask = sitk.ReadImage(str(layout.masks / f"{pid}.nii.gz"))
        predicted = sitk.ReadImage(str(run_dir / "evaluation" / "predictions" / f"{pid}.nii.gz"))
        for image in (mask, predicted):  # everything on the CT's own grid
            assert image.GetSize() == ct.GetSize()
            np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-5)
            np.testing.assert_allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayViewFromImage(predicted))) <= set(range(8))
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["patient_id"] for r in rows} == set(test_ids)
    assert {r["structure"] for r in rows} == {organs.structure(label).key for label in range(1, 8)}
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    assert summary["n_patients"] == len(test_ids) and summary["failed"] == []
    lungs = summary["structures"]["lung_right"]["dice"]
    assert lungs["n"] == len(test_ids) and 0 <= lungs["mean"] <= 1
    for name in ("history.csv", "training_curves.png", "train.log", "last_checkpoint.pth"):
        assert (run_dir / name).is_file(), name


def _predict_from_dicom(folder: Path, checkpoint: Path, out: Path, pid: str) -> None:
    assert predict_multi_organ.main(["--input", str(folder), "--checkpoint", str(checkpoint),
                                     "--output", str(out), "--device", "cpu"]) == 0
    for suffix in ("_labels.nii.gz", "_RTSTRUCT.dcm", "_volumes.csv", "_overlay.png"):
        assert (out / f"{pid}{suffix}").is_file(), suffix


def test_every_phase_on_the_synthetic_cohort(synthetic_cohort, tmp_path: Path) -> None:
    raw_dir, _, cohort = synthetic_cohort
    run_dir = tmp_path / "run"
    result = _run_phases(tmp_path / "DATA", raw_dir, run_dir)
    assert len(result["test_ids"]) >= 1
    _check_outputs(tmp_path / "DATA", run_dir, result["test_ids"])
    pid = result["test_ids"][0]
    _predict_from_dicom(raw_dir / pid, result["checkpoint"], tmp_path / "predictions", pid)


@pytest.mark.real_data
def test_phases_2_to_5_on_the_real_sample_patients(real_sample_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _run_phases(tmp_path / "DATA", real_sample_root, run_dir)
    assert len(result["test_ids"]) == 1  # two patients: one trains, one is tested
    _check_outputs(tmp_path / "DATA", run_dir, result["test_ids"])
    pid = result["test_ids"][0]
    _predict_from_dicom(real_sample_root / pid, result["checkpoint"], tmp_path / "predictions", pid)
