"""Phase 2 (convert_dicom_to_nifti.py): real patients against the plastimatch/SimpleITK reference,
and every messy-collection case of issue 3, each on its own tiny series.

Error-path series are built by editing DICOM files with pydicom. The template is a 32x32,
8-10 slice CT taken from two sources (the ``template`` fixture is parametrised over both):
``synthetic`` (make_synthetic_cohort.generate_patient: signed int16, intercept -1024, always
available) and ``ibsi`` (a crop of the real IBSI-1 phantom CT: unsigned 12-bit, intercept
-1000; skipped without ../shared/data).
"""
from __future__ import annotations

import copy
import gzip
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

import convert_dicom_to_nifti as conv
from thoracic_seg.batch import DONE, FAILED, SKIPPED, PatientError
from thoracic_seg.dicom_ct import (
    PatientDicom, RTStructInfo, SeriesInfo, choose_ct_series, find_dicom_series, read_ct_series,
)
from thoracic_seg.layout import REPORT_NAME, read_report

SIZE = 32
IBSI_SLICES = 10


# --------------------------------------------------------------------------------------------
# Templates and patient builders
# --------------------------------------------------------------------------------------------
@dataclass
class Template:
    """A small CT series (datasets sorted by z, ascending) and an RTSTRUCT that references it."""

    name: str
    slices: list[pydicom.Dataset]
    rtstruct: pydicom.Dataset

    def hu(self) -> np.ndarray:
        """Expected HU volume (z, y, x), computed here independently of the module."""
        return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                         for ds in self.slices]).astype(np.int16)

    def z(self) -> list[float]:
        return [float(ds.ImagePositionPatient[2]) for ds in self.slices]


def _sorted_by_z(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _synthetic_template(tmp: Path) -> Template:
    from make_synthetic_cohort import generate_patient

    record = generate_patient(tmp / "raw", tmp / "truth", "SYN-001", seed=5, size=SIZE, slices=8)
    slices = [pydicom.dcmread(p) for p in (tmp / "raw" / record["ct_folder"]).glob("*.dcm")]
    return Template("synthetic", _sorted_by_z(slices), pydicom.dcmread(tmp / "raw" / record["rtstruct_file"]))


def _ibsi_template(shared_data: Path) -> Template:
    """Ten slices of the IBSI phantom cropped to 32x32 (ImagePositionPatient moved with the crop)."""
    folder = shared_data / "ibsi1-ct" / "dicom"
    slices = _sorted_by_z([pydicom.dcmread(p) for p in sorted((folder / "image").glob("*.dcm"))])
    slices = slices[20:20 + IBSI_SLICES]
    row0, col0 = 90, 80
    for ds in slices:
        crop = ds.pixel_array[row0:row0 + SIZE, col0:col0 + SIZE].copy()
        dr, dc = (float(v) for v in ds.PixelSpacing)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x + col0 * dc:.4f}", f"{y + row0 * dr:.4f}", f"{z:.4f}"]
        ds.Rows = ds.Columns = SIZE
        ds.PixelData = crop.tobytes()
    rtstruct = pydicom.dcmread(next((folder / "mask").glob("*.dcm")))
    return Template("ibsi", slices, rtstruct)


@pytest.fixture(scope="session", params=["synthetic", "ibsi"])
def template(request, tmp_path_factory) -> Template:
    if request.param == "synthetic":
        return _synthetic_template(tmp_path_factory.mktemp("template"))
    return _ibsi_template(request.getfixturevalue("shared_data"))


def _set_series_uid(datasets: list[pydicom.Dataset], series_uid: str) -> None:
    for k, ds in enumerate(datasets):
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def write_patient(root: Path, patient_id: str, template: Template, *, edit=None, series_uid: str | None = None,
                  folder: str = "01-study/1.000-series", names: list[str] | None = None) -> Path:
    """Write ``template``'s slices as ``root/<patient_id>/<folder>/<name>``; return the series folder.

    ``edit(datasets)`` may change the (deep-copied, z-sorted) datasets or the list before writing;
    ``series_uid`` gives the copy its own SeriesInstanceUID and SOPInstanceUIDs.
    """
    datasets = copy.deepcopy(template.slices)
    for ds in datasets:
        ds.PatientID = patient_id
    if series_uid:
        _set_series_uid(datasets, series_uid)
    if edit is not None:
        datasets = edit(datasets) or datasets
    target = root / _folder_name(patient_id) / folder
    target.mkdir(parents=True, exist_ok=True)
    names = names or [f"{k:06d}.dcm" for k in range(len(datasets))]
    for name, ds in zip(names, datasets):
        pydicom.dcmwrite(target / name, ds, enforce_file_format=True)
    return target


def write_rtstruct(root: Path, patient_id: str, template: Template, referenced_series_uid: str) -> Path:
    """The template's RTSTRUCT in its own study folder, pointing at ``referenced_series_uid``."""
    ds = copy.deepcopy(template.rtstruct)
    ds.PatientID = patient_id
    for frame in ds.ReferencedFrameOfReferenceSequence:
        for study in frame.RTReferencedStudySequence:
            for series in study.RTReferencedSeriesSequence:
                series.SeriesInstanceUID = referenced_series_uid
    path = root / _folder_name(patient_id) / "02-rt" / "2.000-rtstruct" / "000000.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _folder_name(patient_id: str) -> str:
    return patient_id.replace("/", "_").replace(".", "_") or "unnamed"


