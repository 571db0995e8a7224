"""Phase 2.5: RTSTRUCT contours -> one multi-organ label map per patient.

``<data-root>/processed/ct_nifti/<PatientID>.nii.gz`` (+ ``conversion_report.csv``) and the RTSTRUCTs
found anywhere under each patient's DICOM folder -> ``<data-root>/processed/masks_multi_organ/
<PatientID>.nii.gz`` (uint8 labels 0-7 from ``organs.py``, exactly the CT's grid and affine)
+ ``structures.csv`` (what each label holds, per patient) + ``unmatched_roi_names.csv``.

    python extract_multi_organ_masks.py --data-root DATA [--ptv-margin-mm 10] [--no-derived-ptv]

How a mask is made:

* RTSTRUCTs are paired with the converted CT through UIDs (referenced series, else frame of
  reference), never through folder names; RTSTRUCTs that reference something else are reported.
* CLOSED_PLANAR contours are rasterised in patient coordinates (DICOM LPS mm) onto the CT grid:
  a voxel is inside when its centre is inside the polygon; all contours of one ROI on one slice
  are combined with the even-odd rule, so holes (a contour inside another) stay holes. A contour
  goes to the slice within half a slice thickness of its z; contours are placed by their
  coordinates only, so references to SOP instances missing from the series do not matter.
* All GTVs are fused into label 1; ``Lungs-Total`` is split into right and left lung at the
  patient's midline (spinal cord centre per slice, else the lungs' centroid). Overlaps are resolved
  with ``organs.PRIORITY``.
* The PTV, as in the clinic, is *made*, not segmented: without a PTV ROI (no NSCLC-Radiomics patient
  has one) the label map holds the contoured structures only, and ``structures.csv`` and the record
  ``<PatientID>.json`` mark the PTV *derived* (``GTV + 10 mm``, ``--ptv-margin-mm``): training does
  not teach label 2 for that patient, and evaluation and prediction grow the GTV with
  :func:`ptv_from_gtv` (the one GTV -> PTV function of the repository). A contoured PTV ROI stays
  label 2 and is trained and scored as a label.
* ``<PatientID>.json`` beside each label map records the annotated flags, how the PTV is made and a
  fingerprint of the inputs (CT NIfTI, RTSTRUCT files, settings): a run without ``--overwrite``
  redoes a patient whose inputs or settings changed, and phase 3 reads its flags from it.

Shared from here: :func:`referenced_uids` (the one RTSTRUCT reference reader, also phase 2's) and the
one even-odd rasteriser (:func:`fill_polygons_2d` per slice, also the synthetic cohort's truth maps).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

import organs
from pipeline_io import (
    DEFAULT_DATA_ROOT,
    DONE,
    FAILED,
    SKIPPED,
    DataLayout,
    PROCESSED_FORMAT,
    PatientError,
    PatientResult,
    add_common_arguments,
    check_same_geometry,
    check_writable,
    exit_status,
    file_sha256,
    fingerprint,
    run_batch,
    setup_logging,
    summary_line,
    walk_files,
    write_nifti,
    write_text_atomic,
)

log = logging.getLogger(__name__)

DEFAULT_PTV_MARGIN_MM = 10.0
CONVERSION_REPORT = "conversion_report.csv"
STRUCTURES_CSV = "structures.csv"
UNMATCHED_CSV = "unmatched_roi_names.csv"
STRUCTURES_COLUMNS = ("patient_id", "label", "structure", "annotated", "source_rois", "derived",
                      "voxels", "volume_ml", "voxels_lost")
UNMATCHED_COLUMNS = ("roi_name", "patients", "patient_ids")
RECORD_SUFFIX = ".json"  # <PatientID>.json beside <PatientID>.nii.gz: what phase 2.5 decided and read
#: How a patient's PTV is made (``record["ptv"]["source"]``): grown from the GTV, a contoured ROI
#: painted as label 2, or nothing (no GTV, or ``--no-derived-ptv``).
PTV_DERIVED, PTV_CONTOURED, PTV_NONE = "derived", "contoured", "none"

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# The File Meta group (first few hundred bytes of a Part-10 file) names the SOP class, so most files
# are recognised without parsing them; "481.3" must not be followed by more digits.
_RTSTRUCT_IN_HEADER = re.compile(re.escape(RTSTRUCT_SOP_CLASS.encode()) + rb"(?![0-9.])")
_HEADER_BYTES = 1024
_CONTOUR_DATA = 0x30060050
_COORD_TOLERANCE = 1e-6  # voxels / mm: absorbs float noise of NIfTI headers (float32) and DS strings


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A CT grid as SimpleITK describes it: ``size`` (x, y, z) voxels, ``spacing`` (x, y, z) mm,
    ``origin`` = LPS mm of voxel (0, 0, 0), ``direction`` 3x3 row-major with the axis directions
    as columns. Patient position of continuous index (i, j, k):
    ``origin + direction @ (spacing * (i, j, k))``; integer indices are voxel centres."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: Any) -> "Grid":
        """From a SimpleITK image or an ``ImageFileReader`` after ``ReadImageInformation()``."""
        if image.GetDimension() != 3:
            raise ValueError(f"need a 3D image, got {image.GetDimension()}D")
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.spacing[2], self.spacing[1], self.spacing[0]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @functools.cached_property
    def index_to_lps(self) -> np.ndarray:
        """3x3 matrix ``direction @ diag(spacing)``: continuous index (i, j, k) -> LPS offset, mm."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)

    def continuous_index(self, points_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous voxel index (i=x column, j=y row, k=z slice)."""
        offsets = np.asarray(points_lps, dtype=np.float64) - np.asarray(self.origin)
        return np.linalg.solve(self.index_to_lps, offsets.T).T


# --------------------------------------------------------------------------------------------
# Masks confined to a bounding box (a lung is ~5% of the volume; never allocate the full grid per ROI)
# --------------------------------------------------------------------------------------------
@dataclass
class BoxMask:
    """A boolean mask that is zero outside ``array``; ``offset`` = (z, y, x) voxel of ``array[0, 0, 0]``."""

    offset: tuple[int, int, int]
    array: np.ndarray  # bool (dz, dy, dx)

    @classmethod
    def empty(cls) -> "BoxMask":
        return cls((0, 0, 0), np.zeros((0, 0, 0), dtype=bool))

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.array.shape))  # type: ignore[return-value]

    def count(self) -> int:
        return int(np.count_nonzero(self.array))

    def to_full(self, shape_zyx: Sequence[int]) -> np.ndarray:
        """The mask on the whole grid, bool (Z, Y, X)."""
        full = np.zeros(tuple(shape_zyx), dtype=bool)
        if self.array.size:
            full[self.box] = self.array
        return full

    def union(self, other: "BoxMask") -> "BoxMask":
        if not other.array.size:
            return self
        if not self.array.size:
            return other
        lo = np.minimum(self.offset, other.offset)
        hi = np.maximum(np.add(self.offset, self.array.shape), np.add(other.offset, other.array.shape))
        out = BoxMask(tuple(int(v) for v in lo), np.zeros(tuple(hi - lo), dtype=bool))
        for part in (self, other):
            start = np.subtract(part.offset, lo)
            region = tuple(slice(s, s + n) for s, n in zip(start, part.array.shape))
            out.array[region] |= part.array
        return out


# --------------------------------------------------------------------------------------------
# RTSTRUCT reading
# --------------------------------------------------------------------------------------------
@dataclass
class Contour:
    """One ContourSequence item: geometric type and its points, (N, 3) float64 LPS mm."""

    geometric_type: str
    points: np.ndarray


@dataclass
class Roi:
    """One ROI of a structure set, with its contours (possibly none)."""

    number: str
    name: str
    frame_of_reference_uid: str
    contours: list[Contour] = field(default_factory=list)


def _contour_points(item: Any) -> np.ndarray:
    """ContourData as (N, 3) float64; parses the raw DS bytes directly (pydicom's DSfloat is 10x slower)."""
    elem = item.get_item(_CONTOUR_DATA) if _CONTOUR_DATA in item else None
    if elem is None or elem.value is None:
        return np.empty((0, 3))
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        values = np.array(bytes(value).split(b"\\"), dtype=np.float64) if value.strip(b" \x00") else np.empty(0)
    elif isinstance(value, (str, float, int)):
        values = np.asarray([float(value)])
    else:
        values = np.asarray([float(v) for v in value], dtype=np.float64)
    if values.size % 3:
        raise ValueError(f"{values.size} ContourData values, not a multiple of 3")
    return values.reshape(-1, 3)


def _roi_number(item: Any, keyword: str) -> str:
    """ROINumber / ReferencedROINumber as text: the stored text when pydicom cannot convert it (IS "1e309")."""
    try:
        return str(item.get(keyword, ""))
    except (TypeError, ValueError, OverflowError):
        return bytes(item.get_item(keyword).value).decode("latin-1").strip(" \x00")


def read_rois(rtstruct: Any) -> list[Roi]:
    """The ROIs of an RTSTRUCT dataset (pydicom), in StructureSetROISequence order.

    ROIs that have contours but no StructureSetROISequence entry get the name ``ROI <number>``.
    Unparseable ContourData raises ``ValueError`` naming the ROI.
    """
    rois: dict[str, Roi] = {}
    for item in rtstruct.get("StructureSetROISequence", []):
        number = _roi_number(item, "ROINumber")
        rois[number] = Roi(number, str(item.get("ROIName", "") or f"ROI {number}").strip(),
                           str(item.get("ReferencedFrameOfReferenceUID", "") or ""))
    for roi_contour in rtstruct.get("ROIContourSequence", []):
        number = _roi_number(roi_contour, "ReferencedROINumber")
        roi = rois.setdefault(number, Roi(number, f"ROI {number}", ""))
        for item in roi_contour.get("ContourSequence", []) or []:
            try:
                points = _contour_points(item)
            except ValueError as exc:
                raise ValueError(f"ROI {roi.name!r}: unreadable ContourData: {exc}") from None
            geometric_type = str(item.get("ContourGeometricType", "CLOSED_PLANAR") or "CLOSED_PLANAR")
            # whitespace collapsed: the type is quoted in one-line messages ("OPEN\nPLANAR")
            roi.contours.append(Contour(" ".join(geometric_type.split()).upper(), points))
    return list(rois.values())


def referenced_uids(rtstruct: Any) -> tuple[set[str], set[str]]:
    """(series UIDs, frame-of-reference UIDs) an RTSTRUCT says its contours were drawn on.

    The one reader of an RTSTRUCT's references: phase 2 (``convert_dicom_to_nifti``) uses it to choose
    the CT series, phase 2.5 to pair the RTSTRUCT with the converted CT. Series come from
    ReferencedFrameOfReferenceSequence > RTReferencedStudySequence > RTReferencedSeriesSequence; frames
    from ReferencedFrameOfReferenceSequence[].FrameOfReferenceUID and, because that sequence is optional
    (type 3) and some exporters leave it out, StructureSetROISequence[].ReferencedFrameOfReferenceUID
    (type 1; the standard requires it to be one of the former when both are present). ``rtstruct`` is a
    pydicom Dataset, possibly read with ``specific_tags`` holding just these two sequences. Values are
    ``str`` with surrounding spaces stripped (pydicom already strips the trailing NUL/space padding of
    UI values), so they compare equal to the UIDs phase 2 writes to ``conversion_report.csv``.
    """
    series: set[str] = set()
    frames: set[str] = set()
    for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", []):
        if frame.get("FrameOfReferenceUID"):
            frames.add(str(frame.FrameOfReferenceUID).strip())
        for study in frame.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                if ser.get("SeriesInstanceUID"):
                    series.add(str(ser.SeriesInstanceUID).strip())
    for item in rtstruct.get("StructureSetROISequence", []):
        if item.get("ReferencedFrameOfReferenceUID"):
            frames.add(str(item.ReferencedFrameOfReferenceUID).strip())
    return series, frames


def _header_until_patient_id(path: Path) -> Any:
    """The dataset up to (0010,0020) PatientID: enough for Modality, SOP class and patient."""
    from pydicom.filereader import read_partial

    with open(path, "rb") as fh:
        return read_partial(fh, stop_when=lambda tag, vr, length: tag > 0x00100020, force=True)


def find_rtstruct_files(folder: Path) -> list[tuple[Path, str]]:
    """Every RTSTRUCT file below ``folder`` (any depth) with its PatientID, sorted by path.

    Part-10 files are recognised from their first kilobyte (the File Meta group names the SOP
    class), so CT slices are never parsed; other files are parsed up to PatientID. Unreadable and
    non-DICOM files are ignored.
    """
    found = []
    for path in walk_files(folder):
        try:
            with open(path, "rb") as fh:
                head = fh.read(_HEADER_BYTES)
            if head[128:132] == b"DICM" and not _RTSTRUCT_IN_HEADER.search(head):
                continue
            ds = _header_until_patient_id(path)
        except Exception as exc:  # not DICOM at all: collections hold READMEs, spreadsheets...
            log.debug("ignoring %s (%s)", path, exc)
            continue
        if ds.get("Modality") == "RTSTRUCT" or str(ds.get("SOPClassUID", "")) == RTSTRUCT_SOP_CLASS:
            found.append((path, str(ds.get("PatientID", "") or "")))
    return found


# --------------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------------
def _even_odd_fill(polygons: Sequence[tuple[int, np.ndarray]], shape_zyx: Sequence[int]) -> BoxMask:
    """Even-odd fill of planar polygons, each ``(slice k, (N, 2) continuous (x=column, y=row))``.

    A voxel is inside when its centre (integer x, y) is inside; every polygon edge toggles the voxels
    to the left of where it crosses a row of centres (crossing-number test, half-open in y so a vertex
    on a row counts once), so contours on the same slice combine by XOR: holes and islands come out
    right. Only the polygons' bounding box is touched; the loop over (edge, row) pairs is vectorised.
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    if not polygons:
        return BoxMask.empty()
    lengths = np.array([len(p) for _, p in polygons])
    xy = np.concatenate([p for _, p in polygons])
    slice_of_point = np.repeat(np.array([k for k, _ in polygons]), lengths)
    starts = np.cumsum(lengths) - lengths
    following = np.arange(len(xy)) + 1
    following[starts + lengths - 1] = starts  # close each polygon
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = x0[following], y0[following]

    row_lo, row_hi = max(0, math.ceil(y0.min())), min(ny - 1, math.ceil(y0.max()) - 1)
    col_lo, col_hi = max(0, math.floor(x0.min())), min(nx - 1, math.ceil(x0.max()))
    k_lo, k_hi = int(slice_of_point.min()), int(slice_of_point.max())
    if row_lo > row_hi or col_lo > col_hi:
        return BoxMask.empty()

    # Rows of voxel centres each edge crosses: y in [min(y0, y1), max(y0, y1)).
    first = np.maximum(np.ceil(np.minimum(y0, y1)), row_lo).astype(np.int64)
    last = np.minimum(np.ceil(np.maximum(y0, y1)) - 1, row_hi).astype(np.int64)
    counts = np.clip(last - first + 1, 0, None)
    edge = np.repeat(np.arange(len(xy)), counts)
    row = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    x_cross = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # Voxel centres c < x_cross lie left of the crossing: c < ceil(x_cross). Column nc = "none".
    n_cols = col_hi - col_lo + 1
    first_right = np.clip(np.ceil(x_cross), col_lo, col_hi + 1).astype(np.int64) - col_lo

    toggles = np.zeros((k_hi - k_lo + 1, row_hi - row_lo + 1, n_cols + 1), dtype=np.uint8)
    np.bitwise_xor.at(toggles, (slice_of_point[edge] - k_lo, row - row_lo, first_right), 1)
    # inside[c] = XOR of toggles at columns > c: a reversed cumulative XOR along x.
    inside = np.bitwise_xor.accumulate(toggles[..., ::-1], axis=2)[..., ::-1][..., 1:]
    return BoxMask((k_lo, row_lo, col_lo), inside.astype(bool))


def fill_polygons_2d(polygons_xy: Sequence[np.ndarray], shape_yx: Sequence[int]) -> np.ndarray:
    """Even-odd fill of the closed polygons of one slice: bool (rows, cols), voxel centre inside.

    ``polygons_xy`` are (N, 2) float arrays of (x = column, y = row) in voxel-index units (voxel
    centres at integers), not closed (the last point joins the first). This is :func:`_even_odd_fill`,
    the rasteriser of every RTSTRUCT ROI of this phase, on a one-slice grid, for callers that work
    slice by slice (``make_synthetic_cohort`` paints its HU images and true label maps with it). A
    polygon inside another is a hole; parts outside the grid are clipped; a centre exactly on an edge
    follows the half-open rule (inside on a left or top edge, outside on a right or bottom one).
    Raises ``ValueError`` for a ``shape_yx`` that is not two non-negative integers or a polygon that is
    not (N, 2).
    """
    shape = tuple(shape_yx)
    if len(shape) != 2 or any(int(n) != n or n < 0 for n in shape):
        raise ValueError(f"shape_yx must be (rows, cols), two non-negative integers; got {shape_yx!r}")
    polygons = []
    for polygon in polygons_xy:
        xy = np.asarray(polygon, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"each polygon must be an (N, 2) array of (x, y); got shape {xy.shape}")
        if len(xy):
            polygons.append((0, xy))
    shape_zyx = (1, int(shape[0]), int(shape[1]))
    return _even_odd_fill(polygons, shape_zyx).to_full(shape_zyx)[0]


@dataclass
class _Notes:
    """Warnings about one patient, grouped so a ROI with 40 bad contours gives one line."""

    grouped: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    lines: list[str] = field(default_factory=list)

    def contour(self, roi: str, problem: str, where: str) -> None:
        self.grouped[(roi, problem)].append(where)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def all(self) -> list[str]:
        out = list(self.lines)
        for (roi, problem), places in self.grouped.items():
            shown = ", ".join(places[:8]) + (", ..." if len(places) > 8 else "")
            count = f"{len(places)} contours" if len(places) > 1 else "contour"
            out.append(f"ROI {roi!r}: {count} {problem}, skipped ({shown})")
        return out


def _planar_polygons(contours: Iterable[Contour], grid: Grid, roi_name: str,
                     notes: _Notes) -> list[tuple[int, np.ndarray]]:
    """Keep the usable CLOSED_PLANAR contours as (slice k, (N, 2) continuous x/y index), warn about the rest.

    An exact copy of a contour already kept on the same slice is dropped: under the even-odd rule the
    pair would cancel out and erase the structure on that slice.
    """
    nz = grid.size[2]
    polygons = []
    seen: set[tuple[int, bytes]] = set()
    for contour in contours:
        points = contour.points
        if not len(points):
            notes.contour(roi_name, "without points", "no slice")
            continue
        index = grid.continuous_index(points)
        k_mean = float(index[:, 2].mean())
        k = int(np.floor(k_mean + 0.5)) if math.isfinite(k_mean) else -1  # NaN/inf: refused below
        z_text = f"z = {float(points[:, 2].mean()):.2f} mm"
        where = f"slice {k}, {z_text}" if 0 <= k < nz else z_text
        if contour.geometric_type != "CLOSED_PLANAR":
            notes.contour(roi_name, f"of type {contour.geometric_type} (not CLOSED_PLANAR)", where)
        elif len(points) < 3:
            notes.contour(roi_name, f"with fewer than 3 points ({len(points)})", where)
        elif not np.isfinite(index).all():
            notes.contour(roi_name, "with non-numeric coordinates", where)
        elif np.ptp(index[:, 2]) > 0.5 + _COORD_TOLERANCE:
            notes.contour(roi_name, "not parallel to the CT slices", where)
        elif not -0.5 - _COORD_TOLERANCE <= k_mean <= nz - 0.5 + _COORD_TOLERANCE:
            first_z, last_z = (float((np.asarray(grid.origin) + grid.index_to_lps @ [0, 0, kk])[2])
                               for kk in (0, nz - 1))
            notes.contour(roi_name, f"matching no CT slice (slices span z = {first_z:.2f} .. {last_z:.2f} mm, "
                                    f"+- half a slice)", where)
        elif (k, points.tobytes()) in seen:
            notes.contour(roi_name, "identical to another contour on the same slice", where)
        else:
            seen.add((k, points.tobytes()))
            polygons.append((min(max(k, 0), nz - 1), index[:, :2]))
    return polygons


def rasterize_contours(contours: Sequence[np.ndarray], image: Any, *, roi_name: str = "ROI") -> np.ndarray:
    """Rasterise closed planar contours (each (N, 3) LPS mm, N >= 3) onto ``image``'s grid.

    ``image`` is a SimpleITK image (or anything with GetSize/GetSpacing/GetOrigin/GetDirection).
    Returns bool (Z, Y, X): voxel centre inside the polygon, contours on the same slice combined with
    the even-odd rule (a contour inside another is a hole). Contours that are unusable (fewer than
    3 points, no matching slice, not parallel to the slices) are skipped with a logged warning.
    """
    grid = Grid.of(image)
    notes = _Notes()
    contour_items = [Contour("CLOSED_PLANAR", np.asarray(c, dtype=np.float64).reshape(-1, 3)) for c in contours]
    mask = _even_odd_fill(_planar_polygons(contour_items, grid, roi_name, notes), grid.shape_zyx)
    for line in notes.all():
        log.warning("%s", line)
    return mask.to_full(grid.shape_zyx)


def masks_from_rtstruct(rtstruct: Any, image: Any) -> dict[str, np.ndarray]:
    """Rasterise every ROI of an RTSTRUCT onto ``image``'s grid: ROI name -> bool (Z, Y, X).

    ``rtstruct`` is a pydicom Dataset or a path. No pairing or frame-of-reference check is done here
    (the caller knows the RTSTRUCT belongs to the image). ROIs with the same name are merged (union);
    ROIs without usable contours map to an all-False mask. Warnings are logged.
    """
    import pydicom

    ds = rtstruct if isinstance(rtstruct, pydicom.Dataset) else pydicom.dcmread(rtstruct)
    grid = Grid.of(image)
    notes = _Notes()
    masks: dict[str, BoxMask] = {}
    for roi in read_rois(ds):
        mask = _even_odd_fill(_planar_polygons(roi.contours, grid, roi.name, notes), grid.shape_zyx)
        masks[roi.name] = masks[roi.name].union(mask) if roi.name in masks else mask
    for line in notes.all():
        log.warning("%s", line)
    return {name: mask.to_full(grid.shape_zyx) for name, mask in masks.items()}


# --------------------------------------------------------------------------------------------
# Structures: ROIs -> labels, lung split, derived PTV, priority overlay
# --------------------------------------------------------------------------------------------
@dataclass
class StructureMask:
    """What one label (1-7) of a patient holds before the priority overlay."""

    label: int
    mask: BoxMask = field(default_factory=BoxMask.empty)
    annotated: bool = False
    derived: str = ""  # "GTV + 10 mm": made from other structures, never painted into the label map
    source_rois: list[str] = field(default_factory=list)
    how: str = ""  # recorded next to the ROI names: "split at the midline (...)"

    @property
    def source_text(self) -> str:
        text = "|".join(self.source_rois)
        return f"{text} {self.how}".strip()


def polygon_centres(polygons: Sequence[tuple[int, np.ndarray]], grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, the LPS x (mm) of the area centroid of the polygons ``(k, (N, 2) continuous x/y index)``
    on it (several polygons: area-weighted). Returns (slice indices, x) sorted by slice; works for
    structures smaller than a voxel, unlike a centroid of rasterised voxels."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # sum A*cx, A*cy, A
    for k, xy in polygons:
        x, y = xy[:, 0], xy[:, 1]
        xn, yn = np.roll(x, -1), np.roll(y, -1)
        cross = x * yn - xn * y
        area = cross.sum() / 2
        if abs(area) < 1e-12:
            continue
        sign, acc = np.sign(area), sums[k]  # either winding order
        acc[0] += sign * ((x + xn) * cross).sum() / 6
        acc[1] += sign * ((y + yn) * cross).sum() / 6
        acc[2] += abs(area)
    slices = np.array(sorted(sums), dtype=np.int64)
    to_x = grid.index_to_lps[0]
    centre_x = np.array([grid.origin[0] + to_x @ (sums[k][0] / sums[k][2], sums[k][1] / sums[k][2], k)
                         for k in slices])
    return slices, centre_x


def split_at_midline(lungs: BoxMask, grid: Grid, cord_centres: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[BoxMask, BoxMask, str]:
    """Split a both-lungs mask into (right, left) at the patient's midline; returns the method too.

    The midline is the patient x (LPS, +x = patient's left) of the spinal-cord centre on each slice
    (``cord_centres`` = (slice indices, x mm) from :func:`polygon_centres`), interpolated between cord
    slices and held constant beyond them; without a cord, the x centroid of the lungs mask itself.
    A voxel whose centre has x below the midline is right lung.
    """
    if not lungs.array.size:
        return lungs, BoxMask.empty(), "empty"
    to_x = grid.index_to_lps[0]  # LPS x = origin_x + to_x @ (i, j, k)
    origin_x = grid.origin[0]
    if cord_centres is not None and len(cord_centres[0]):
        slices, centre_x = cord_centres
        method = "spinal cord centre per slice"
    else:
        kji = np.argwhere(lungs.array) + lungs.offset
        centre = origin_x + (kji[:, 2] * to_x[0] + kji[:, 1] * to_x[1] + kji[:, 0] * to_x[2]).mean()
        slices, centre_x = np.array([0]), np.array([centre])
        method = "lungs centroid"
    z0, y0, x0 = lungs.offset
    dz, dy, dx = lungs.array.shape
    k = np.arange(z0, z0 + dz)
    midline = np.interp(k, slices, centre_x)
    relative_x = ((origin_x + k * to_x[2] - midline)[:, None, None]
                  + (np.arange(x0, x0 + dx) * to_x[0])[None, None, :])
    if abs(to_x[1]) > 1e-9:  # rows contribute to x only for rotated in-plane directions
        relative_x = relative_x + (np.arange(y0, y0 + dy) * to_x[1])[None, :, None]
    right_side = relative_x < 0
    return (BoxMask(lungs.offset, lungs.array & right_side),
            BoxMask(lungs.offset, lungs.array & ~right_side), method)


def expand_mm(mask: BoxMask, margin_mm: float, grid: Grid | Any) -> BoxMask:
    """Isotropic 3D expansion by ``margin_mm`` on the (anisotropic) grid: every voxel whose centre is
    within ``margin_mm`` (Euclidean, mm) of a voxel of ``mask``. Computed with a distance transform
    on the mask's bounding box grown by the margin, clipped to the grid. ``grid`` needs only
    ``spacing_zyx`` and ``shape_zyx``; :func:`ptv_from_gtv` is the same on whole arrays."""
    from scipy.ndimage import distance_transform_edt

    if not (margin_mm >= 0 and math.isfinite(margin_mm)):
        raise ValueError(f"margin must be a finite number >= 0 mm, got {margin_mm}")
    if not mask.count():
        return BoxMask.empty()
    spacing = np.asarray(grid.spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x) in mm, got {grid.spacing_zyx}")
    pad = np.ceil(margin_mm / spacing).astype(int)
    lo = np.maximum(np.asarray(mask.offset) - pad, 0)
    hi = np.minimum(np.add(mask.offset, mask.array.shape) + pad, grid.shape_zyx)
    region = np.ones(tuple(hi - lo), dtype=bool)  # True = not tumour
    start = np.asarray(mask.offset) - lo
    region[tuple(slice(s, s + n) for s, n in zip(start, mask.array.shape))] &= ~mask.array
    distance = distance_transform_edt(region, sampling=spacing)
    return BoxMask(tuple(int(v) for v in lo), distance <= margin_mm + _COORD_TOLERANCE)


@dataclass(frozen=True)
class _ArrayGrid:
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]


def ptv_from_gtv(gtv_zyx: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float) -> np.ndarray:
    """The PTV of a GTV mask: bool (Z, Y, X), every voxel whose centre lies within ``margin_mm``
    (Euclidean, in mm on the anisotropic grid ``spacing_zyx`` = (z, y, x) mm) of a GTV voxel.

    The one GTV -> PTV function of the repository: phase 2.5 (the volume in ``structures.csv``),
    evaluation (PTV scored as margin(predicted GTV) vs margin(true GTV)) and prediction (the PTV ROI
    of the RTSTRUCT) call it. ``gtv_zyx`` is any array, non-zero = GTV. A single voxel grown by
    10 mm on a 1 x 1 x 3 mm grid (x, y, z) gives 317 + 2 x (293 + 197 + 61) = 1,419 voxels.
    """
    gtv = np.asarray(gtv_zyx) != 0
    if gtv.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) GTV mask, got shape {gtv.shape}")
    spacing = tuple(float(v) for v in spacing_zyx)
    if len(spacing) != 3:
        raise ValueError(f"spacing must be (z, y, x) mm, got {spacing_zyx}")
    out = np.zeros(gtv.shape, dtype=bool)
    occupied = np.argwhere(gtv)
    if not len(occupied):
        expand_mm(BoxMask.empty(), margin_mm, _ArrayGrid(gtv.shape, spacing))  # validates the margin
        return out
    lo, hi = occupied.min(axis=0), occupied.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grown = expand_mm(BoxMask(tuple(int(v) for v in lo), gtv[box]), margin_mm,
                      _ArrayGrid(tuple(gtv.shape), spacing))
    out[grown.box] = grown.array
    return out


def ptv_description(margin_mm: float) -> str:
    """How a derived PTV is made, as ``structures.csv`` and ``summary.md`` say it: ``GTV + 10 mm``."""
    return f"GTV + {margin_mm:g} mm"


def build_structures(
    rois: Sequence[Roi],
    grid: Grid,
    *,
    ptv_margin_mm: float = DEFAULT_PTV_MARGIN_MM,
    derive_ptv: bool = True,
    notes: _Notes | None = None,
) -> tuple[dict[int, StructureMask], list[str]]:
    """Turn ROIs into one mask per label 1-7 (before the priority overlay).

    Returns ``({label: StructureMask}, unmatched ROI names)``. ROI names are matched with
    ``organs.match_roi_name``; several ROIs of one label (all GTVs, duplicate names) are merged by
    union. A ROI without a usable contour provides nothing (its structure may stay not annotated).
    Without a PTV ROI and with ``derive_ptv``, the PTV is the GTV grown by ``ptv_margin_mm``: its
    mask is kept for the record (volume) but it stays *not annotated* and is never painted.
    """
    notes = notes if notes is not None else _Notes()
    structures = {label: StructureMask(label) for label in organs.FOREGROUND_LABELS}
    both_lungs = StructureMask(organs.BOTH_LUNGS)
    cord_polygons: list[tuple[int, np.ndarray]] = []
    unmatched: list[str] = []
    seen_names: dict[str, int] = defaultdict(int)
    for roi in rois:
        seen_names[roi.name] += 1
        label = organs.match_roi_name(roi.name)
        if label is None:
            if roi.name not in unmatched:
                unmatched.append(roi.name)
            continue
        polygons = _planar_polygons(roi.contours, grid, roi.name, notes)
        if not polygons:
            notes.add(f"ROI {roi.name!r} has no usable contour: it annotates nothing")
            continue
        if label == organs.SPINAL_CORD:
            cord_polygons.extend(polygons)
        target = both_lungs if label == organs.BOTH_LUNGS else structures[label]
        target.mask = target.mask.union(_even_odd_fill(polygons, grid.shape_zyx))
        target.annotated = True
        if roi.name not in target.source_rois:
            target.source_rois.append(roi.name)
    for name, count in seen_names.items():
        if count > 1:
            notes.add(f"ROI name {name!r} appears {count} times: its contours were merged (union)")

    right, left = structures[organs.RIGHT_LUNG], structures[organs.LEFT_LUNG]
    if both_lungs.annotated:
        if right.annotated and left.annotated:
            notes.add(f"both lungs are contoured separately: {'|'.join(both_lungs.source_rois)} ignored")
        else:
            right_part, left_part, method = split_at_midline(
                both_lungs.mask, grid, polygon_centres(cord_polygons, grid))
            how = f"(split at the midline: {method})"
            for side, part in ((right, right_part), (left, left_part)):
                if not side.annotated:
                    side.mask, side.annotated, side.how = part, True, how
                    side.source_rois = list(both_lungs.source_rois)
            notes.add(f"{'|'.join(both_lungs.source_rois)} split into right and left lung at the midline ({method})")

    ptv, gtv = structures[organs.PTV], structures[organs.GTV]
    if not ptv.annotated and derive_ptv and gtv.annotated:
        ptv.mask = expand_mm(gtv.mask, ptv_margin_mm, grid)
        ptv.derived = ptv_description(ptv_margin_mm)
        ptv.source_rois = list(gtv.source_rois)
    return structures, unmatched


def ptv_record(structures: Mapping[int, StructureMask], ptv_margin_mm: float) -> dict[str, Any]:
    """``{"source": derived|contoured|none[, "margin_mm": m]}``: how this patient's PTV is made."""
    ptv = structures[organs.PTV]
    if ptv.annotated:
        return {"source": PTV_CONTOURED}
    if ptv.derived:
        return {"source": PTV_DERIVED, "margin_mm": float(ptv_margin_mm)}
    return {"source": PTV_NONE}


def combine_labels(structures: Mapping[int, StructureMask], shape_zyx: Sequence[int]
                   ) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """Paint the structures into one uint8 (Z, Y, X) label map, higher ``organs.PRIORITY`` winning.

    Derived structures (a PTV grown from the GTV) are not painted: the map holds contoured
    structures only. Returns ``(labels, voxels per label, voxels each structure lost to higher
    priority)``; a derived structure's voxels are its own (it overlaps freely, it loses nothing).
    """
    labels = np.zeros(tuple(shape_zyx), dtype=np.uint8)
    for label in reversed(organs.PRIORITY):
        mask = structures[label].mask
        if mask.array.size and not structures[label].derived:
            labels[mask.box][mask.array] = label
    voxels, lost = {}, {}
    for label in organs.FOREGROUND_LABELS:
        mask = structures[label].mask
        if structures[label].derived:
            voxels[label], lost[label] = mask.count(), 0
            continue
        voxels[label] = int(np.count_nonzero(labels[mask.box][mask.array] == label)) if mask.array.size else 0
        lost[label] = mask.count() - voxels[label]
    return labels, voxels, lost


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatientJob:
    """Inputs of one patient: the converted CT, the UIDs phase 2 recorded for it and the RTSTRUCT
    files found under the patient's DICOM folder (see :func:`find_rtstruct_files`)."""

    patient_id: str
    ct_path: Path
    series_uid: str
    frame_of_reference_uid: str
    rtstruct_files: tuple[Path, ...]
    output_path: Path
    patient_folder: Path = Path()  # where the RTSTRUCTs were looked for (for messages)
    summarised: bool = True  # False: no structures.csv rows (its run was killed): never skipped


@dataclass(frozen=True)
class Settings:
    ptv_margin_mm: float = DEFAULT_PTV_MARGIN_MM
    derive_ptv: bool = True
    overwrite: bool = True  # False: skip a patient whose record says the same inputs and settings


def select_rtstructs(candidates: Sequence[tuple[Path, Any]], series_uid: str, frame_uid: str,
                     patient_id: str) -> tuple[list[tuple[Path, Any]], list[str]]:
    """Choose the RTSTRUCTs drawn on the CT: those referencing its series, else its frame of reference.

    Returns (chosen, notes about the others). Raises :class:`PatientError` when none fits or a chosen
    one places its contours in another frame of reference.
    """
    described = []
    for path, ds in candidates:
        series, frames = referenced_uids(ds)
        described.append((path, ds, series, frames))
    chosen = [d for d in described if series_uid and series_uid in d[2]]
    if not chosen and frame_uid:
        chosen = [d for d in described if d[3] == {frame_uid}]
    if not chosen:
        if not described:
            raise PatientError(f"{patient_id}: no RTSTRUCT to pair with the CT")
        details = "; ".join(f"{p.name} references series {sorted(s) or 'none'}, frame of reference "
                            f"{sorted(f) or 'none'}" for p, _, s, f in described)
        raise PatientError(f"{patient_id}: no RTSTRUCT references the CT series {series_uid} or its frame of "
                           f"reference {frame_uid or '(unknown)'}: {details}")
    for path, _, _, frames in chosen:
        if frame_uid and frames - {frame_uid}:
            raise PatientError(f"{patient_id}: RTSTRUCT {path} places contours in frame of reference "
                               f"{sorted(frames - {frame_uid})}, but the CT series {series_uid} has frame of "
                               f"reference {frame_uid}; contours would land in the wrong place")
    others = [f"RTSTRUCT {p} ignored: it references series {sorted(s) or 'none'}, not the CT series {series_uid}"
              for p, _, s, _ in described if all(p != c[0] for c in chosen)]
    if chosen and series_uid not in chosen[0][2]:
        others.append(f"RTSTRUCT {', '.join(str(c[0]) for c in chosen)} paired through the frame of reference "
                      f"only (no reference to series {series_uid})")
    return [(p, ds) for p, ds, _, _ in chosen], others


def _read_grid(ct_path: Path) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct_path))
    try:
        reader.ReadImageInformation()  # the header is all we need: no HU are read
    except RuntimeError as exc:
        raise PatientError(f"cannot read the CT {ct_path}: {str(exc).strip().splitlines()[-1]}") from None
    return reader


def record_path(mask_path: Path) -> Path:
    """``<PatientID>.json`` beside the label map ``<PatientID>.nii.gz``."""
    return mask_path.with_name(mask_path.name[: -len(".nii.gz")] + RECORD_SUFFIX)


def inputs_fingerprint(job: PatientJob, settings: Settings) -> str:
    """Fingerprint of what a patient's label map is made from: the CT NIfTI's and RTSTRUCT files'
    bytes (SHA-256; RTSTRUCTs named relative to the patient folder, so moving ``DATA`` changes
    nothing), the phase 2.5 settings and the output format."""
    def name(path: Path) -> str:
        try:
            return str(path.relative_to(job.patient_folder))
        except ValueError:
            return path.name
    return fingerprint({
        "format": PROCESSED_FORMAT,
        "ct_nifti": file_sha256(job.ct_path),
        "rtstructs": sorted((name(p), file_sha256(p)) for p in job.rtstruct_files),
        "ptv_margin_mm": float(settings.ptv_margin_mm), "derive_ptv": bool(settings.derive_ptv),
    })


def read_mask_record(mask_path: Path | str) -> dict[str, Any]:
    """The record phase 2.5 wrote beside a label map (flags, PTV, fingerprints).

    Raises ``FileNotFoundError`` when the label map or its record is missing and ``ValueError`` for
    a record of another format; both messages name the file and say to re-run phase 2.5.
    """
    mask_path = Path(mask_path)
    path = record_path(mask_path)
    again = "re-run extract_multi_organ_masks.py --overwrite for this patient"
    if not path.is_file():
        if mask_path.is_file():
            raise ValueError(f"{mask_path} was written by an earlier version of extract_multi_organ_masks.py "
                             f"(no {path.name}: its PTV may be painted into the label map); {again}")
        raise FileNotFoundError(f"no label map {mask_path}; run extract_multi_organ_masks.py")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); {again}") from None
    if not isinstance(record, dict) or record.get("format") != PROCESSED_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ValueError(f"{path} has format {found!r}, this version reads format {PROCESSED_FORMAT}; {again}")
    return record


