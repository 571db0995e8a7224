"""Laterality: a series stored feet first or prone (issue 13) reaches the network in the training
orientation (head-first supine, LPS) and its labels come back on its own grid, on the right side.

A CT series is re-stored as a scanner stores it with the patient in another position: pixel data,
ImageOrientationPatient and ImagePositionPatient change together, so every voxel keeps its patient
position. Phase 2 must then give the same image in patient space, and prediction the same labels,
with the right lung on the patient's right (lower LPS x). The prediction model is a laterality-
sensitive stand-in for a trained network: it writes "right lung" on the left half of the image it is
given, as the training convention does, so it fails when a volume reaches it mirrored.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.valuerep import DSfloat

import convert_dicom_to_nifti as phase2
import predict_multi_organ as pm
from thoracic_seg import organs, precision, qa
from thoracic_seg.batch import DONE, same_geometry
from thoracic_seg.grid import orientation_code
from thoracic_seg.inference import Predictor
from thoracic_seg.layout import DataLayout
from thoracic_seg.rtstruct_read import read_rois
from thoracic_seg.cases import find_cases

#: Sign of the row (ImageOrientationPatient[:3]) and column ([3:]) directions of each patient
#: position relative to head-first supine, as scanners store an axial series (DICOM PS3.3 C.7.6.2.1.1).
POSITION_SIGNS = {"HFS": (1, 1), "FFS": (-1, 1), "HFP": (-1, -1), "FFP": (1, -1)}
#: The orientation code phase 2 gives such a series (slices ordered along row x column).
STORED_CODE = {"HFS": "LPS", "FFS": "RPI", "HFP": "RAS", "FFP": "LAI"}
RESTORED = ("FFS", "HFP", "FFP")
LUNG_Z = -0.5  # z-score below which a pixel counts as lung density (lung and air, about -800 HU and below)


def _ds(values) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]


def restore_series(source: Path, dest: Path, position: str) -> Path:
    """Copy the CT series of ``source`` (any axial orientation, one series) into ``dest`` as stored
    with the patient in ``position`` (HFS, FFS, HFP, FFP) relative to it: the row and/or column
    direction reversed, the pixel columns and/or rows reversed with it and the slice origin moved to
    the new first pixel, so every voxel keeps its patient position; PatientPosition set. UIDs kept."""
    row_sign, col_sign = POSITION_SIGNS[position]
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in Path(source).iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
        row_dir, col_dir = iop[:3], iop[3:]
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        origin = np.array(ds.ImagePositionPatient, dtype=np.float64)
        pixels = ds.pixel_array
        if row_sign < 0:  # columns run the other way: the last column becomes the first
            pixels, origin = pixels[:, ::-1], origin + (int(ds.Columns) - 1) * col_spacing * row_dir
        if col_sign < 0:
            pixels, origin = pixels[::-1, :], origin + (int(ds.Rows) - 1) * row_spacing * col_dir
        ds.ImageOrientationPatient = _ds(np.concatenate([row_sign * row_dir, col_sign * col_dir]) + 0.0)
        ds.ImagePositionPatient = _ds(origin)
        ds.PatientPosition = position
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(dest / path.name)
    return dest


class LateralityModel(torch.nn.Module):
    """(B, 1, S, S) z-scored CT -> (B, 8, S, S) logits: lung-density pixels in the left half of the
    image are the right lung, in the right half the left lung (patient right on image left, the
    training convention); everything else background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lung = (x[:, 0] < LUNG_Z).float()
        left_half = torch.zeros_like(lung)
        left_half[..., : x.shape[-1] // 2] = 1.0
        logits = torch.full((x.shape[0], organs.NUM_CLASSES, *x.shape[-2:]), -20.0)
        logits[:, organs.BACKGROUND] = 0.0
        logits[:, organs.RIGHT_LUNG] = 20.0 * lung * left_half - 10.0
        logits[:, organs.LEFT_LUNG] = 20.0 * lung * (1.0 - left_half) - 10.0
        return logits


def laterality_predictor(size: int) -> Predictor:
    return Predictor(LateralityModel(), Path("laterality.pth"), torch.device("cpu"), precision.FLOAT32,
                        batch_size=16, window=(-1000.0, 400.0), size=size)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(int(a.sum() + b.sum()), 1)


def centre_x_mm(image: sitk.Image, label: int) -> float:
    """LPS x (mm; larger = more to the patient's left) of the centre of ``label`` in ``image``."""
    zyx = np.argwhere(sitk.GetArrayViewFromImage(image) == label).mean(axis=0)
    return image.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist())[0]


def convert(dicom_root: Path, data_root: Path, patient_id: str) -> sitk.Image:
    """Phase 2 on ``dicom_root``; the patient's CT NIfTI."""
    (result,) = phase2.run(data_root=data_root, dicom_root=dicom_root, patients=[patient_id])
    assert result.status == DONE, result.message
    return sitk.ReadImage(str(DataLayout(data_root).ct_nifti / f"{patient_id}.nii.gz"))