def convert(tmp_path: Path, **kwargs) -> dict[str, conv.PatientResult]:
    """run() on ``tmp_path/raw`` with outputs under ``tmp_path/processed``; results by patient id."""
    results = conv.run(data_root=tmp_path, **kwargs)
    return {r.patient_id: r for r in results}


def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "processed" / "ct_nifti"


def read_volume(tmp_path: Path, patient_id: str) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(out_dir(tmp_path) / f"{patient_id}.nii.gz"))
    return sitk.GetArrayFromImage(image), image


def assert_failed_cleanly(tmp_path: Path, results: dict, patient_id: str, match: str) -> None:
    """The patient failed with ``match`` in its message, left no output, and GOOD still converted."""
    result = results[patient_id]
    assert result.status == FAILED, result
    assert result.message and re.search(match, result.message), result.message
    assert not (out_dir(tmp_path) / f"{patient_id}.nii.gz").exists()
    assert not (out_dir(tmp_path) / ".partial").exists()
    assert results["GOOD"].status == DONE
    report = read_report(out_dir(tmp_path) / REPORT_NAME)
    assert report[patient_id]["status"] == FAILED and report[patient_id]["message"] == result.message
    assert report["GOOD"]["status"] == DONE


def nifti_affine(path: Path) -> np.ndarray:
    """The sform (srow_x/y/z, RAS mm) straight from the NIfTI-1 header bytes; checks sform_code > 0."""
    with gzip.open(path, "rb") as handle:
        header = handle.read(348)
    assert int(np.frombuffer(header, "<i4", 1, 0)[0]) == 348, "not a little-endian NIfTI-1 header"
    assert int(np.frombuffer(header, "<i2", 1, 254)[0]) > 0, "sform_code is 0"
    rows = np.frombuffer(header, "<f4", 12, 280).reshape(3, 4).astype(np.float64)
    return np.vstack([rows, [0, 0, 0, 1]])


# --------------------------------------------------------------------------------------------
# Real data: the two NSCLC-Radiomics patients
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_converted(real_sample_root, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("real")
    results = conv.run(data_root=data_root, dicom_root=real_sample_root, workers=1)
    return data_root, {r.patient_id: r for r in results}


@pytest.mark.real_data
@pytest.mark.parametrize("patient_id", ["LUNG1-005", "LUNG1-010"])
def test_real_patient_matches_reference_json(real_converted, reference_json, patient_id):
    data_root, results = real_converted
    assert results[patient_id].status == DONE and results[patient_id].message == ""
    ref = reference_json[patient_id]
    array, image = read_volume(data_root, patient_id)
    assert array.dtype == np.int16
    assert list(array.shape) == ref["shape_zyx"]
    # NIfTI stores geometry as float32: compare at float32 precision.
    np.testing.assert_allclose(image.GetSpacing(), ref["spacing_xyz_mm"], rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ref["origin_xyz_mm"], rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), ref["direction"], atol=1e-6)
    assert int(array.min()) == ref["hu_min"]
    assert int(array.max()) == ref["hu_max"]
    assert int(array.sum(dtype=np.int64)) == ref["hu_sum"]
    row = read_report(data_root / "processed" / "ct_nifti" / REPORT_NAME)[patient_id]
    series_folder = Path(row["series_folder"]).relative_to(Path(row["patient_folder"]).parent)
    assert series_folder.as_posix() == ref["ct_series_folder"]
    assert row["slices"] == "91" and row["shape_zyx"] == "91 512 512" and row["spacing_xyz"] == "0.977 0.977 3"


@pytest.mark.real_data
@pytest.mark.parametrize("patient_id", ["LUNG1-005", "LUNG1-010"])
def test_real_patient_equals_simpleitk_series_reader(real_converted, real_sample_root, reference_json, patient_id):
    data_root, _ = real_converted
    folder = real_sample_root / reference_json[patient_id]["ct_series_folder"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    expected = reader.Execute()
    array, image = read_volume(data_root, patient_id)
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)


