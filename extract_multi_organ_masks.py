"""Phase 2.5: RTSTRUCT contours -> one multi-organ label map per patient.

``<data-root>/processed/ct_nifti/<PatientID>.nii.gz`` (+ ``conversion_report.csv``) and the RTSTRUCTs
under each patient's DICOM folder -> ``<data-root>/processed/masks_multi_organ/<PatientID>.nii.gz``
(uint8 labels 0-7 of ``thoracic_seg/organs.py`` on the CT's exact grid and affine) + ``<PatientID>.json``
(annotated flags, how the PTV is made, inputs fingerprint) + ``structures.csv`` + ``unmatched_roi_names.csv``.

    python extract_multi_organ_masks.py --data-root DATA [--ptv-margin-mm 10] [--no-derived-ptv]

RTSTRUCTs are paired with the CT through UIDs, never folder names (:func:`select_rtstructs`), and read
and rasterised (even-odd, voxel centres in LPS mm) by ``thoracic_seg/rtstruct_read.py``. Without a PTV
ROI the PTV is derived (GTV + margin, ``thoracic_seg/ptv.py``) and never painted: docs/labels.md. Our own
automatic contours (prediction's ``zGTV^Auto``...) are never training truth: docs/review.md.
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

from thoracic_seg import organs
from thoracic_seg.batch import (
    DONE, FAILED, SKIPPED, PatientError, PatientResult, add_common_arguments, check_same_geometry,
    check_writable, exit_status, file_sha256, fingerprint, run_batch_into_report, run_from_command_line,
    setup_logging, summary_line, write_nifti, write_text_atomic,
)
from thoracic_seg.geometry import BoxMask, Grid
from thoracic_seg.layout import (
    CONVERSION_REPORT, DEFAULT_DATA_ROOT, PROCESSED_FORMAT, STRUCTURES_COLUMNS, STRUCTURES_CSV, UNMATCHED_CSV,
    DataLayout, read_csv_rows, read_mask_record, record_path,
)
from thoracic_seg.ptv import (
    DEFAULT_PTV_MARGIN_MM, PTV_CONTOURED, PTV_DERIVED, PTV_NONE, expand_mm, ptv_description,
)
from thoracic_seg.rtstruct_read import (
    RasterNotes, Roi, even_odd_fill, find_rtstruct_files, planar_polygons, read_rois, referenced_uids,
)

log = logging.getLogger(__name__)

UNMATCHED_COLUMNS = ("roi_name", "patients", "patient_ids", "reason")
#: Why an ROI gave no label (the ``reason`` column of unmatched_roi_names.csv).
UNKNOWN_NAME = "name not recognised: unknown or derived structure"
OWN_AUTOMATIC = "our automatic contour (ROIGenerationAlgorithm AUTOMATIC, name ending ^Auto): never training truth"
OWN_NAME_NOT_AUTOMATIC = ("named as our automatic contour (^Auto) but ROIGenerationAlgorithm {algorithm}: taken as "
                          "not reviewed; a physician who accepts it renames it")
#: Bumped when which ROIs give which label changes, so that every patient is redone once.
#: 2: our own automatic ROIs are skipped.
ROI_RULES = 2


# ---- Structures: ROIs -> labels, lung split, derived PTV, priority overlay -------------------
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
    centre_x = np.array([grid.origin[0] + to_x @ (sums[k][0] / sums[k][2], sums[k][1] / sums[k][2], k) for k in slices])
    return slices, centre_x


def split_at_midline(lungs: BoxMask, grid: Grid, cord_centres: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[BoxMask, BoxMask, str]:
    """Split a both-lungs mask into (right, left) at the patient's midline; returns the method too.

    The midline is the LPS x of the spinal-cord centre per slice (``cord_centres`` = (slice indices, x mm),
    :func:`polygon_centres`), interpolated between cord slices, held beyond them; without a cord, the lungs'
    x centroid. A voxel centre with x below the midline is right lung.
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
    relative_x = ((origin_x + k * to_x[2] - midline)[:, None, None] + (np.arange(x0, x0 + dx) * to_x[0])[None, None, :])
    if abs(to_x[1]) > 1e-9:  # rows contribute to x only for rotated in-plane directions
        relative_x = relative_x + (np.arange(y0, y0 + dy) * to_x[1])[None, :, None]
    right_side = relative_x < 0
    return (BoxMask(lungs.offset, lungs.array & right_side), BoxMask(lungs.offset, lungs.array & ~right_side), method)


