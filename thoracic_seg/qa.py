"""The quality check of every predicted structure: features measured on the label map, flags with
their reason and numbers, a verdict per structure (prediction writes it beside the labels; docs/review.md).

:func:`structure_features` measures (volume, side of the midline, 3D components, the fraction
post-processing removed, gaps along z, area on the scan's first and last slice, mean maximum softmax
probability); :func:`flag_structures` compares them with :data:`QA_THRESHOLDS` and the training
patients' volumes (:func:`training_volume_record`, stored in the checkpoint); :func:`check` does both.
numpy and scipy only: no SimpleITK, no torch. ``benchmarks/calibrate_qa.py`` measures the thresholds.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from thoracic_seg import organs

#: Bumped when the check's features, flags or files change: prediction records it in its provenance,
#: so outputs checked by another version are redone.
QA_FORMAT = 1

#: Every threshold of the check, in one place. Each is a value a flag is raised *beyond*; the
#: calibration on the quality benchmark's held-out patients (benchmarks/calibrate_qa.py, docs/quality.md)
#: measures how many poor (Dice < 0.5) and good (Dice >= 0.8) structures each value flags. On the six
#: real development patients, held out by fold (2026-12-06): 32 of 32 poor flagged, 0 of 34 good.
QA_THRESHOLDS: dict[str, float] = {
    # volume: flagged below (training minimum / factor) or above (training maximum x factor); the
    # training range of 4-6 patients is narrower than the population's, hence the factor.
    "volume_factor": 1.5,
    # volume: fewer training patients with the structure annotated than this: the check is not available.
    "volume_min_patients": 2,
    # side: a lung's centroid must lie at least this many mm on its own side of the midline (the true
    # lungs of the six real patients: 61-84 mm).
    "lung_side_mm": 0.0,
    # side: the heart's centroid must lie at least this many mm to the patient's left of the midline
    # (the true hearts of the six real patients: 5-32 mm to the left of the cord).
    "heart_side_mm": 0.0,
    # components: a lung or the heart whose second largest 3D piece holds more than this fraction of
    # it (true contours: at most 0.004, specks of a few voxels).
    "max_second_piece_fraction": 0.01,
    # removed: post-processing removed more than this fraction of the structure's voxels (the network
    # put that much of it in pieces away from the organ).
    "max_removed_fraction": 0.05,
    # z_gap: a tube (cord, esophagus) missing on more than this many mm along z between its ends (one
    # skipped 3 mm slice is tolerated: a true esophagus of the real patients has one).
    "max_tube_gap_mm": 5.0,
    # cut: a lung or the heart covering more than this area (mm^2) on the scan's first or last slice
    # (a true lung base of the real patients touches the last slice with 1.5 cm2).
    "max_end_area_mm2": 500.0,
    # low_confidence: the mean maximum softmax probability inside the structure below this.
    "min_confidence": 0.8,
}

#: Structures a thoracic RT planning CT always shows: one that is not predicted at all is flagged.
EXPECTED_LABELS: tuple[int, ...] = organs.FOREGROUND_LABELS
#: Structures whose side of the body is checked against the midline.
SIDE_LABELS: tuple[int, ...] = (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART)
#: Organs in one piece, not tubes, whose pieces are counted (a tube in pieces is a z_gap).
COMPONENT_LABELS: tuple[int, ...] = (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART)
#: Tubes that run through the whole thorax: a gap along z inside them is flagged.
TUBE_LABELS: tuple[int, ...] = (organs.ESOPHAGUS, organs.SPINAL_CORD)
#: Organs that a thoracic scan contains whole: one reaching the first or last slice is cut. The cord and
#: the esophagus normally cross the scan's ends; the tumour may lie anywhere.
CUT_LABELS: tuple[int, ...] = (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART)

#: Flag codes, in the order a verdict lists them, with what each means (docs/review.md says what to check).
FLAG_CODES: dict[str, str] = {
    "missing": "no voxel predicted, though every thoracic RT CT shows the structure",
    "volume": "volume outside the training patients' range (widened by volume_factor)",
    "side": "centroid on the wrong side of the midline (cord, or between the lungs)",
    "components": "a lung or the heart in several large 3D pieces",
    "removed": "post-processing removed a large fraction of the structure",
    "z_gap": "a tube (cord, esophagus) interrupted along z",
    "cut": "a lung or the heart reaches the scan's first or last slice",
    "low_confidence": "the network's mean maximum softmax probability inside it is low",
    "from_gtv": "a PTV grown from a flagged GTV",
}

#: Columns of ``<PatientID>_qa.csv``: one row per structure 1-7.
QA_COLUMNS = (
    "patient_id", "label", "structure", "verdict", "flags", "reasons", "not_checked", "voxels", "volume_ml",
    "training_n", "training_min_ml", "training_max_ml", "lateral_offset_mm", "components", "second_piece_fraction",
    "removed_fraction",
    "max_gap_mm", "first_slice_area_mm2", "last_slice_area_mm2", "confidence",
)

_FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
_CONFIDENCE_CHUNK = 16  # slices of probabilities widened to float32 at a time
_STATS = ("min_ml", "q1_ml", "median_ml", "q3_ml", "max_ml")


@dataclass(frozen=True)
class Flag:
    """One problem of one structure: ``code`` (a key of :data:`FLAG_CODES`) and ``reason``, a sentence
    with the numbers behind it."""

    code: str
    reason: str


@dataclass
class StructureQA:
    """The check of one structure: its ``features`` (:func:`structure_features`), ``flags`` and the checks
    that could not run (``not_checked``: check name -> why)."""

    label: int
    features: dict[str, Any]
    flags: list[Flag] = field(default_factory=list)
    not_checked: dict[str, str] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.flags]

    @property
    def verdict(self) -> str:
        """``QA ok``, ``QA ok (not checked: volume)`` or ``QA flagged: <reason>; <reason>``: the text of
        the RTSTRUCT ROI's description."""
        if self.flags:
            return "QA flagged: " + "; ".join(f.reason for f in self.flags)
        return "QA ok" + (f" (not checked: {', '.join(self.not_checked)})" if self.not_checked else "")


