"""Reading CT series from DICOM: find every patient's series in a collection (headers only), choose
the planning CT, and read it as HU on its exact grid (slices ordered along the normal; gantry tilt,
oblique, shear and missing slices refused or, with ``fill_gaps``, interpolated).

Phase 2 (``convert_dicom_to_nifti.py``) and prediction read DICOM through this module.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from thoracic_seg.batch import PatientError, safe_patient_id, walk_files
from thoracic_seg.grid import MAX_AXIAL_ANGLE_DEG
from thoracic_seg.rtstruct_read import referenced_uids

log = logging.getLogger(__name__)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Header elements read while scanning a collection (everything but these is skipped); the two
#: RTSTRUCT sequences are what :func:`thoracic_seg.rtstruct_read.referenced_uids` reads.
SCAN_TAGS = (
    "PatientID", "SOPClassUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID",
    "FrameOfReferenceUID", "NumberOfFrames", "ReferencedFrameOfReferenceSequence", "StructureSetROISequence",
)
#: Header elements :func:`read_ct_series` needs to place a slice before decoding any pixels.
GEOMETRY_TAGS = (
    "SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "NumberOfFrames", "GantryDetectorTilt",
    "StudyInstanceUID", "FrameOfReferenceUID", "PatientID",
)
#: Two slices closer than this along the normal are the same slice (a duplicate).
DUPLICATE_TOLERANCE_MM = 1e-3
#: Steps may differ from the nominal (smallest) step by this fraction before they count as a gap.
SPACING_TOLERANCE = 0.01
#: Largest sideways drift of the slice origins over the whole stack (gantry tilt / shear).
SHEAR_TOLERANCE_MM = 0.05
#: ImageOrientationPatient must agree between slices and be orthonormal to this tolerance.
ORIENTATION_TOLERANCE = 1e-4
INT16_MIN, INT16_MAX = int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max)


@dataclass
class SeriesInfo:
    """One CT image series of a patient, from its headers."""

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    files: list[Path] = field(default_factory=list)  # sorted by path, NOT by slice position

    @property
    def folder(self) -> Path:
        """The folder holding the series' files (their common ancestor)."""
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))


@dataclass
class RTStructInfo:
    """An RTSTRUCT found beside the CT: the series and frames of reference it points to."""

    path: Path
    referenced_series_uids: set[str]
    frame_of_reference_uids: set[str]


@dataclass
class PatientDicom:
    """Everything the header scan found for one patient.

    ``patient_id``: the PatientID made safe for a file name (else the folder's name). ``folder``: the
    top-level folder under the root when it holds all and only this patient's files, else the common
    ancestor of the patient's files (possibly the root).
    """

    patient_id: str
    dicom_patient_id: str
    folder: Path
    ct_series: dict[str, SeriesInfo] = field(default_factory=dict)
    rtstructs: list[RTStructInfo] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # modality -> files set aside
    problems: list[str] = field(default_factory=list)  # unreadable files beside this patient's files


class SliceRef(NamedTuple):
    """One z index of a converted volume: ``position_lps`` is the slice origin (first voxel centre) in
    LPS mm; ``path`` and ``sop_instance_uid`` are None for a slice interpolated by ``fill_gaps``."""

    sop_instance_uid: str | None
    position_lps: tuple[float, float, float]
    path: Path | None

    @property
    def z_mm(self) -> float:
        """The slice's LPS z coordinate (mm); what an RTSTRUCT contour of this slice carries."""
        return self.position_lps[2]


@dataclass
class CTSeries:
    """A CT series read into a volume. ``image``: SimpleITK int16 HU (array z, y, x); origin = first
    slice's ImagePositionPatient, direction columns = (row direction, column direction, slice normal),
    spacing = (column, row, slice step) mm, all LPS. ``slices``: one :class:`SliceRef` per z index.
    """

    image: sitk.Image
    slices: list[SliceRef]
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    dicom_patient_id: str
    filled_slices: int = 0
    notes: list[str] = field(default_factory=list)  # duplicates dropped, gaps filled


