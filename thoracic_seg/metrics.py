"""3D metrics of a predicted label map against the truth, on the CT's own anisotropic grid: Dice, the
95th-percentile Hausdorff distance in mm, the radiotherapy metrics surface Dice at a per-structure
tolerance (Nikolov et al. 2021) and added path length (Vaassen et al. 2020), volumes, and
:func:`score_structures` for all structures of one patient (unannotated structures, and those a model
does not predict, not scored; a derived PTV scored as margin(GTV) vs margin(GTV)). docs/metrics.md
defines the metrics, their tolerances and their empty cases.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Collection, NamedTuple, Sequence

import numpy as np
from scipy import ndimage
from surface_distance import lookup_tables

from thoracic_seg import organs
from thoracic_seg.ptv import PTV_DERIVED, ptv_description, ptv_from_gtv


#: Labels scored, each with the label values that make up the structure (PTV contains its GTV).
SCORED_LABELS: dict[int, tuple[int, ...]] = organs.STRUCTURE_MEMBERS
METRIC_COLUMNS = (
    "patient_id", "structure", "labels", "annotated", "dice", "hd95_mm",
    "truth_ml", "predicted_ml", "volume_diff_ml", "volume_diff_pct", "surface_dice", "apl_mm",
)
#: metrics.csv writes finite metrics with this many significant digits.
METRIC_SIGNIFICANT_DIGITS = 6


class Tolerance(NamedTuple):
    """A distance in mm within which two contours count as agreeing, and where the number comes from."""
    mm: float
    source: str


_COLLIER = ("Collier et al. 2003, J Appl Clin Med Phys 4(1):17-24: average inter-observer variation "
            "of 6 dosimetrists on 6 thoracic CTs (as tabulated in the review PMC5709138, "
            "Table 3)")
_MAASTRO = ("no checked thoracic per-structure value: the default of the contour-comparison scripts of "
            "Vaassen et al.'s group, MAASTRO (quantifyContourDifferences.m: SDSCTolerance = APLTolerance "
            "= 0.1 cm; github.com/danielslobUM/pyAPL)")
#: Surface-Dice tolerance per structure label. Nikolov et al. 2021 (JMIR 23(7):e26151) set each
#: organ's tolerance to the variation between expert contours of it; for thoracic organs the
#: inter-observer distances of Collier et al. 2003 give heart, esophagus and spinal cord. Lungs, GTV
#: and PTV have no such published distance that we could check and take 1 mm (see docs/metrics.md).
SURFACE_DICE_TOLERANCE: dict[int, Tolerance] = {
    organs.GTV: Tolerance(1.0, _MAASTRO),
    organs.PTV: Tolerance(1.0, _MAASTRO),
    organs.RIGHT_LUNG: Tolerance(1.0, _MAASTRO),
    organs.LEFT_LUNG: Tolerance(1.0, _MAASTRO),
    organs.HEART: Tolerance(7.0, _COLLIER),
    organs.ESOPHAGUS: Tolerance(4.0, _COLLIER),
    organs.SPINAL_CORD: Tolerance(2.0, _COLLIER),
}
#: Added path length: a truth contour pixel farther than this from the predicted contour of its
#: slice is one a clinician redraws (Vaassen et al. 2020 used exact overlap, 0 mm, on contours
#: adjusted from the automatic ones; their group's tool compares independent contours at 1 mm).
APL_TOLERANCE = Tolerance(1.0, _MAASTRO)


def tolerances_record() -> dict[str, Any]:
    """The tolerances of the ``surface_dice`` and ``apl_mm`` columns with their sources, as JSON (``summary.json``)."""
    return {"surface_dice": {organs.structure(label).key: {"mm": t.mm, "source": t.source}
                             for label, t in SURFACE_DICE_TOLERANCE.items()},
            "apl": {"mm": APL_TOLERANCE.mm, "source": APL_TOLERANCE.source}}


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


def _check_tolerance(tolerance_mm: float) -> float:
    """``tolerance_mm`` as a float; ``ValueError`` naming it unless it is a finite number >= 0."""
    try:
        tolerance = float(tolerance_mm)
    except (TypeError, ValueError):
        tolerance = math.nan
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite distance >= 0 mm, got {tolerance_mm!r}")
    return tolerance


def _union_box(pred: np.ndarray, truth: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The bounding box of both masks, ``margin`` voxels larger where the array allows; None when both are empty."""
    found = ndimage.find_objects((pred | truth).astype(np.uint8))
    if not found:
        return None
    return tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in found[0])


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
    box = _union_box(pred, truth, margin=1)
    pred_surface, truth_surface = surface_voxels(pred[box]), surface_voxels(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


class SurfaceDistances(NamedTuple):
    """Surface elements ("surfels") of two masks, as DeepMind's ``surface_distance.compute_surface_distances``
    makes them: per surfel of the truth, its distance (mm) to the predicted surface and its area (mm²);
    the same for the prediction. 1-D float64 arrays, unsorted; all empty when both masks are."""
    truth_to_pred_mm: np.ndarray
    truth_areas_mm2: np.ndarray
    pred_to_truth_mm: np.ndarray
    pred_areas_mm2: np.ndarray


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Area in mm² of the marching-cubes surface inside each of the 256 2x2x2 neighbourhoods, for
    this voxel spacing: the reference's own table (it cannot be re-derived from another marching-cubes
    implementation: scikit-image's differs in 44 of the 256 cases)."""
    return lookup_tables.create_table_neighbour_code_to_surface_area(spacing)


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """The 8-bit code of every 2x2x2 neighbourhood of a (z, y, x) mask padded by one empty voxel on
    each side: shape ``mask.shape + 1``, a point per voxel corner, bits weighted as the reference's
    ``ENCODE_NEIGHBOURHOOD_3D_KERNEL`` (its ``ndimage.correlate`` with that kernel)."""
    padded = np.pad(mask, 1).astype(np.uint8)
    codes = np.zeros(tuple(n - 1 for n in padded.shape), np.uint8)
    for (dz, dy, dx), weight in np.ndenumerate(lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL):
        codes += np.uint8(weight) * padded[dz:dz + codes.shape[0], dy:dy + codes.shape[1], dx:dx + codes.shape[2]]
    return codes


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float]) -> SurfaceDistances:
    """The surfels of two boolean (z, y, x) masks and their distances to the other surface, in mm.

    Exactly DeepMind's ``compute_surface_distances`` (Nikolov et al. 2021, the surface-distance
    package): a surfel is a voxel corner whose 2x2x2 neighbourhood is neither empty nor full, its
    area is the marching-cubes area of that neighbourhood (the package's table for ``spacing_zyx``),
    its distance the Euclidean one, with ``spacing_zyx``, to the nearest surfel of the other mask.
    Computed in the bounding box of both masks padded by one voxel: every surfel lies inside it and a
    distance transform measures distances to surfels, so no tolerance margin is needed and the
    result equals the whole volume's. One mask empty: its arrays are empty and the other's distances
    ``inf`` (the package returns the same, but its numpy-2 release fails on it).
    """
    pred, truth = _check_pair(pred, truth)
    spacing = _check_spacing(spacing_zyx)
    box = _union_box(pred, truth)
    if box is None:
        return SurfaceDistances(*(np.zeros(0) for _ in range(4)))
    truth_codes, pred_codes = _neighbour_codes(truth[box]), _neighbour_codes(pred[box])
    truth_surfels, pred_surfels = (truth_codes != 0) & (truth_codes != 255), (pred_codes != 0) & (pred_codes != 255)
    table = _surfel_area_table(spacing)
    return SurfaceDistances(_distances_to(pred_surfels, truth_surfels, spacing), table[truth_codes[truth_surfels]],
                            _distances_to(truth_surfels, pred_surfels, spacing), table[pred_codes[pred_surfels]])


