"""Phase 5b: 3D evaluation of a trained U-Net, or of another model's label maps, on the original CT grid.

processed/ct_nifti (CT in HU) + processed/masks_multi_organ (truth) -> <checkpoint dir>/evaluation/:
metrics.csv, summary.md, summary.json, dice_boxplot.png, predictions/<PatientID>.nii.gz

    python evaluate_multi_organ.py --checkpoint runs/demo/best_unet_multi_organ.pth --split test
    python evaluate_multi_organ.py --predictions DIR --label-map map.json  # -> DIR/evaluation/

A CT is segmented by prediction's own path (``inference.Predictor``), so the labels scored are those
``predict_multi_organ.py`` writes; another model's ``DIR/<PatientID>.nii.gz`` are mapped to our labels
(docs/scoring-other-models.md). Both are scored in 3D at the CT's resolution by :func:`score_label_map`;
unannotated structures and those a model does not predict are not scored.
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
from pathlib import Path
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk

from thoracic_seg import organs
from thoracic_seg.batch import (DONE, FAILED, PatientError, PatientResult, check_same_geometry, exit_status,
                                file_sha256, positive_int, read_nifti, run_batch, run_from_command_line, setup_logging,
                                summary_line, write_nifti, write_text_atomic)
from thoracic_seg.cases import prediction_provenance
from thoracic_seg.figures import FIGURES, dice_boxplot_figure, save_figure
from thoracic_seg.image_grid import segment_image
from thoracic_seg.inference import Predictor
from thoracic_seg.layout import (BEST_CHECKPOINT, DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, DataLayout,
                                 evaluation_output_dir, truth_record)
from thoracic_seg.metrics import (APL_TOLERANCE, METRIC_COLUMNS, METRIC_SIGNIFICANT_DIGITS, SCORED_LABELS,
                                  SURFACE_DICE_TOLERANCE, score_structures, tolerances_record)
from thoracic_seg.postprocess import describe_postprocess, postprocess_labels
from thoracic_seg.precision import DEFAULT_PREDICTION_PRECISION, PREDICTION_PRECISIONS
from thoracic_seg.ptv import PTV_DERIVED
from thoracic_seg.splits import load_split

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
DEFAULT_NAME_PATTERN = "{patient_id}.nii.gz"  # --name-pattern: a patient's label map in --predictions DIR


# ---- One patient: the truth, the one scoring of a label map, and the two ways to get the label map ----
class Truth(NamedTuple):
    """A patient's truth label map (phase 2.5's, on the CT grid), its file and phase 2.5's record."""
    image: sitk.Image
    path: Path
    annotated: list[bool]  # 8 flags indexed by label
    ptv: dict[str, Any]  # how the PTV is made (``{"source": "derived", "margin_mm": m}``, ...)


def read_truth(patient_id: str, layout: DataLayout) -> Truth:
    """The truth of one patient; :class:`PatientError` naming the file or record that is missing."""
    path = layout.masks / f"{patient_id}.nii.gz"
    if not path.is_file():
        raise PatientError(f"{patient_id}: {path} not found; run phase 2.5 (extract_multi_organ_masks.py)")
    image = read_nifti(path)
    try:
        annotated, ptv = truth_record(layout, patient_id)
    except (FileNotFoundError, ValueError) as exc:
        raise PatientError(str(exc)) from None
    return Truth(image, path, annotated, ptv)


def score_label_map(patient_id: str, labels: sitk.Image, truth: Truth, what: str,
                    predicted_labels: Collection[int] | None = None) -> list[dict[str, Any]]:
    """:func:`score_structures`' rows, ``patient_id`` added, of one label map (ours, 0-7, whoever made it)
    against the truth; :class:`PatientError` naming ``what`` and the truth file when their grids differ."""
    check_same_geometry(labels, truth.image, f"{patient_id}: {what} vs {truth.path}")
    spacing_zyx = tuple(reversed(truth.image.GetSpacing()))
    rows = score_structures(sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(truth.image),
                            spacing_zyx, truth.annotated, truth.ptv, predicted_labels=predicted_labels)
    diagonal = math.dist([0.0] * 3, [n * d for n, d in zip(truth.image.GetSize(), truth.image.GetSpacing())])
    for row in rows:
        row["patient_id"], row["diagonal_mm"] = patient_id, diagonal  # the HD95 penalty of an empty structure
    return rows


