"""Phase 2: DICOM CT series -> NIfTI volumes (int16 HU) that keep the true patient geometry.

``<dicom-root>`` (default ``<data-root>/raw``, any nesting) -> ``<data-root>/processed/ct_nifti/<PatientID>.nii.gz``
plus ``conversion_report.csv`` (one row per patient; phase 2.5 reads it to pair RTSTRUCTs with the CT).

    python convert_dicom_to_nifti.py --data-root DATA [--dicom-root DIR] [--fill-gaps] [--patients ID ...]

The reading is ``thoracic_seg/dicom_ct.py``: a header scan (``find_dicom_series``), the series the
RTSTRUCT references, else the longest (``choose_ct_series``), read as int16 HU on its LPS grid
(``read_ct_series``: slices sorted along the normal, tilt refused, gaps failed or ``--fill-gaps``).
Here each image is written atomically (SimpleITK stores LPS as the NIfTI RAS affine) with its report
row. On a clean series the image equals ``SimpleITK.ImageSeriesReader``'s, voxel for voxel.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Collection, Iterable, Sequence

import SimpleITK as sitk

from thoracic_seg.batch import (
    DONE, FAILED, SKIPPED, PatientError, PatientResult, add_common_arguments, check_writable, exit_status,
    setup_logging, summary_line, write_nifti, write_text_atomic,
)
from thoracic_seg.dicom_ct import (
    PatientDicom, SeriesInfo, choose_ct_series, find_dicom_series, read_ct_series,
)
from thoracic_seg.layout import DEFAULT_DATA_ROOT, REPORT_COLUMNS, REPORT_NAME, DataLayout, read_report
from thoracic_seg.batch import run_batch_into_report

log = logging.getLogger(__name__)

PHASE = "Phase 2"


# ---- One patient, the report, the batch ------------------------------------------------------
def _vector(values: Iterable[float]) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def _report_row(patient: PatientDicom, series: SeriesInfo | None, status: str, message: str,
                image_info: dict | None = None) -> dict[str, str]:
    row = {column: "" for column in REPORT_COLUMNS}
    row.update(patient_id=patient.patient_id, dicom_patient_id=patient.dicom_patient_id,
               patient_folder=str(patient.folder.resolve()), status=status, message=message)
    if series is not None:
        row.update(series_folder=str(series.folder.resolve()), series_uid=series.series_uid,
                   study_uid=series.study_uid, frame_of_reference_uid=series.frame_of_reference_uid,
                   slices=str(len(series.files)))
    row.update(image_info or {})
    return row


def _image_info(image: sitk.Image | sitk.ImageFileReader) -> dict[str, str]:
    size = image.GetSize()
    return {"shape_zyx": _vector(size[::-1]), "spacing_xyz": _vector(image.GetSpacing()),
            "origin_xyz": _vector(image.GetOrigin())}


def convert_patient(patient: PatientDicom, out_dir: Path, fill_gaps: bool = False,
                    overwrite: bool = False, reported: Collection[str] | None = None) -> PatientResult:
    """Convert one patient's CT to ``<out_dir>/<patient_id>.nii.gz``; the batch task.

    An existing output is skipped (unless ``overwrite``) when ``reported`` is None or holds the
    patient (ids with a row in ``conversion_report.csv``); otherwise it was written by a run
    killed before its report row and is converted again, so the report is complete.
    Raises :class:`PatientError` for a problem with the patient's data; returns a
    :class:`PatientResult` whose ``info["report_row"]`` is the patient's report row.
    """
    started = time.perf_counter()
    series, choice = choose_ct_series(patient)
    out_path = Path(out_dir) / f"{patient.patient_id}.nii.gz"
    if out_path.exists() and not overwrite and (reported is None or patient.patient_id in reported):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(out_path))
        reader.ReadImageInformation()
        message = "output exists (use --overwrite to redo)"
        row = _report_row(patient, series, SKIPPED, message, _image_info(reader))
        return PatientResult(patient.patient_id, SKIPPED, message, {"report_row": row})
    if out_path.exists() and not overwrite:
        log.info("%s: %s has no conversion_report.csv row (its run was interrupted): converting again",
                 patient.patient_id, out_path.name)
    try:
        ct = read_ct_series(series.files, fill_gaps=fill_gaps)
    except PatientError as exc:
        context = [str(exc), choice]
        if patient.problems:
            context.append(f"unreadable file(s) beside the series: {', '.join(patient.problems)}")
        if out_path.exists():
            context.append(f"the previous {out_path.name} was left in place")
        raise PatientError("; ".join(c for c in context if c)) from None
    write_nifti(ct.image, out_path)
    notes = [n for n in [choice, *ct.notes] if n]
    if patient.problems:
        notes.append(f"ignored unreadable file(s): {', '.join(patient.problems)}")
    message = "; ".join(notes)
    row = _report_row(patient, series, DONE, message, _image_info(ct.image))
    row.update(slices=str(len(ct.slices) - ct.filled_slices), filled_slices=str(ct.filled_slices))
    seconds = time.perf_counter() - started
    return PatientResult(patient.patient_id, DONE, message, {"report_row": row, "seconds": seconds})


def _convert_safely(patient: PatientDicom, **kwargs) -> PatientResult:
    """:func:`convert_patient`, with a failure turned into a result that still carries its report row."""
    try:
        return convert_patient(patient, **kwargs)
    except PatientError as exc:
        series = None
        if patient.ct_series:
            series, _ = choose_ct_series(patient)
        message = str(exc)
        return PatientResult(patient.patient_id, FAILED, message,
                             {"report_row": _report_row(patient, series, FAILED, message)})


def _write_report(path: Path, results: Sequence[PatientResult]) -> None:
    """Merge this run's rows into the report by patient id (a skipped patient keeps its "done" row)."""
    rows = read_report(path)
    for result in results:
        row = result.info.get("report_row")
        if row is None:
            continue
        if result.status == SKIPPED and rows.get(result.patient_id, {}).get("status") == DONE:
            continue  # keep the row of the run that wrote the file
        rows[result.patient_id] = row
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for patient_id in sorted(rows):
        writer.writerow({c: rows[patient_id].get(c, "") for c in REPORT_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def run(*, data_root: Path | str = DEFAULT_DATA_ROOT, dicom_root: Path | str | None = None,
        patients: Sequence[str] | None = None, workers: int = 1, overwrite: bool = False,
        fill_gaps: bool = False) -> list[PatientResult]:
    """Convert every patient under ``dicom_root`` (default ``<data_root>/raw``).

    Writes ``<data_root>/processed/ct_nifti/<PatientID>.nii.gz`` and merges this run's rows
    into ``conversion_report.csv``. ``patients`` restricts the run to these (safe) patient ids;
    an id that is not found is reported as failed. Raises ``FileNotFoundError`` when the DICOM
    root is missing and ``PermissionError`` when the output folder cannot be written.
    """
    layout = DataLayout(Path(data_root))
    dicom_root = Path(dicom_root) if dicom_root is not None else layout.raw
    if not dicom_root.is_dir():
        raise FileNotFoundError(f"DICOM folder {dicom_root} not found (set --dicom-root or --data-root)")
    out_dir = layout.ct_nifti
    check_writable(out_dir)

    found = find_dicom_series(dicom_root)
    if not found and patients is None:
        raise FileNotFoundError(
            f"no DICOM CT series found under {dicom_root.resolve()} (searched every file below it, following "
            "symbolic links); put the collection there or pass --dicom-root")
    by_id: dict[str, list[PatientDicom]] = defaultdict(list)
    for patient in found:
        by_id[patient.patient_id].append(patient)
    wanted = list(by_id) if patients is None else list(dict.fromkeys(patients))

    results: dict[str, PatientResult] = {}
    todo = []
    for patient_id in wanted:
        group = by_id.get(patient_id, [])
        if not group:
            results[patient_id] = PatientResult(
                patient_id, FAILED, f"no DICOM files with this patient id under {dicom_root}")
        elif len(group) > 1:
            sources = "; ".join(f"PatientID {p.dicom_patient_id!r} in {p.folder}" for p in group)
            message = (f"several patients would be written to {patient_id}.nii.gz ({sources}); "
                       "give them distinct PatientIDs or convert them separately")
            results[patient_id] = PatientResult(
                patient_id, FAILED, message, {"report_row": _report_row(group[0], None, FAILED, message)})
        else:
            todo.append(group[0])
    for failed in results.values():
        log.error("%s: FAILED: %s", failed.patient_id, failed.message)

    report_path = out_dir / REPORT_NAME
    reported = frozenset(read_report(report_path))
    task = functools.partial(_convert_safely, out_dir=out_dir, fill_gaps=fill_gaps, overwrite=overwrite,
                             reported=reported)
    return run_batch_into_report(todo, task, write_report=functools.partial(_write_report, report_path),
                                 results=results, wanted=wanted, workers=workers, desc=PHASE,
                                 patient_id_of=lambda p: p.patient_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 2: convert each patient's CT series to <data-root>/processed/ct_nifti/<PatientID>.nii.gz "
                    "(int16 HU, true patient geometry) and write conversion_report.csv.")
    add_common_arguments(parser)
    parser.add_argument("--dicom-root", type=Path, default=None,
                        help="folder holding the DICOM collection, any nesting (default: <data-root>/raw)")
    parser.add_argument("--fill-gaps", action="store_true",
                        help="interpolate missing slices linearly onto the nominal spacing "
                             "(default: fail the patient and name the gaps)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    dicom_root = args.dicom_root if args.dicom_root is not None else DataLayout(args.data_root).raw
    if not dicom_root.is_dir():
        parser.error(f"DICOM folder {dicom_root} not found (set --dicom-root or --data-root)")
    try:
        results = run(data_root=args.data_root, dicom_root=dicom_root, patients=args.patients,
                      workers=args.workers, overwrite=args.overwrite, fill_gaps=args.fill_gaps)
    except PermissionError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # nothing to convert: say where we looked, exit non-zero
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(summary_line(PHASE, results))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