def _up_to_date(job: PatientJob, fingerprint_now: str) -> tuple[bool, str]:
    """(skip?, why it is redone) for a patient whose outputs may exist."""
    if not job.output_path.is_file():
        return False, ""
    try:
        record = read_mask_record(job.output_path)
    except ValueError:
        return False, "redone: its label map was written by an earlier version (or its record is unreadable)"
    except FileNotFoundError:
        return False, ""
    if not job.summarised:
        return False, "redone: it has no structures.csv rows (its run was interrupted)"
    if record.get("inputs_fingerprint") == fingerprint_now:
        return True, ""
    return False, "redone: its CT, RTSTRUCT or phase 2.5 settings changed since it was made"


def extract_patient(job: PatientJob, settings: Settings = Settings()) -> PatientResult:
    """Make one patient's label map, its record and its structures.csv rows (in ``result.info``).

    With ``settings.overwrite`` False, a patient whose record holds the same inputs fingerprint is
    skipped; one whose inputs or settings changed (or written by an earlier version) is redone.
    """
    import pydicom
    import SimpleITK as sitk

    pid = job.patient_id
    fingerprint_now = inputs_fingerprint(job, settings)
    redo_reason = ""
    if not settings.overwrite:
        skip, redo_reason = _up_to_date(job, fingerprint_now)
        if skip:
            return PatientResult(pid, SKIPPED, f"{job.output_path.name} is up to date (use --overwrite to redo it)")
    reader = _read_grid(job.ct_path)
    grid = Grid.of(reader)
    candidates, notes = [], _Notes()
    for path in job.rtstruct_files:
        try:
            ds = pydicom.dcmread(path)
            # pydicom reads a truncated file without complaint; a structure set must have both.
            missing = [k for k in ("StructureSetROISequence", "ROIContourSequence") if k not in ds]
            if missing:
                raise ValueError(f"no {' or '.join(missing)} (truncated file?)")
            candidates.append((path, ds))
        except Exception as exc:
            notes.add(f"unreadable RTSTRUCT {path}: {exc}")
    if not candidates:
        raise PatientError(f"{pid}: no readable RTSTRUCT under {job.patient_folder}"
                           + (f" ({'; '.join(notes.all())})" if notes.all() else ""))
    chosen, others = select_rtstructs(candidates, job.series_uid, job.frame_of_reference_uid, pid)
    for line in others:
        notes.add(line)
    rois = []
    for path, ds in chosen:
        try:
            rois.extend(read_rois(ds))
        except ValueError as exc:
            raise PatientError(f"{pid}: RTSTRUCT {path}: {exc}") from None

    structures, unmatched = build_structures(rois, grid, ptv_margin_mm=settings.ptv_margin_mm,
                                             derive_ptv=settings.derive_ptv, notes=notes)
    labels, voxels, lost = combine_labels(structures, grid.shape_zyx)
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    check_same_geometry(image, reader, f"{pid}: mask vs CT {job.ct_path}")
    record_file = record_path(job.output_path)
    record_file.unlink(missing_ok=True)  # a run killed after the map and before its record is redone
    write_nifti(image, job.output_path)
    record = {
        "format": PROCESSED_FORMAT, "patient_id": pid,
        "annotated": [True] + [bool(structures[label].annotated) for label in organs.FOREGROUND_LABELS],
        "ptv": ptv_record(structures, settings.ptv_margin_mm),
        "settings": {"ptv_margin_mm": float(settings.ptv_margin_mm), "derive_ptv": bool(settings.derive_ptv)},
        "inputs_fingerprint": fingerprint_now,
        "mask_sha256": file_sha256(job.output_path),
    }
    write_text_atomic(record_file, json.dumps(record, indent=2) + "\n")

    rows = [{
        "patient_id": pid, "label": label, "structure": organs.structure(label).key,
        "annotated": "yes" if s.annotated else "no", "source_rois": s.source_text,
        "derived": s.derived, "voxels": voxels[label],
        "volume_ml": f"{voxels[label] * grid.voxel_ml:.3f}", "voxels_lost": lost[label],
    } for label, s in structures.items()]
    lines = notes.all()  # run_batch logs the message with the patient id
    missing = [organs.structure(label).key for label, s in structures.items() if not s.annotated and not s.derived]
    derived = [f"{organs.structure(label).key} derived ({s.derived})" for label, s in structures.items() if s.derived]
    message = "; ".join(([redo_reason] if redo_reason else []) + lines + derived
                        + ([f"not annotated: {', '.join(missing)}"] if missing else []))
    return PatientResult(pid, DONE, message, {"rows": rows, "unmatched": unmatched, "notes": lines})


