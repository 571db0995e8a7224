"""Hostile headers (issue 13): property-based tests of phases 2 and 2.5 on mutated DICOM headers.

One small synthetic patient (32 px, 8 slices) is generated once; every example copies it, rewrites
header elements of its CT slices or RTSTRUCT with raw bytes (deleted, empty, NaN, huge, negative,
non-ASCII, wrong length, dangling references, missing sequences) and runs phases 2 and 2.5. The
contract: ``run()``/``main()`` never raise or hang; each patient is done, or failed with one line
naming the patient or its file (never the batch runner's catch-all); nothing is written outside
the data root, no ``.partial/`` is left, a failed patient has no output and a done one a readable
output on the CT's grid. Examples are derandomised and bounded: 341, about 25 s of CPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import signal
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

import convert_dicom_to_nifti as conv
import extract_multi_organ_masks as em
from thoracic_seg.batch import DONE, FAILED, SKIPPED
from thoracic_seg.layout import (
    REPORT_NAME, STRUCTURES_CSV, UNMATCHED_CSV, DataLayout, read_mask_record, read_report,
    read_structures_csv, record_path,
)

#: pydicom warns about every invalid value it reads: here they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PID = "SYN-001"
SIZE, SLICES = 32, 8
EXAMPLE_TIMEOUT_S = 30  # a hang fails the example instead of the whole CI job

HOSTILE = settings(
    derandomize=True, database=None, deadline=None, print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------------------------
# The pristine patient, copied per example
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pristine:
    root: Path  # holds data/raw/synthetic/SYN-001 (converted once, to check the pristine patient converts)
    ct_files: tuple[str, ...]  # relative to data/
    rtstruct_file: str  # relative to data/


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    from make_synthetic_cohort import generate_patient

    root = tmp_path_factory.mktemp("hostile-pristine")
    data = root / "data"
    record = generate_patient(data / "raw" / "synthetic", root / "truth", PID, seed=3, size=SIZE, slices=SLICES)
    results = conv.run(data_root=data, workers=1)
    assert [(r.patient_id, r.status) for r in results] == [(PID, DONE)]
    raw = Path("raw") / "synthetic"
    ct_files = tuple(str(p.relative_to(data)) for p in sorted((data / raw / record["ct_folder"]).glob("*.dcm")))
    assert len(ct_files) == SLICES
    return Pristine(root, ct_files, str(raw / record["rtstruct_file"]))


@contextlib.contextmanager
def example_root(tmp_path: Path, pristine: Pristine):
    """A fresh copy of the pristine DICOM for one example: ``<tmp>/<example>/data/raw``.

    Outputs are never copied: conversion_report.csv holds absolute patient folders, and phase 2
    keeps the row of the run that wrote a CT it skips, so phase 2.5 would read the pristine RTSTRUCT.
    """
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        data = Path(folder) / "data"
        shutil.copytree(pristine.root / "data" / "raw", data / "raw")
        yield data


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) instead of hanging when the body runs longer than ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"example still running after {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Writing hostile values: raw bytes, so anything (NaN, "abc", 7 bytes of US) reaches the reader
# --------------------------------------------------------------------------------------------
def set_raw(ds: pydicom.Dataset, tag: int, vr: str, value: bytes | None) -> None:
    """Give ``ds`` element ``tag`` the raw ``value`` (padded to even length); None deletes it."""
    tag = Tag(tag)
    if value is None:
        if tag in ds:
            del ds[tag]
        return
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def raw_value(ds: pydicom.Dataset, tag: int) -> bytes:
    """The element's value as the bytes stored in the file (b"" when absent)."""
    if Tag(tag) not in ds:
        return b""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"")
    value = elem.value
    if value is None:
        return b""
    values = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
    return b"\\".join(str(v).encode("latin-1") for v in values)