def evaluate_patient(patient_id: str, *, predictor: Predictor, layout: DataLayout, predictions_dir: Path,
                     overwrite: bool = False) -> PatientResult:
    """Predict one patient as ``predict_multi_organ.py`` does (``image_grid.segment_image``), write it on the
    CT grid, score it (``info["rows"]``). A saved prediction is reused only when ``<PatientID>.json`` beside
    it names the same CT bytes."""
    ct_path = layout.ct_nifti / f"{patient_id}.nii.gz"
    if not ct_path.is_file():
        raise PatientError(f"{patient_id}: {ct_path} not found; run phase 2 (convert_dicom_to_nifti.py)")
    truth = read_truth(patient_id, layout)
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
    rows = score_label_map(patient_id, predicted_image, truth, "prediction")
    if not message.startswith("reused"):
        write_nifti(predicted_image, prediction_path)
        write_text_atomic(record_path, json.dumps({"ct_sha256": ct_sha256}) + "\n")
    return PatientResult(patient_id, DONE, message, {"rows": rows, "ptv": truth.ptv})


def score_other_patient(patient_id: str, *, layout: DataLayout, predictions_dir: Path, name_pattern: str,
                        label_map: Mapping[int, int], postprocess: bool = False) -> PatientResult:
    """Score another model's label map ``predictions_dir / name_pattern`` of one patient, mapped to ours
    (:func:`apply_label_map`), post-processed as ours with ``postprocess``; unmapped structures are not scored."""
    truth = read_truth(patient_id, layout)
    path = predictions_dir / name_pattern.format(patient_id=patient_id)
    if not path.is_file():
        raise PatientError(f"{patient_id}: {path} not found; the other model made no label map for this "
                           "patient, or --name-pattern does not match its file names")
    try:
        other = read_nifti(path)
    except RuntimeError as exc:  # SimpleITK's: not an image file, a truncated one
        raise PatientError(f"{patient_id}: {path} cannot be read as an image: {str(exc).strip()[-200:]}") from None
    check_same_geometry(other, truth.image, f"{patient_id}: {path} vs {truth.path}")
    try:
        labels = apply_label_map(sitk.GetArrayViewFromImage(other), label_map)
    except ValueError as exc:
        raise PatientError(f"{patient_id}: {path}: {exc}") from None
    if postprocess:
        labels = postprocess_labels(labels)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(other)
    rows = score_label_map(patient_id, image, truth, str(path), predicted_labels=set(label_map.values()))
    return PatientResult(patient_id, DONE, "", {"rows": rows, "ptv": truth.ptv})


def _saved_ct_sha256(path: Path) -> str | None:
    """The sha256 of the CT a saved prediction was made from (its ``<PatientID>.json``), or None."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("ct_sha256")
    except (OSError, ValueError, AttributeError):
        return None


# ---- Another model's labels ----
def load_label_map(path: Path) -> dict[int, int]:
    """``--label-map``: a JSON object ``{"<the other model's label value>": "<our structure key>"}`` (several
    values may name one structure) -> ``{value: our label}``. ``FileNotFoundError``/``ValueError`` naming
    the file and the entry: not a JSON object, no entry, a value not an integer >= 1 (or given twice), a key
    not one of our structures."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} not found")
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_JsonPairs)
    except ValueError as exc:
        raise ValueError(f"label map {path}: not valid JSON ({exc})") from None
    keys = [s.key for s in organs.STRUCTURES if s.label != organs.BACKGROUND]
    if not isinstance(pairs, _JsonPairs) or not pairs:
        found = "an empty object" if isinstance(pairs, _JsonPairs) else json.dumps(pairs)[:80]
        raise ValueError(f"label map {path}: expected a JSON object such as "
                         f'{{"1": "lung_right", "2": "heart"}}, got {found}')
    mapping: dict[int, int] = {}
    for value, key in pairs:
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise ValueError(f"label map {path}: {value!r} is not a label value: expected an integer >= 1 "
                             "(0 is background)")
        if int(value) in mapping:
            raise ValueError(f"label map {path}: label value {int(value)} is given twice")
        if not isinstance(key, str) or key not in keys:
            raise ValueError(f"label map {path}: value {value} maps to {key!r}, not one of our structures "
                             f"({', '.join(keys)})")
        mapping[int(value)] = organs.BY_KEY[key].label
    return mapping


