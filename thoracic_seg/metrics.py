"""3D metrics of a predicted label map against the truth, on the CT's own anisotropic grid: Dice, the
95th-percentile Hausdorff distance in mm, volumes, and :func:`score_structures` for all structures of
one patient (unannotated structures, and those a model does not predict, not scored; a derived PTV
scored as margin(GTV) vs margin(GTV)).
"""
from __future__ import annotations

import math
from typing import Any, Collection, Sequence

import numpy as np
from scipy import ndimage

from thoracic_seg import organs
from thoracic_seg.ptv import PTV_DERIVED, ptv_description, ptv_from_gtv


#: Labels scored, each with the label values that make up the structure (PTV contains its GTV).
SCORED_LABELS: dict[int, tuple[int, ...]] = organs.STRUCTURE_MEMBERS
METRIC_COLUMNS = (
    "patient_id", "structure", "labels", "annotated", "dice", "hd95_mm",
    "truth_ml", "predicted_ml", "volume_diff_ml", "volume_diff_pct",
)
#: metrics.csv writes finite metrics with this many significant digits.
METRIC_SIGNIFICANT_DIGITS = 6


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


def score_structures(
    predicted: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float], annotated: Sequence[bool],
    ptv: dict[str, Any] | None = None, only: Sequence[int] | None = None,
    predicted_labels: Collection[int] | None = None,
) -> list[dict[str, Any]]:
    """Metrics of every structure 1-7 (or of the labels in ``only``) of one patient: one dict per structure.

    ``predicted`` and ``truth`` are (z, y, x) label maps (0-7) on the same grid; ``annotated``
    holds 8 flags indexed by label. Unannotated structures get ``annotated=False`` and no
    metrics (None). A contoured PTV is scored on labels GTV + PTV together; with ``ptv`` =
    ``{"source": "derived", "margin_mm": m}`` (phase 2.5's record) the PTV is scored as
    margin(predicted GTV) against margin(true GTV), whenever the GTV is annotated.
    ``predicted_labels`` (None: all) are the labels the model predicts at all (another model's,
    mapped to ours): a structure outside them gets ``predicted=False`` and no metrics, never Dice 0;
    its ``annotated`` is unchanged. A derived PTV needs the GTV among them, a contoured one the PTV.
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
        grown = label == organs.PTV and derived
        if predicted_labels is not None and (organs.GTV if grown else label) not in predicted_labels:
            row["predicted"] = scored = False  # the model makes no such label: nothing to score
        if grown:
            margin = float(ptv["margin_mm"])  # type: ignore[index]
            row["labels"], row["ptv_source"] = ptv_description(margin), PTV_DERIVED
        if grown and scored:
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