def replace_transfer_syntax(path: Path, uid: bytes | None) -> None:
    """Rewrite the File Meta group's TransferSyntaxUID (None: drop it); the data set is left as it is."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    end = 144 + struct.unpack("<I", data[140:144])[0]
    elements, pos = [], 144
    while pos < end:
        (group, element), vr = struct.unpack("<HH", data[pos:pos + 4]), data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            size = 12 + struct.unpack("<I", data[pos + 8:pos + 12])[0]
        else:
            size = 8 + struct.unpack("<H", data[pos + 6:pos + 8])[0]
        if (group, element) != (0x0002, 0x0010):
            elements.append(data[pos:pos + size])
        elif uid is not None:
            value = uid + b"\x00" * (len(uid) % 2)
            elements.append(struct.pack("<HH", 0x0002, 0x0010) + b"UI" + struct.pack("<H", len(value)) + value)
        pos += size
    meta = b"".join(elements)
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(meta))
    path.write_bytes(data[:132] + group_length + meta + data[end:])


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
#: Number strings a reader must refuse or survive: NaN/inf spellings, beyond float32/float64,
#: subnormal, signs alone, non-ASCII digits (Python's float() accepts "١٢"), separators, garbage.
SPECIAL_NUMBERS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e308", "-1e308", "1e309", "1e39", "3.5e38",
                   "1e-320", "0", "-0", "-1", "-512.5", "", " ", "abc", "1,5", "0x1F", "1e", "+", "١٢", "1.0.0",
                   "\x00", "99999999999999999999"]
number_text = st.one_of(
    st.sampled_from(SPECIAL_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-2**40, 2**40).map(str),
)
number_list = st.lists(number_text, max_size=8).map(lambda tokens: "\\".join(tokens).encode("utf-8"))
#: A whole numeric element: a list of hostile numbers, or bytes.
number_bytes = st.one_of(number_list, st.binary(max_size=24), st.sampled_from(
    [b"1e39\\1e39\\1e39", b"1e-320\\1e-320\\1e-320", b"-1e39\\0\\0", b"1e6\\1e6\\1e6"]))
#: One component of the element's original value replaced: (which, by what).
component = st.tuples(st.integers(0, 8), number_text)

text_bytes = st.one_of(
    st.sampled_from([b"", b"../../etc", b"1.2.3\\4.5.6", b"\x00" * 8, "Ünïcødé".encode("utf-8"),
                     "Ünïcødé".encode("latin-1"), b"A" * 10_000, b"1." * 5_000, b" ", b"\\", b"\n\r\t",
                     b"Heart\nGTV"]),
    st.binary(max_size=64),
    st.text(max_size=20).map(lambda s: s.encode("utf-8")),
)
us_bytes = st.one_of(
    st.sampled_from([0, 1, 7, 8, 12, 15, 16, 31, 32, 33, 64, 65535]).map(lambda n: struct.pack("<H", n)),
    st.integers(0, 65535).map(lambda n: struct.pack("<H", n)),
    st.sampled_from([b"", b"\x01", b"\x00\x00\x00\x00", struct.pack("<HH", 32, 32), b"\x20\x00\x20"]),
)
#: Keyword -> (tag, VR) of the CT elements the phases read (or could trip over).
CT_NUMBERS = {
    "ImagePositionPatient": (0x00200032, "DS"), "ImageOrientationPatient": (0x00200037, "DS"),
    "PixelSpacing": (0x00280030, "DS"), "SliceThickness": (0x00180050, "DS"),
    "RescaleSlope": (0x00281053, "DS"), "RescaleIntercept": (0x00281052, "DS"),
    "GantryDetectorTilt": (0x00181120, "DS"), "NumberOfFrames": (0x00280008, "IS"),
    "InstanceNumber": (0x00200013, "IS"), "SliceLocation": (0x00201041, "DS"),
}
CT_SHORTS = {
    "Rows": 0x00280010, "Columns": 0x00280011, "BitsAllocated": 0x00280100, "BitsStored": 0x00280101,
    "HighBit": 0x00280102, "PixelRepresentation": 0x00280103, "SamplesPerPixel": 0x00280002,
}
CT_TEXTS = {
    "PatientID": (0x00100020, "LO"), "SeriesInstanceUID": (0x0020000E, "UI"),
    "StudyInstanceUID": (0x0020000D, "UI"), "FrameOfReferenceUID": (0x00200052, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"), "SOPClassUID": (0x00080016, "UI"), "Modality": (0x00080060, "CS"),
    "PhotometricInterpretation": (0x00280004, "CS"), "SpecificCharacterSet": (0x00080005, "CS"),
}
PIXEL_DATA = 0x7FE00010
TRANSFER_SYNTAXES = [b"", b"1.2.3.4", b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.1.99",
                     b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.5", b"\xff\xfe garbage"]


@dataclass(frozen=True)
class CTEdit:
    """Set ``keyword`` on the slice(s) ``where`` (an index, or "all") to ``value``.

    ``value``: raw bytes, None (delete), or (index, text): one component of the original replaced.
    ``keyword`` "PixelData": value is the number of bytes kept (or None); "TransferSyntaxUID": the UID.
    """

    keyword: str
    where: int | str
    value: object


slices_hit = st.one_of(st.just("all"), st.integers(0, SLICES - 1))
ct_edit = st.one_of(
    st.builds(CTEdit, st.sampled_from(sorted(CT_NUMBERS)), slices_hit, st.one_of(st.none(), number_bytes, component)),
    st.builds(CTEdit, st.sampled_from(sorted(CT_SHORTS)), slices_hit, st.one_of(st.none(), us_bytes)),
    st.builds(CTEdit, st.sampled_from(sorted(CT_TEXTS)), slices_hit, st.one_of(st.none(), text_bytes)),
    st.builds(CTEdit, st.just("PixelData"), slices_hit,
              st.one_of(st.none(), st.sampled_from([0, 1, 2, SIZE * SIZE, 2 * SIZE * SIZE - 2, 2 * SIZE * SIZE + 2]))),
    st.builds(CTEdit, st.just("TransferSyntaxUID"), slices_hit, st.one_of(st.none(), st.sampled_from(TRANSFER_SYNTAXES))),
)


def apply_ct_edits(data: Path, pristine: Pristine, edits: list[CTEdit]) -> None:
    """Apply the edits in order, transfer syntax changes last (pydicom could not rewrite the file after)."""
    for edit in sorted(edits, key=lambda e: e.keyword == "TransferSyntaxUID"):
        apply_ct_edit(data, pristine, edit)


def apply_ct_edit(data: Path, pristine: Pristine, edit: CTEdit) -> None:
    files = [data / f for f in pristine.ct_files]
    for path in files if edit.where == "all" else [files[int(edit.where)]]:
        if edit.keyword == "TransferSyntaxUID":
            replace_transfer_syntax(path, edit.value)  # type: ignore[arg-type]
            continue
        ds = pydicom.dcmread(path)
        if edit.keyword == "PixelData":
            keep = edit.value
            set_raw(ds, PIXEL_DATA, "OW", None if keep is None else (raw_value(ds, PIXEL_DATA) * 2)[:keep])
        elif edit.keyword in CT_SHORTS:
            set_raw(ds, CT_SHORTS[edit.keyword], "US", edit.value)  # type: ignore[arg-type]
        else:
            tag, vr = CT_NUMBERS.get(edit.keyword) or CT_TEXTS[edit.keyword]
            value = edit.value
            if isinstance(value, tuple):
                parts = raw_value(ds, tag).split(b"\\")
                parts[value[0] % len(parts)] = value[1].encode("utf-8")
                value = b"\\".join(parts)
            set_raw(ds, tag, vr, value)  # type: ignore[arg-type]
        ds.save_as(path)


# RTSTRUCT edits: (what, which item, value); items are picked modulo the sequence length.
roi_index = st.integers(0, 20)
contour_bytes = st.one_of(
    number_bytes,
    st.lists(number_text, min_size=1, max_size=40).map(lambda t: "\\".join(t).encode("utf-8")),
)
contour_value = st.one_of(
    st.none(), contour_bytes, component.map(lambda c: (c[0] * 7 + 2, c[1])),
    # a regular polygon of n points around the original contour (n = 1, 2: degenerate; n large: dense)
    st.sampled_from([1, 2, 3, 4, 100, 5_000]).map(lambda n: ("points", n)),
)
SEQUENCES = ["StructureSetROISequence", "ROIContourSequence", "ReferencedFrameOfReferenceSequence",
             "RTROIObservationsSequence", "ContourSequence", "RTReferencedStudySequence",
             "RTReferencedSeriesSequence", "ContourImageSequence"]
OTHER_UID = b"1.2.826.0.1.3680043.8.498.99999"
uid_value = st.one_of(st.none(), st.sampled_from([OTHER_UID, b"", b"\\", b"1.2\\" + OTHER_UID]), text_bytes)


@dataclass(frozen=True)
class RTEdit:
    """One change to the RTSTRUCT; ``item``/``sub`` pick the ROI / contour (modulo their counts)."""

    what: str
    item: int
    sub: int
    value: object


rt_edit = st.one_of(
    st.builds(RTEdit, st.just("ContourData"), roi_index, roi_index, contour_value),
    st.builds(RTEdit, st.just("NumberOfContourPoints"), roi_index, roi_index, st.one_of(st.none(), number_bytes)),
    st.builds(RTEdit, st.just("ContourGeometricType"), roi_index, roi_index, st.one_of(
        st.none(), st.sampled_from([b"POINT", b"OPEN_PLANAR", b"OPEN_NONPLANAR", b"closed_planar", b"CLOSED_PLANAR\\POINT",
                         b"OPEN\nPLANAR"]),
        text_bytes)),
    st.builds(RTEdit, st.just("ReferencedROINumber"), roi_index, st.just(0), st.one_of(
        st.none(), st.sampled_from([b"999", b"-1", b"0", b"", b"abc", b"1\\2", b"3.5", b"9" * 30]), number_bytes)),
    st.builds(RTEdit, st.just("ROINumber"), roi_index, roi_index, st.one_of(
        st.none(), st.just("duplicate"), st.sampled_from([b"999", b"-1", b"", b"abc", b"1\\2"]), number_bytes)),
    st.builds(RTEdit, st.just("ROIName"), roi_index, roi_index, st.one_of(st.none(), st.just("duplicate"), text_bytes)),
    st.builds(RTEdit, st.sampled_from(["delete", "empty"]), roi_index, st.just(0), st.sampled_from(SEQUENCES)),
    st.builds(RTEdit, st.sampled_from(["ReferencedFrameOfReferenceUID", "FrameOfReferenceUID", "SeriesInstanceUID"]),
              roi_index, st.just(0), uid_value),
    st.builds(RTEdit, st.sampled_from(["PatientID", "Modality", "SOPClassUID"]), st.just(0), st.just(0),
              st.one_of(st.none(), text_bytes)),
)

CONTOUR_DATA, NUMBER_OF_POINTS, GEOMETRIC_TYPE = 0x30060050, 0x30060046, 0x30060042
REFERENCED_ROI_NUMBER, ROI_NUMBER, ROI_NAME = 0x30060084, 0x30060022, 0x30060026


def _pick(sequence, index: int):
    return sequence[index % len(sequence)] if sequence else None


def _items(ds: pydicom.Dataset, keyword: str) -> list[pydicom.Dataset]:
    """Every dataset holding ``keyword`` (at any depth)."""
    found = []

    def visit(d: pydicom.Dataset) -> None:
        for tag in list(d.keys()):
            if d.get_item(tag).VR == "SQ":  # get_item: no conversion of the (perhaps hostile) other values
                elem = d[tag]
                if elem.keyword == keyword:
                    found.append(d)
                for item in elem.value:
                    visit(item)
    visit(ds)
    return found


def polygon_bytes(points: np.ndarray) -> bytes:
    return "\\".join(f"{v:.3f}" for v in points.ravel()).encode("ascii")


def circle(centre: np.ndarray, radius: float, n: int) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([centre[0] + radius * np.cos(theta), centre[1] + radius * np.sin(theta),
                            np.full(n, centre[2])])


def apply_rt_edit(ds: pydicom.Dataset, edit: RTEdit) -> None:
    rois, roi_contours = ds.get("StructureSetROISequence") or [], ds.get("ROIContourSequence") or []
    if edit.what in ("ContourData", "NumberOfContourPoints", "ContourGeometricType"):
        roi_contour = _pick(roi_contours, edit.item)
        contour = _pick((roi_contour.get("ContourSequence") or []) if roi_contour is not None else [], edit.sub)
        if contour is None:
            return
        value = edit.value
        if edit.what == "ContourData" and isinstance(value, tuple):
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            if value[0] == "points":
                value = polygon_bytes(circle(points.mean(axis=0), 5.0, value[1]))
            else:
                parts = raw_value(contour, CONTOUR_DATA).split(b"\\")
                parts[value[0] % len(parts)] = value[1].encode("utf-8")
                value = b"\\".join(parts)
        tag, vr = {"ContourData": (CONTOUR_DATA, "DS"), "NumberOfContourPoints": (NUMBER_OF_POINTS, "IS"),
                   "ContourGeometricType": (GEOMETRIC_TYPE, "CS")}[edit.what]
        set_raw(contour, tag, vr, value)  # type: ignore[arg-type]
    elif edit.what == "ReferencedROINumber":
        target = _pick(roi_contours, edit.item)
        if target is not None:
            set_raw(target, REFERENCED_ROI_NUMBER, "IS", edit.value)  # type: ignore[arg-type]
    elif edit.what in ("ROINumber", "ROIName"):
        target, other = _pick(rois, edit.item), _pick(rois, edit.sub)
        if target is None:
            return
        tag, vr = (ROI_NUMBER, "IS") if edit.what == "ROINumber" else (ROI_NAME, "LO")
        value = raw_value(other, tag) if edit.value == "duplicate" else edit.value
        set_raw(target, tag, vr, value)  # type: ignore[arg-type]
    elif edit.what in ("delete", "empty"):
        holders = _items(ds, str(edit.value))
        holder = _pick(holders, edit.item)
        if holder is not None:
            if edit.what == "delete":
                delattr(holder, str(edit.value))
            else:
                setattr(holder, str(edit.value), pydicom.Sequence([]))
    elif edit.what in ("ReferencedFrameOfReferenceUID", "FrameOfReferenceUID", "SeriesInstanceUID"):
        keyword = {"ReferencedFrameOfReferenceUID": "StructureSetROISequence",
                   "FrameOfReferenceUID": "ReferencedFrameOfReferenceSequence",
                   "SeriesInstanceUID": "RTReferencedSeriesSequence"}[edit.what]
        holders = [item for holder in _items(ds, keyword) for item in holder[keyword].value]
        target = _pick(holders, edit.item)
        if target is not None:
            set_raw(target, pydicom.datadict.tag_for_keyword(edit.what), "UI", edit.value)  # type: ignore[arg-type]
    else:  # top-level text
        set_raw(ds, pydicom.datadict.tag_for_keyword(edit.what), "LO" if edit.what == "PatientID" else
                ("CS" if edit.what == "Modality" else "UI"), edit.value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------
def check_result(result, data: Path) -> None:
    """One patient's result: a status, and a failure says in one line which patient/file and what."""
    assert result.status in (DONE, SKIPPED, FAILED), result
    assert "traceback" not in result.info, (
        f"unexpected exception escaped to the batch runner: {result.message}\n{result.info['traceback']}")
    assert isinstance(result.message, str) and "Traceback" not in result.message, result.message
    assert "\n" not in result.message and "\r" not in result.message, f"not one line: {result.message!r}"
    if result.status == FAILED:
        assert result.message.strip(), result
        names = (result.patient_id, PID, str(data))
        assert any(name and name in result.message for name in names), (
            f"failure names neither the patient nor a file: {result.message!r}")


