"""Post-processing of predicted label maps: per structure, the 3D components smaller than a fraction of
its largest are removed (``--postprocess`` of evaluation and prediction). GTV and PTV are never
touched: a tumour can be multifocal. The rule per structure was measured on real patients
(``benchmarks/bench_quality.py``, docs/quality.md).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from thoracic_seg import organs


#: Organs that are one connected body; tumour targets (GTV, PTV) may be multifocal.
SINGLE_COMPONENT_LABELS: tuple[int, ...] = (
    organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART, organs.ESOPHAGUS, organs.SPINAL_CORD,
)
#: ``--postprocess``, per structure: components with fewer voxels than this fraction of the
#: structure's largest 3D component are removed (1.0: only the largest stays; a structure not listed
#: is left alone). Lungs and heart: chosen by benchmarks/bench_quality.py on two real patients; on six
#: held out (each fold's rule chosen on the other folds) every rule moves them by -0.0001 to +0.0011
#: Dice on average (one right lung -0.0085): negligible either way. The esophagus keeps every piece:
#: its held-out Dice (0.42) is below the 0.5 floor a rule is chosen above. The cord keeps every piece:
#: the rule chosen for it on two folds cost the third 0.016. docs/quality.md has the numbers.
POSTPROCESS_MIN_FRACTION: dict[int, float] = {organs.RIGHT_LUNG: 1.0, organs.LEFT_LUNG: 1.0, organs.HEART: 1.0}
#: The rules the quality benchmark measures for each structure, by name.
POSTPROCESS_CANDIDATES: dict[str, float] = {"largest": 1.0, "drop<10%": 0.1, "drop<1%": 0.01}


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