# ---- Orientation -----------------------------------------------------------------------------
def patient_axes(orientation: str) -> tuple[int, int, float]:
    """``(slice axis, lateral axis, lateral sign)`` of a (Z, Y, X) array of an image stored in
    ``orientation`` (the code of its columns, rows and slices, ``grid.orientation_code``: ``LPS``,
    ``RPI``...): the array axis along S/I, the array axis along L/R, and +1 when the index along it
    increases towards the patient's left (L), -1 towards the right (R). ``ValueError`` for a code
    that is not one letter of each of L/R, P/A, S/I.

        >>> patient_axes("LPS"), patient_axes("RAI")
        ((0, 2, 1.0), (0, 2, -1.0))
    """
    code = str(orientation).upper()
    pairs = ("LR", "PA", "SI")
    found = [next((k for k, pair in enumerate(pairs) if letter in pair), None) for letter in code]
    if len(code) != 3 or sorted(p for p in found if p is not None) != [0, 1, 2]:
        raise ValueError(f"orientation must be three letters, one of each of L/R, P/A, S/I (e.g. LPS, RAI), "
                         f"got {orientation!r}")
    lateral = found.index(0)
    return 2 - found.index(2), 2 - lateral, 1.0 if code[lateral] == "L" else -1.0


# ---- Features --------------------------------------------------------------------------------
def _union_box(boxes: Sequence[tuple[slice, ...] | None], members: Sequence[int]) -> tuple[slice, ...] | None:
    """The box holding the labels ``members`` (``ndimage.find_objects``' ``boxes``), None when none occurs."""
    present = [boxes[m - 1] for m in members if m - 1 < len(boxes) and boxes[m - 1] is not None]
    if not present:
        return None
    return tuple(slice(min(b[a].start for b in present), max(b[a].stop for b in present)) for a in range(3))