def check_logs(records: list[logging.LogRecord]) -> None:
    for record in records:
        assert record.exc_info is None, f"traceback logged: {record.getMessage()}"
        assert "Traceback" not in record.getMessage(), record.getMessage()


def check_tree(data: Path) -> None:
    """Everything below the example folder is under the data root, and nothing half-written is left."""
    example = data.parent
    assert [p.name for p in example.iterdir()] == ["data"]
    assert not [p for p in data.rglob("*") if p.name == ".partial" or p.name.startswith(".write-test")]


def check_phase2(data: Path, results) -> list[str]:
    """Phase 2's outputs agree with its results; returns the converted patient ids."""
    assert isinstance(results, list) and results
    out = DataLayout(data).ct_nifti
    report = read_report(out / REPORT_NAME)
    converted = []
    for result in results:
        check_result(result, data)
        path = out / f"{result.patient_id}.nii.gz"
        assert path.parent == out and re.fullmatch(r"[A-Za-z0-9._+\-]+", result.patient_id), result.patient_id
        if result.status == FAILED:
            assert not path.exists(), f"{path} written for a failed patient"
            if result.patient_id in report:
                assert report[result.patient_id]["status"] == FAILED
        else:
            image = sitk.ReadImage(str(path))
            assert image.GetPixelID() == sitk.sitkInt16 and image.GetDimension() == 3
            assert all(s > 0 and math.isfinite(s) for s in image.GetSpacing()), image.GetSpacing()
            assert all(math.isfinite(v) for v in image.GetOrigin() + image.GetDirection())
            direction = np.asarray(image.GetDirection()).reshape(3, 3)
            np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-4)
            assert report[result.patient_id]["status"] == DONE  # a skipped patient keeps its row
            row = report[result.patient_id]  # the geometry phase 2 computed is the one read back
            np.testing.assert_allclose(image.GetSpacing(), [float(v) for v in row["spacing_xyz"].split()], rtol=1e-5)
            np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in row["origin_xyz"].split()],
                                       rtol=1e-5, atol=1e-3)
            converted.append(result.patient_id)
    names = {p.name for p in out.iterdir()}
    assert names <= {REPORT_NAME} | {f"{r.patient_id}.nii.gz" for r in results if r.status != FAILED}, names
    return converted