def own_roi_reason(roi: Roi) -> str:
    """Why ``roi`` is one of our automatic contours and never training truth, or "" when it is not ours.

    Ours: a name with our ``^Auto`` qualifier (``organs.has_automatic_qualifier``) and ROIGenerationAlgorithm
    AUTOMATIC, as prediction writes them. A name with the qualifier and another algorithm (a planning
    system that rewrote it, or a contour edited and saved under our name) is skipped too: accepting a
    contour means renaming it (docs/review.md). An AUTOMATIC ROI without the qualifier is not ours.
    """
    if not organs.has_automatic_qualifier(roi.name):
        return ""
    if roi.generation_algorithm == "AUTOMATIC":
        return OWN_AUTOMATIC
    return OWN_NAME_NOT_AUTOMATIC.format(algorithm=roi.generation_algorithm or "absent")


def build_structures(
    rois: Sequence[Roi], grid: Grid, *, ptv_margin_mm: float = DEFAULT_PTV_MARGIN_MM, derive_ptv: bool = True,
    notes: RasterNotes | None = None,
) -> tuple[dict[int, StructureMask], dict[str, str]]:
    """Turn ROIs into one mask per label 1-7 (before the priority overlay).

    Returns ``({label: StructureMask}, {unmatched ROI name: reason})``. Names are matched by
    ``organs.match_roi_name``; our own automatic ROIs (:func:`own_roi_reason`) give no label.
    ROIs of one label (all GTVs, duplicates) are united; one without a usable contour provides nothing.
    A both-lungs ROI (``Lungs-Total``) fills each lung not contoured alone (:func:`split_at_midline`).
    Without a PTV ROI and with ``derive_ptv``, the PTV is the GTV grown by ``ptv_margin_mm``, kept for the
    record (volume) but *not annotated* and never painted.
    """
    notes = notes if notes is not None else RasterNotes()
    structures = {label: StructureMask(label) for label in organs.FOREGROUND_LABELS}
    both_lungs = StructureMask(organs.BOTH_LUNGS)
    cord_polygons: list[tuple[int, np.ndarray]] = []
    unmatched: dict[str, str] = {}
    seen_names: dict[str, int] = defaultdict(int)
    for roi in rois:
        seen_names[roi.name] += 1
        label = organs.match_roi_name(roi.name)  # None for our names
        if label is None:
            unmatched.setdefault(roi.name, own_roi_reason(roi) or UNKNOWN_NAME)
            continue
        polygons = planar_polygons(roi.contours, grid, roi.name, notes)
        if not polygons:
            notes.add(f"ROI {roi.name!r} has no usable contour: it annotates nothing")
            continue
        if label == organs.SPINAL_CORD:
            cord_polygons.extend(polygons)
        target = both_lungs if label == organs.BOTH_LUNGS else structures[label]
        target.mask = target.mask.union(even_odd_fill(polygons, grid.shape_zyx))
        target.annotated = True
        if roi.name not in target.source_rois:
            target.source_rois.append(roi.name)
    for name, count in seen_names.items():
        if count > 1:
            notes.add(f"ROI name {name!r} appears {count} times: its contours were merged (union)")
    own = [name for name, reason in unmatched.items() if reason != UNKNOWN_NAME]
    if own:
        notes.add(f"automatic ROI(s) of ours skipped, never training truth: {', '.join(map(repr, own))}")

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