class _JsonPairs(list):
    """A JSON object as its (key, value) pairs in file order, so that a repeated key is seen."""


def apply_label_map(values: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
    """Another model's (z, y, x) label map -> ours (uint8, 0-7): a voxel whose value is a key of ``label_map``
    gets that label, every other voxel background (one value per voxel, so structures overlapping in the other
    model cannot both be read). ``ValueError`` for non-integer values (a float map of probabilities, say)."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise ValueError(f"label values must be integers, found non-integer values (dtype {values.dtype})")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"label values must be integers, got dtype {values.dtype}")
    labels = np.zeros(values.shape, dtype=np.uint8)
    for value, label in label_map.items():
        labels[values == value] = label
    return labels


# ---- Summaries ----
def _stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, median, population std and n of the finite values (None when there are none)."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)),
            "std": float(finite.std()), "n": int(finite.size)}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per structure key: Dice, HD95 (mm), surface Dice, added path length (mm) and volume difference (%)
    statistics over the annotated rows with a defined Dice; HD95 over finite values, ``n_inf`` counting
    patients where truth or prediction was empty, and ``penalised_mean``: the mean with each of those at the
    CT's diagonal (``diagonal_mm``), so predicting nothing never improves it."""
    out: dict[str, dict[str, Any]] = {}
    for label in SCORED_LABELS:
        key = organs.structure(label).key
        scored = [r for r in rows if r["structure"] == key and r["annotated"]
                  and r["dice"] is not None and not math.isnan(r["dice"])]
        hd95 = [r["hd95_mm"] for r in scored]
        out[key] = {
            "dice": _stats([r["dice"] for r in scored]),
            "hd95_mm": {**_stats(hd95), "n_inf": sum(math.isinf(v) for v in hd95),
                        "penalised_mean": _stats([r["diagonal_mm"] if math.isinf(r["hd95_mm"]) else r["hd95_mm"]
                                                  for r in scored if "diagonal_mm" in r])["mean"]},
            "surface_dice": _stats([r["surface_dice"] for r in scored]),
            "apl_mm": _stats([r["apl_mm"] for r in scored]),
            "volume_diff_pct": _stats([r["volume_diff_pct"] for r in scored]),
            "n_not_annotated": sum(1 for r in rows if r["structure"] == key and not r["annotated"]),
            "n_empty": sum(1 for r in rows if r["structure"] == key and r["annotated"]
                           and r["dice"] is not None and math.isnan(r["dice"]))}
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
    if "checkpoint" in context:
        source = [f"- checkpoint: `{context['checkpoint']}`"]
    else:
        mapped = f"`{context['predictions']}`, mapped to our labels value by value by `{context['label_map']}`"
        missing = _not_predicted_names(context["not_predicted"]) or "none"
        source = [f"- label maps of another model: {mapped}",
                  f"- not predicted by this model (no label value maps to them), not scored: {missing}"]
    lines = [f"# Evaluation: {context['split']} split ({context['n_patients']} patients)", "", *source,
             f"- post-processing: {context.get('postprocess_rule') or 'none'}",
             f"- PTV: {context.get('ptv_scoring', 'labels GTV + PTV')}",
             "- 3D metrics on each CT's original grid; unannotated structures not scored;",
             "  HD95 mean and median over finite values (`HD95 inf`: truth or prediction empty, Dice 0);",
             "  `HD95 penalised`: the mean with each empty one at the CT's diagonal;",
             "  surface Dice at each structure's tolerance (in brackets; sources in summary.json, docs/metrics.md);",
             f"  APL: added path length, true contour farther than {APL_TOLERANCE.mm:g} mm from the predicted one.", "",
             "| Structure | n | Dice mean ± std | Dice median | HD95 mean (mm) | HD95 median (mm) | HD95 inf "
             "| HD95 penalised (mm) "
             "| Surface Dice mean ± std (tolerance) | APL mean (mm) | Volume diff mean (%) | not annotated |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, s in summary.items():
        d, h, v, sd, apl = s["dice"], s["hd95_mm"], s["volume_diff_pct"], s["surface_dice"], s["apl_mm"]
        tolerance = SURFACE_DICE_TOLERANCE[organs.BY_KEY[key].label].mm
        lines.append(f"| {organs.BY_KEY[key].name} | {d['n']} | {num(d['mean'])} ± {num(d['std'])} "
                     f"| {num(d['median'])} | {num(h['mean'], 2)} | {num(h['median'], 2)} | {h['n_inf']} "
                     f"| {num(h['penalised_mean'], 2)} "
                     f"| {num(sd['mean'])} ± {num(sd['std'])} ({tolerance:g} mm) | {num(apl['mean'], 0)} "
                     f"| {num(v['mean'], 1)} | {s['n_not_annotated']} |")
    return "\n".join(lines) + "\n"


def _not_predicted_names(keys: Sequence[str]) -> str:
    """``Esophagus, PTV (...)``: the structures another model does not predict, for ``summary.md``."""
    names = [organs.BY_KEY[key].name for key in keys]
    if organs.structure(organs.PTV).key in keys and organs.structure(organs.GTV).key not in keys:
        names[list(keys).index(organs.structure(organs.PTV).key)] += (
            " (contoured; a derived PTV is scored, grown from the predicted GTV)")
    return ", ".join(names)


def ptv_scoring(ptv_rows: Sequence[dict[str, Any]]) -> str:
    """How the PTV rows were scored, for ``summary.md``: derived (margin of the GTV) and/or contoured,
    or not at all where the model predicts no GTV (derived) or no PTV (contoured)."""
    missing = sum(1 for r in ptv_rows if r.get("predicted") is False)
    ptv_rows = [r for r in ptv_rows if r.get("predicted") is not False]
    derived = sorted({r["labels"] for r in ptv_rows if r.get("ptv_source") == PTV_DERIVED})
    n_derived = sum(1 for r in ptv_rows if r.get("ptv_source") == PTV_DERIVED)
    parts = []
    if n_derived:
        parts.append(f"derived ({', '.join(derived)}) in {n_derived} patient(s): margin(predicted GTV) "
                     "vs margin(true GTV)")
    if len(ptv_rows) - n_derived:
        parts.append(f"contoured in {len(ptv_rows) - n_derived} patient(s): labels GTV + PTV")
    if missing:
        parts.append(f"not scored in {missing} patient(s): the model predicts no GTV (for a derived PTV) "
                     "or no PTV (for a contoured one)")
    return "; ".join(parts) or "not scored (no PTV, contoured or derived)"


def _check_provenance(predictions_dir: Path, provenance: dict[str, Any], overwrite: bool) -> None:
    """Refuse to reuse saved predictions made by another checkpoint, post-processing rule or
    inference setting (precision, preprocessing: ``cases.prediction_provenance``)."""
    path = predictions_dir / PROVENANCE_FILE
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in provenance} != provenance:
            raise ValueError(f"{predictions_dir} holds predictions of checkpoint sha256 "
                             f"{saved.get('checkpoint_sha256')} (post-processing: "
                             f"{saved.get('postprocess_rule') or saved.get('postprocess')}; inference: "
                             f"{saved.get('inference')}), not of this run; use --overwrite or another --output-dir")
    predictions_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(provenance, indent=2) + "\n")