def _distances_to(targets: np.ndarray, points: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from each true voxel of ``points`` to the nearest true voxel of ``targets`` (same
    shape), in ``points``' C order; ``inf`` for all when ``targets`` has none."""
    if not targets.any():
        return np.full(np.count_nonzero(points), np.inf)
    return ndimage.distance_transform_edt(~targets, sampling=spacing)[points]


def surface_dice(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` (Nikolov et al. 2021) of two boolean (z, y, x) masks, in [0, 1].

    The surfel area of both surfaces lying within ``tolerance_mm`` (``<=``) of the other surface,
    over the area of both: DeepMind's ``compute_surface_dice_at_tolerance`` on
    :func:`surface_distances`. NaN when both masks are empty (nothing to find, nothing found: not
    scored, as Dice), 0.0 when exactly one is. ``ValueError`` for a negative or non-finite tolerance.
    """
    tolerance = _check_tolerance(tolerance_mm)
    d = surface_distances(pred, truth, spacing_zyx)
    total = d.truth_areas_mm2.sum() + d.pred_areas_mm2.sum()
    if total == 0:
        return float("nan")
    within = (d.truth_areas_mm2[d.truth_to_pred_mm <= tolerance].sum()
              + d.pred_areas_mm2[d.pred_to_truth_mm <= tolerance].sum())
    return float(within / total)


def contour_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels of each axial slice of a boolean (z, y, x) mask with an in-plane face neighbour (4-connected)
    outside it, outside the array counting as outside: the slice's contour (:func:`surface_voxels`
    within the slice)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def added_path_length_mm(pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float],
                         tolerance_mm: float = APL_TOLERANCE.mm) -> float:
    """Added path length in mm (Vaassen et al. 2020): the length of the true contour a clinician would
    have to draw, summed over the axial slices of two boolean (z, y, x) masks.

    Per slice, the truth's :func:`contour_pixels` farther than ``tolerance_mm`` (in-plane Euclidean
    distance between pixel centres, ``spacing_zyx[1:]``) from every contour pixel of the prediction
    in that slice; all of them where the prediction has no pixel in the slice. The length is the
    number of such pixels times the pixel size (the mean of the two in-plane spacings), as Vaassen
    et al.'s script and platipy's ``compute_metric_total_apl`` count it. 0.0 when the truth is empty
    (nothing to draw; with an empty prediction too, Dice is NaN and the row is not scored); the whole
    contour length when only the prediction is empty. What a clinician would delete is not counted.
    ``ValueError`` for a negative or non-finite tolerance.
    """
    pred, truth = _check_pair(pred, truth)
    spacing = _check_spacing(spacing_zyx)
    tolerance = _check_tolerance(tolerance_mm)
    if not truth.any():
        return 0.0
    # Contours lie in the bounding box of both masks, and distances to the predicted contour are
    # measured inside the slice, so the crop changes nothing but the time.
    box = _union_box(pred, truth)
    truth_contour, pred_contour = contour_pixels(truth[box]), contour_pixels(pred[box])
    added = 0
    for z in np.flatnonzero(truth_contour.any(axis=(1, 2))):
        if pred_contour[z].any():
            far = ndimage.distance_transform_edt(~pred_contour[z], sampling=spacing[1:]) > tolerance
            added += np.count_nonzero(truth_contour[z] & far)
        else:
            added += np.count_nonzero(truth_contour[z])
    return float(added * (spacing[1] + spacing[2]) / 2.0)


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
    holds 8 flags indexed by label. The metrics are :data:`METRIC_COLUMNS` from ``dice`` on: Dice,
    HD95, volumes, surface Dice at :data:`SURFACE_DICE_TOLERANCE` of the structure and added path
    length at :data:`APL_TOLERANCE`. Unannotated structures get ``annotated=False`` and no
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
                surface_dice=surface_dice(pred_mask, truth_mask, spacing_zyx, SURFACE_DICE_TOLERANCE[label].mm),
                apl_mm=added_path_length_mm(pred_mask, truth_mask, spacing_zyx, APL_TOLERANCE.mm),
            )
        else:
            row.update({column: None for column in METRIC_COLUMNS[4:]})
        rows.append(row)
    return rows