def _longest_run(values: np.ndarray) -> int:
    """The longest run of True in a 1D bool array."""
    best = run = 0
    for v in values:
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def mean_inside(probabilities: np.ndarray, mask: np.ndarray, box: Sequence[slice], scale: float = 1.0) -> float:
    """The mean over the voxels of ``mask`` (bool, the shape of ``box``) of the maximum class probability:
    ``probabilities`` (Z, C, Y, X), any dtype, ``scale`` = the value of a probability of 1 (255 for uint8).
    Widened to float32 :data:`_CONFIDENCE_CHUNK` slices at a time, so it never copies the whole volume."""
    zs, ys, xs = box
    total, count = 0.0, int(mask.sum())
    for start in range(zs.start, zs.stop, _CONFIDENCE_CHUNK):
        stop = min(start + _CONFIDENCE_CHUNK, zs.stop)
        chunk = np.asarray(probabilities[start:stop, :, ys, xs], dtype=np.float32).max(axis=1)
        total += float(chunk[mask[start - zs.start:stop - zs.start]].sum(dtype=np.float64))
    return total / count / float(scale)


def _geometry(mask: np.ndarray, box: Sequence[slice], shape: Sequence[int], spacing_zyx: Sequence[float],
              axes: tuple[int, int, float]) -> dict[str, Any]:
    """Lateral position (mm towards the patient's left from index 0), components, gaps and end-slice areas
    of one structure's ``mask`` cut out of a volume of ``shape`` at ``box``."""
    slice_axis, lateral_axis, sign = axes
    others = tuple(a for a in range(3) if a != slice_axis)
    in_plane_mm2 = float(np.prod([spacing_zyx[a] for a in others]))
    lateral_index = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != lateral_axis)))[0]
    counts = mask.sum(axis=tuple(a for a in range(3) if a != lateral_axis))[lateral_index]
    lateral = (lateral_index + box[lateral_axis].start) * float(spacing_zyx[lateral_axis]) * sign
    cumulative = np.cumsum(counts)
    median = lateral[int(np.searchsorted(cumulative, cumulative[-1] / 2.0))]
    occupied = mask.any(axis=others)  # the box is tight: its first and last slices hold the structure
    per_slice = mask.sum(axis=others)
    first = int(per_slice[0]) if box[slice_axis].start == 0 else 0
    last = int(per_slice[-1]) if box[slice_axis].stop == shape[slice_axis] else 0
    pieces, components = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    sizes = np.sort(np.bincount(pieces.ravel())[1:])[::-1]
    return {"lateral_mm": float(np.average(lateral, weights=counts)), "lateral_median_mm": float(median),
            "components": int(components),
            "second_piece_fraction": float(sizes[1] / sizes.sum()) if components > 1 else 0.0,
            "slices": int(occupied.sum()), "max_gap_mm": _longest_run(~occupied) * float(spacing_zyx[slice_axis]),
            "first_slice_area_mm2": first * in_plane_mm2, "last_slice_area_mm2": last * in_plane_mm2}