# ---- Batch ----
def run(*, checkpoint: Path | None = None, predictions: Path | None = None, label_map: Path | None = None,
        name_pattern: str = DEFAULT_NAME_PATTERN, data_root: Path = DEFAULT_DATA_ROOT, split: str = "test",
        splits_dir: Path = DEFAULT_SPLITS_DIR, patients: Sequence[str] | None = None, output_dir: Path | None = None,
        batch_size: int | None = None, device: str = "auto", postprocess: bool = False, overwrite: bool = False,
        context_slices: int | None = None, precision: str = DEFAULT_PREDICTION_PRECISION) -> list[PatientResult]:
    """Evaluate ``checkpoint``, or score another model's label maps ``predictions/<name_pattern>`` through
    ``label_map`` (:func:`load_label_map`), on ``split`` (or ``patients``); write the reports to ``output_dir``
    (default: ``evaluation/`` beside the checkpoint or in ``predictions``; ``evaluation_postprocessed/`` with
    ``postprocess``). ``batch_size``, ``device``, ``precision``, ``overwrite`` and ``context_slices`` (None: the
    checkpoint's; another number is refused) are for a checkpoint. ``FileNotFoundError``/``ValueError``: a missing
    split, checkpoint, folder or label map, both or neither source, a bad label map or name pattern, saved
    predictions of another checkpoint in ``output_dir`` (without ``overwrite``), a context mismatch."""
    if (checkpoint is None) == (predictions is None):
        raise ValueError("give a checkpoint or the folder of another model's label maps (--predictions), "
                         f"not {'both' if checkpoint is not None else 'neither'}")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        if label_map is not None:
            raise ValueError("--label-map is for --predictions (another model's label maps), not for a checkpoint")
    else:
        predictions, mapping = Path(predictions), _check_other_model(Path(predictions), label_map, name_pattern)
    layout = DataLayout(Path(data_root))
    patient_ids = list(patients) if patients else load_split(Path(splits_dir), split)
    if not patient_ids:
        raise ValueError(f"no patients to evaluate: split {split!r} in {splits_dir} is empty")
    rule = describe_postprocess() if postprocess else None
    which = split if not patients else "given ids"
    if checkpoint is not None:
        output_dir = Path(output_dir) if output_dir else evaluation_output_dir(checkpoint, postprocess)
        predictions_dir = output_dir / "predictions"
        predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size,
                                   postprocess=postprocess, context_slices=context_slices)
        inference = prediction_provenance(predictor)  # hashes the checkpoint once
        _check_provenance(predictions_dir, {"checkpoint_sha256": inference["checkpoints_sha256"][0],
                                            "postprocess": postprocess, "postprocess_rule": rule,
                                            "inference": inference}, overwrite)
        log.info("evaluating %d patients (%s) with %s -> %s", len(patient_ids), which, predictor.describe(), output_dir)
        source: dict[str, Any] = {"checkpoint": str(checkpoint)}
        task = functools.partial(evaluate_patient, predictor=predictor, layout=layout,
                                 predictions_dir=predictions_dir, overwrite=overwrite)
    else:
        # the folder names of a checkpoint's evaluation, inside the folder of label maps
        output_dir = (Path(output_dir) if output_dir
                      else predictions / evaluation_output_dir(predictions, postprocess).name)
        log.info("scoring %d patients (%s): label maps %s/%s through %s -> %s", len(patient_ids), which,
                 predictions, name_pattern, label_map, output_dir)
        source = {"predictions": str(predictions), "label_map": str(label_map),
                  "not_predicted": [organs.structure(label).key for label in SCORED_LABELS
                                    if label not in mapping.values()]}
        task = functools.partial(score_other_patient, layout=layout, predictions_dir=predictions,
                                 name_pattern=name_pattern, label_map=mapping, postprocess=postprocess)
    results = run_batch(patient_ids, task, workers=1, desc="evaluating")
    write_reports(results, output_dir, source, split if not patients else "given patients", postprocess)
    return results