@pytest.mark.real_data
@pytest.mark.parametrize("patient_id", ["LUNG1-005", "LUNG1-010"])
def test_real_nifti_affine_puts_every_dicom_slice_at_its_patient_position(
        real_converted, real_sample_root, reference_json, patient_id):
    """Every DICOM file's pixels sit at the voxel the file's sform says is its IPP (LPS -> RAS)."""
    data_root, _ = real_converted
    path = data_root / "processed" / "ct_nifti" / f"{patient_id}.nii.gz"
    affine = nifti_affine(path)
    array, _ = read_volume(data_root, patient_id)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    files = sorted((real_sample_root / reference_json[patient_id]["ct_series_folder"]).glob("*.dcm"))
    assert len(files) == array.shape[0]
    for f in files:
        ds = pydicom.dcmread(f)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        voxel = np.linalg.solve(affine, np.append(lps_to_ras @ ipp, 1.0))[:3]
        np.testing.assert_allclose(voxel, np.round(voxel), atol=1e-3)
        i, j, k = (int(v) for v in np.round(voxel))
        assert (i, j) == (0, 0)
        np.testing.assert_array_equal(array[k], ds.pixel_array * int(ds.RescaleSlope) + int(ds.RescaleIntercept))
        # a voxel away from the corner: column 300, row 100 of this slice
        dr, dc = (float(v) for v in ds.PixelSpacing)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        lps = ipp + 300 * dc * iop[:3] + 100 * dr * iop[3:]
        np.testing.assert_allclose((affine @ [300, 100, k, 1])[:3], lps_to_ras @ lps, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Synthetic cohort end to end: the CT grid is the truth label map's grid; the report links UIDs
# --------------------------------------------------------------------------------------------
def test_synthetic_cohort_end_to_end(synthetic_cohort, tmp_path):
    raw_dir, truth_dir, cohort = synthetic_cohort
    results = conv.run(data_root=tmp_path, dicom_root=raw_dir)
    assert [r.status for r in results] == [DONE] * len(cohort)
    report = read_report(out_dir(tmp_path) / REPORT_NAME)
    for record in cohort:
        pid = record["patient_id"]
        _, image = read_volume(tmp_path, pid)
        truth = sitk.ReadImage(str(truth_dir / record["truth_file"]))
        assert image.GetSize() == truth.GetSize() and list(image.GetSize()[::-1]) == record["shape_zyx"]
        np.testing.assert_allclose(image.GetOrigin(), truth.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), truth.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), truth.GetDirection(), atol=1e-6)
        row = report[pid]
        assert row["series_uid"] == record["ct_series_uid"]
        assert row["frame_of_reference_uid"] == record["frame_of_reference_uid"]
        assert Path(row["patient_folder"]) == (raw_dir / pid).resolve()
        assert Path(row["series_folder"]) == (raw_dir / record["ct_folder"]).resolve()


# --------------------------------------------------------------------------------------------
# Clean series, layout and series choice
# --------------------------------------------------------------------------------------------
def test_clean_series_converts_with_exact_hu_and_geometry(tmp_path, template):
    write_patient(tmp_path / "raw", "GOOD", template)
    results = convert(tmp_path)
    assert results["GOOD"].status == DONE and results["GOOD"].message == ""
    array, image = read_volume(tmp_path, "GOOD")
    np.testing.assert_array_equal(array, template.hu())
    first = template.slices[0]
    np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in first.ImagePositionPatient], atol=1e-4)
    step = (template.z()[-1] - template.z()[0]) / (len(template.slices) - 1)
    np.testing.assert_allclose(image.GetSpacing(), [float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), step],
                               rtol=1e-6)


def test_read_ct_series_lists_each_slice_uid_and_position(tmp_path, template):
    folder = write_patient(tmp_path / "raw", "GOOD", template)
    ct = read_ct_series(sorted(folder.glob("*.dcm"), reverse=True))
    assert [s.sop_instance_uid for s in ct.slices] == [ds.SOPInstanceUID for ds in template.slices]
    assert [s.z_mm for s in ct.slices] == pytest.approx(template.z(), abs=1e-4)
    assert ct.series_uid == template.slices[0].SeriesInstanceUID
    assert ct.frame_of_reference_uid == template.slices[0].FrameOfReferenceUID
    assert ct.image.GetPixelID() == sitk.sitkInt16 and ct.filled_slices == 0


def test_find_dicom_series_patient_folders(tmp_path, template):
    """Collection layout: the top-level folder; a folder of several patients: each patient's own
    subfolder; a flat dump of two patients: the root itself."""
    write_patient(tmp_path / "collection", "P1", template)
    write_patient(tmp_path / "collection" / "cohort", "P2", template, series_uid=generate_uid())
    write_rtstruct(tmp_path / "collection" / "cohort", "P2", template, "1.2.3")
    write_patient(tmp_path / "collection" / "cohort", "P3", template, series_uid=generate_uid())
    flat = tmp_path / "flat"
    write_patient(flat, "A", template, folder=".", names=[f"a{k}.dcm" for k in range(len(template.slices))])
    write_patient(flat, "B", template, series_uid=generate_uid(), folder=".",
                  names=[f"b{k}.dcm" for k in range(len(template.slices))])
    for name in ("A", "B"):  # move the files out of <flat>/<id>/. into <flat>
        for f in (flat / name).glob("*.dcm"):
            f.rename(flat / f.name)
        (flat / name).rmdir()
    p1, p2, p3 = find_dicom_series(tmp_path / "collection")
    assert (p1.patient_id, p2.patient_id, p3.patient_id) == ("P1", "P2", "P3")
    assert p1.folder == tmp_path / "collection" / "P1"
    assert p2.folder == tmp_path / "collection" / "cohort" / "P2"  # CT and RTSTRUCT study folders
    assert p3.folder == tmp_path / "collection" / "cohort" / "P3" / "01-study" / "1.000-series"
    assert [r.referenced_series_uids for r in p2.rtstructs] == [{"1.2.3"}] and p2.ignored == {"RTSTRUCT": 1}
    a, b = find_dicom_series(flat)
    assert (a.patient_id, b.patient_id) == ("A", "B") and a.folder == b.folder == flat
    assert [len(s.files) for s in a.ct_series.values()] == [len(template.slices)]


def _series(uid: str, n: int) -> SeriesInfo:
    return SeriesInfo(uid, "S", "F1", [Path(f"/d/{uid}/{k}.dcm") for k in range(n)])