def structure_features(
    labels_zyx: np.ndarray, spacing_zyx: Sequence[float], *, orientation: str = "LPS",
    labels_before: np.ndarray | None = None, probabilities: np.ndarray | None = None, probability_scale: float = 1.0,
    ptv_mask: np.ndarray | None = None, training_volumes: Mapping[str, Any] | None = None,
) -> dict[int, dict[str, Any]]:
    """What the check measures of each structure 1-7 of one patient: label -> features.

    ``labels_zyx`` (Z, Y, X) uint8 0-7, the final labels (after post-processing), in the stored array
    order of a CT of ``orientation`` (``grid.orientation_code``: the side of the patient each image axis
    points to; laterality is judged in patient coordinates from it), voxel ``spacing_zyx`` mm in that
    order. ``labels_before``: the labels before post-processing (None: no post-processing ran).
    ``probabilities`` (Z, 8, Y, X) on the same grid (before post-processing; ``probability_scale`` is a
    probability of 1: 1.0 for floats, 255 for the quality benchmark's uint8). ``ptv_mask`` (bool (Z, Y, X)):
    a PTV grown from the GTV (the PTV is then this mask, not labels GTV + PTV). ``training_volumes``: the
    checkpoint's record (:func:`training_volume_record`), None for a checkpoint without one.

    Features: ``voxels``, ``volume_ml``; ``lateral_mm`` (mean centroid) and ``lateral_median_mm`` along
    the patient's right-left axis, mm increasing towards the patient's left from the array's first
    index; ``lateral_offset_mm`` = ``lateral_mm`` minus the midline (positive: the patient's left of it;
    the midline is the cord's median position, or without a cord the midpoint of the two lungs'
    centroids; None without either); ``components`` (26-connected pieces) and ``second_piece_fraction``
    (the second largest piece's share of the voxels, 0 for one piece); ``removed_fraction`` (of the
    structure's voxels before post-processing); ``slices``; ``max_gap_mm`` (the longest run of slices
    without the structure between its first and last slice, x the slice spacing); ``first_slice_area_mm2``,
    ``last_slice_area_mm2`` (its area on the scan's first / last slice along S/I); ``confidence`` (mean
    maximum probability inside; None without probabilities); ``training_n``/``training_min_ml``/
    ``training_max_ml`` (None without a record); ``derived`` (a PTV grown from the GTV). An empty
    structure has only ``voxels`` 0, ``volume_ml`` 0, ``derived`` and the training numbers.
    """
    labels = np.asarray(labels_zyx)
    if labels.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label map, got shape {labels.shape}")
    if len(spacing_zyx) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing_zyx):
        raise ValueError(f"spacing_zyx must be three positive mm values, got {tuple(spacing_zyx)}")
    for name, other in (("labels_before", labels_before), ("ptv_mask", ptv_mask)):
        if other is not None and np.shape(other) != labels.shape:
            raise ValueError(f"{name} has shape {np.shape(other)}, the labels {labels.shape}")
    if probabilities is not None and (np.ndim(probabilities) != 4 or np.shape(probabilities)[0] != labels.shape[0]
                                      or np.shape(probabilities)[2:] != labels.shape[1:]
                                      or np.shape(probabilities)[1] != organs.NUM_CLASSES):
        raise ValueError(f"probabilities must be (Z, {organs.NUM_CLASSES}, Y, X) = "
                         f"{(labels.shape[0], organs.NUM_CLASSES, *labels.shape[1:])}, got {np.shape(probabilities)}")
    axes = patient_axes(orientation)
    voxel_ml = float(np.prod([float(s) for s in spacing_zyx])) / 1000.0
    boxes = ndimage.find_objects(labels)
    before_counts = None if labels_before is None else \
        np.bincount(np.asarray(labels_before).reshape(-1), minlength=organs.NUM_CLASSES)
    features: dict[int, dict[str, Any]] = {}
    for label in organs.FOREGROUND_LABELS:
        derived = label == organs.PTV and ptv_mask is not None
        members = organs.STRUCTURE_MEMBERS[label]
        found = None
        if derived:
            box = _union_box(ndimage.find_objects(np.asarray(ptv_mask, dtype=np.uint8)), (1,))
            found = None if box is None else (np.asarray(ptv_mask)[box].astype(bool), box)
        elif _union_box(boxes, (label,)) is not None:  # no PTV label: a GTV alone makes no contoured PTV
            box = _union_box(boxes, members)
            found = np.isin(labels[box], members), box
        values: dict[str, Any] = {"voxels": 0, "volume_ml": 0.0, "derived": derived,
                                  **_training_numbers(training_volumes, label)}
        if found is not None and found[0].any():
            mask, box = found
            voxels = int(mask.sum())
            values.update(voxels=voxels, volume_ml=voxels * voxel_ml,
                          **_geometry(mask, box, labels.shape, spacing_zyx, axes))
            before = voxels if before_counts is None or derived else int(sum(before_counts[m] for m in members))
            values["removed_fraction"] = max(0.0, (before - voxels) / before) if before else 0.0
            values["confidence"] = (mean_inside(probabilities, mask, box, probability_scale)
                                    if probabilities is not None and not derived else None)
        features[label] = values
    midline = _midline(features)
    for values in features.values():
        if values["voxels"]:
            values["lateral_offset_mm"] = None if midline is None else values["lateral_mm"] - midline
    return features