def check_positions(original_series: Path, patient_id: str, work: Path, size: int) -> None:
    """Re-store ``original_series`` (HFS) in every other position; phase 2 and prediction must give
    the original's image and labels in patient space, the right lung on the patient's right."""
    predictor = laterality_predictor(size)
    images, labels, lungs_x = {}, {}, {}
    for position in ("HFS", *RESTORED):
        dicom_root = work / position / "raw"
        series = dicom_root / patient_id / "study" / "series"
        if position == "HFS":
            shutil.copytree(original_series, series)
        else:
            restore_series(original_series, series, position)
        image = convert(dicom_root, work / position / "DATA", patient_id)
        assert orientation_code(image) == STORED_CODE[position]
        images[position] = image
        (case,) = find_cases(dicom_root)
        out = work / position / "predictions"
        result = pm.predict_case(case, predictor, out)
        assert result.status == DONE, result.message
        assert (f"stored {STORED_CODE[position]}, predicted in LPS" in result.message) == (position != "HFS")
        label_image = sitk.ReadImage(str(out / f"{patient_id}_labels.nii.gz"))
        assert same_geometry(label_image, image)  # written on the CT's own stored grid
        ptv_image = sitk.ReadImage(str(out / f"{patient_id}_PTV.nii.gz"))
        assert same_geometry(ptv_image, image)
        labels[position] = label_image
        lungs_x[position] = (centre_x_mm(label_image, organs.RIGHT_LUNG), centre_x_mm(label_image, organs.LEFT_LUNG))
        # the quality check judges sides in patient coordinates, whatever the stored order
        checked = result.info["qa"]
        assert checked[organs.RIGHT_LUNG].features["lateral_offset_mm"] < 0, position
        assert checked[organs.LEFT_LUNG].features["lateral_offset_mm"] > 0, position
        assert not any("side" in checked[lb].codes for lb in (organs.RIGHT_LUNG, organs.LEFT_LUNG)), position
        # the RTSTRUCT: the right lung's contour points lie on the patient's right too
        rois = {roi.name: roi for roi in read_rois(pydicom.dcmread(out / f"{patient_id}_RTSTRUCT.dcm"))}
        right, left = (np.concatenate([c.points for c in rois[organs.automatic_roi_name(lb)].contours])
                       for lb in (organs.RIGHT_LUNG, organs.LEFT_LUNG))
        assert right[:, 0].mean() < left[:, 0].mean(), position

    original = sitk.GetArrayFromImage(images["HFS"])
    original_labels = sitk.GetArrayFromImage(labels["HFS"])
    assert original_labels.any()
    for position in RESTORED:
        in_lps = sitk.DICOMOrient(images[position], "LPS")  # phase 2: same image in patient space
        assert np.array_equal(sitk.GetArrayFromImage(in_lps), original), position
        assert same_geometry(in_lps, images["HFS"]), position
        assert not np.array_equal(sitk.GetArrayFromImage(images[position]), original)  # stored otherwise
        restored = sitk.GetArrayFromImage(sitk.DICOMOrient(labels[position], "LPS"))
        for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG):
            assert dice(restored == label, original_labels == label) >= 0.99, (position, label)
    for position, (right_x, left_x) in lungs_x.items():
        assert right_x < left_x, (position, right_x, left_x)

    # The model is laterality-sensitive: fed the feet-first series in its stored order (what
    # prediction did before the orientation step), the right lung lands on the patient's left.
    mirrored = predictor.segment(sitk.GetArrayFromImage(images["FFS"]))
    mirrored_image = sitk.GetImageFromArray(mirrored)
    mirrored_image.CopyInformation(images["FFS"])
    assert centre_x_mm(mirrored_image, organs.RIGHT_LUNG) > centre_x_mm(mirrored_image, organs.LEFT_LUNG)
    # ... and the quality check says so
    checked = qa.check(mirrored, images["FFS"].GetSpacing()[::-1], orientation=orientation_code(images["FFS"]))
    assert "side" in checked[organs.RIGHT_LUNG].codes and "side" in checked[organs.LEFT_LUNG].codes


# --------------------------------------------------------------------------------------------
# The re-storing helper itself
# --------------------------------------------------------------------------------------------
def test_restore_series_keeps_every_voxel_at_its_patient_position(synthetic_cohort, tmp_path) -> None:
    raw_dir, _, cohort = synthetic_cohort
    source = raw_dir / cohort[0]["ct_folder"]
    first = sorted(source.glob("*.dcm"))[0]
    original = pydicom.dcmread(first)
    restored = pydicom.dcmread(restore_series(source, tmp_path / "FFP", "FFP") / first.name)
    assert restored.PatientPosition == "FFP" and restored.SOPInstanceUID == original.SOPInstanceUID
    assert [float(v) for v in restored.ImageOrientationPatient] == [1, 0, 0, 0, -1, 0]

    def position_mm(ds, row: int, col: int) -> np.ndarray:
        iop = np.array(ds.ImageOrientationPatient, float)
        spacing = [float(v) for v in ds.PixelSpacing]
        return (np.array(ds.ImagePositionPatient, float) + col * spacing[1] * iop[:3]
                + row * spacing[0] * iop[3:])

    rows, cols = original.pixel_array.shape
    for row, col in [(0, 0), (3, 7), (rows - 1, 5)]:
        moved = (rows - 1 - row, col)  # FFP relative to HFS: rows reversed, columns kept
        assert restored.pixel_array[moved] == original.pixel_array[row, col]
        np.testing.assert_allclose(position_mm(restored, *moved), position_mm(original, row, col), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Synthetic patient (every run) and real patient (LUNG1-005)
# --------------------------------------------------------------------------------------------
def test_feet_first_and_prone_synthetic_patient_is_segmented_like_head_first_supine(
        synthetic_cohort, tmp_path) -> None:
    raw_dir, _, cohort = synthetic_cohort
    record = cohort[0]
    check_positions(raw_dir / record["ct_folder"], record["patient_id"], tmp_path, size=32)


@pytest.mark.real_data
@pytest.mark.slow
def test_feet_first_and_prone_real_patient_is_segmented_like_head_first_supine(
        real_sample_root, reference_json, tmp_path) -> None:
    series = real_sample_root / reference_json["LUNG1-005"]["ct_series_folder"]
    check_positions(series, "LUNG1-005", tmp_path, size=128)