@pytest.mark.parametrize("sizes, referenced, frames, expected, why", [
    ({"1.1": 5}, set(), set(), "1.1", ""),
    ({"1.1": 5, "1.2": 9}, set(), set(), "1.2", "because it has the most slices; ignored 1.1 (5 slices)"),
    ({"1.1": 5, "1.2": 9}, {"1.1"}, {"F1"}, "1.1", "because it is referenced by the RTSTRUCT; ignored 1.2"),
    ({"1.1": 5, "1.2": 9, "1.3": 7}, {"1.1", "1.3"}, set(), "1.3",
     "because it is referenced by the RTSTRUCT and has the most slices of those 2; ignored 1.1 (5 slices), 1.2"),
    ({"1.1": 9, "1.2": 9}, set(), set(), "1.1", "because it has the most slices"),  # tie: first UID
    ({"1.1": 5, "1.2": 9}, {"9.9"}, set(), "1.2", "the RTSTRUCT references series 9.9 not found here"),
    ({"1.1": 5, "1.2": 9}, set(), {"F2"}, "1.2", "because it has the most slices"),
    ({"1.1": 5, "1.2": 9}, set(), {"F1"}, "1.2", "because it is in the RTSTRUCT's frame of reference"),
])
def test_choose_ct_series(sizes, referenced, frames, expected, why):
    patient = PatientDicom("P", "P", Path("/d"), {u: _series(u, n) for u, n in sizes.items()})
    if referenced or frames:
        patient.rtstructs.append(RTStructInfo(Path("/d/rs.dcm"), referenced, frames))
    chosen, note = choose_ct_series(patient)
    assert chosen.series_uid == expected
    assert (why in note) if why else note == ""


def test_choose_ct_series_without_ct_names_what_was_found():
    patient = PatientDicom("P", "P", Path("/d"))
    patient.ignored.update({"RTSTRUCT": 1, "SEG": 2})
    with pytest.raises(PatientError, match=r"no CT image series under /d \(found: 1 RTSTRUCT, 2 SEG\)"):
        choose_ct_series(patient)


# --------------------------------------------------------------------------------------------
# Error paths: each builds its own patient next to a GOOD one in the same run
# --------------------------------------------------------------------------------------------
def test_truncated_file_in_series_fails_naming_it(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    folder = write_patient(raw, "BAD", template)
    victim = folder / "000003.dcm"
    victim.write_bytes(victim.read_bytes()[: -SIZE * SIZE])  # header intact, pixel data cut short
    results = convert(tmp_path)
    assert_failed_cleanly(tmp_path, results, "BAD", r"000003\.dcm: cannot (decode pixel data|read DICOM file)")


def test_garbage_file_in_series_is_named_and_leaves_a_gap(tmp_path, template, caplog):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    folder = write_patient(raw, "BAD", template)
    (folder / "000003.dcm").write_bytes(b"this is not DICOM" * 50)
    with caplog.at_level(logging.WARNING, logger="convert_dicom_to_nifti"):
        results = convert(tmp_path)
    assert any("000003.dcm: not a DICOM file" in r.getMessage() for r in caplog.records)
    assert_failed_cleanly(tmp_path, results, "BAD",
                          r"non-uniform slice spacing.*"
                          r"unreadable file\(s\) beside the series: 000003\.dcm: not a DICOM file")


def test_rtdose_rtplan_seg_and_text_beside_the_ct_are_ignored(tmp_path, template, caplog):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    folder = write_patient(raw, "MIXED", template)
    for k, (sop_class, modality) in enumerate([("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE"),
                                               ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN"),
                                               ("1.2.840.10008.5.1.4.1.1.66.4", "SEG")]):
        ds = copy.deepcopy(template.slices[0])  # same series UID and position as a real slice
        ds.PatientID, ds.SOPClassUID, ds.Modality = "MIXED", sop_class, modality
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        pydicom.dcmwrite(folder / f"object{k}.dcm", ds, enforce_file_format=True)
    (folder / "notes.txt").write_text("exported by a planning system\n")
    with caplog.at_level(logging.WARNING, logger="convert_dicom_to_nifti"):
        results = convert(tmp_path)
    assert results["MIXED"].status == DONE and results["GOOD"].status == DONE
    assert any("notes.txt: not a DICOM file" in r.getMessage() for r in caplog.records)
    array, _ = read_volume(tmp_path, "MIXED")
    np.testing.assert_array_equal(array, template.hu())
    (patient,) = [p for p in find_dicom_series(raw) if p.patient_id == "MIXED"]
    assert patient.ignored == {"RTDOSE": 1, "RTPLAN": 1, "SEG": 1}


def _drop_first_two(datasets):
    return datasets[2:]


@pytest.mark.parametrize("rtstruct_refers_to_smaller", [False, True])
def test_two_ct_series_in_one_patient_folder(tmp_path, template, rtstruct_refers_to_smaller):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "TWO", template, folder="01-study/1.000-full")
    small_uid = generate_uid()
    write_patient(raw, "TWO", template, folder="01-study/2.000-partial", series_uid=small_uid, edit=_drop_first_two)
    if rtstruct_refers_to_smaller:
        write_rtstruct(raw, "TWO", template, small_uid)
    results = convert(tmp_path)
    array, _ = read_volume(tmp_path, "TWO")
    row = read_report(out_dir(tmp_path) / REPORT_NAME)["TWO"]
    n = len(template.slices)
    if rtstruct_refers_to_smaller:
        assert "referenced by the RTSTRUCT" in results["TWO"].message
        np.testing.assert_array_equal(array, template.hu()[2:])
        assert row["series_uid"] == small_uid and row["slices"] == str(n - 2)
    else:
        assert "the most slices" in results["TWO"].message
        np.testing.assert_array_equal(array, template.hu())
        assert row["series_uid"] == template.slices[0].SeriesInstanceUID and row["slices"] == str(n)
    assert f"ignored {small_uid if not rtstruct_refers_to_smaller else template.slices[0].SeriesInstanceUID}" \
        in results["TWO"].message
    assert row["message"] == results["TWO"].message and results["GOOD"].status == DONE


