"""export_nnunet.py: the label mapping and the ignore rule on tiny arrays, the export of a synthetic
cohort (phases 2 and 2.5 run by their ``run()``) checked voxel by voxel and header byte by header
byte, its error paths, and nnU-Net v2 itself accepting the dataset: its integrity check and its 2d
planning and preprocessing (skipped when nnunetv2 is not installed).

The synthetic cohort's first four patients: SYN-001 complete, SYN-002 without heart contour,
SYN-003 complete, SYN-004 without esophagus contour; every PTV is derived (never a label).
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import convert_dicom_to_nifti
import export_nnunet as ex
import extract_multi_organ_masks
from thoracic_seg.batch import DONE, FAILED
from thoracic_seg.layout import DataLayout

SPLITS = {"train": ["SYN-001", "SYN-002"], "val": ["SYN-003"], "test": ["SYN-004"]}
DATASET = "Dataset501_NSCLCRadiomics"
# Our labels -> exported, when the PTV is derived: 0 1 (2 gone) 3 4 5 6 7 -> 0 1 2 3 4 5 6; ignore = 7.
OURS_TO_EXPORTED = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6}
NAMES = {"background": 0, "gtv": 1, "lung_right": 2, "lung_left": 3, "heart": 4, "esophagus": 5, "spinal_cord": 6}
TO_OURS = {"1": "gtv", "2": "lung_right", "3": "lung_left", "4": "heart", "5": "esophagus", "6": "spinal_cord"}
ALL = [True] * 8
DERIVED_PTV = [True, True, False, True, True, True, True, True]
DERIVED_PTV_NO_HEART = [True, True, False, True, True, False, True, True]


# --------------------------------------------------------------------------------------------
# Pure rules
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    ([DERIVED_PTV], [1, 3, 4, 5, 6, 7]),  # a derived PTV is not annotated: not a label
    ([DERIVED_PTV_NO_HEART], [1, 3, 4, 6, 7]),  # a heart nobody has cannot be taught
    ([DERIVED_PTV_NO_HEART, DERIVED_PTV], [1, 3, 4, 5, 6, 7]),  # one patient with a heart is enough
    ([ALL], [1, 2, 3, 4, 5, 6, 7]),  # a contoured PTV is a label
    ([], []),
])
def test_exported_labels(flags, expected) -> None:
    assert ex.exported_labels(flags) == expected


def test_missing_structures() -> None:
    assert ex.missing_structures(DERIVED_PTV_NO_HEART, [1, 3, 4, 5, 6, 7]) == [5]
    assert ex.missing_structures(DERIVED_PTV, [1, 3, 4, 5, 6, 7]) == []


def test_label_mapping_is_consecutive_with_ignore_last() -> None:
    mapping = ex.label_mapping([1, 3, 4, 5, 6, 7], "ignore", with_ignore=True)
    assert mapping == {"ours_to_exported": {str(k): v for k, v in OURS_TO_EXPORTED.items()},
                       "labels": {**NAMES, "ignore": 7}, "missing": "ignore"}
    assert ex.exported_to_ours(mapping) == TO_OURS
    assert ex.label_mapping([1, 5], "exclude", with_ignore=False) == {
        "ours_to_exported": {"0": 0, "1": 1, "5": 2}, "labels": {"background": 0, "gtv": 1, "heart": 2},
        "missing": "exclude"}


def test_export_label_array_renumbers_and_paints_background_as_ignore() -> None:
    ours = np.array([[[0, 1, 3, 4], [5, 6, 7, 0]]], dtype=np.uint8)
    out = ex.export_label_array(ours, OURS_TO_EXPORTED)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 1, 2, 3], [4, 5, 6, 0]]])
    np.testing.assert_array_equal(ex.export_label_array(ours, OURS_TO_EXPORTED, ignore_value=7),
                                  [[[7, 1, 2, 3], [4, 5, 6, 7]]])


def test_export_label_array_refuses_a_value_that_is_not_exported() -> None:
    with pytest.raises(ValueError, match=r"label values \[2, 9\] are not exported labels \(exported: \[0, 1, 3"):
        ex.export_label_array(np.array([0, 2, 3, 9]), OURS_TO_EXPORTED)


def test_the_evaluation_reads_the_map_back_to_our_labels(tmp_path) -> None:
    import evaluate_multi_organ

    if not hasattr(evaluate_multi_organ, "load_label_map"):
        pytest.skip("evaluate_multi_organ.py has no --label-map yet")
    path = tmp_path / ex.LABEL_MAP_TO_OURS_JSON
    path.write_text(json.dumps(TO_OURS))
    assert evaluate_multi_organ.load_label_map(path) == {v: k for k, v in OURS_TO_EXPORTED.items() if k}


def test_read_splits_refuses_a_patient_in_two_splits(tmp_path) -> None:
    for name, ids in {"train": ["A", "B"], "val": ["C"], "test": ["B"]}.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(ids) + "\n")
    with pytest.raises(ValueError, match="patient B is listed in both train.txt and test.txt"):
        ex.read_splits(tmp_path)


@pytest.mark.parametrize("dataset_id, name, match", [
    (0, "X", "dataset id must be 1-999"), (1000, "X", "dataset id must be 1-999"),
    (5, "a b", "dataset name must be letters"), (5, "../x", "dataset name must be letters"),
])
def test_dataset_folder_bad_options(dataset_id, name, match) -> None:
    with pytest.raises(ValueError, match=match):
        ex.dataset_folder("raw", dataset_id, name)
    assert ex.dataset_folder("raw", 7, "Lung_CT-1") == Path("raw/Dataset007_Lung_CT-1")


# --------------------------------------------------------------------------------------------
# Export of a synthetic cohort
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processed(synthetic_cohort, tmp_path_factory) -> Path:
    """A data root with phases 2 and 2.5 done on the synthetic cohort and our splits in ``splits/``."""
    raw_dir, _, _ = synthetic_cohort
    root = tmp_path_factory.mktemp("export_nnunet")
    assert all(r.status == DONE for r in convert_dicom_to_nifti.run(data_root=root, dicom_root=raw_dir))
    assert all(r.status == DONE for r in extract_multi_organ_masks.run(data_root=root, dicom_root=raw_dir))
    write_splits(root / "splits", SPLITS)
    return root


def write_splits(folder: Path, splits: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (folder / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def export(root: Path, out: Path, *args: str) -> int:
    return ex.main(["--data-root", str(root), "--splits-dir", str(root / "splits"), "--nnunet-raw", str(out),
                    "--workers", "1", *args])


def geometry_bytes(path: Path) -> bytes:
    """The NIfTI-1 header fields that make the affine: pixdim, qform/sform codes, quaternion, srow."""
    with gzip.open(path, "rb") as fh:
        header = fh.read(348)
    return header[76:108] + header[252:328]


def test_export_keeps_geometry_renumbers_and_ignores_background_of_a_patient_missing_the_heart(
        processed, tmp_path, capsys) -> None:
    layout, out = DataLayout(processed), tmp_path / "raw"
    assert export(processed, out, "--preprocessed", str(tmp_path / "pre")) == 0
    assert capsys.readouterr().out.strip() == "nnU-Net export: 4 exported, 0 skipped, 0 failed"
    folder = out / DATASET
    assert sorted(p.name for p in folder.iterdir()) == [
        "dataset.json", "imagesTr", "imagesTs", "label_map_to_ours.json", "label_mapping.json", "labelsTr",
        "splits_final.json"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["SYN-004_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["SYN-001.nii.gz", "SYN-002.nii.gz",
                                                                       "SYN-003.nii.gz"]
    for pid in ("SYN-001", "SYN-002", "SYN-003", "SYN-004"):
        image = folder / ("imagesTs" if pid == "SYN-004" else "imagesTr") / f"{pid}_0000.nii.gz"
        assert image.read_bytes() == (layout.ct_nifti / f"{pid}.nii.gz").read_bytes()
    lut = np.zeros(8, dtype=np.uint8)
    for ours, exported in OURS_TO_EXPORTED.items():
        lut[ours] = exported
    for pid in ("SYN-001", "SYN-002", "SYN-003"):
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / f"{pid}.nii.gz")))
        label_path = folder / "labelsTr" / f"{pid}.nii.gz"
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        expected = lut[ours]
        if pid == "SYN-002":  # no heart contour: every background voxel could be heart
            expected[ours == 0] = 7
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == np.uint8 and (ours == 3).any()
        assert (7 in got) == (pid == "SYN-002")
        assert geometry_bytes(label_path) == geometry_bytes(layout.ct_nifti / f"{pid}.nii.gz")
    assert json.loads((folder / "dataset.json").read_text()) == {
        "channel_names": {"0": "CT"}, "labels": {**NAMES, "ignore": 7}, "numTraining": 3,
        "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO", "name": "NSCLCRadiomics",
        "reference": "NSCLC-Radiomics, doi:10.7937/K9/TCIA.2015.PF0M9REI", "licence": "CC BY-NC 3.0"}
    assert json.loads((folder / "label_map_to_ours.json").read_text()) == TO_OURS
    assert json.loads((folder / "label_mapping.json").read_text())["ours_to_exported"] == {
        str(k): v for k, v in OURS_TO_EXPORTED.items()}
    folds = [{"train": ["SYN-001", "SYN-002"], "val": ["SYN-003"]}]
    assert json.loads((folder / "splits_final.json").read_text()) == folds
    assert json.loads((tmp_path / "pre" / DATASET / "splits_final.json").read_text()) == folds

    assert export(processed, out) == 0  # everything exists: skipped
    assert capsys.readouterr().out.strip() == "nnU-Net export: 0 exported, 4 skipped, 0 failed"


def test_missing_exclude_leaves_the_patient_out_and_needs_no_ignore_label(processed, tmp_path, capsys) -> None:
    out = tmp_path / "raw"
    assert export(processed, out, "--missing", "exclude") == 0
    assert capsys.readouterr().out.strip() == ("nnU-Net export: 3 exported, 1 skipped, 0 failed; "
                                               "1 of the skipped excluded (a structure not contoured)")
    folder = out / DATASET
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == ["SYN-001.nii.gz", "SYN-003.nii.gz"]
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == NAMES and dataset["numTraining"] == 2
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": ["SYN-001"], "val": ["SYN-003"]}]


def test_a_bad_patient_is_reported_and_the_batch_goes_on(processed, tmp_path, capsys) -> None:
    root = tmp_path / "DATA"
    shutil.copytree(processed, root)
    masks = DataLayout(root).masks
    (masks / "SYN-003.json").unlink()
    mask = sitk.ReadImage(str(masks / "SYN-001.nii.gz"))
    painted = sitk.GetArrayFromImage(mask)
    painted[0, 0, 0] = 2  # a PTV painted although the record says derived
    image = sitk.GetImageFromArray(painted)
    image.CopyInformation(mask)
    sitk.WriteImage(image, str(masks / "SYN-001.nii.gz"))
    results = {r.patient_id: r for r in ex.run(nnunet_raw=tmp_path / "raw", data_root=root,
                                               splits_dir=root / "splits")}
    assert {p: r.status for p, r in results.items()} == {"SYN-001": FAILED, "SYN-002": DONE, "SYN-003": FAILED,
                                                         "SYN-004": DONE}
    assert results["SYN-001"].message.startswith(f"SYN-001: {masks / 'SYN-001.nii.gz'}: label values [2] are not")
    assert results["SYN-003"].message.startswith("SYN-003: ") and "SYN-003.json" in results["SYN-003"].message
    assert json.loads((tmp_path / "raw" / DATASET / "dataset.json").read_text())["numTraining"] == 1
    assert export(root, tmp_path / "raw") == 1
    assert capsys.readouterr().out.strip() == "nnU-Net export: 0 exported, 2 skipped, 2 failed (SYN-001, SYN-003)"


def test_dataset_level_errors(processed, tmp_path, monkeypatch) -> None:
    out = tmp_path / "raw"
    ex.run(nnunet_raw=out, data_root=processed, splits_dir=processed / "splits")
    (unknown,) = ex.run(nnunet_raw=out, data_root=processed, splits_dir=processed / "splits", patients=["SYN-404"])
    assert (unknown.status, unknown.message) == (FAILED, "SYN-404: not in train.txt, val.txt or test.txt")
    with pytest.raises(ValueError, match="holds another label mapping .* re-run with --overwrite"):
        ex.run(nnunet_raw=out, data_root=processed, splits_dir=processed / "splits", missing="exclude")
    with pytest.raises(ValueError, match="missing must be one of ignore, exclude, got 'drop'"):
        ex.run(nnunet_raw=out, data_root=processed, splits_dir=processed / "splits", missing="drop")
    shutil.copy(out / DATASET / "imagesTs" / "SYN-004_0000.nii.gz", out / DATASET / "imagesTr" / "OLD_0000.nii.gz")
    with pytest.raises(ValueError, match=r"1 file\(s\) of .* belong to no patient .*OLD_0000.nii.gz"):
        ex.run(nnunet_raw=out, data_root=processed, splits_dir=processed / "splits")
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        ex.main(["--data-root", str(processed)])
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------------------------
# nnU-Net itself
# --------------------------------------------------------------------------------------------
def nnunet_command(name: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    """Run an installed nnU-Net console script (its declared function, in this interpreter)."""
    (point,) = entry_points(group="console_scripts", name=name)
    module, function = point.value.split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_nnunet_verifies_plans_and_preprocesses_the_export(processed, tmp_path) -> None:
    pytest.importorskip("nnunetv2")
    raw, preprocessed = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed"
    assert export(processed, raw) == 0  # no --preprocessed: nnU-Net copies splits_final.json itself
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(tmp_path / "nnUNet_results"), "OMP_NUM_THREADS": "1"}
    done = nnunet_command("nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "2d", "-np", "1", "-npfp", "1",
                          "--verify_dataset_integrity", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "verify_dataset_integrity Done" in done.stdout and "Warning" not in done.stdout
    folder = preprocessed / DATASET
    assert sorted(p.name for p in (folder / "nnUNetPlans_2d").glob("*.pkl")) == [
        "SYN-001.pkl", "SYN-002.pkl", "SYN-003.pkl"]
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": ["SYN-001", "SYN-002"],
                                                                       "val": ["SYN-003"]}]
    assert json.loads((folder / "dataset.json").read_text())["labels"]["ignore"] == 7
    ct = sitk.ReadImage(str(DataLayout(processed).ct_nifti / "SYN-002.nii.gz"))
    with open(folder / "nnUNetPlans_2d" / "SYN-002.pkl", "rb") as fh:
        seen = pickle.load(fh)["sitk_stuff"]  # the geometry nnU-Net read and will write predictions with
    assert (seen["spacing"], seen["origin"], seen["direction"]) == (ct.GetSpacing(), ct.GetOrigin(),
                                                                    ct.GetDirection())