def _midline(features: Mapping[int, Mapping[str, Any]]) -> float | None:
    """The patient's midline along right-left (mm, :func:`structure_features`' axis): the cord's median
    position; without a cord, halfway between the two lungs' centroids; None without either."""
    if features[organs.SPINAL_CORD]["voxels"]:
        return float(features[organs.SPINAL_CORD]["lateral_median_mm"])
    right, left = features[organs.RIGHT_LUNG], features[organs.LEFT_LUNG]
    if right["voxels"] and left["voxels"]:
        return (right["lateral_mm"] + left["lateral_mm"]) / 2.0
    return None


def _training_numbers(record: Mapping[str, Any] | None, label: int) -> dict[str, Any]:
    if record is None:
        return {"training_n": None, "training_min_ml": None, "training_max_ml": None}
    stats = (record.get("structures") or {}).get(organs.structure(label).key) or {}
    return {"training_n": int(stats.get("n", 0)), "training_min_ml": stats.get("min_ml"),
            "training_max_ml": stats.get("max_ml")}


# ---- Flags -----------------------------------------------------------------------------------
def _ml(value: float) -> str:
    return f"{value:.2f} ml" if value < 10 else f"{value:.1f} ml" if value < 100 else f"{value:.0f} ml"


def flag_structure(label: int, values: Mapping[str, Any], thresholds: Mapping[str, float] = QA_THRESHOLDS,
                   gtv: StructureQA | None = None) -> StructureQA:
    """The flags of one structure from its ``values`` (:func:`structure_features`); ``gtv``: the GTV's
    check, which a derived PTV inherits (``from_gtv``)."""
    t = {**QA_THRESHOLDS, **thresholds}
    name = organs.structure(label).name
    result = StructureQA(label, dict(values))
    flags, not_checked = result.flags, result.not_checked
    if not values["voxels"]:
        if label in EXPECTED_LABELS:
            flags.append(Flag("missing", "missing: no voxel predicted (every thoracic RT CT shows it)"))
    if values.get("derived"):
        if gtv is not None and gtv.flagged:
            flags.append(Flag("from_gtv", f"grown from the automatic GTV, which is flagged ({', '.join(gtv.codes)})"))
        return result
    if not values["voxels"]:
        return result

    n, low_ml, high_ml = values["training_n"], values["training_min_ml"], values["training_max_ml"]
    if n is None:
        not_checked["volume"] = "the checkpoint holds no training volumes (trained before they were recorded)"
    elif n < t["volume_min_patients"] or low_ml is None or high_ml is None:
        not_checked["volume"] = (f"{n} training patient(s) with {name} annotated, "
                                 f"at least {t['volume_min_patients']:g} needed")
    else:
        low, high, volume = low_ml / t["volume_factor"], high_ml * t["volume_factor"], values["volume_ml"]
        if not low <= volume <= high:
            where = "below" if volume < low else "above"
            flags.append(Flag("volume", f"volume {_ml(volume)} {where} the {n} training patients' "
                                        f"{_ml(low_ml)}-{_ml(high_ml)} (widened x{t['volume_factor']:g}: "
                                        f"{_ml(low)}-{_ml(high)})"))

    offset = values.get("lateral_offset_mm")
    if label in SIDE_LABELS and offset is None:
        not_checked["side"] = "no midline: neither a spinal cord nor both lungs predicted"
    elif label in SIDE_LABELS:
        left_side = label != organs.RIGHT_LUNG
        least = t["heart_side_mm"] if label == organs.HEART else t["lung_side_mm"]
        on_side = offset if left_side else -offset
        if on_side < least:
            side = "left" if offset > 0 else "right"
            flags.append(Flag("side", f"centroid {abs(offset):.0f} mm to the patient's {side} of the midline "
                                      f"(expected at least {least:g} mm to the {'left' if left_side else 'right'})"))

    if label in COMPONENT_LABELS and values["second_piece_fraction"] > t["max_second_piece_fraction"]:
        flags.append(Flag("components", f"in {values['components']} separate 3D pieces, the second largest "
                                        f"{values['second_piece_fraction']:.0%} of it (at most "
                                        f"{t['max_second_piece_fraction']:.0%} accepted)"))
    if values["removed_fraction"] > t["max_removed_fraction"]:
        flags.append(Flag("removed", f"post-processing removed {values['removed_fraction']:.0%} of its voxels as "
                                     f"stray pieces (at most {t['max_removed_fraction']:.0%} accepted)"))
    if label in TUBE_LABELS and values["max_gap_mm"] > t["max_tube_gap_mm"]:
        flags.append(Flag("z_gap", f"interrupted along z for {values['max_gap_mm']:.1f} mm between its ends "
                                   f"(at most {t['max_tube_gap_mm']:g} mm accepted)"))
    if label in CUT_LABELS:
        end = max(values["first_slice_area_mm2"], values["last_slice_area_mm2"])
        if end > t["max_end_area_mm2"]:
            which = "first" if values["first_slice_area_mm2"] >= values["last_slice_area_mm2"] else "last"
            flags.append(Flag("cut", f"cut by the scan's {which} slice ({end / 100:.1f} cm2 on it; at most "
                                     f"{t['max_end_area_mm2'] / 100:g} cm2 accepted): partly outside the scan"))
    if values.get("confidence") is None:
        not_checked["confidence"] = "no class probabilities"
    elif values["confidence"] < t["min_confidence"]:
        flags.append(Flag("low_confidence", f"mean network confidence inside {values['confidence']:.2f} "
                                            f"(below {t['min_confidence']:g})"))
    return result