def test_rtstruct_frame_of_reference_is_also_read_from_the_roi_sequence(tmp_path, template):
    """ReferencedFrameOfReferenceSequence is optional (type 3); an RTSTRUCT without it still names its
    frame in StructureSetROISequence, which phase 2 reads through the reader phase 2.5 pairs with
    (``thoracic_seg.rtstruct_read.referenced_uids``): the smaller series in that frame is chosen."""
    raw = tmp_path / "raw"
    write_patient(raw, "TWO", template, folder="01-study/1.000-full")
    small_uid, small_frame = generate_uid(), generate_uid()

    def other_frame(datasets):
        for ds in datasets:
            ds.FrameOfReferenceUID = small_frame
        return datasets[2:]

    write_patient(raw, "TWO", template, folder="01-study/2.000-partial", series_uid=small_uid, edit=other_frame)
    path = write_rtstruct(raw, "TWO", template, "1.2.3")
    ds = pydicom.dcmread(path)
    del ds.ReferencedFrameOfReferenceSequence
    for item in ds.StructureSetROISequence:
        item.ReferencedFrameOfReferenceUID = small_frame
    ds.save_as(path)
    (patient,) = find_dicom_series(raw)
    (rtstruct,) = patient.rtstructs
    assert (rtstruct.referenced_series_uids, rtstruct.frame_of_reference_uids) == (set(), {small_frame})
    chosen, note = choose_ct_series(patient)
    assert chosen.series_uid == small_uid and "because it is in the RTSTRUCT's frame of reference" in note


def test_duplicate_slice_is_dropped_with_a_warning(tmp_path, template, caplog):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def duplicate(datasets):
        twin = copy.deepcopy(datasets[4])
        twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return datasets + [twin]

    write_patient(raw, "DUP", template, edit=duplicate)
    with caplog.at_level(logging.WARNING, logger="convert_dicom_to_nifti"):
        results = convert(tmp_path)
    last = len(template.slices)
    assert results["DUP"].status == DONE
    assert f"dropped duplicate slice {last:06d}.dcm" in results["DUP"].message
    assert "000004.dcm" in results["DUP"].message
    assert any("duplicate slice position" in r.getMessage() for r in caplog.records)
    array, _ = read_volume(tmp_path, "DUP")
    np.testing.assert_array_equal(array, template.hu())


def _drop_slice_3(datasets):
    return datasets[:3] + datasets[4:]


def test_missing_slice_fails_with_gap_positions(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "GAP", template, edit=_drop_slice_3)
    results = convert(tmp_path)
    z = template.z()
    gap = rf"{z[2]:.2f} -> {z[4]:.2f} mm \(step {z[4] - z[2]:.2f}\).*--fill-gaps"
    assert_failed_cleanly(tmp_path, results, "GAP",
                          rf"non-uniform slice spacing.*nominal step {z[1] - z[0]:.3f} mm.*{gap}")


def test_missing_slice_is_interpolated_with_fill_gaps(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "GAP", template, edit=_drop_slice_3)
    results = convert(tmp_path, fill_gaps=True)
    assert results["GAP"].status == DONE
    assert "filled 1 missing slice(s) by linear interpolation" in results["GAP"].message
    array, image = read_volume(tmp_path, "GAP")
    hu = template.hu()
    expected = hu.copy()
    expected[3] = np.rint((hu[2].astype(np.float64) + hu[4]) / 2)
    np.testing.assert_array_equal(array, expected)
    assert image.GetSpacing()[2] == pytest.approx(template.z()[1] - template.z()[0], abs=1e-4)
    row = read_report(out_dir(tmp_path) / REPORT_NAME)["GAP"]
    assert (row["filled_slices"], row["slices"]) == ("1", str(len(hu) - 1))
    assert row["shape_zyx"] == f"{len(hu)} {SIZE} {SIZE}"
    ct = read_ct_series(sorted((raw / "GAP").rglob("*.dcm")), fill_gaps=True)
    assert ct.slices[3].sop_instance_uid is None and ct.slices[3].z_mm == pytest.approx(template.z()[3], abs=1e-4)