def _text(value: object) -> str:
    return str(value).strip() if value is not None else ""


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (pydicom's messages can span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _value(ds: pydicom.Dataset, keyword: str, default: object = None) -> object:
    """``ds.get(keyword, default)``, or the stored text when pydicom cannot convert it (IS "1e309")."""
    try:
        return ds.get(keyword, default)
    except (TypeError, ValueError, OverflowError):
        raw = ds.get_item(keyword).value
        return raw.decode("latin-1").strip(" \x00") if isinstance(raw, bytes) else raw


def _frame_count(ds: pydicom.Dataset) -> int | None:
    """NumberOfFrames (1 when absent or empty); None when it is not an integer."""
    try:
        return int(_value(ds, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, OverflowError):
        return None


def _read_scan_header(path: Path) -> pydicom.Dataset:
    """The header elements in :data:`SCAN_TAGS`; raises ``InvalidDicomError``/``OSError``/... ."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SCAN_TAGS))
    except InvalidDicomError:
        # Old files without the 128-byte preamble and "DICM": accept them only when the forced
        # parse finds a SOP class, so text files and images are still rejected.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SCAN_TAGS), force=True)
            sop_class = _text(ds.get("SOPClassUID", ""))
        except Exception:
            sop_class = ""
        if not sop_class.startswith("1.2."):
            raise InvalidDicomError("no DICOM preamble and no SOP Class UID") from None
        return ds


def find_dicom_series(root: Path | str) -> list[PatientDicom]:
    """Scan ``root`` (any nesting) and group its CT image files by patient and series.

    Headers only. Files are grouped by PatientID (else by top-level folder). CT Image Storage objects are
    candidate series, RTSTRUCTs are kept with the series they reference, every other object (RTPLAN,
    RTDOSE, SEG, ...) is counted in ``ignored``. Unreadable and non-DICOM files are logged and noted in
    ``problems`` of the patients with files in the same folder.

    Returns the patients sorted by ``patient_id``. Two can share one when different PatientIDs make the
    same file name (``../../etc`` and ``etc``); the caller must refuse to write either (``run`` does).
    """
    root = Path(root)
    groups: dict[str, dict] = {}
    bad_files: list[tuple[Path, str]] = []
    for path in walk_files(root):
        try:
            ds = _read_scan_header(path)
        except InvalidDicomError:
            bad_files.append((path, "not a DICOM file"))
            continue
        except Exception as exc:  # truncated or corrupt: report it, keep scanning
            bad_files.append((path, f"unreadable DICOM file ({_one_line(exc)})"))
            continue
        top = _top_folder(root, path)
        dicom_id = _text(ds.get("PatientID", ""))
        group = groups.setdefault(dicom_id or f"\0{top}", {
            "dicom_id": dicom_id, "tops": set(), "files": [], "series": {}, "rtstructs": [],
            "ignored": Counter(),
        })
        group["tops"].add(top)
        group["files"].append(path)
        modality = _text(ds.get("Modality", "")) or "unknown modality"
        sop_class = _text(ds.get("SOPClassUID", ""))
        if modality == "RTSTRUCT":
            group["rtstructs"].append(RTStructInfo(path, *referenced_uids(ds)))
            group["ignored"][modality] += 1
        elif sop_class == CT_IMAGE_STORAGE and _frame_count(ds) in (1, None):  # None: fails, naming the file
            uid = _text(ds.get("SeriesInstanceUID", "")) or f"(no SeriesInstanceUID) {path.parent}"
            series = group["series"].setdefault(uid, SeriesInfo(
                uid, _text(ds.get("StudyInstanceUID", "")), _text(ds.get("FrameOfReferenceUID", ""))))
            series.files.append(path)
        elif modality == "CT":  # enhanced / multi-frame CT: say so rather than "no CT found"
            group["ignored"]["CT (not single-frame CT Image Storage)"] += 1
        else:
            group["ignored"][modality] += 1

    patients = []
    patients_per_top = Counter(top for group in groups.values() for top in group["tops"])
    for group in groups.values():
        (top, *more) = group["tops"]
        if not more and top != root and patients_per_top[top] == 1:
            folder = top  # collection layout: <root>/<patient folder>/<study>/<series>/...
        else:  # a flat dump or a folder of several patients (raw/synthetic/<id>/...)
            folder = Path(os.path.commonpath([str(p.parent) for p in group["files"]]))
        patients.append(PatientDicom(
            patient_id=safe_patient_id(group["dicom_id"], fallback=folder.name),
            dicom_patient_id=group["dicom_id"], folder=folder, ct_series=group["series"],
            rtstructs=group["rtstructs"], ignored=group["ignored"],
        ))
    for path, why in bad_files:
        log.warning("%s: %s; ignored", path, why)
        for patient in patients:
            if any(path.parent == f.parent for s in patient.ct_series.values() for f in s.files):
                patient.problems.append(f"{path.name}: {why}")
    return sorted(patients, key=lambda p: (p.patient_id, str(p.folder)))


def _top_folder(root: Path, path: Path) -> Path:
    """The first folder below ``root`` on the way to ``path`` (``root`` for files directly in it)."""
    parts = path.relative_to(root).parts
    return root / parts[0] if len(parts) > 1 else root


def choose_ct_series(patient: PatientDicom) -> tuple[SeriesInfo, str]:
    """The CT series to convert and, when there was a choice, a sentence saying which and why.

    Prefers the series that the patient's RTSTRUCT(s) reference (by SeriesInstanceUID, else by
    FrameOfReferenceUID); among several candidates the one with the most slices wins, ties
    broken by SeriesInstanceUID. Raises :class:`PatientError` when there is no CT image series.
    """
    candidates = list(patient.ct_series.values())
    if not candidates:
        found = ", ".join(f"{n} {m}" for m, n in sorted(patient.ignored.items())) or "no DICOM objects"
        raise PatientError(f"{patient.patient_id}: no CT image series under {patient.folder} (found: {found})")
    referenced = set().union(*(r.referenced_series_uids for r in patient.rtstructs))
    frames = set().union(*(r.frame_of_reference_uids for r in patient.rtstructs))
    pool = [s for s in candidates if s.series_uid in referenced]
    why = "it is referenced by the RTSTRUCT"
    if not pool:
        pool = [s for s in candidates if s.frame_of_reference_uid and s.frame_of_reference_uid in frames]
        why = "it is in the RTSTRUCT's frame of reference"
    if not pool:
        pool, why = candidates, "it has the most slices"
    elif len(pool) > 1:
        why += f" and has the most slices of those {len(pool)}"
    chosen = min(pool, key=lambda s: (-len(s.files), s.series_uid))
    if len(candidates) == 1:
        return chosen, ""
    others = ", ".join(f"{s.series_uid} ({len(s.files)} slices)" for s in candidates if s is not chosen)
    note = (f"chose CT series {chosen.series_uid} ({len(chosen.files)} slices, {chosen.folder}) because "
            f"{why}; ignored {others}")
    if patient.rtstructs and not (referenced & set(patient.ct_series)):
        note += f"; the RTSTRUCT references series {', '.join(sorted(referenced)) or '(none)'} not found here"
    return chosen, note


@dataclass
class _Slice:
    path: Path
    sop_instance_uid: str
    position: np.ndarray  # ImagePositionPatient, LPS mm
    distance: float  # along the slice normal, mm


def _floats(ds: pydicom.Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = _value(ds, keyword)
    try:  # a str is one unconvertible value, not a sequence of characters
        array = np.array([float(v) for v in ([value] if isinstance(value, str) else value)], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.array([])
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise PatientError(f"{path}: {keyword} is {value!r}; expected {count} numbers")
    return array


def _count(ds: pydicom.Dataset, keyword: str, path: Path) -> int:
    value = _value(ds, keyword)
    if not isinstance(value, int) or value < 1:
        raise PatientError(f"{path}: {keyword} is {value!r}; expected a positive integer")
    return value


def _geometry_headers(files: Sequence[Path]) -> list[tuple[Path, pydicom.Dataset]]:
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(GEOMETRY_TAGS))
        except Exception as exc:
            raise PatientError(f"{path}: cannot read DICOM header ({_one_line(exc)})") from None
        frames = _frame_count(ds)
        if frames is None:
            raise PatientError(f"{path}: NumberOfFrames is {_value(ds, 'NumberOfFrames')!r}; expected an integer (1)")
        if frames != 1:
            raise PatientError(f"{path}: multi-frame image ({frames} frames); "
                               "only single-frame CT Image Storage series are supported")
        headers.append((path, ds))
    return headers


def _fits_nifti(values: np.ndarray, positive: bool = False) -> bool:
    """True when ``values`` survive the NIfTI header's float32: finite (and, if ``positive``, normal)."""
    stored = np.abs(np.asarray(values, dtype=np.float64))
    limit = float(np.finfo(np.float32).max)
    return bool(np.all(stored < limit) and (not positive or np.all(stored >= np.finfo(np.float32).tiny)))


def _check_same(headers: list[tuple[Path, pydicom.Dataset]], what: str, value_of) -> object:
    first_path, first = headers[0]
    expected = value_of(first_path, first)
    for path, ds in headers[1:]:
        value = value_of(path, ds)
        if not np.allclose(value, expected, atol=ORIENTATION_TOLERANCE, rtol=0):
            raise PatientError(f"{path}: {what} {np.round(value, 6).tolist()} differs from "
                               f"{np.round(expected, 6).tolist()} in {first_path}; not one image stack")
    return expected


def _slice_geometry(headers: list[tuple[Path, pydicom.Dataset]]):
    """Orientation, spacing and sorted, de-duplicated slices; refuses tilted or odd stacks."""
    uids = {_text(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(uids) > 1:
        raise PatientError(f"the {len(headers)} files belong to {len(uids)} series: {sorted(uids)}")
    iop = _check_same(headers, "ImageOrientationPatient", lambda p, ds: _floats(ds, "ImageOrientationPatient", 6, p))
    pixel_spacing = _check_same(headers, "PixelSpacing", lambda p, ds: _floats(ds, "PixelSpacing", 2, p))
    rows, cols = _check_same(headers, "Rows x Columns",
                             lambda p, ds: np.array([_count(ds, "Rows", p), _count(ds, "Columns", p)]))
    row_dir, col_dir = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3
            or abs(row_dir @ col_dir) > 1e-3):
        raise PatientError(f"{headers[0][0]}: ImageOrientationPatient {iop.tolist()} is not two "
                           "orthogonal unit vectors")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    angle = math.degrees(math.acos(min(1.0, abs(normal[2]))))
    if angle > MAX_AXIAL_ANGLE_DEG:
        raise PatientError(
            f"{headers[0][0]}: not an axial series: the slice normal {(np.round(normal, 4) + 0.0).tolist()} "
            f"is {angle:.1f} deg from the head-foot axis (at most {MAX_AXIAL_ANGLE_DEG:g} deg allowed; "
            f"ImageOrientationPatient {iop.tolist()})")
    if pixel_spacing.min() <= 0:
        raise PatientError(f"{headers[0][0]}: PixelSpacing {pixel_spacing.tolist()} must be positive")
    if not _fits_nifti(pixel_spacing, positive=True):  # ITK refuses subnormal spacings; NIfTI resets inf to 1
        raise PatientError(f"{headers[0][0]}: PixelSpacing {pixel_spacing.tolist()} does not fit the NIfTI "
                           "header (float32, normal numbers)")

    slices = []
    for path, ds in headers:
        position = _floats(ds, "ImagePositionPatient", 3, path)
        if not _fits_nifti(position):
            raise PatientError(f"{path}: ImagePositionPatient {position.tolist()} does not fit the NIfTI header "
                               "(float32)")
        slices.append(_Slice(path, _text(ds.get("SOPInstanceUID", "")), position, float(position @ normal)))
    slices.sort(key=lambda s: (s.distance, str(s.path)))

    notes = []
    kept = [slices[0]]
    for s in slices[1:]:
        if s.distance - kept[-1].distance < DUPLICATE_TOLERANCE_MM:
            notes.append(f"dropped duplicate slice {s.path.name} (same position {s.distance:.3f} mm "
                         f"along the normal as {kept[-1].path.name})")
            log.warning("%s: duplicate slice position %.3f mm (same as %s); dropped", s.path, s.distance, kept[-1].path)
        else:
            kept.append(s)
    if len(kept) < 2:
        raise PatientError(f"{headers[0][0].parent}: only {len(kept)} distinct slice position(s); "
                           "a CT volume needs at least 2")

    # Every slice origin must lie on the line through the first one along the normal;
    # anything else is a gantry tilt or a sheared stack that a (row, col, normal) grid misplaces.
    offsets = np.array([s.position - kept[0].position for s in kept])
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(sideways, axis=1)
    if drift.max() > SHEAR_TOLERANCE_MM:
        worst = int(drift.argmax())
        tilt = math.degrees(math.atan2(drift[worst], kept[worst].distance - kept[0].distance))
        gantry = {_text(ds.get("GantryDetectorTilt", "")) for _, ds in headers} - {""}
        raise PatientError(
            f"{kept[worst].path}: gantry tilt or sheared stack: slice origins drift {drift[worst]:.2f} mm "
            f"sideways from the slice normal over {kept[worst].distance - kept[0].distance:.1f} mm "
            f"(about {tilt:.2f} deg; GantryDetectorTilt {', '.join(sorted(gantry)) or 'not given'}); "
            "tilted series are not supported: correct the tilt first (e.g. dcm2niix) or exclude the patient")
    geometry = {"row_dir": row_dir, "col_dir": col_dir, "normal": normal,
                "pixel_spacing": pixel_spacing, "rows": int(rows), "cols": int(cols)}
    return geometry, kept, notes


def _resampling_plan(distances: np.ndarray, fill_gaps: bool, where: str):
    """How to build the output slices from the sorted source slices at ``distances`` (mm).

    Returns (output step mm, one ``(source k, source k+1, weight of k+1)`` per output slice, gap
    descriptions). A step above the nominal (smallest) is a gap: :class:`PatientError` listing the gaps
    unless ``fill_gaps``, then the output covers first..last with the step closest to nominal.
    """
    steps = np.diff(distances)
    nominal = float(steps.min())
    gaps = np.flatnonzero(steps > nominal * (1 + SPACING_TOLERANCE))
    if gaps.size == 0:
        step = float((distances[-1] - distances[0]) / (len(distances) - 1))
        plan = [(k, k, 0.0) for k in range(len(distances))]
        return step, plan, []
    described = [f"{distances[i]:.2f} -> {distances[i + 1]:.2f} mm (step {steps[i]:.2f})" for i in gaps]
    if not fill_gaps:
        raise PatientError(
            f"{where}: non-uniform slice spacing (missing slices?): nominal step {nominal:.3f} mm, gaps "
            f"between slice positions {'; '.join(described[:10])}{' ...' if len(described) > 10 else ''}; "
            "use --fill-gaps to interpolate the missing slices")
    extent = float(distances[-1] - distances[0])
    count = int(round(extent / nominal)) + 1
    step = extent / (count - 1)
    targets = distances[0] + step * np.arange(count)
    plan = []
    for t in targets:
        k = min(int(np.searchsorted(distances, t, side="right")) - 1, len(distances) - 2)
        weight = float((t - distances[k]) / (distances[k + 1] - distances[k]))
        if weight < 1e-6:
            plan.append((k, k, 0.0))
        elif weight > 1 - 1e-6:
            plan.append((k + 1, k + 1, 0.0))
        else:
            plan.append((k, k + 1, weight))
    return step, plan, described


def _rescale(ds: pydicom.Dataset, keyword: str, default: float, path: Path) -> float:
    """RescaleSlope/RescaleIntercept as a finite float (``default`` when absent or empty). A slope of
    0 or below fails the patient: it would flatten or invert the Hounsfield scale silently."""
    value = _value(ds, keyword, default)
    try:
        number = float(default if value is None or value == "" else value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise PatientError(f"{path}: {keyword} is {value!r}; expected one finite number")
    if keyword == "RescaleSlope" and number <= 0:
        raise PatientError(f"{path}: RescaleSlope is {value!r}; expected a number > 0 (0 or a negative slope "
                           "would give flat or inverted HU)")
    return number


def _hu_slice(path: Path, rows: int, cols: int) -> np.ndarray:
    """One slice in HU (int32 when exact, else float64), with the slice's own slope/intercept."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise PatientError(f"{path}: cannot read DICOM file ({_one_line(exc)})") from None
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise PatientError(f"{path}: cannot decode pixel data ({name}): {_one_line(exc)}") from None
    if stored.shape != (rows, cols):
        raise PatientError(f"{path}: pixel array {stored.shape}, expected (Rows, Columns) = {(rows, cols)}")
    slope, intercept = (_rescale(ds, keyword, default, path)
                        for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)))
    if slope == 1 and intercept.is_integer() and abs(intercept) <= 2**30:  # exact in int32
        hu = stored.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(stored * slope + intercept)
    low, high = hu.min(), hu.max()
    if not INT16_MIN <= low <= high <= INT16_MAX:  # also refuses NaN (slope x stored + intercept = inf - inf)
        raise PatientError(f"{path}: HU range [{low:g}, {high:g}] (stored values x RescaleSlope {slope:g} + "
                           f"RescaleIntercept {intercept:g}) does not fit int16 [{INT16_MIN}, {INT16_MAX}]")
    return hu


def read_ct_series(files: Sequence[Path | str], fill_gaps: bool = False) -> CTSeries:
    """Read one CT series (single-frame files, any order) into an int16 HU volume with its true LPS geometry.

    Slices are ordered along the slice normal (row x column direction of ImageOrientationPatient); exact
    duplicate positions are dropped with a warning. HU = stored x RescaleSlope + RescaleIntercept (per
    slice), rounded to int16. Missing slices (a step above the nominal, i.e. smallest, one) raise
    :class:`PatientError` giving the gaps, unless ``fill_gaps``: then the stack is linearly resampled onto
    the uniform step closest to nominal that spans first..last, recorded in ``filled_slices``/``notes``.
    :class:`PatientError` naming the file for gantry tilt or shear, non-axial or mixed orientations,
    different slice sizes, HU outside int16, undecodable pixel data. Pixels are read once into a
    preallocated (z, y, x) int16 array.
    """
    files = [Path(f) for f in files]
    if not files:
        raise PatientError("no files given")
    headers = _geometry_headers(files)
    geometry, slices, notes = _slice_geometry(headers)
    distances = np.array([s.distance for s in slices])
    step, plan, gaps = _resampling_plan(distances, fill_gaps, str(slices[0].path.parent))

    rows, cols = geometry["rows"], geometry["cols"]
    volume = np.empty((len(plan), rows, cols), dtype=np.int16)
    cache: dict[int, np.ndarray] = {}  # at most the two source slices the current output needs
    for z, (k, k_next, weight) in enumerate(plan):
        for index in (k, k_next):
            if index not in cache:
                cache[index] = _hu_slice(slices[index].path, rows, cols)
        for index in [i for i in cache if i < k]:
            del cache[index]
        if weight == 0.0:
            volume[z] = cache[k]
        else:
            volume[z] = np.rint((1 - weight) * cache[k] + weight * cache[k_next])
    del cache

    origin = slices[0].position
    normal = geometry["normal"]
    direction = np.column_stack([geometry["row_dir"], geometry["col_dir"], normal])
    image = sitk.GetImageFromArray(volume)
    del volume
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing((float(geometry["pixel_spacing"][1]), float(geometry["pixel_spacing"][0]), step))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))

    refs = []
    for z, (k, k_next, weight) in enumerate(plan):
        source = slices[k] if weight == 0.0 else None
        position = source.position if source else origin + normal * (z * step)
        refs.append(SliceRef(source.sop_instance_uid if source else None,
                             tuple(float(v) for v in position), source.path if source else None))
    filled = sum(r.path is None for r in refs)
    if gaps:
        notes.append(f"filled {filled} missing slice(s) by linear interpolation onto a {step:.3f} mm step "
                     f"(gaps {'; '.join(gaps)})")
        log.warning("%s: %s", slices[0].path.parent, notes[-1])

    first = headers[0][1]
    return CTSeries(
        image=image, slices=refs, series_uid=_text(first.get("SeriesInstanceUID", "")),
        study_uid=_text(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=_text(first.get("FrameOfReferenceUID", "")),
        dicom_patient_id=_text(first.get("PatientID", "")), filled_slices=filled, notes=notes,
    )
