"""The PTV rule: the PTV is made, not segmented: the GTV grown by a margin in mm (10 mm by default),
isotropic on the anisotropic grid. Phase 2.5 grows it with :func:`expand_mm` and records how each
patient's PTV is made; evaluation, prediction and the figures grow it with :func:`ptv_from_gtv`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from thoracic_seg import organs
from thoracic_seg.geometry import COORD_TOLERANCE, BoxMask, Grid

DEFAULT_PTV_MARGIN_MM = 10.0
#: How a patient's PTV is made (``record["ptv"]["source"]``): grown from the GTV, a contoured ROI
#: painted as label 2, or nothing (no GTV, or ``--no-derived-ptv``).
PTV_DERIVED, PTV_CONTOURED, PTV_NONE = "derived", "contoured", "none"


def expand_mm(mask: BoxMask, margin_mm: float, grid: Grid | Any) -> BoxMask:
    """Isotropic 3D expansion by ``margin_mm`` on the (anisotropic) grid: every voxel whose centre is
    within ``margin_mm`` (Euclidean, mm) of a voxel of ``mask``. Computed with a distance transform
    on the mask's bounding box grown by the margin, clipped to the grid. ``grid`` needs only
    ``spacing_zyx`` and ``shape_zyx``; :func:`ptv_from_gtv` is the same on whole arrays."""
    from scipy.ndimage import distance_transform_edt

    if not (margin_mm >= 0 and math.isfinite(margin_mm)):
        raise ValueError(f"margin must be a finite number >= 0 mm, got {margin_mm}")
    if not mask.count():
        return BoxMask.empty()
    spacing = np.asarray(grid.spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x) in mm, got {grid.spacing_zyx}")
    pad = np.ceil(margin_mm / spacing).astype(int)
    lo = np.maximum(np.asarray(mask.offset) - pad, 0)
    hi = np.minimum(np.add(mask.offset, mask.array.shape) + pad, grid.shape_zyx)
    region = np.ones(tuple(hi - lo), dtype=bool)  # True = not tumour
    start = np.asarray(mask.offset) - lo
    region[tuple(slice(s, s + n) for s, n in zip(start, mask.array.shape))] &= ~mask.array
    distance = distance_transform_edt(region, sampling=spacing)
    return BoxMask(tuple(int(v) for v in lo), distance <= margin_mm + COORD_TOLERANCE)


@dataclass(frozen=True)
class _ArrayGrid:
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]


def ptv_from_gtv(gtv_zyx: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float) -> np.ndarray:
    """The PTV of a GTV mask: bool (Z, Y, X), every voxel whose centre lies within ``margin_mm``
    (Euclidean, in mm on the anisotropic grid ``spacing_zyx`` = (z, y, x) mm) of a GTV voxel.

    :func:`expand_mm` on a whole array: evaluation (PTV scored as margin(predicted GTV) vs
    margin(true GTV)), prediction (the PTV ROI of the RTSTRUCT) and the figures call it; phase 2.5
    calls :func:`expand_mm`. ``gtv_zyx`` is any array, non-zero = GTV. A single voxel grown by
    10 mm on a 1 x 1 x 3 mm grid (x, y, z) gives 317 + 2 x (293 + 197 + 61) = 1,419 voxels.
    """
    gtv = np.asarray(gtv_zyx) != 0
    if gtv.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) GTV mask, got shape {gtv.shape}")
    spacing = tuple(float(v) for v in spacing_zyx)
    if len(spacing) != 3:
        raise ValueError(f"spacing must be (z, y, x) mm, got {spacing_zyx}")
    out = np.zeros(gtv.shape, dtype=bool)
    occupied = np.argwhere(gtv)
    if not len(occupied):
        expand_mm(BoxMask.empty(), margin_mm, _ArrayGrid(gtv.shape, spacing))  # validates the margin
        return out
    lo, hi = occupied.min(axis=0), occupied.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grown = expand_mm(BoxMask(tuple(int(v) for v in lo), gtv[box]), margin_mm, _ArrayGrid(tuple(gtv.shape), spacing))
    out[grown.box] = grown.array
    return out


def ptv_description(margin_mm: float) -> str:
    """How a derived PTV is made, as ``structures.csv`` and ``summary.md`` say it: ``GTV + 10 mm``."""
    return f"GTV + {margin_mm:g} mm"


def fold_derived_ptv(probabilities: torch.Tensor, ptv: Mapping[str, Any]) -> torch.Tensor:
    """(B, C, H, W) softmax probabilities -> the same with label 2 folded into background when the
    model's PTV is derived (``unet_multi_organ.checkpoint_ptv``): such a network never learnt
    label 2 (the loss merged it with background for every training patient), so p(background or
    PTV) is the probability of background and label 2 is never predicted. Other models: unchanged."""
    if ptv.get("source") != "derived":
        return probabilities
    folded = probabilities.clone()
    folded[:, organs.BACKGROUND] += folded[:, organs.PTV]
    folded[:, organs.PTV] = 0
    return folded