def flag_structures(features: Mapping[int, Mapping[str, Any]],
                    thresholds: Mapping[str, float] = QA_THRESHOLDS) -> dict[int, StructureQA]:
    """:func:`flag_structure` of each structure of :func:`structure_features`' result (the GTV first: a
    derived PTV inherits its flags)."""
    results = {organs.GTV: flag_structure(organs.GTV, features[organs.GTV], thresholds)}
    for label in organs.FOREGROUND_LABELS:
        if label != organs.GTV:
            results[label] = flag_structure(label, features[label], thresholds, gtv=results[organs.GTV])
    return {label: results[label] for label in organs.FOREGROUND_LABELS}


def check(labels_zyx: np.ndarray, spacing_zyx: Sequence[float], *, thresholds: Mapping[str, float] = QA_THRESHOLDS,
          **inputs: Any) -> dict[int, StructureQA]:
    """The check of every structure 1-7 of one patient: label -> :class:`StructureQA`. ``inputs``: those of
    :func:`structure_features` (orientation, labels_before, probabilities, probability_scale, ptv_mask,
    training_volumes)."""
    return flag_structures(structure_features(labels_zyx, spacing_zyx, **inputs), thresholds)


# ---- Training volumes ------------------------------------------------------------------------
def volume_statistics(volumes_ml: Sequence[float]) -> dict[str, Any]:
    """``{"n", "min_ml", "q1_ml", "median_ml", "q3_ml", "max_ml"}`` of some volumes (ml; quartiles by
    linear interpolation, numpy's default), rounded to 0.001 ml; only ``n`` 0 for none.

        >>> volume_statistics([1.0, 2.0, 3.0, 4.0, 5.0])["q1_ml"]
        2.0
    """
    values = np.asarray([float(v) for v in volumes_ml], dtype=np.float64)
    if not len(values):
        return {"n": 0}
    numbers = np.percentile(values, [0, 25, 50, 75, 100])
    return {"n": int(len(values)), **{k: round(float(v), 3) for k, v in zip(_STATS, numbers)}}