# ---- One patient -----------------------------------------------------------------------------
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


def inputs_fingerprint(job: PatientJob, settings: Settings) -> str:
    """Fingerprint of what a patient's label map is made from: the CT NIfTI's and RTSTRUCT files'
    bytes (SHA-256; RTSTRUCTs named relative to the patient folder, so moving ``DATA`` changes
    nothing), the phase 2.5 settings, the output format and :data:`ROI_RULES`."""
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
        "roi_rules": ROI_RULES,
    })


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
    candidates, notes = [], RasterNotes()
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


# ---- CSV outputs -----------------------------------------------------------------------------


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _printable(name: str) -> str:
    """An ROI name fit for one CSV cell: control characters (a stray CR or LF) become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(name))


def write_summaries(masks_dir: Path, results: Sequence[PatientResult]) -> None:
    """Merge this run's rows into structures.csv and unmatched_roi_names.csv (one row per ROI name and
    reason; atomic writes).

    Rows of patients done in this run replace their old rows; other patients' rows are kept (a row
    of an earlier version, without a reason, gets :data:`UNKNOWN_NAME`: those were all it listed).
    """
    done = {r.patient_id: r.info for r in results if r.status == DONE and "rows" in r.info}
    if not done:
        return
    rows = [row for row in read_csv_rows(masks_dir / STRUCTURES_CSV) if row["patient_id"] not in done]
    rows += [row for info in done.values() for row in info["rows"]]
    rows.sort(key=lambda r: (str(r["patient_id"]), int(r["label"])))
    write_text_atomic(masks_dir / STRUCTURES_CSV, _csv_text(STRUCTURES_COLUMNS, rows))

    patients_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in read_csv_rows(masks_dir / UNMATCHED_CSV):
        for pid in filter(None, (row.get("patient_ids") or "").split("|")):
            if pid not in done:
                patients_of[(row["roi_name"], row.get("reason") or UNKNOWN_NAME)].add(pid)
    for pid, info in done.items():
        for name, reason in info["unmatched"].items():
            patients_of[(_printable(name), reason)].add(pid)
    unmatched = [{"roi_name": name, "patients": len(pids), "patient_ids": "|".join(sorted(pids)), "reason": reason}
                 for (name, reason), pids in sorted(patients_of.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    write_text_atomic(masks_dir / UNMATCHED_CSV, _csv_text(UNMATCHED_COLUMNS, unmatched))


# ---- Batch -----------------------------------------------------------------------------------
def _conversion_rows(ct_dir: Path) -> dict[str, dict[str, str]]:
    rows = read_csv_rows(ct_dir / CONVERSION_REPORT)
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
    *, data_root: Path | str = DEFAULT_DATA_ROOT, dicom_root: Path | str | None = None,
    patients: Sequence[str] | None = None, workers: int = 1, overwrite: bool = False,
    ptv_margin_mm: float = DEFAULT_PTV_MARGIN_MM, derive_ptv: bool = True,
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
    summarised = {row["patient_id"] for row in read_csv_rows(layout.masks / STRUCTURES_CSV)}
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
    task = functools.partial(_task, settings=Settings(ptv_margin_mm, derive_ptv, overwrite))
    return run_batch_into_report(jobs, task, write_report=functools.partial(write_summaries, layout.masks),
                                 results=results, wanted=wanted, workers=workers, desc="Phase 2.5 masks",
                                 patient_id_of=lambda job: job.patient_id)


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
    results = run_from_command_line(  # FileNotFoundError: no patient at all
        parser, run, errors=(PermissionError, FileNotFoundError), usage_error=False, data_root=args.data_root,
        dicom_root=args.dicom_root, patients=args.patients, workers=args.workers, overwrite=args.overwrite,
        ptv_margin_mm=args.ptv_margin_mm, derive_ptv=not args.no_derived_ptv)
    if results is None:
        return 1
    print(summary_line("Phase 2.5", results, done_word="extracted"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