def check_phase25(data: Path, results) -> None:
    layout = DataLayout(data)
    for result in results:
        check_result(result, data)
        mask_path = layout.masks / f"{result.patient_id}.nii.gz"
        if result.status == FAILED:
            assert not mask_path.exists() and not record_path(mask_path).exists(), f"{mask_path} of a failed patient"
        else:
            assert result.status == DONE, result
            mask = sitk.ReadImage(str(mask_path))
            ct = sitk.ReadImage(str(layout.ct_nifti / f"{result.patient_id}.nii.gz"))
            assert mask.GetPixelID() == sitk.sitkUInt8
            assert mask.GetSize() == ct.GetSize()
            np.testing.assert_allclose(mask.GetOrigin(), ct.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(mask.GetSpacing(), ct.GetSpacing(), rtol=1e-6)
            assert int(sitk.GetArrayViewFromImage(mask).max()) <= 7
            assert read_mask_record(mask_path)["patient_id"] == result.patient_id
    if layout.masks.is_dir():
        allowed = {STRUCTURES_CSV, UNMATCHED_CSV} | {
            f"{r.patient_id}{suffix}" for r in results if r.status == DONE for suffix in (".nii.gz", ".json")}
        assert {p.name for p in layout.masks.iterdir()} <= allowed


def run_both_phases(data: Path, caplog) -> None:
    """Phase 2 then, on what it converted, phase 2.5; every contract check on the way."""
    caplog.clear()
    with time_limit(EXAMPLE_TIMEOUT_S):
        results = conv.run(data_root=data, workers=1)
        done = check_phase2(data, results)
        if done:
            check_phase25(data, em.run(data_root=data, workers=1))
    check_logs(caplog.records)
    check_tree(data)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------
@settings(HOSTILE, max_examples=150)
@given(edits=st.lists(ct_edit, min_size=1, max_size=3))
def test_hostile_ct_headers_convert_or_fail_in_one_line(pristine, tmp_path, caplog, edits) -> None:
    with example_root(tmp_path, pristine) as data:
        apply_ct_edits(data, pristine, edits)
        run_both_phases(data, caplog)


@settings(HOSTILE, max_examples=150)
@given(edits=st.lists(rt_edit, min_size=1, max_size=3))
def test_hostile_rtstruct_extracts_or_fails_in_one_line(pristine, tmp_path, caplog, edits) -> None:
    with example_root(tmp_path, pristine) as data:
        path = data / pristine.rtstruct_file
        ds = pydicom.dcmread(path)
        for edit in edits:
            apply_rt_edit(ds, edit)
        ds.save_as(path)
        run_both_phases(data, caplog)


@contextlib.contextmanager
def restored_logging():
    """main() reconfigures the root logger (basicConfig(force=True)); put pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


SUMMARY = {conv: re.compile(r"^Phase 2: (\d+) converted, (\d+) skipped, (\d+) failed( \(.+\))?$"),
           em: re.compile(r"^Phase 2\.5: (\d+) extracted, (\d+) skipped, (\d+) failed( \(.+\))?$")}


@settings(HOSTILE, max_examples=40)
@given(ct_edits=st.lists(ct_edit, max_size=2), rt_edits=st.lists(rt_edit, max_size=2))
def test_hostile_headers_through_main_exit_status_and_stderr(pristine, tmp_path, capsys, ct_edits, rt_edits) -> None:
    with example_root(tmp_path, pristine) as data:
        apply_ct_edits(data, pristine, ct_edits)
        path = data / pristine.rtstruct_file
        ds = pydicom.dcmread(path)
        for edit in rt_edits:
            apply_rt_edit(ds, edit)
        ds.save_as(path)
        capsys.readouterr()
        for module in (conv, em):
            with restored_logging(), time_limit(EXAMPLE_TIMEOUT_S):
                status = module.main(["--data-root", str(data), "--workers", "1"])
            out, err = capsys.readouterr()
            assert "Traceback" not in err and "Traceback" not in out, err
            if not out.strip():  # no patient at all (no CT series left): one line naming the folder, exit 1
                last = err.strip().splitlines()[-1]
                assert status == 1 and ("no DICOM CT series found under" in last
                                        or "no converted CT" in last), err
                continue
            summary = SUMMARY[module].match(out.strip().splitlines()[-1])
            assert summary, out
            failed = int(summary.group(3))
            assert status == (1 if failed else 0), (status, out)
            # one "<patient>: FAILED: <message>" log line per failed patient (tqdm may share the line)
            assert len(re.findall(r"ERROR \S+: [^\n]*?: FAILED: \S", err)) == failed, err
        check_tree(data)


def test_contour_of_a_million_points_is_rasterised(pristine, tmp_path, caplog) -> None:
    """10^6 points in one ContourData (a 24 MB element) go through both phases in a few seconds."""
    with example_root(tmp_path, pristine) as data:
        path = data / pristine.rtstruct_file
        ds = pydicom.dcmread(path)
        heart = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == "Heart")
        contour = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == heart).ContourSequence[0]
        centre = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3).mean(axis=0)
        set_raw(contour, CONTOUR_DATA, "DS", polygon_bytes(circle(centre, 5.0, 1_000_000)))
        set_raw(contour, NUMBER_OF_POINTS, "IS", b"1000000")
        ds.save_as(path)
        run_both_phases(data, caplog)
        assert read_structures_csv(DataLayout(data).masks / STRUCTURES_CSV)[PID][3]  # heart annotated