def patient_volumes_ml(labels_zyx: np.ndarray, voxel_mm: Sequence[float],
                       annotated: Sequence[bool]) -> dict[str, float]:
    """Structure key -> volume (ml) of the structures a patient has annotated (8 flags by label), in a
    truth label map (Z, Y, X) of voxel size ``voxel_mm`` (z, y, x mm). A PTV counts labels GTV + PTV
    (``organs.STRUCTURE_MEMBERS``)."""
    if len(annotated) != organs.NUM_CLASSES:
        raise ValueError(f"annotated needs {organs.NUM_CLASSES} flags (labels 0-7), got {len(annotated)}")
    counts = np.bincount(np.asarray(labels_zyx).reshape(-1), minlength=organs.NUM_CLASSES)
    voxel_ml = float(np.prod([float(v) for v in voxel_mm])) / 1000.0
    return {organs.structure(label).key: float(sum(counts[m] for m in organs.STRUCTURE_MEMBERS[label])) * voxel_ml
            for label in organs.FOREGROUND_LABELS if annotated[label]}


def training_volume_record(per_patient: Mapping[str, Mapping[str, float]], source: str) -> dict[str, Any]:
    """What a checkpoint stores of its training patients' volumes (``training_volumes``): ``{"source":
    how they were measured, "patients": n, "structures": {key: volume_statistics over the patients that
    annotate it}}`` from ``per_patient`` (patient id -> :func:`patient_volumes_ml`); a structure no
    patient annotates is left out."""
    structures = {}
    for label in organs.FOREGROUND_LABELS:
        key = organs.structure(label).key
        values = [v[key] for v in per_patient.values() if key in v]
        if values:
            structures[key] = volume_statistics(values)
    return {"source": source, "patients": len(per_patient), "structures": structures}


# ---- Outputs ---------------------------------------------------------------------------------
def _number(value: Any, digits: int = 3) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return round(value, digits)
    return value


def qa_rows(patient_id: str, results: Mapping[int, StructureQA]) -> list[dict[str, Any]]:
    """The rows of ``<PatientID>_qa.csv`` (:data:`QA_COLUMNS`), one per structure; empty cells for what
    was not measured."""
    rows = []
    for label, result in results.items():
        f = result.features
        rows.append({
            "patient_id": patient_id, "label": label, "structure": organs.structure(label).key,
            "verdict": "flagged" if result.flagged else "ok", "flags": " ".join(result.codes),
            "reasons": "; ".join(flag.reason for flag in result.flags),
            "not_checked": "; ".join(f"{k}: {v}" for k, v in result.not_checked.items()),
            **{column: _number(f.get(column)) for column in QA_COLUMNS[7:]},
        })
    return rows


def qa_csv_text(patient_id: str, results: Mapping[int, StructureQA]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=QA_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(qa_rows(patient_id, results))
    return buffer.getvalue()


def volumes_qa_column(result: StructureQA) -> str:
    """The ``qa`` cell of ``_volumes.csv``: ``ok``, or the flag codes separated by spaces."""
    return " ".join(result.codes) or "ok"


def summary(patient_id: str, results: Mapping[int, StructureQA]) -> str:
    """One log line: ``P1: QA flagged 2 of 7 structures: Heart (volume, cut); Esophagus (z_gap)`` or
    ``P1: QA ok, no structure flagged``."""
    flagged = [r for r in results.values() if r.flagged]
    if not flagged:
        return f"{patient_id}: QA ok, no structure flagged"
    named = "; ".join(f"{organs.structure(r.label).name} ({', '.join(r.codes)})" for r in flagged)
    return f"{patient_id}: QA flagged {len(flagged)} of {len(results)} structures: {named}"