# --------------------------------------------------------------------------------------------
# CSV outputs
# --------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_structures_csv(path: Path | str) -> dict[str, list[bool]]:
    """``structures.csv`` -> {patient id: annotated flags indexed by label 0..7} (label 0 always True).

    Labels without a row count as not annotated (a derived PTV is not annotated). Raises
    ``ValueError`` naming the file when columns are missing, when the table was written by an
    earlier version (a ``synthetic`` column: its PTV was painted into the label maps), or a value is
    not yes/no or a label is outside 1-7.
    """
    path = Path(path)
    rows = _read_csv(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (written by extract_multi_organ_masks.py)")
    columns = set(rows[0] if rows else _header(path))
    if "synthetic" in columns and "derived" not in columns:
        raise ValueError(f"{path} was written by an earlier version of extract_multi_organ_masks.py (its PTV is "
                         "painted into the label maps); re-run extract_multi_organ_masks.py --overwrite")
    missing = {"patient_id", "label", "annotated"} - columns
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; expected {', '.join(STRUCTURES_COLUMNS)}")
    flags: dict[str, list[bool]] = {}
    for line, row in enumerate(rows, start=2):
        label, value = row["label"], row["annotated"].strip().lower()
        if value not in ("yes", "no") or not label.isdigit() or not 1 <= int(label) < organs.NUM_CLASSES:
            raise ValueError(f"{path} line {line}: label {label!r}, annotated {row['annotated']!r}; "
                             f"expected label 1-{organs.NUM_CLASSES - 1} and yes/no")
        patient = flags.setdefault(row["patient_id"], [True] + [False] * (organs.NUM_CLASSES - 1))
        patient[int(label)] = value == "yes"
    return flags


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh), [])


