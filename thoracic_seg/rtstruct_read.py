"""Reading RTSTRUCTs: find them (without parsing most files), read their ROIs and the CT they
reference, and rasterise contours onto a CT grid (even-odd fill of voxel centres, as plastimatch)."""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from thoracic_seg.batch import walk_files
from thoracic_seg.geometry import COORD_TOLERANCE, BoxMask, Grid

log = logging.getLogger(__name__)
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# The File Meta group (first few hundred bytes of a Part-10 file) names the SOP class, so most files
# are recognised without parsing them; "481.3" must not be followed by more digits.
_RTSTRUCT_IN_HEADER = re.compile(re.escape(RTSTRUCT_SOP_CLASS.encode()) + rb"(?![0-9.])")
_HEADER_BYTES = 1024
_CONTOUR_DATA = 0x30060050


@dataclass
class Contour:
    """One ContourSequence item: geometric type and its points, (N, 3) float64 LPS mm."""

    geometric_type: str
    points: np.ndarray


@dataclass
class Roi:
    """One ROI of a structure set, with its contours (possibly none) and its ROIGenerationAlgorithm
    (``AUTOMATIC``, ``SEMIAUTOMATIC``, ``MANUAL``; upper case, empty when absent)."""

    number: str
    name: str
    frame_of_reference_uid: str
    contours: list[Contour] = field(default_factory=list)
    generation_algorithm: str = ""


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
    """The ROIs of an RTSTRUCT dataset (pydicom), in StructureSetROISequence order (where the standard
    places each ROI's name and ROIGenerationAlgorithm).

    ROIs that have contours but no StructureSetROISequence entry get the name ``ROI <number>``.
    Unparseable ContourData raises ``ValueError`` naming the ROI.
    """
    rois: dict[str, Roi] = {}
    for item in rtstruct.get("StructureSetROISequence", []):
        number = _roi_number(item, "ROINumber")
        rois[number] = Roi(number, str(item.get("ROIName", "") or f"ROI {number}").strip(),
                           str(item.get("ReferencedFrameOfReferenceUID", "") or ""),
                           generation_algorithm=str(item.get("ROIGenerationAlgorithm", "") or "").strip().upper())
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

    Phase 2 chooses the CT series with it, phase 2.5 pairs the RTSTRUCT with the converted CT. Series come
    from ReferencedFrameOfReferenceSequence > RTReferencedStudySequence > RTReferencedSeriesSequence; frames
    from ReferencedFrameOfReferenceSequence[].FrameOfReferenceUID and, as that sequence is optional (type 3)
    and some exporters omit it, StructureSetROISequence[].ReferencedFrameOfReferenceUID (type 1).
    ``rtstruct``: a pydicom Dataset, possibly read with ``specific_tags`` of just these two sequences.
    Values are stripped ``str``, equal to the UIDs phase 2 writes to ``conversion_report.csv``.
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


def even_odd_fill(polygons: Sequence[tuple[int, np.ndarray]], shape_zyx: Sequence[int]) -> BoxMask:
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

    ``polygons_xy``: (N, 2) float (x = column, y = row) in voxel-index units (centres at integers), not
    closed. :func:`even_odd_fill` (phase 2.5's rasteriser) on a one-slice grid, for slice-by-slice callers
    (``make_synthetic_cohort``). A polygon inside another is a hole; parts outside the grid are clipped; a
    centre on an edge is inside on a left or top edge, outside on a right or bottom one. ``ValueError``
    for a ``shape_yx`` that is not two non-negative integers or a polygon that is not (N, 2).
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
    return even_odd_fill(polygons, shape_zyx).to_full(shape_zyx)[0]


@dataclass
class RasterNotes:
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


def planar_polygons(contours: Iterable[Contour], grid: Grid, roi_name: str,
                     notes: RasterNotes) -> list[tuple[int, np.ndarray]]:
    """Keep the usable CLOSED_PLANAR contours as (slice k, (N, 2) continuous x/y index), warn about the rest.

    A contour goes to the slice within half a slice of its z, by its coordinates only (the SOP
    instance it references may be missing from the series). An exact copy of a contour already kept
    on the same slice is dropped: under the even-odd rule the pair would erase the structure there.
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
        elif np.ptp(index[:, 2]) > 0.5 + COORD_TOLERANCE:
            notes.contour(roi_name, "not parallel to the CT slices", where)
        elif not -0.5 - COORD_TOLERANCE <= k_mean <= nz - 0.5 + COORD_TOLERANCE:
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
    notes = RasterNotes()
    contour_items = [Contour("CLOSED_PLANAR", np.asarray(c, dtype=np.float64).reshape(-1, 3)) for c in contours]
    mask = even_odd_fill(planar_polygons(contour_items, grid, roi_name, notes), grid.shape_zyx)
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
    notes = RasterNotes()
    masks: dict[str, BoxMask] = {}
    for roi in read_rois(ds):
        mask = even_odd_fill(planar_polygons(roi.contours, grid, roi.name, notes), grid.shape_zyx)
        masks[roi.name] = masks[roi.name].union(mask) if roi.name in masks else mask
    for line in notes.all():
        log.warning("%s", line)
    return {name: mask.to_full(grid.shape_zyx) for name, mask in masks.items()}