def test_shuffled_file_names_and_instance_numbers(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    n = len(template.slices)
    order = np.random.default_rng(0).permutation(n)

    def shuffle_instances(datasets):
        for ds, number in zip(datasets, order):
            ds.InstanceNumber = int(number) + 1

    names = [f"IMG{int(k) * 7919 % 1000:04d}" for k in order[::-1]]  # no .dcm suffix either
    write_patient(raw, "SHUF", template, edit=shuffle_instances, names=names)
    results = convert(tmp_path)
    assert results["SHUF"].status == DONE
    array, image = read_volume(tmp_path, "SHUF")
    np.testing.assert_array_equal(array, template.hu())
    assert image.GetOrigin()[2] == pytest.approx(min(template.z()), abs=1e-4)


def test_per_slice_rescale_intercept_and_slope(tmp_path, template):
    """Every slice gets its own intercept (and one a slope of 0.5); the HU must not change."""
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    hu = template.hu()

    def vary_rescale(datasets):
        for k, ds in enumerate(datasets):
            slope, intercept = (0.5, -1100) if k == 5 else (1, -1000 - 10 * k)
            ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
            ds.PixelData = np.rint((hu[k] - intercept) / slope).astype("<i2").tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(intercept)

    write_patient(raw, "RESCALE", template, edit=vary_rescale)
    results = convert(tmp_path)
    assert results["RESCALE"].status == DONE
    array, _ = read_volume(tmp_path, "RESCALE")
    np.testing.assert_array_equal(array, hu)


def test_hu_outside_int16_fails(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def huge_slope(datasets):
        datasets[2].RescaleSlope = "100"

    write_patient(raw, "HUGE", template, edit=huge_slope)
    results = convert(tmp_path)
    assert_failed_cleanly(tmp_path, results, "HUGE", r"000002\.dcm: HU range .* RescaleSlope 100 .* does not fit int16")


def _set_raw(ds: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Store ``value`` as the element's bytes, bypassing pydicom's checks (a hostile header)."""
    tag = pydicom.tag.Tag(keyword)
    value += b" " * (len(value) % 2)
    ds[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)


# Found by tests/test_hostile_headers.py (issue 13): each escaped as an exception whose message named
# no file ("TypeError: int() argument must be ... not 'NoneType'"), escaped run() itself (NumberOfFrames),
# passed the int16 check as NaN HU (RescaleSlope NaN), or spanned several lines (pixel decoding).
@pytest.mark.parametrize("keyword, vr, value, match", [
    ("NumberOfFrames", "IS", b"abc", r"000002\.dcm: NumberOfFrames is 'abc'; expected an integer \(1\)$"),
    ("NumberOfFrames", "IS", b"1e309", r"000002\.dcm: NumberOfFrames is '1e309'; expected an integer \(1\)$"),
    ("RescaleSlope", "DS", b"NaN", r"000002\.dcm: RescaleSlope is 'NaN'; expected one finite number$"),
    ("RescaleSlope", "DS", b"abc", r"000002\.dcm: RescaleSlope is 'abc'; expected one finite number$"),
    ("RescaleSlope", "DS", b"0", r"000002\.dcm: RescaleSlope is '0'; expected a number > 0 \(0 or a negative "
                                 r"slope would give flat or inverted HU\)$"),
    ("RescaleSlope", "DS", b"-1", r"000002\.dcm: RescaleSlope is '-1'; expected a number > 0"),
    ("RescaleIntercept", "DS", b"-inf", r"000002\.dcm: RescaleIntercept is '-inf'; expected one finite number$"),
    ("RescaleIntercept", "DS", b"19206321827", r"000002\.dcm: HU range \[1\.92063e\+10, 1\.92063e\+10\] .* "
                                              r"RescaleIntercept 1\.92063e\+10\) does not fit int16"),
    ("Rows", "US", b"", r"000002\.dcm: Rows is None; expected a positive integer$"),
    ("ImagePositionPatient", "DS", b"1e39\\0\\0", r"000002\.dcm: ImagePositionPatient \[1e\+39, 0\.0, 0\.0\] does not "
                                                 r"fit the NIfTI header \(float32\)$"),
    ("PhotometricInterpretation", "CS", b"BAD\nVALUE", r"000002\.dcm: cannot decode pixel data \(\S+ VR Little "
                                                     r"Endian\): ValueError: .*'BAD VALUE'$"),
], ids=["frames-text", "frames-inf", "slope-nan", "slope-text", "slope-zero", "slope-negative", "intercept-inf", "intercept-beyond-int32",
        "rows-empty", "position-beyond-float32", "photometric-newline"])
def test_hostile_header_value_fails_naming_the_file(tmp_path, template, keyword, vr, value, match):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "HOSTILE", template, edit=lambda datasets: _set_raw(datasets[2], keyword, vr, value))
    results = convert(tmp_path)
    assert "traceback" not in results["HOSTILE"].info and "\n" not in results["HOSTILE"].message
    assert_failed_cleanly(tmp_path, results, "HOSTILE", match)


@pytest.mark.parametrize("spacing", [b"1e39\\1e39", b"1e-320\\1e-320"], ids=["beyond-float32", "subnormal"])
def test_pixel_spacing_the_nifti_header_cannot_hold_fails(tmp_path, template, spacing):
    """Before: 1e39 mm was written as inf and read back as 1 mm (status done); 1e-320 mm made ITK raise."""
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def hostile(datasets):
        for ds in datasets:
            _set_raw(ds, "PixelSpacing", "DS", spacing)

    write_patient(raw, "HOSTILE", template, edit=hostile)
    results = convert(tmp_path)
    assert "traceback" not in results["HOSTILE"].info
    assert_failed_cleanly(tmp_path, results, "HOSTILE", r"000000\.dcm: PixelSpacing \[.*\] does not fit the NIfTI "
                                                        r"header \(float32, normal numbers\)$")


def _jpeg_lossless(ds: pydicom.Dataset) -> None:
    """pydicom has no JPEG-lossless encoder: encode the slice with GDCM (SimpleITK) and move the
    encapsulated pixel data into the dataset."""
    stored = ds.pixel_array
    with tempfile.TemporaryDirectory() as tmp:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(os.path.join(tmp, "slice.dcm"))
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(stored))
        encoded = pydicom.dcmread(os.path.join(tmp, "slice.dcm"))
    assert encoded.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    ds["PixelData"] = encoded["PixelData"]
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG2000Lossless, RLELossless], ids=lambda u: u.name)
def test_compressed_series_reads(tmp_path, template, syntax):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def compress(datasets):
        for ds in datasets:
            _jpeg_lossless(ds) if syntax == JPEGLosslessSV1 else ds.compress(syntax)

    folder = write_patient(raw, "PACKED", template, edit=compress)
    assert pydicom.dcmread(next(folder.glob("*.dcm"))).file_meta.TransferSyntaxUID == syntax
    results = convert(tmp_path)
    assert results["PACKED"].status == DONE
    array, _ = read_volume(tmp_path, "PACKED")
    np.testing.assert_array_equal(array, template.hu())


def test_jpeg_ls_series_reads(tmp_path, template):
    """JPEG-LS decodes through pylibjpeg-libjpeg. pydicom cannot encode JPEG-LS without pyjpegls
    (not installed), so every slice gets the JPEG-LS pixel data of pydicom's bundled
    MR_small_jpeg_ls_lossless.dcm (64x64, signed 16 bit), with its own intercept."""
    from pydicom.data import get_testdata_file

    source = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array  # same image, uncompressed
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def jpeg_ls(datasets):
        for k, ds in enumerate(datasets):
            ds.Rows, ds.Columns = source.Rows, source.Columns
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = "1", str(-1000 - k)
            ds["PixelData"] = copy.deepcopy(source["PixelData"])
            ds.file_meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID

    write_patient(raw, "JLS", template, edit=jpeg_ls)
    results = convert(tmp_path)
    assert results["JLS"].status == DONE and results["GOOD"].status == DONE
    array, _ = read_volume(tmp_path, "JLS")
    np.testing.assert_array_equal(array, [expected - 1000 - k for k in range(len(template.slices))])


@pytest.mark.parametrize("degrees", [15.0, 0.5])
def test_gantry_tilt_fails(tmp_path, template, degrees):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    z0 = template.z()[0]

    def tilt(datasets):
        for ds in datasets:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [f"{x:.4f}", f"{y + (z - z0) * math.tan(math.radians(degrees)):.4f}", f"{z:.4f}"]
            ds.GantryDetectorTilt = str(degrees)

    write_patient(raw, "TILT", template, edit=tilt)
    results = convert(tmp_path)
    assert_failed_cleanly(tmp_path, results, "TILT",
                          rf"gantry tilt or sheared stack: .*about {degrees:.2f} deg; GantryDetectorTilt {degrees}\)")


def test_non_axial_series_fails(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def coronal(datasets):
        for ds in datasets:
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]

    write_patient(raw, "CORONAL", template, edit=coronal)
    results = convert(tmp_path)
    assert_failed_cleanly(tmp_path, results, "CORONAL",
                          r"not an axial series: the slice normal \[0\.0, 1\.0, 0\.0\] is 90\.0 deg")


def test_mixed_orientations_fail(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)

    def rotate_one(datasets):
        datasets[1].ImageOrientationPatient = ["0", "1", "0", "-1", "0", "0"]

    write_patient(raw, "MIXED", template, edit=rotate_one)
    results = convert(tmp_path)
    assert_failed_cleanly(tmp_path, results, "MIXED",
                          r"000001\.dcm: ImageOrientationPatient .* differs from .*not one image stack")


@pytest.mark.parametrize("patient_id, expected_file", [("../../etc", "etc"), ("LUNG1/001", "LUNG1_001")])
def test_unsafe_patient_id_stays_inside_the_output_folder(tmp_path, template, patient_id, expected_file):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, patient_id, template, series_uid=generate_uid())
    results = convert(tmp_path)
    assert results[expected_file].status == DONE and results["GOOD"].status == DONE
    assert {p.name for p in out_dir(tmp_path).iterdir()} == {
        "GOOD.nii.gz", REPORT_NAME, f"{expected_file}.nii.gz"}
    assert not list(tmp_path.parent.glob("*.nii.gz")) and not (tmp_path / "etc").exists()
    assert read_report(out_dir(tmp_path) / REPORT_NAME)[expected_file]["dicom_patient_id"] == patient_id


def test_two_patient_ids_with_the_same_file_name_both_fail(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "../../etc", template, series_uid=generate_uid())
    write_patient(raw, "etc", template, series_uid=generate_uid())
    results = convert(tmp_path)
    assert results["etc"].status == FAILED
    assert "several patients would be written to etc.nii.gz" in results["etc"].message
    assert "'../../etc'" in results["etc"].message and "'etc'" in results["etc"].message
    assert not (out_dir(tmp_path) / "etc.nii.gz").exists() and results["GOOD"].status == DONE
    assert read_report(out_dir(tmp_path) / REPORT_NAME)["etc"]["status"] == FAILED


def test_output_folder_without_write_permission(tmp_path, template, capsys):
    # Tests run as root, which ignores chmod: make the output folder impossible by putting the
    # data root under a regular file (mkdir fails with NotADirectoryError).
    write_patient(tmp_path / "raw", "GOOD", template)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(PermissionError, match="cannot write to output folder .*blocker/processed/ct_nifti"):
        conv.run(data_root=blocker, dicom_root=tmp_path / "raw")
    status = conv.main(["--data-root", str(blocker), "--dicom-root", str(tmp_path / "raw"), "--workers", "1"])
    assert status == 2
    assert "error: cannot write to output folder" in capsys.readouterr().err


def test_missing_dicom_root_is_a_one_line_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        conv.main(["--data-root", str(tmp_path), "--workers", "1"])
    assert exit_info.value.code == 2
    assert f"DICOM folder {tmp_path / 'raw'} not found" in capsys.readouterr().err


def test_existing_output_is_skipped_unless_overwrite_and_report_rows_merge(tmp_path, template):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "OTHER", template, series_uid=generate_uid())
    assert convert(tmp_path, patients=["GOOD"])["GOOD"].status == DONE
    target = out_dir(tmp_path) / "GOOD.nii.gz"
    os.utime(target, (1, 1))
    results = convert(tmp_path)
    assert results["GOOD"].status == SKIPPED and results["OTHER"].status == DONE
    assert target.stat().st_mtime == 1
    report = read_report(out_dir(tmp_path) / REPORT_NAME)
    assert report["GOOD"]["status"] == DONE and report["OTHER"]["status"] == DONE  # first run's row kept
    assert convert(tmp_path, patients=["GOOD"], overwrite=True)["GOOD"].status == DONE
    assert target.stat().st_mtime > 1
    assert set(read_report(out_dir(tmp_path) / REPORT_NAME)) == {"GOOD", "OTHER"}


def test_failed_overwrite_keeps_the_previous_output_and_says_so(tmp_path, template):
    raw = tmp_path / "raw"
    folder = write_patient(raw, "GOOD", template)
    assert convert(tmp_path)["GOOD"].status == DONE
    before = (out_dir(tmp_path) / "GOOD.nii.gz").read_bytes()
    (folder / "000003.dcm").unlink()  # the series now has a gap
    result = convert(tmp_path, overwrite=True)["GOOD"]
    assert result.status == FAILED and result.message.endswith("the previous GOOD.nii.gz was left in place")
    assert (out_dir(tmp_path) / "GOOD.nii.gz").read_bytes() == before
    assert convert(tmp_path)["GOOD"].status == SKIPPED
    assert read_report(out_dir(tmp_path) / REPORT_NAME)["GOOD"]["status"] == SKIPPED


def test_main_exit_status_and_summary_line(tmp_path, template, capsys):
    raw = tmp_path / "raw"
    write_patient(raw, "GOOD", template)
    write_patient(raw, "GAP", template, edit=_drop_slice_3)
    argv = ["--data-root", str(tmp_path), "--workers", "2"]  # two processes: the task must pickle
    assert conv.main(argv) == 1
    assert "Phase 2: 1 converted, 0 skipped, 1 failed (GAP)" in capsys.readouterr().out
    assert conv.main(argv + ["--fill-gaps"]) == 0
    assert "Phase 2: 1 converted, 1 skipped, 0 failed" in capsys.readouterr().out
    assert conv.main(argv + ["--patients", "NOBODY"]) == 1
    assert "Phase 2: 0 converted, 0 skipped, 1 failed (NOBODY)" in capsys.readouterr().out


def test_a_collection_linked_under_raw_is_converted(synthetic_cohort, tmp_path, capsys):
    """Users link their downloaded collection: ``ln -s /path/to/collection DATA/raw/NSCLC``."""
    raw_dir, _, cohort = synthetic_cohort
    (tmp_path / "DATA" / "raw").mkdir(parents=True)
    (tmp_path / "DATA" / "raw" / "NSCLC").symlink_to(raw_dir, target_is_directory=True)
    assert conv.main(["--data-root", str(tmp_path / "DATA"), "--workers", "1"]) == 0
    assert f"Phase 2: {len(cohort)} converted, 0 skipped, 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "DATA" / "processed" / "ct_nifti").glob("*.nii.gz")) == [
        f"{r['patient_id']}.nii.gz" for r in cohort]


def test_a_folder_without_any_ct_says_so_and_exits_non_zero(tmp_path, capsys):
    empty = tmp_path / "DATA" / "raw"
    empty.mkdir(parents=True)
    (empty / "README.txt").write_text("not DICOM")
    assert conv.main(["--data-root", str(tmp_path / "DATA")]) == 1
    err = capsys.readouterr().err
    assert f"no DICOM CT series found under {empty.resolve()}" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="no DICOM CT series found under"):
        conv.run(data_root=tmp_path / "DATA")