def _printable(name: str) -> str:
    """An ROI name fit for one CSV cell: control characters (a stray CR or LF) become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(name))


def write_summaries(masks_dir: Path, results: Sequence[PatientResult]) -> None:
    """Merge this run's rows into structures.csv and unmatched_roi_names.csv (atomic writes).

    Rows of patients done in this run replace their old rows; other patients' rows are kept.
    """
    done = {r.patient_id: r.info for r in results if r.status == DONE and "rows" in r.info}
    if not done:
        return
    rows = [row for row in _read_csv(masks_dir / STRUCTURES_CSV) if row["patient_id"] not in done]
    rows += [row for info in done.values() for row in info["rows"]]
    rows.sort(key=lambda r: (str(r["patient_id"]), int(r["label"])))
    write_text_atomic(masks_dir / STRUCTURES_CSV, _csv_text(STRUCTURES_COLUMNS, rows))

    patients_of: dict[str, set[str]] = defaultdict(set)
    for row in _read_csv(masks_dir / UNMATCHED_CSV):
        for pid in filter(None, (row.get("patient_ids") or "").split("|")):
            if pid not in done:
                patients_of[row["roi_name"]].add(pid)
    for pid, info in done.items():
        for name in info["unmatched"]:
            patients_of[_printable(name)].add(pid)
    unmatched = [{"roi_name": name, "patients": len(pids), "patient_ids": "|".join(sorted(pids))}
                 for name, pids in sorted(patients_of.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    write_text_atomic(masks_dir / UNMATCHED_CSV, _csv_text(UNMATCHED_COLUMNS, unmatched))


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------
def _conversion_rows(ct_dir: Path) -> dict[str, dict[str, str]]:
    rows = _read_csv(ct_dir / CONVERSION_REPORT)
    return {row.get("patient_id", ""): row for row in rows}  # a later row (re-run) wins


def _resolve_folder(folder: str, dicom_root: Path) -> Path:
    path = Path(folder)
    return path if path.is_absolute() else dicom_root / path


def _rtstructs_of(row: Mapping[str, str], dicom_root: Path, scanned: dict[Path, list[tuple[Path, str]]]
                  ) -> tuple[Path, tuple[Path, ...]]:
    """The RTSTRUCT files under a patient's folder that may belong to it (same PatientID, or none).

    Several patients can share one folder (``raw/synthetic/`` holds a whole cohort): each folder is
    scanned once per run, and RTSTRUCTs of other PatientIDs are left out before pairing by UID.
    """
    folder = _resolve_folder(row["patient_folder"], dicom_root)
    if not folder.is_dir():
        raise PatientError(f"DICOM folder {folder} of conversion_report.csv not found "
                           f"(--dicom-root is {dicom_root})")
    if folder not in scanned:
        scanned[folder] = find_rtstruct_files(folder)
    dicom_id = row.get("dicom_patient_id", "") or ""
    return folder, tuple(path for path, rt_id in scanned[folder] if not (dicom_id and rt_id and rt_id != dicom_id))


def _task(job: PatientJob, settings: Settings) -> PatientResult:
    return extract_patient(job, settings)


def run(
    *,
    data_root: Path | str = DEFAULT_DATA_ROOT,
    dicom_root: Path | str | None = None,
    patients: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    ptv_margin_mm: float = DEFAULT_PTV_MARGIN_MM,
    derive_ptv: bool = True,
) -> list[PatientResult]:
    """Extract the label map of every converted CT (or of ``patients``); returns one result per patient.

    Patients come from ``<data-root>/processed/ct_nifti/*.nii.gz``; their DICOM folder, series and
    frame-of-reference UIDs from phase 2's ``conversion_report.csv``. Without ``overwrite``, a
    patient is skipped only when its record says the same inputs and settings. Raises
    ``PermissionError`` when the output folder is not writable and ``ValueError`` for a negative margin.
    """
    if ptv_margin_mm < 0 or not math.isfinite(ptv_margin_mm):
        raise ValueError(f"ptv_margin_mm must be a finite number >= 0, got {ptv_margin_mm}")
    layout = DataLayout(Path(data_root))
    dicom_root = Path(dicom_root) if dicom_root is not None else layout.raw
    check_writable(layout.masks)
    report = _conversion_rows(layout.ct_nifti)
    available = sorted(p.name[: -len(".nii.gz")] for p in layout.ct_nifti.glob("*.nii.gz"))
    if not available and not patients:
        raise FileNotFoundError(f"no converted CT (<PatientID>.nii.gz) in {layout.ct_nifti.resolve()}; "
                                "run convert_dicom_to_nifti.py first")
    wanted = list(dict.fromkeys(patients)) if patients else available

    results: dict[str, PatientResult] = {}
    jobs: list[PatientJob] = []
    scanned: dict[Path, list[tuple[Path, str]]] = {}
    summarised = {row["patient_id"] for row in _read_csv(layout.masks / STRUCTURES_CSV)}
    for pid in wanted:
        row = report.get(pid)
        output = layout.masks / f"{pid}.nii.gz"
        if pid not in available:
            results[pid] = PatientResult(pid, FAILED, f"no converted CT {layout.ct_nifti / (pid + '.nii.gz')} "
                                                      "(run convert_dicom_to_nifti.py first)")
        elif row is None or not row.get("patient_folder"):
            results[pid] = PatientResult(pid, FAILED, f"no row for {pid} in {layout.ct_nifti / CONVERSION_REPORT} "
                                                      "(re-run convert_dicom_to_nifti.py)")
        else:
            try:
                folder, rtstructs = _rtstructs_of(row, dicom_root, scanned)
            except PatientError as exc:
                results[pid] = PatientResult(pid, FAILED, f"{pid}: {exc}")
                continue
            jobs.append(PatientJob(pid, layout.ct_nifti / f"{pid}.nii.gz", row.get("series_uid", "") or "",
                                   row.get("frame_of_reference_uid", "") or "", rtstructs, output, folder,
                                   summarised=pid in summarised))
    # Each patient's rows are merged into the summaries as it finishes: a killed run keeps its rows.
    batch = run_batch(jobs, functools.partial(_task, settings=Settings(ptv_margin_mm, derive_ptv, overwrite)),
                      workers=workers, desc="Phase 2.5 masks", patient_id_of=lambda job: job.patient_id,
                      on_result=lambda result: write_summaries(layout.masks, [result]))
    results.update((r.patient_id, r) for r in batch)
    ordered = [results[pid] for pid in wanted]
    write_summaries(layout.masks, ordered)
    return ordered


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 2.5: rasterise RTSTRUCT contours onto the converted CTs as one uint8 "
                    "label map (0-7) per patient.")
    add_common_arguments(parser)
    parser.add_argument("--dicom-root", type=Path, default=None,
                        help="raw DICOM collection (default: <data-root>/raw); relative patient folders "
                             "of conversion_report.csv are resolved against it")
    parser.add_argument("--ptv-margin-mm", type=float, default=DEFAULT_PTV_MARGIN_MM,
                        help="margin of the derived PTV around the fused GTV, mm (default: %(default)s); "
                             "recorded in structures.csv and <PatientID>.json")
    parser.add_argument("--no-derived-ptv", "--no-synthetic-ptv", dest="no_derived_ptv", action="store_true",
                        help="no PTV at all when the RTSTRUCT has none (default: derived from the GTV)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.ptv_margin_mm >= 0 and math.isfinite(args.ptv_margin_mm)):
        parser.error(f"--ptv-margin-mm must be >= 0, got {args.ptv_margin_mm}")
    setup_logging(args.verbose)
    try:
        results = run(data_root=args.data_root, dicom_root=args.dicom_root, patients=args.patients,
                      workers=args.workers, overwrite=args.overwrite, ptv_margin_mm=args.ptv_margin_mm,
                      derive_ptv=not args.no_derived_ptv)
    except (PermissionError, FileNotFoundError) as exc:  # FileNotFoundError: no patient at all
        log.error("%s", exc)
        return 1
    print(summary_line("Phase 2.5", results, done_word="extracted"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
