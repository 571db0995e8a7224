"""make_synthetic_cohort.py: real DICOM that reads back, RTSTRUCT linked by UIDs only, contours on
the slices, truth maps on the CT grid, left/right, Hounsfield ranges, ROI variants, determinism,
refusal to overwrite and one-line argument errors.

The truth maps are not an independent check of phase 2.5's rasteriser: the generator fills the very
polygons it writes to the RTSTRUCT with phase 2.5's own even-odd fill (``fill_polygons_2d`` of
``thoracic_seg/rtstruct_read.py``, one fill algorithm in the repository), so phase 2.5 reproducing
the truth (``test_run_reproduces_the_synthetic_truth``) checks geometry, pairing, ROI names and the
priority overlay, while a rasterisation error would sit on both sides and cancel. The
rasteriser is checked independently by its own tests against matplotlib and scikit-image
(tests/test_extract_multi_organ_masks.py), by :func:`mpl_rasterise` below, and on real patients against
plastimatch's reference masks.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as MplPath

from make_synthetic_cohort import VARIANT_CYCLE, Variant, generate_cohort, generate_patient, main
from thoracic_seg import organs
from thoracic_seg.batch import same_geometry


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def read_ct(raw_dir: Path, record: dict) -> tuple[list[pydicom.Dataset], list[Path]]:
    """The CT slices of a patient sorted by z (ImagePositionPatient), with their files."""
    files = sorted((raw_dir / record["ct_folder"]).glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    order = np.argsort([float(ds.ImagePositionPatient[2]) for ds in datasets])
    return [datasets[i] for i in order], [files[i] for i in order]


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def contours_of(rtstruct: pydicom.Dataset) -> dict[str, list[pydicom.Dataset]]:
    names = {roi.ROINumber: roi.ROIName for roi in rtstruct.StructureSetROISequence}
    return {names[rc.ReferencedROINumber]: list(rc.ContourSequence) for rc in rtstruct.ROIContourSequence}


def mpl_rasterise(contours: list[pydicom.Dataset], truth: sitk.Image) -> np.ndarray:
    """An independent rasteriser (matplotlib, voxel centres, even-odd per slice), z-y-x bool."""
    size_x, size_y, size_z = truth.GetSize()
    ox, oy, oz = truth.GetOrigin()
    sx, sy, sz = truth.GetSpacing()
    cols, rows = np.meshgrid(np.arange(size_x), np.arange(size_y))
    centres = np.stack([ox + cols.ravel() * sx, oy + rows.ravel() * sy], axis=1)
    mask = np.zeros((size_z, size_y, size_x), bool)
    for c in contours:
        pts = np.asarray(c.ContourData, float).reshape(-1, 3)
        k = int(round((pts[0, 2] - oz) / sz))
        mask[k] ^= MplPath(pts[:, :2]).contains_points(centres).reshape(size_y, size_x)
    return mask


def json_record_of(truth_dir: Path, patient_id: str) -> dict:
    (record,) = [r for r in json.loads((truth_dir / "cohort.json").read_text()) if r["patient_id"] == patient_id]
    return record


@pytest.fixture(scope="module")
def patients(synthetic_cohort):
    """(raw_dir, truth_dir, [(record, ct datasets sorted by z, rtstruct, truth image)])."""
    raw_dir, truth_dir, cohort = synthetic_cohort
    out = []
    for record in cohort:
        cts, _ = read_ct(raw_dir, record)
        rt = pydicom.dcmread(raw_dir / record["rtstruct_file"])
        truth = sitk.ReadImage(str(truth_dir / record["truth_file"]))
        out.append((record, cts, rt, truth))
    return raw_dir, truth_dir, out


# --------------------------------------------------------------------------------------------
# the cohort fixture: DICOM that reads back, geometry
# --------------------------------------------------------------------------------------------
def test_cohort_layout_and_records(synthetic_cohort) -> None:
    raw_dir, truth_dir, cohort = synthetic_cohort
    assert [r["patient_id"] for r in cohort] == ["SYN-001", "SYN-002", "SYN-003", "SYN-004"]
    assert sorted(p.name for p in raw_dir.iterdir()) == ["SYN-001", "SYN-002", "SYN-003", "SYN-004"]
    assert sorted(p.name for p in truth_dir.iterdir()) == [
        "SYN-001.nii.gz", "SYN-002.nii.gz", "SYN-003.nii.gz", "SYN-004.nii.gz", "cohort.json"]
    assert json.loads((truth_dir / "cohort.json").read_text()) == cohort
    for r in cohort:
        ct, rt = Path(r["ct_folder"]), Path(r["rtstruct_file"])
        assert len(ct.parts) == 3 and len(rt.parts) == 4  # <PatientID>/<study>/<series>[/file]
        assert ct.parts[0] == rt.parts[0] == r["patient_id"]
        assert ct.parts[1] != rt.parts[1] and ct.parts[2] != rt.parts[2]
        assert len(list((raw_dir / ct).glob("*.dcm"))) == 24


def test_ct_files_are_proper_ct_image_storage(patients) -> None:
    _, _, items = patients
    for record, cts, _, _ in items:
        for ds in cts:
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert (ds.Modality, ds.PatientID) == ("CT", record["patient_id"])
            assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (64, 64, 16, 1)
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert ds.SeriesInstanceUID == record["ct_series_uid"]
            assert ds.FrameOfReferenceUID == record["frame_of_reference_uid"]
            assert ds.pixel_array.dtype == np.int16
            assert 0 <= ds.pixel_array.min() and ds.pixel_array.max() <= 4095
        spacing = float(cts[0].PixelSpacing[0])
        assert 350 <= spacing * 64 <= 500.1  # field of view in mm, whatever the matrix
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in cts])
        thickness = float(cts[0].SliceThickness)
        assert thickness in (2.5, 2.75, 3.0)
        np.testing.assert_allclose(np.diff(z), thickness, atol=1e-3)
        assert len({ds.SOPInstanceUID for ds in cts}) == 24


def test_file_names_and_instance_numbers_do_not_follow_position(synthetic_cohort) -> None:
    raw_dir, _, cohort = synthetic_cohort
    for record in cohort:
        cts, files = read_ct(raw_dir, record)
        names = [f.name for f in files]  # in z order
        numbers = [int(ds.InstanceNumber) for ds in cts]
        assert sorted(numbers) == list(range(1, 25))
        assert names != sorted(names) and names != sorted(names, reverse=True)
        assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)


def test_series_sorted_by_position_has_the_truth_geometry(patients) -> None:
    raw_dir, _, items = patients
    for record, cts, _, truth in items:
        ct = read_series(raw_dir / record["ct_folder"])
        assert ct.GetSize() == truth.GetSize() == (64, 64, 24)
        assert same_geometry(ct, truth), (ct.GetOrigin(), truth.GetOrigin())
        assert truth.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        np.testing.assert_allclose(truth.GetOrigin(), [float(v) for v in cts[0].ImagePositionPatient], atol=1e-3)
        np.testing.assert_allclose(truth.GetOrigin(), record["origin_xyz"], atol=1e-3)
        assert sitk.GetArrayViewFromImage(truth).dtype == np.uint8
        # SimpleITK applies the rescale: voxel (0, 0, k) equals the stored value - 1024
        hu = sitk.GetArrayFromImage(ct)
        k = 5
        assert hu[k, 0, 0] == int(cts[k].pixel_array[0, 0]) - 1024


# --------------------------------------------------------------------------------------------
# RTSTRUCT
# --------------------------------------------------------------------------------------------
def test_rtstruct_is_linked_to_the_ct_by_uids_only(patients) -> None:
    _, _, items = patients
    for record, cts, rt, _ in items:
        assert rt.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert rt.SOPClassUID == pydicom.uid.RTStructureSetStorage and rt.Modality == "RTSTRUCT"
        assert rt.StudyInstanceUID != cts[0].StudyInstanceUID  # a different study folder
        assert rt.SeriesInstanceUID != cts[0].SeriesInstanceUID
        (frame,) = rt.ReferencedFrameOfReferenceSequence
        assert frame.FrameOfReferenceUID == cts[0].FrameOfReferenceUID
        (study,) = frame.RTReferencedStudySequence
        assert study.ReferencedSOPInstanceUID == cts[0].StudyInstanceUID
        (series,) = study.RTReferencedSeriesSequence
        assert series.SeriesInstanceUID == cts[0].SeriesInstanceUID
        assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [
            ds.SOPInstanceUID for ds in cts]


def test_every_contour_lies_on_a_ct_slice_and_references_it(patients) -> None:
    _, _, items = patients
    for _, cts, rt, _ in items:
        uid_at_z = {round(float(ds.ImagePositionPatient[2]), 3): ds.SOPInstanceUID for ds in cts}
        n_contours = 0
        for name, contours in contours_of(rt).items():
            assert contours, name
            for c in contours:
                pts = np.asarray(c.ContourData, float).reshape(-1, 3)
                assert c.ContourGeometricType == "CLOSED_PLANAR"
                assert len(pts) == c.NumberOfContourPoints >= 12
                assert not np.array_equal(pts[0], pts[-1])  # closed implicitly
                assert np.ptp(pts[:, 2]) == 0.0
                z = round(float(pts[0, 2]), 3)
                assert z in uid_at_z, (name, z)
                (ref,) = c.ContourImageSequence
                assert ref.ReferencedSOPInstanceUID == uid_at_z[z]
                n_contours += 1
        assert n_contours > 24 * 3


def test_roi_names_types_and_cohort_json_agree(patients) -> None:
    _, _, items = patients
    for record, _, rt, _ in items:
        names = [roi.ROIName for roi in rt.StructureSetROISequence]
        assert list(record["roi_names"]) == names
        assert [(roi.ROINumber, roi.ROIGenerationAlgorithm) for roi in rt.StructureSetROISequence] == [
            (number, "MANUAL") for number in range(1, len(names) + 1)]  # contoured by hand, as in TCIA
        kinds = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
        numbers = {roi.ROIName: roi.ROINumber for roi in rt.StructureSetROISequence}
        annotated = [True] + [False] * 7
        for name, label in record["roi_names"].items():
            assert organs.match_roi_name(name) == label, name
            expected_kind = {organs.GTV: "GTV", organs.PTV: "PTV"}.get(label, "ORGAN")
            if name in ("External", "CONTOUR EXTERNE"):
                expected_kind = "EXTERNAL"
            assert kinds[numbers[name]] == expected_kind
            if label == organs.BOTH_LUNGS:
                annotated[organs.RIGHT_LUNG] = annotated[organs.LEFT_LUNG] = True
            elif label is not None:
                annotated[label] = True
        assert record["annotated"] == annotated
        assert organs.PTV not in record["roi_names"].values()  # no PTV by default


def test_fixture_covers_the_roi_variants(synthetic_cohort) -> None:
    _, _, cohort = synthetic_cohort
    names = [set(r["roi_names"]) for r in cohort]
    assert names[0] == {"GTV-1", "Lung-Right", "Lung-Left", "Heart", "Esophagus", "Spinal-Cord"}
    assert names[1] == {"GTV-1", "gtv-2", "Lung-Right", "Lung-Left", "Esophagus", "Spinal-Cord"}
    assert names[2] == {"GTV-1", "Lungs-Total", "Heart", "Esophagus", "Spinal-Cord", "External", "Lungs-GTV"}
    assert names[3] == {"GTV primaire", "gtv-2", "POUMON D", "POUMON G", "COEUR", "MOELLE"}
    assert [r["lungs_total"] for r in cohort] == [False, False, True, False]
    assert [r["french_names"] for r in cohort] == [False, False, False, True]
    assert [r["annotated"][organs.HEART] for r in cohort] == [True, False, True, True]


def test_first_six_variants_cover_every_option() -> None:
    default = Variant()
    for f in dataclasses.fields(Variant):
        values = {getattr(v, f.name) for v in VARIANT_CYCLE}
        assert values - {getattr(default, f.name)}, f"no variant sets {f.name}"
    assert {v.extra_gtvs for v in VARIANT_CYCLE} == {0, 1, 2}


# --------------------------------------------------------------------------------------------
# truth maps: every structure, left/right, priority, Hounsfield values
# --------------------------------------------------------------------------------------------
def test_truth_has_every_anatomical_structure_even_when_not_contoured(patients) -> None:
    _, _, items = patients
    for record, _, _, truth in items:
        labels = sitk.GetArrayFromImage(truth)
        present = sorted(int(v) for v in np.unique(labels))
        assert present == [0, 1, 3, 4, 5, 6, 7] == [0] + record["labels_present"]


def test_right_lung_is_on_the_patient_right(patients) -> None:
    _, _, items = patients
    for _, _, _, truth in items:
        labels = sitk.GetArrayFromImage(truth)
        ox, sx = truth.GetOrigin()[0], truth.GetSpacing()[0]
        x_right = ox + sx * np.nonzero(labels == organs.RIGHT_LUNG)[2]
        x_left = ox + sx * np.nonzero(labels == organs.LEFT_LUNG)[2]
        assert x_right.max() < x_left.min()  # LPS: patient right has the more negative x
        assert x_left.mean() - x_right.mean() > 80


def test_rasterising_the_lung_contours_gives_the_truth_lungs(patients) -> None:
    """The truth map is the even-odd rasterisation of the RTSTRUCT polygons, priority applied."""
    _, _, items = patients
    for record, _, rt, truth in items:
        labels = sitk.GetArrayFromImage(truth)
        for name, label in record["roi_names"].items():
            if label not in (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.SPINAL_CORD, organs.HEART):
                continue
            mask = mpl_rasterise(contours_of(rt)[name], truth)
            assert mask.sum() > 0
            assert np.all((labels == label) <= mask), name  # every truth voxel is inside
            winners = organs.PRIORITY[: organs.PRIORITY.index(label)]
            assert np.all(np.isin(labels[mask], (label,) + winners)), name  # the rest went to winners


def test_lungs_total_contours_cover_both_truth_lungs(patients) -> None:
    _, _, items = patients
    record, _, rt, truth = items[2]
    assert record["lungs_total"]
    labels = sitk.GetArrayFromImage(truth)
    mask = mpl_rasterise(contours_of(rt)["Lungs-Total"], truth)
    assert np.all(np.isin(labels, (organs.RIGHT_LUNG, organs.LEFT_LUNG)) <= mask)


def test_hounsfield_values_are_plausible_per_structure(patients) -> None:
    raw_dir, _, items = patients
    for record, _, _, truth in items:
        hu = sitk.GetArrayFromImage(read_series(raw_dir / record["ct_folder"])).astype(float)
        labels = sitk.GetArrayFromImage(truth)
        assert hu[labels == organs.RIGHT_LUNG].mean() < -700
        assert hu[labels == organs.LEFT_LUNG].mean() < -700
        assert (hu[np.isin(labels, (organs.RIGHT_LUNG, organs.LEFT_LUNG))] > 200).mean() < 0.001  # no rib
        assert 0 < hu[labels == organs.HEART].mean() < 100
        assert -100 < hu[labels == organs.SPINAL_CORD].mean() < 100
        assert -100 < hu[labels == organs.GTV].mean() < 100
        assert hu[:, :3, :3].mean() < -980  # air in the corners
        assert hu.min() >= -1024
        # bone: the vertebral body just in front of (anterior = -y) the cord
        sy = truth.GetSpacing()[1]
        for k in range(labels.shape[0]):
            rows, cols = np.nonzero(labels[k] == organs.SPINAL_CORD)
            if rows.size == 0:
                continue
            r, c = int(rows.min()), int(round(cols.mean()))
            box = hu[k, max(r - int(30 / sy), 0): r, c - 1: c + 2]
            assert box.max() > 300, (record["patient_id"], k)


# --------------------------------------------------------------------------------------------
# generate_patient options
# --------------------------------------------------------------------------------------------
def test_patient_with_cavity_extra_gtvs_ptv_and_no_heart_or_esophagus(tmp_path: Path) -> None:
    record = generate_patient(tmp_path / "raw", tmp_path / "truth", "SYN-101", seed=5, size=48,
                              slices=16, with_ptv=True, heart_contour=False,
                              esophagus_contour=False, extra_gtvs=2, lung_cavity=True,
                              unrelated_rois=True)
    assert set(record["roi_names"]) == {"GTV-1", "gtv-2", "gtv-3", "PTV", "Lung-Right", "Lung-Left",
                                        "Spinal-Cord", "External", "Lungs-GTV"}
    assert record["annotated"] == [True, True, True, True, True, False, False, True]
    truth = sitk.ReadImage(str(tmp_path / "truth" / "SYN-101.nii.gz"))
    labels = sitk.GetArrayFromImage(truth)
    assert set(np.unique(labels)) == set(range(8))  # heart/esophagus in the anatomy anyway
    rt = pydicom.dcmread(tmp_path / "raw" / record["rtstruct_file"])
    contours = contours_of(rt)
    # the cavity: some slice of one lung has two contours, the second inside the first
    cavity_lung = [n for n in ("Lung-Right", "Lung-Left")
                   if len({c.ContourData[2] for c in contours[n]}) < len(contours[n])]
    assert len(cavity_lung) == 1
    lung = contours[cavity_lung[0]]
    outer_only = mpl_rasterise([c for i, c in enumerate(lung)
                                if i == 0 or lung[i - 1].ContourData[2] != c.ContourData[2]], truth)
    with_hole = mpl_rasterise(lung, truth)
    hole = outer_only & ~with_hole
    assert hole.sum() > 0 and np.all(labels[hole] != record["roi_names"][cavity_lung[0]])
    # PTV contains every GTV voxel; GTV wins over PTV in the label map
    ptv = mpl_rasterise(contours["PTV"], truth)
    assert np.all((labels == organs.GTV) <= ptv)
    assert (labels == organs.PTV).sum() > (labels == organs.GTV).sum()
    assert json_record_of(tmp_path / "truth", "SYN-101") == record


def test_patient_with_lungs_total_and_french_names(tmp_path: Path) -> None:
    record = generate_patient(tmp_path / "raw", tmp_path / "truth", "SYN-102", seed=5, size=32,
                              slices=8, lungs_total=True, french_names=True)
    assert set(record["roi_names"]) == {"GTV primaire", "POUMONS", "COEUR", "OESOPHAGE", "MOELLE"}
    assert record["roi_names"]["POUMONS"] == organs.BOTH_LUNGS
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "truth" / "SYN-102.nii.gz")))
    assert {organs.RIGHT_LUNG, organs.LEFT_LUNG} <= set(np.unique(labels).tolist())
    with pytest.raises(FileExistsError, match="SYN-102 exists"):
        generate_patient(tmp_path / "raw", tmp_path / "truth", "SYN-102", seed=5, size=32, slices=8)


@pytest.mark.parametrize("kwargs,message", [
    ({"size": 16}, "size must be an integer in 32-1024, got 16"),
    ({"size": 64.0}, "size must be an integer"),
    ({"slices": 4}, "slices must be an integer in 8-400, got 4"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"extra_gtvs": 3}, "extra_gtvs must be 0, 1 or 2, got 3"),
])
def test_generate_patient_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_patient(tmp_path / "raw", tmp_path / "truth", **kwargs)
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_patients_do_not_depend_on_cohort_size(
        synthetic_cohort, tmp_path: Path) -> None:
    raw_dir, truth_dir, cohort = synthetic_cohort
    again = generate_cohort(tmp_path / "raw", tmp_path / "truth", n_patients=2, seed=7, size=64, slices=24)
    assert again == cohort[:2]
    first_two = {k: v for k, v in tree_bytes(raw_dir).items() if k.split("/")[0] in ("SYN-001", "SYN-002")}
    assert tree_bytes(tmp_path / "raw") == first_two
    for pid in ("SYN-001", "SYN-002"):
        assert (tmp_path / "truth" / f"{pid}.nii.gz").read_bytes() == (truth_dir / f"{pid}.nii.gz").read_bytes()


def test_another_seed_gives_another_cohort(synthetic_cohort, tmp_path: Path) -> None:
    raw_dir, _, cohort = synthetic_cohort
    other = generate_cohort(tmp_path / "raw", tmp_path / "truth", n_patients=1, seed=8, size=64, slices=24)
    assert other[0]["ct_series_uid"] != cohort[0]["ct_series_uid"]
    assert other[0]["origin_xyz"] != cohort[0]["origin_xyz"]
    new, old = tree_bytes(tmp_path / "raw"), tree_bytes(raw_dir / "SYN-001")
    assert not set(new.values()) & set(old.values())


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_main_writes_refuses_a_non_empty_folder_and_overwrites_on_request(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--data-root", str(tmp_path / "DATA"), "--patients", "2", "--size", "32", "--slices", "8"]
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "DATA" / "raw" / "synthetic").iterdir()) == ["SYN-001", "SYN-002"]
    assert "2 patients written to" in capsys.readouterr().err

    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0], err

    assert main(argv[:3] + ["1"] + argv[4:] + ["--overwrite"]) == 0  # replaced, not merged
    assert sorted(p.name for p in (tmp_path / "DATA" / "raw" / "synthetic").iterdir()) == ["SYN-001"]
    assert sorted(p.name for p in (tmp_path / "DATA" / "synthetic_truth").iterdir()) == [
        "SYN-001.nii.gz", "cohort.json"]


def test_overwrite_never_deletes_files_it_did_not_write(tmp_path: Path) -> None:
    precious = tmp_path / "out" / "thesis.tex"
    precious.parent.mkdir()
    precious.write_text("years of work")
    with pytest.raises(FileExistsError, match="is not empty"):
        generate_cohort(tmp_path / "out", tmp_path / "truth", n_patients=1, size=32, slices=8)
    with pytest.raises(FileExistsError, match="holds thesis.tex, which this script did not write"):
        generate_cohort(tmp_path / "out", tmp_path / "truth", n_patients=1, size=32, slices=8,
                        overwrite=True)
    assert precious.read_text() == "years of work"


@pytest.mark.parametrize("argv,fragment", [
    (["--size", "16"], "argument --size: must be in 32-1024, got 16"),
    (["--size", "abc"], "argument --size: expected an integer, got 'abc'"),
    (["--size", "64.5"], "argument --size: expected an integer"),
    (["--patients", "0"], "argument --patients: must be in 1-10000, got 0"),
    (["--slices", "4"], "argument --slices: must be in 8-400, got 4"),
    (["--seed", "-1"], "argument --seed: must be in 0-4294967295, got -1"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_invalid_arguments_give_one_line_and_exit_2(argv: list[str], fragment: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
