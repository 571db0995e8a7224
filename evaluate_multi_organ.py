"""Phase 5b: 3D evaluation of a trained U-Net on the patients of a split, on the original CT grid.

processed/ct_nifti (CT in HU) + processed/masks_multi_organ (truth) -> <checkpoint dir>/evaluation/:
metrics.csv, summary.md, summary.json, dice_boxplot.png, predictions/<PatientID>.nii.gz

    python evaluate_multi_organ.py --checkpoint runs/demo/best_unet_multi_organ.pth --split test

Each patient's CT is segmented by prediction's own path (``thoracic_seg.inference.Predictor``: the
checkpoint's preprocessing applied to the HU volume, float32 by default), so the labels scored
here are those ``predict_multi_organ.py`` writes. Each structure is scored in 3D at the CT's own
resolution (``thoracic_seg.metrics.score_structures``); unannotated structures are not scored.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from thoracic_seg import organs
from thoracic_seg.batch import (
    DONE, FAILED, PatientError, PatientResult, check_same_geometry, exit_status, file_sha256, positive_int,
    read_nifti, run_batch, run_from_command_line, setup_logging, summary_line, write_nifti, write_text_atomic,
)
from thoracic_seg.cases import prediction_provenance
from thoracic_seg.figures import FIGURES, dice_boxplot_figure, save_figure
from thoracic_seg.image_grid import segment_image
from thoracic_seg.inference import Predictor
from thoracic_seg.layout import (
    BEST_CHECKPOINT, DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, DataLayout, evaluation_output_dir, truth_record,
)
from thoracic_seg.metrics import METRIC_COLUMNS, METRIC_SIGNIFICANT_DIGITS, SCORED_LABELS, score_structures
from thoracic_seg.postprocess import describe_postprocess
from thoracic_seg.precision import DEFAULT_PREDICTION_PRECISION, PREDICTION_PRECISIONS
from thoracic_seg.ptv import PTV_DERIVED
from thoracic_seg.splits import load_split

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------
def evaluate_patient(
    patient_id: str, *, predictor: Predictor, layout: DataLayout, predictions_dir: Path, overwrite: bool = False,
) -> PatientResult:
    """Predict (or reuse the saved prediction of) one patient, write it on the CT grid, score it.
    A saved prediction is reused only when ``<PatientID>.json`` beside it names the same CT bytes.

    The network input is made from phase 2's CT exactly as prediction makes it
    (``image_grid.segment_image``: orientation, window, z-score, body crop, resize, and back), so
    the labels scored here are the labels ``predict_multi_organ.py`` writes for the same CT.

    ``info["rows"]`` holds :func:`score_structures`' rows with ``patient_id`` added.
    """
    ct_path, truth_path = layout.ct_nifti / f"{patient_id}.nii.gz", layout.masks / f"{patient_id}.nii.gz"
    for path, phase in ((ct_path, "phase 2 (convert_dicom_to_nifti.py)"),
                        (truth_path, "phase 2.5 (extract_multi_organ_masks.py)")):
        if not path.is_file():
            raise PatientError(f"{patient_id}: {path} not found; run {phase}")
    truth_image = read_nifti(truth_path)
    try:
        annotated, ptv = truth_record(layout, patient_id)
    except (FileNotFoundError, ValueError) as exc:
        raise PatientError(str(exc)) from None

    prediction_path = predictions_dir / f"{patient_id}.nii.gz"
    record_path, ct_sha256 = predictions_dir / f"{patient_id}.json", file_sha256(ct_path)
    reusable = prediction_path.is_file() and not overwrite
    if reusable and _saved_ct_sha256(record_path) == ct_sha256:
        predicted_image = read_nifti(prediction_path)
        message = "reused saved prediction"
    else:
        ct_image = read_nifti(ct_path)
        try:
            labels = segment_image(predictor, ct_image)
        except ValueError as exc:  # an oblique CT, a constant volume, no body to crop to
            raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
        predicted_image = sitk.GetImageFromArray(labels)
        predicted_image.CopyInformation(ct_image)
        message = "" if not reusable else ("redone: its CT changed since the saved prediction"
                                           if record_path.is_file() else "redone: no record of the CT it was made from")
    check_same_geometry(predicted_image, truth_image, f"{patient_id}: prediction vs {truth_path}")
    if not message.startswith("reused"):
        write_nifti(predicted_image, prediction_path)
        write_text_atomic(record_path, json.dumps({"ct_sha256": ct_sha256}) + "\n")

    spacing_zyx = tuple(reversed(truth_image.GetSpacing()))
    rows = score_structures(sitk.GetArrayViewFromImage(predicted_image),
                            sitk.GetArrayViewFromImage(truth_image), spacing_zyx, annotated, ptv)
    for row in rows:
        row["patient_id"] = patient_id
    return PatientResult(patient_id, DONE, message, {"rows": rows, "ptv": ptv})


def _saved_ct_sha256(path: Path) -> str | None:
    """The sha256 of the CT a saved prediction was made from (its ``<PatientID>.json``), or None."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("ct_sha256")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, median, population std and n of the finite values (None when there are none)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)),
            "std": float(finite.std()), "n": int(finite.size)}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per structure key: Dice, HD95 (mm) and volume difference (%) statistics over scored patients.

    Only annotated rows with a defined Dice count. HD95 statistics are over finite values;
    ``n_inf`` counts the patients where one of truth/prediction was empty.
    """
    out: dict[str, dict[str, Any]] = {}
    for label in SCORED_LABELS:
        key = organs.structure(label).key
        scored = [r for r in rows if r["structure"] == key and r["annotated"]
                  and r["dice"] is not None and not math.isnan(r["dice"])]
        hd95 = [r["hd95_mm"] for r in scored]
        out[key] = {
            "dice": _stats([r["dice"] for r in scored]),
            "hd95_mm": {**_stats(hd95), "n_inf": sum(math.isinf(v) for v in hd95)},
            "volume_diff_pct": _stats([r["volume_diff_pct"] for r in scored]),
            "n_not_annotated": sum(1 for r in rows if r["structure"] == key and not r["annotated"]),
            "n_empty": sum(1 for r in rows if r["structure"] == key and r["annotated"]
                           and r["dice"] is not None and math.isnan(r["dice"])),
        }
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else f"{value:.{METRIC_SIGNIFICANT_DIGITS}g}"
    return str(value)


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per (patient, structure); metric cells are empty for unannotated structures."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in METRIC_COLUMNS])
    write_text_atomic(path, buffer.getvalue())


def format_summary_md(summary: dict[str, dict[str, Any]], context: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"# Evaluation: {context['split']} split ({context['n_patients']} patients)", "",
        f"- checkpoint: `{context['checkpoint']}`",
        f"- post-processing: {context.get('postprocess_rule') or 'none'}",
        f"- PTV: {context.get('ptv_scoring', 'labels GTV + PTV')}",
        "- 3D metrics on each CT's original grid; unannotated structures not scored;",
        "  HD95 statistics over finite values (`HD95 inf`: truth or prediction empty, Dice 0).", "",
        "| Structure | n | Dice mean ± std | Dice median | HD95 mean (mm) | HD95 median (mm) | HD95 inf "
        "| Volume diff mean (%) | not annotated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, s in summary.items():
        d, h, v = s["dice"], s["hd95_mm"], s["volume_diff_pct"]
        lines.append(
            f"| {organs.BY_KEY[key].name} | {d['n']} | {num(d['mean'])} ± {num(d['std'])} | {num(d['median'])} "
            f"| {num(h['mean'], 2)} | {num(h['median'], 2)} | {h['n_inf']} | {num(v['mean'], 1)} "
            f"| {s['n_not_annotated']} |"
        )
    return "\n".join(lines) + "\n"


def ptv_scoring(ptv_rows: Sequence[dict[str, Any]]) -> str:
    """How the PTV rows were scored, for ``summary.md``: derived (margin of the GTV) and/or contoured."""
    derived = sorted({r["labels"] for r in ptv_rows if r.get("ptv_source") == PTV_DERIVED})
    n_derived = sum(1 for r in ptv_rows if r.get("ptv_source") == PTV_DERIVED)
    parts = []
    if n_derived:
        parts.append(f"derived ({', '.join(derived)}) in {n_derived} patient(s): margin(predicted GTV) "
                     "vs margin(true GTV)")
    if len(ptv_rows) - n_derived:
        parts.append(f"contoured in {len(ptv_rows) - n_derived} patient(s): labels GTV + PTV")
    return "; ".join(parts) or "not scored (no PTV, contoured or derived)"


def _check_provenance(predictions_dir: Path, provenance: dict[str, Any], overwrite: bool) -> None:
    """Refuse to reuse saved predictions made by another checkpoint, post-processing rule or
    inference setting (precision, preprocessing: ``cases.prediction_provenance``)."""
    path = predictions_dir / PROVENANCE_FILE
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in provenance} != provenance:
            raise ValueError(
                f"{predictions_dir} holds predictions of checkpoint sha256 {saved.get('checkpoint_sha256')} "
                f"(post-processing: {saved.get('postprocess_rule') or saved.get('postprocess')}; inference: "
                f"{saved.get('inference')}), not of this run; "
                "use --overwrite or another --output-dir"
            )
    predictions_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(provenance, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------
def run(
    *, checkpoint: Path, data_root: Path = DEFAULT_DATA_ROOT, split: str = "test",
    splits_dir: Path = DEFAULT_SPLITS_DIR, patients: Sequence[str] | None = None,
    output_dir: Path | None = None, batch_size: int | None = None, device: str = "auto",
    postprocess: bool = False, overwrite: bool = False, context_slices: int | None = None,
    precision: str = DEFAULT_PREDICTION_PRECISION,
) -> list[PatientResult]:
    """Evaluate ``checkpoint`` on the patients of ``split`` (or ``patients``); write the reports.

    ``context_slices`` None takes the checkpoint's; a number that differs from it is refused.
    Raises ``FileNotFoundError``/``ValueError`` for a missing split or checkpoint, saved
    predictions of another checkpoint in ``output_dir`` (without ``overwrite``), or a context mismatch.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    layout = DataLayout(Path(data_root))
    patient_ids = list(patients) if patients else load_split(Path(splits_dir), split)
    if not patient_ids:
        raise ValueError(f"no patients to evaluate: split {split!r} in {splits_dir} is empty")
    output_dir = Path(output_dir) if output_dir else evaluation_output_dir(checkpoint, postprocess)
    predictions_dir = output_dir / "predictions"
    rule = describe_postprocess() if postprocess else None
    predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size,
                               postprocess=postprocess, context_slices=context_slices)
    _check_provenance(predictions_dir, {"checkpoint_sha256": file_sha256(checkpoint), "postprocess": postprocess,
                                        "postprocess_rule": rule, "inference": prediction_provenance(predictor)},
                      overwrite)
    log.info("evaluating %d patients (%s) with %s -> %s", len(patient_ids),
             split if not patients else "given ids", predictor.describe(), output_dir)

    def task(patient_id: str) -> PatientResult:
        return evaluate_patient(patient_id, predictor=predictor, layout=layout, predictions_dir=predictions_dir,
                                overwrite=overwrite)

    results = run_batch(patient_ids, task, workers=1, desc="evaluating")
    rows = [row for r in results if r.status == DONE for row in r.info["rows"]]
    summary = summarize(rows)
    ptv_rows = [row for row in rows if row["structure"] == organs.structure(organs.PTV).key and row["annotated"]]
    context = {
        "checkpoint": str(checkpoint), "split": split if not patients else "given patients",
        "n_patients": sum(r.status == DONE for r in results), "postprocess": postprocess,
        "postprocess_rule": rule,
        "failed": [r.patient_id for r in results if r.status == FAILED],
        "ptv_scoring": ptv_scoring(ptv_rows),
    }
    write_metrics_csv(rows, output_dir / "metrics.csv")
    write_text_atomic(output_dir / "summary.json",
                      json.dumps({**context, "structures": summary}, indent=2) + "\n")
    write_text_atomic(output_dir / "summary.md", format_summary_md(summary, context))
    save_figure(dice_boxplot_figure(rows, f"3D Dice per structure, {context['split']} "
                                          f"({context['n_patients']} patients)"), output_dir / FIGURES["dice"])
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help=f"{BEST_CHECKPOINT} of a run")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding processed/ (default: %(default)s)")
    parser.add_argument("--split", default="test", help="split name, reads <splits-dir>/<split>.txt (default: test)")
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR, help="default: %(default)s")
    parser.add_argument("--patients", nargs="+", metavar="ID", default=None,
                        help="evaluate these patient ids instead of the split")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: <checkpoint dir>/evaluation (evaluation_postprocessed with --postprocess)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="slices per forward pass (default: chosen from free memory, as prediction does)")
    parser.add_argument("--precision", choices=PREDICTION_PRECISIONS, default=DEFAULT_PREDICTION_PRECISION,
                        help="as predict_multi_organ.py --precision (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--postprocess", action="store_true",
                        help="remove small 3D components per structure, as measured on real patients "
                             f"({describe_postprocess().replace('%', '%%')}; GTV/PTV untouched)")
    parser.add_argument("--overwrite", action="store_true", help="predict again even where a prediction exists")
    parser.add_argument("--context-slices", type=int, default=None, metavar="K",
                        help="neighbours per side the network sees (default: the checkpoint's; another value is refused)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    results = run_from_command_line(
        parser, run, checkpoint=args.checkpoint, data_root=args.data_root, split=args.split,
        splits_dir=args.splits_dir, patients=args.patients, output_dir=args.output_dir, batch_size=args.batch_size,
        device=args.device, postprocess=args.postprocess, overwrite=args.overwrite,
        context_slices=args.context_slices, precision=args.precision)
    print(summary_line("Phase 5b", results, done_word="evaluated"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
