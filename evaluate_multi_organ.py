"""Phase 5b: 3D evaluation of a trained U-Net on the patients of a split, on the original CT grid.

processed/ct_nifti (CT in HU) + processed/masks_multi_organ (truth) -> <checkpoint dir>/evaluation/:
metrics.csv, summary.md, summary.json, dice_boxplot.png, predictions/<PatientID>.nii.gz

    python evaluate_multi_organ.py --checkpoint runs/demo/best_unet_multi_organ.pth --split test

Each patient's CT is segmented by prediction's own path (``predict_multi_organ.Predictor``: the
checkpoint's preprocessing applied to the HU volume, float32 by default), so the labels scored
here are those ``predict_multi_organ.py`` writes. Each structure is scored in 3D at the CT's own
resolution (:func:`score_structures`); unannotated structures are not scored.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

import organs
from dataset_multi_organ import load_split
from extract_multi_organ_masks import PTV_DERIVED, ptv_description, ptv_from_gtv, read_mask_record
from pipeline_io import (
    DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, DONE, FAILED, DataLayout, PatientError, PatientResult,
    check_same_geometry, exit_status, file_sha256, positive_int, read_nifti, run_batch,
    setup_logging, summary_line, write_nifti, write_text_atomic,
)
from precision import DEFAULT_PREDICTION_PRECISION, PREDICTION_PRECISIONS
from train_multi_organ import BEST_CHECKPOINT
from visualize_all_phases import FIGURES, dice_boxplot_figure, save_figure

if TYPE_CHECKING:
    from predict_multi_organ import Predictor

log = logging.getLogger(__name__)

#: Labels scored, each with the label values that make up the structure (PTV contains its GTV).
SCORED_LABELS: dict[int, tuple[int, ...]] = organs.STRUCTURE_MEMBERS
#: Organs that are one connected body; tumour targets (GTV, PTV) may be multifocal.
SINGLE_COMPONENT_LABELS: tuple[int, ...] = (
    organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART, organs.ESOPHAGUS, organs.SPINAL_CORD,
)
#: ``--postprocess``, per structure: components with fewer voxels than this fraction of the
#: structure's largest 3D component are removed (1.0: only the largest stays; a structure not listed
#: is left alone). Chosen from benchmarks/bench_quality.py on real patients (benchmarks/RESULTS.md,
#: README "What the quality benchmark decided"): for each structure the rule, among the candidates
#: below, whose Dice is never below no post-processing on any measured fold and seed (by more than
#: 0.001) and best on average. The lungs and the heart keep their largest component; the esophagus
#: loses only pieces under 10% of its largest (keeping the largest lost true pieces: -0.10 Dice in
#: one score); the spinal cord is left alone (every rule raised its HD95 and lowered a score's Dice:
#: a slice-by-slice network predicts tubes in pieces that are all true).
POSTPROCESS_MIN_FRACTION: dict[int, float] = {
    organs.RIGHT_LUNG: 1.0, organs.LEFT_LUNG: 1.0, organs.HEART: 1.0, organs.ESOPHAGUS: 0.1,
}
#: The rules the quality benchmark measures for each structure, by name.
POSTPROCESS_CANDIDATES: dict[str, float] = {"largest": 1.0, "drop<10%": 0.1, "drop<1%": 0.01}
METRIC_COLUMNS = (
    "patient_id", "structure", "labels", "annotated", "dice", "hd95_mm",
    "truth_ml", "predicted_ml", "volume_diff_ml", "volume_diff_pct",
)
PROVENANCE_FILE = "provenance.json"
#: metrics.csv writes finite metrics with this many significant digits.
METRIC_SIGNIFICANT_DIGITS = 6


# --------------------------------------------------------------------------------------------
# Metrics (pure functions on z-y-x boolean volumes)
# --------------------------------------------------------------------------------------------
def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3D (z, y, x) masks, got {pred.ndim} dimensions {pred.shape}")
    return pred.astype(bool, copy=False), truth.astype(bool, copy=False)


def _check_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive finite mm values (z, y, x), got {tuple(spacing_zyx)}")
    return spacing  # type: ignore[return-value]


def dice_3d(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean (z, y, x) masks: 2|P∩T| / (|P| + |T|).

    NaN when both are empty (nothing to find and nothing found), 0.0 when exactly one is.
    """
    pred, truth = _check_pair(pred, truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    if total == 0:
        return float("nan")
    return 2.0 * np.count_nonzero(pred & truth) / total


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of a boolean (z, y, x) mask with a face neighbour outside it (outside the array counts)."""
    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two boolean (z, y, x) masks.

    Distances are Euclidean between surface voxel centres with ``spacing_zyx`` (mm, z-y-x order,
    as ``reversed(image.GetSpacing())``); the result is the larger of the 95th percentiles of
    the prediction->truth and truth->prediction surface distances (MONAI ``directed=False``,
    medpy ``hd95``). NaN when both masks are empty, ``inf`` when exactly one is.
    """
    pred, truth = _check_pair(pred, truth)
    spacing = _check_spacing(spacing_zyx)
    has_pred, has_truth = pred.any(), truth.any()
    if not has_pred and not has_truth:
        return float("nan")
    if not has_pred or not has_truth:
        return float("inf")
    # Every surface voxel lies in the bounding box of the union, so distances computed inside it
    # (one voxel of margin) equal those in the whole volume, at a fraction of the cost.
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    pred_surface, truth_surface = surface_voxels(pred[box]), surface_voxels(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def volume_ml(mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Volume of a boolean mask in ml (cm³) given the voxel spacing in mm."""
    return np.count_nonzero(mask) * float(np.prod(_check_spacing(spacing_zyx))) / 1000.0


def remove_small_components(labels: np.ndarray, min_fraction: Mapping[int, float]) -> np.ndarray:
    """Copy of a (z, y, x) label map where, for each label in ``min_fraction``, the 3D components
    (26-connected) with fewer voxels than ``min_fraction[label]`` x the label's largest component
    become background (0). A fraction of 1 or more keeps only the largest component (the first
    of equal ones); 0 keeps everything. Labels not in the mapping are unchanged.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) label map, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    for label, fraction in min_fraction.items():
        if not 1 <= label < organs.NUM_CLASSES:
            raise ValueError(f"post-processing rules are for labels 1-{organs.NUM_CLASSES - 1}, got label {label}")
        if not (math.isfinite(fraction) and fraction >= 0):
            raise ValueError(f"label {label}: the fraction of the largest component must be >= 0, got {fraction}")
    out = labels.copy()
    full = ndimage.generate_binary_structure(3, 3)
    boxes = ndimage.find_objects(labels)
    for label, fraction in min_fraction.items():
        if fraction <= 0 or label > len(boxes) or boxes[label - 1] is None:
            continue
        box = boxes[label - 1]
        components, count = ndimage.label(labels[box] == label, structure=full)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        if fraction >= 1:
            keep = np.zeros(sizes.shape, dtype=bool)
            keep[int(np.argmax(sizes))] = True
        else:
            keep = sizes >= fraction * sizes.max()
        keep[0] = True  # background of the box stays what it is
        region = out[box]
        region[~keep[components]] = organs.BACKGROUND
    return out


def keep_largest_component(labels: np.ndarray, only: Sequence[int] = SINGLE_COMPONENT_LABELS) -> np.ndarray:
    """Copy of a (z, y, x) label map where each label in ``only`` keeps its largest 3D component.

    Components are 26-connected; voxels of the smaller components become background (0).
    Labels not in ``only`` (by default GTV and PTV, which may be multifocal) are unchanged.
    """
    return remove_small_components(labels, {label: 1.0 for label in only})


def postprocess_labels(labels: np.ndarray) -> np.ndarray:
    """``--postprocess``: :data:`POSTPROCESS_MIN_FRACTION`'s rule for each structure."""
    return remove_small_components(labels, POSTPROCESS_MIN_FRACTION)


def describe_postprocess(min_fraction: Mapping[int, float] = POSTPROCESS_MIN_FRACTION) -> str:
    """One line: which structures keep only their largest component, which lose small ones."""
    groups: dict[float, list[str]] = {}
    for label, fraction in sorted(min_fraction.items()):
        if fraction > 0:
            groups.setdefault(min(fraction, 1.0), []).append(organs.structure(label).name)
    if not groups:
        return "none"
    parts = []
    for fraction, names in sorted(groups.items(), reverse=True):
        what = "largest component" if fraction >= 1 else f"components under {fraction * 100:g}% of the largest removed"
        parts.append(f"{what}: {', '.join(names)}")
    return "; ".join(parts)


def score_structures(
    predicted: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float], annotated: Sequence[bool],
    ptv: dict[str, Any] | None = None, only: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Metrics of every structure 1-7 (or of the labels in ``only``) of one patient: one dict per structure.

    ``predicted`` and ``truth`` are (z, y, x) label maps (0-7) on the same grid; ``annotated``
    holds 8 flags indexed by label. Unannotated structures get ``annotated=False`` and no
    metrics (None). A contoured PTV is scored on labels GTV + PTV together; with ``ptv`` =
    ``{"source": "derived", "margin_mm": m}`` (phase 2.5's record) the PTV is scored as
    margin(predicted GTV) against margin(true GTV), whenever the GTV is annotated.
    """
    if len(annotated) != organs.NUM_CLASSES:
        raise ValueError(f"annotated needs {organs.NUM_CLASSES} flags (labels 0-7), got {len(annotated)}")
    derived = ptv is not None and ptv.get("source") == PTV_DERIVED and bool(annotated[organs.GTV])
    rows = []
    for label, members in SCORED_LABELS.items():
        if only is not None and label not in only:
            continue
        scored = bool(annotated[label]) or (label == organs.PTV and derived)
        row: dict[str, Any] = {
            "structure": organs.structure(label).key,
            "labels": "+".join(str(m) for m in members),
            "annotated": scored,
        }
        if label == organs.PTV and derived:
            margin = float(ptv["margin_mm"])  # type: ignore[index]
            row["labels"], row["ptv_source"] = ptv_description(margin), PTV_DERIVED
            pred_mask = ptv_from_gtv(np.asarray(predicted) == organs.GTV, spacing_zyx, margin)
            truth_mask = ptv_from_gtv(np.asarray(truth) == organs.GTV, spacing_zyx, margin)
        elif scored:
            pred_mask, truth_mask = np.isin(predicted, members), np.isin(truth, members)
        if scored:
            truth_ml, pred_ml = volume_ml(truth_mask, spacing_zyx), volume_ml(pred_mask, spacing_zyx)
            row.update(
                dice=dice_3d(pred_mask, truth_mask),
                hd95_mm=hd95_mm(pred_mask, truth_mask, spacing_zyx),
                truth_ml=truth_ml,
                predicted_ml=pred_ml,
                volume_diff_ml=pred_ml - truth_ml,
                volume_diff_pct=100.0 * (pred_ml - truth_ml) / truth_ml if truth_ml > 0 else float("nan"),
            )
        else:
            row.update({column: None for column in METRIC_COLUMNS[4:]})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------
def truth_record(layout: DataLayout, patient_id: str) -> tuple[list[bool], dict[str, Any]]:
    """(8 annotated flags indexed by label, how the PTV is made) from phase 2.5's record of the
    truth label map; a label map of an earlier version (PTV painted in) is refused."""
    try:
        record = read_mask_record(layout.masks / f"{patient_id}.nii.gz")
    except (FileNotFoundError, ValueError) as exc:
        raise PatientError(f"{patient_id}: {exc}") from None
    flags = record.get("annotated")
    if not isinstance(flags, list) or len(flags) != organs.NUM_CLASSES:
        raise PatientError(f"{patient_id}: phase 2.5's record has annotated flags {flags!r}; "
                           "re-run extract_multi_organ_masks.py --overwrite for this patient")
    return [bool(f) for f in flags], dict(record.get("ptv") or {})


def evaluate_patient(
    patient_id: str, *, predictor: "Predictor", layout: DataLayout, predictions_dir: Path, overwrite: bool = False,
) -> PatientResult:
    """Predict (or reuse the saved prediction of) one patient, write it on the CT grid, score it.

    The network input is made from phase 2's CT exactly as prediction makes it
    (``Predictor.segment_image``: orientation, window, z-score, body crop, resize, and back), so
    the labels scored here are the labels ``predict_multi_organ.py`` writes for the same CT.

    ``info["rows"]`` holds :func:`score_structures`' rows with ``patient_id`` added.
    """
    ct_path, truth_path = layout.ct_nifti / f"{patient_id}.nii.gz", layout.masks / f"{patient_id}.nii.gz"
    for path, phase in ((ct_path, "phase 2 (convert_dicom_to_nifti.py)"),
                        (truth_path, "phase 2.5 (extract_multi_organ_masks.py)")):
        if not path.is_file():
            raise PatientError(f"{patient_id}: {path} not found; run {phase}")
    truth_image = read_nifti(truth_path)
    annotated, ptv = truth_record(layout, patient_id)

    prediction_path = predictions_dir / f"{patient_id}.nii.gz"
    if prediction_path.is_file() and not overwrite:
        predicted_image = read_nifti(prediction_path)
        message = "reused saved prediction"
    else:
        ct_image = read_nifti(ct_path)
        try:
            labels = predictor.segment_image(ct_image)
        except ValueError as exc:  # an oblique CT, a constant volume, no body to crop to
            raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
        predicted_image = sitk.GetImageFromArray(labels)
        predicted_image.CopyInformation(ct_image)
        message = ""
    check_same_geometry(predicted_image, truth_image, f"{patient_id}: prediction vs {truth_path}")
    if not message:
        write_nifti(predicted_image, prediction_path)

    spacing_zyx = tuple(reversed(truth_image.GetSpacing()))
    rows = score_structures(sitk.GetArrayViewFromImage(predicted_image),
                            sitk.GetArrayViewFromImage(truth_image), spacing_zyx, annotated, ptv)
    for row in rows:
        row["patient_id"] = patient_id
    return PatientResult(patient_id, DONE, message, {"rows": rows, "ptv": ptv})


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
    """Refuse to reuse saved predictions made by another checkpoint or post-processing setting."""
    path = predictions_dir / PROVENANCE_FILE
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in provenance} != provenance:
            raise ValueError(
                f"{predictions_dir} holds predictions of checkpoint sha256 {saved.get('checkpoint_sha256')} "
                f"(post-processing: {saved.get('postprocess_rule') or saved.get('postprocess')}), not of this run; "
                "use --overwrite or another --output-dir"
            )
    predictions_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(provenance, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------
def default_output_dir(checkpoint: Path, postprocess: bool) -> Path:
    return Path(checkpoint).parent / ("evaluation_postprocessed" if postprocess else "evaluation")


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
    output_dir = Path(output_dir) if output_dir else default_output_dir(checkpoint, postprocess)
    predictions_dir = output_dir / "predictions"
    rule = describe_postprocess() if postprocess else None
    _check_provenance(predictions_dir, {"checkpoint_sha256": file_sha256(checkpoint), "postprocess": postprocess,
                                        "postprocess_rule": rule}, overwrite)

    from predict_multi_organ import Predictor  # it imports this module's post-processing

    predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size,
                               postprocess=postprocess, context_slices=context_slices)
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
    try:
        results = run(checkpoint=args.checkpoint, data_root=args.data_root, split=args.split,
                      splits_dir=args.splits_dir, patients=args.patients, output_dir=args.output_dir,
                      batch_size=args.batch_size, device=args.device, postprocess=args.postprocess,
                      overwrite=args.overwrite, context_slices=args.context_slices, precision=args.precision)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    print(summary_line("Phase 5b", results, done_word="evaluated"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