def _check_other_model(predictions: Path, label_map: Path | None, name_pattern: str) -> dict[int, int]:
    """The label map of ``--predictions`` once the folder, the mapping and the name pattern are checked."""
    if not predictions.is_dir():
        raise FileNotFoundError(f"folder of label maps {predictions} not found")
    if label_map is None:
        raise ValueError("--predictions needs --label-map: a JSON file mapping the other model's label values "
                         'to our structures, such as {"1": "lung_right", "2": "heart"}')
    try:
        name = name_pattern.format(patient_id="ID")
    except (KeyError, IndexError, ValueError):
        name = ""
    if "{patient_id}" not in name_pattern or not name or Path(name).is_absolute():
        raise ValueError(f"--name-pattern {name_pattern!r}: expected a file name relative to the folder with "
                         f"{{patient_id}} and no other field, such as {DEFAULT_NAME_PATTERN!r}")
    return load_label_map(label_map)


def write_reports(results: Sequence[PatientResult], output_dir: Path, source: dict[str, Any], split: str,
                  postprocess: bool) -> None:
    """metrics.csv, summary.json, summary.md and the Dice box plot of a batch, whoever made its labels
    (``source``: the checkpoint, or another model's folder, label map and structures it does not predict)."""
    rows = [row for r in results if r.status == DONE for row in r.info["rows"]]
    summary = summarize(rows)
    ptv_rows = [row for row in rows if row["structure"] == organs.structure(organs.PTV).key and row["annotated"]]
    context = {**source, "split": split, "n_patients": sum(r.status == DONE for r in results),
               "postprocess": postprocess, "postprocess_rule": describe_postprocess() if postprocess else None,
               "failed": [r.patient_id for r in results if r.status == FAILED], "ptv_scoring": ptv_scoring(ptv_rows),
               "tolerances_mm": tolerances_record()}
    write_metrics_csv(rows, output_dir / "metrics.csv")
    write_text_atomic(output_dir / "summary.json", json.dumps({**context, "structures": summary}, indent=2) + "\n")
    write_text_atomic(output_dir / "summary.md", format_summary_md(summary, context))
    save_figure(dice_boxplot_figure(rows, f"3D Dice per structure, {context['split']} "
                                          f"({context['n_patients']} patients)"), output_dir / FIGURES["dice"])
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help=f"{BEST_CHECKPOINT} of a run")
    what.add_argument("--predictions", type=Path, metavar="DIR", help="instead of a checkpoint: another model's label "
                      "maps on each patient's CT grid, DIR/<PatientID>.nii.gz (docs/scoring-other-models.md)")
    parser.add_argument("--label-map", type=Path, metavar="JSON", help="with --predictions: its label values -> "
                        'our structures, {"1": "lung_right", ...}; other values are background')
    parser.add_argument("--name-pattern", default=DEFAULT_NAME_PATTERN, metavar="PATTERN",
                        help="with --predictions: file name of a patient's label map in DIR (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding processed/ (default: %(default)s)")
    parser.add_argument("--split", default="test", help="split name, reads <splits-dir>/<split>.txt (default: test)")
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR, help="default: %(default)s")
    parser.add_argument("--patients", nargs="+", metavar="ID", default=None,
                        help="evaluate these patient ids instead of the split")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: <checkpoint dir>/evaluation or "
                        "DIR/evaluation (evaluation_postprocessed with --postprocess)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="slices per forward pass (default: chosen from free memory, as prediction does)")
    parser.add_argument("--precision", choices=PREDICTION_PRECISIONS, default=DEFAULT_PREDICTION_PRECISION,
                        help="as predict_multi_organ.py --precision (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--postprocess", action="store_true", help="remove small 3D components per structure, as "
                        f"measured on real patients ({describe_postprocess().replace('%', '%%')}; GTV/PTV untouched)")
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
        parser, run, checkpoint=args.checkpoint, predictions=args.predictions, label_map=args.label_map,
        name_pattern=args.name_pattern, data_root=args.data_root, split=args.split, splits_dir=args.splits_dir,
        patients=args.patients, output_dir=args.output_dir, batch_size=args.batch_size, device=args.device,
        postprocess=args.postprocess, overwrite=args.overwrite, context_slices=args.context_slices,
        precision=args.precision)
    print(summary_line("Phase 5b", results, done_word="evaluated"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
