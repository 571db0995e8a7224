"""Phase 3: window, z-score and resize every CT and label map to SIZE x SIZE slices, and write a
memory-mappable training cache.

``processed/ct_nifti/`` + ``processed/masks_multi_organ/`` (+ each patient's ``<PatientID>.json``) ->
``processed/normalized_ct/`` (float32 NIfTI + ``normalization.json``),
``processed/normalized_masks/`` (uint8 NIfTI) and ``processed/training_cache/<PatientID>/``
(``ct.npy`` float16 (Z, S, S), ``mask.npy`` uint8 (Z, S, S), ``meta.json``).

    python normalize_ct_and_masks.py --data-root DATA [--window -1000 400] [--size 256] [--crop-body]

Per patient: the volume is first brought to the network's one orientation (head-first supine
axial, ``LPS``: patient right on image left, anterior up) by axis permutations and flips only
(:func:`to_network_orientation`; an oblique volume is refused), so a feet-first or prone series
reaches the network as the training data do; the phase-2 NIfTIs keep their stored order. Then
HU are clipped to the window, z-scored with the mean and standard deviation of the windowed
volume (recorded in ``normalization.json``), and every axial slice is resized in-plane
(bilinear, anti-aliased when shrinking, for CT; nearest neighbour for labels, so no new label
value can appear). Slices are kept one for one, so z never changes. The NIfTI geometry is updated
so that the normalized volumes overlay the originals voxel corner for voxel corner; the original
shape, spacing, origin and direction (phase 2's stored grid) and the orientation step
(``"orientation": {"stored": "RPI", "network": "LPS"}``) are recorded so predictions can be mapped back.

``--crop-body`` (off by default; ``--crop-margin-mm``, default 10): after the z-score (whose
statistics stay those of the whole windowed volume) every slice is cropped to the square in-plane
box of the body (:func:`body_box`: the largest 3D connected component above -500 HU, plus the
margin, shifted inside the image, padded with air where a square cannot fit) and only then
resized, so the pixels are finer (about 1.4 mm instead of 1.95 mm at 256 px on a 500 mm field of
view). The box is recorded on the network-orientation grid: ``"crop": {"method": "body",
"threshold_hu": -500, "margin_mm": 10, "box_yx": [y0, x0, side]}`` (``null`` without the option);
the normalized NIfTIs start at the box corner, so they still overlay the CT.

``meta.json`` records the annotated flags and how the PTV is made (from phase 2.5's record) and a
fingerprint of the inputs (CT and label-map bytes, phase 2.5's flags and PTV margin): a run without
``--overwrite`` redoes a patient whose inputs changed and says so; the dataset, training and
evaluation refuse a cache written by an earlier version (:func:`read_cache_meta`).

The network grid <-> CT grid pair lives here; evaluation, prediction and the figures import it:
orientation (``to_network_orientation`` / ``from_network_orientation``, exact), the body crop
(``body_box`` / ``crop_to_box``; its settings and box read back by ``crop_settings_of`` /
``crop_box_of``) and in-plane size (``resize_ct_slices`` / ``probabilities_to_ct_labels``, which
also pastes the box back into the full grid). A cache without the orientation record (written by
an earlier version) is redone without ``--overwrite`` and refused by the readers.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

import organs
from convert_dicom_to_nifti import MAX_AXIAL_ANGLE_DEG
from extract_multi_organ_masks import read_mask_record
from pipeline_io import (
    DEFAULT_DATA_ROOT,
    DONE,
    PROCESSED_FORMAT,
    SKIPPED,
    DataLayout,
    PatientError,
    PatientResult,
    add_common_arguments,
    atomic_output,
    check_same_geometry,
    exit_status,
    file_sha256,
    fingerprint,
    list_patients,
    read_nifti,
    remove_stale_partials,
    run_batch,
    setup_logging,
    summary_line,
    write_nifti,
    write_text_atomic,
)

log = logging.getLogger(__name__)

DEFAULT_WINDOW: tuple[float, float] = (-1000, 400)
DEFAULT_SIZE = 256
SIZE_MULTIPLE = 16  # the U-Net halves the slice four times
MIN_SIZE = 32

NORMALIZATION_JSON = "normalization.json"
CACHE_CT = "ct.npy"
CACHE_MASK = "mask.npy"
CACHE_META = "meta.json"
CACHE_CT_DTYPE = np.float16  # z-scored values lie in about [-2, 4]: float16 keeps ~1e-3 precision
CACHE_MASK_DTYPE = np.uint8

_SLICES_PER_CHUNK = 32  # bounds the float32 working memory of the resize

#: ``--crop-body``: the in-plane box of the body (the largest 3D connected component above
#: ``threshold_hu``), widened by ``margin_mm`` and made square. Off by default.
CROP_METHOD = "body"
DEFAULT_CROP_THRESHOLD_HU = -500  # between lung (about -850 HU) and soft tissue: the body wall
DEFAULT_CROP_MARGIN_MM = 10
AIR_HU = -1000  # what a box reaching beyond the image is padded with (before the window)


# --------------------------------------------------------------------------------------------
# Argument checks (shared by run() and the command line)
# --------------------------------------------------------------------------------------------
def check_window(window: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` HU with ``low < high``; ``ValueError`` naming the values otherwise."""
    if len(window) != 2:
        raise ValueError(f"window must be two HU values (LOW HIGH), got {list(window)}")
    low, high = (_plain_number(v) for v in window)
    if not np.isfinite([low, high]).all() or not low < high:
        raise ValueError(f"window LOW must be below HIGH (HU), got LOW={low} HIGH={high}")
    return low, high


def check_size(size: int) -> int:
    """A slice size that is a multiple of 16 and at least 32; ``ValueError`` otherwise."""
    if isinstance(size, bool) or int(size) != size or size < MIN_SIZE or size % SIZE_MULTIPLE:
        raise ValueError(
            f"size must be a multiple of {SIZE_MULTIPLE} and >= {MIN_SIZE} (e.g. 256), got {size}"
        )
    return int(size)


def _plain_number(value: float) -> float:
    """-1000.0 -> -1000 so JSON records read like the command line."""
    value = float(value)
    return int(value) if value.is_integer() else value


# --------------------------------------------------------------------------------------------
# Intensities
# --------------------------------------------------------------------------------------------
def window_and_zscore(
    hu: np.ndarray, window: Sequence[float] = DEFAULT_WINDOW
) -> tuple[np.ndarray, float, float]:
    """Clip HU to ``window`` and z-score with the windowed volume's own mean and std.

    Args:
        hu: CT in Hounsfield units, any shape and numeric dtype (normally int16 (Z, Y, X)).
        window: ``(low, high)`` HU.

    Returns:
        ``(normalized float32 same shape, mean HU, std HU)``; mean and std are of the clipped
        volume (population std, ddof=0), computed in float64.

    Raises:
        ValueError: for an empty volume or one that is constant inside the window (std 0).
    """
    low, high = check_window(window)
    if hu.size == 0:
        raise ValueError("cannot z-score an empty volume")
    clipped = _clip(hu, low, high)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if not std > 0:
        raise ValueError(
            f"the windowed volume is constant ({mean} HU in window [{low}, {high}]): cannot z-score"
        )
    return _zscore_clipped(clipped, mean, std), mean, std


def apply_zscore(
    hu: np.ndarray, window: Sequence[float], mean: float, std: float
) -> np.ndarray:
    """Clip HU to ``window`` and z-score with a recorded ``mean`` and ``std`` (HU) -> float32.

    Use the values from ``normalization.json`` / ``meta.json`` so that evaluation and prediction
    preprocess exactly as phase 3 did.
    """
    low, high = check_window(window)
    if not std > 0:
        raise ValueError(f"std must be > 0 HU, got {std}")
    return _zscore_clipped(_clip(hu, low, high), mean, std)


def _clip(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """A float32 copy of ``hu`` clipped to [low, high] (one volume-sized array, no more)."""
    clipped = np.array(hu, dtype=np.float32)
    return np.clip(clipped, low, high, out=clipped)


def _zscore_clipped(clipped: np.ndarray, mean: float, std: float) -> np.ndarray:
    """In place on ``clipped`` (a float32 array we own)."""
    clipped -= np.float32(mean)
    clipped /= np.float32(std)
    return clipped


# --------------------------------------------------------------------------------------------
# Body crop (in plane, on the network-orientation grid, before the resize)
# --------------------------------------------------------------------------------------------
def crop_settings(margin_mm: float = DEFAULT_CROP_MARGIN_MM,
                  threshold_hu: float = DEFAULT_CROP_THRESHOLD_HU) -> dict[str, Any]:
    """The record of a body crop: ``{"method": "body", "threshold_hu": -500, "margin_mm": 10}``.

    Phase 3 writes it (with the patient's ``box_yx``) into ``meta.json`` and ``normalization.json``,
    training copies it (without the box) into the checkpoint's ``preprocessing``. ``ValueError``
    for a negative or non-finite margin (mm) or a non-finite threshold (HU).
    """
    margin, threshold = float(margin_mm), float(threshold_hu)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"crop margin must be a finite number >= 0 mm, got {margin_mm!r}")
    if not math.isfinite(threshold):
        raise ValueError(f"crop threshold must be a finite HU value, got {threshold_hu!r}")
    return {"method": CROP_METHOD, "threshold_hu": _plain_number(threshold), "margin_mm": _plain_number(margin)}


def crop_settings_of(record: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """The crop settings (method, threshold, margin; no box) of a phase-3 record (``meta.json``,
    ``normalization.json``) or of a checkpoint's ``preprocessing``; None when it crops nothing
    (``"crop": null``, or a record written before the option). ``ValueError`` naming ``where``
    for another method or invalid values."""
    crop = record.get("crop")
    if crop is None:
        return None
    if not isinstance(crop, Mapping) or crop.get("method") != CROP_METHOD:
        raise ValueError(f"{where}: unknown crop {crop!r}; this version knows "
                         f"{{'method': '{CROP_METHOD}', ...}} or none")
    try:
        return crop_settings(crop["margin_mm"], crop["threshold_hu"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: invalid crop {dict(crop)}: {exc}") from None


def crop_box_of(record: Mapping[str, Any], where: str) -> tuple[int, int, int] | None:
    """The patient's crop box ``(y0, x0, side)`` (pixels of the network-orientation grid) from a
    phase-3 record; None when phase 3 did not crop. ``ValueError`` naming ``where`` if invalid."""
    if crop_settings_of(record, where) is None:
        return None
    box = record["crop"].get("box_yx")
    if (not isinstance(box, (list, tuple)) or len(box) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) for v in box) or box[2] < 1):
        raise ValueError(f"{where}: crop box_yx must be three integers [y0, x0, side >= 1], got {box!r}; "
                         "re-run normalize_ct_and_masks.py --overwrite")
    return int(box[0]), int(box[1]), int(box[2])


def describe_crop(crop: Mapping[str, Any] | None) -> str:
    """``body crop (> -500 HU, margin 10 mm)`` or ``no crop``, for messages."""
    if crop is None:
        return "no crop"
    return f"body crop (> {crop['threshold_hu']} HU, margin {crop['margin_mm']} mm)"


def crop_arguments(crop: Mapping[str, Any] | None) -> str:
    """The phase 3 options that give ``crop``: ``--crop-body --crop-margin-mm 10`` or ``without --crop-body``."""
    return "without --crop-body" if crop is None else f"--crop-body --crop-margin-mm {crop['margin_mm']}"


def body_box(
    hu_zyx: np.ndarray, spacing_yx: Sequence[float], threshold_hu: float = DEFAULT_CROP_THRESHOLD_HU,
    margin_mm: float = DEFAULT_CROP_MARGIN_MM,
) -> tuple[int, int, int]:
    """The square in-plane box ``(y0, x0, side)`` (pixels) around the body of a CT.

    Args:
        hu_zyx: CT in HU (Z, Y, X), in the network's orientation (the box is on that grid).
        spacing_yx: pixel spacing (mm) along y (rows) and x (columns).
        threshold_hu: voxels above it are body candidates; the body is the largest 3D connected
            component of them (6-connectivity), so the couch and stray bright voxels are left out.
        margin_mm: added on every side, ``ceil(margin_mm / spacing)`` pixels per axis, and cut
            at the image border.

    Returns:
        The box covers rows ``y0 .. y0 + side - 1`` and columns ``x0 .. x0 + side - 1``. It is
        square (the longer side of the body box wins; the other is widened equally on both
        sides, the extra pixel after), so a resize to S x S keeps the pixel aspect. Along an axis
        where the square fits in the image it is shifted inside (``0 <= y0 <= Y - side``); where
        it does not (a non-square image), it covers the whole axis and reaches beyond it
        (``Y - side <= y0 <= 0``): :func:`crop_to_box` pads it with air.

    Raises:
        ValueError: no voxel above ``threshold_hu`` (no body), or a bad volume or spacing.
    """
    hu = np.asarray(hu_zyx)
    if hu.ndim != 3 or hu.size == 0:
        raise ValueError(f"expected a non-empty (Z, Y, X) CT, got shape {hu.shape}")
    spacing = [float(v) for v in spacing_yx]
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"spacing_yx must be two positive mm values, got {tuple(spacing_yx)}")
    settings = crop_settings(margin_mm, threshold_hu)
    components, count = ndimage.label(hu > settings["threshold_hu"])
    if count == 0:
        raise ValueError(f"no voxel above {settings['threshold_hu']} HU (max {hu.max()} HU): no body to crop to")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    _, rows, cols = ndimage.find_objects(components, max_label=int(np.argmax(sizes)))[-1]
    del components
    shape = hu.shape[1:]
    lows, highs = [], []
    for axis, extent in enumerate((rows, cols)):
        pad = math.ceil(settings["margin_mm"] / spacing[axis])
        lows.append(max(extent.start - pad, 0))
        highs.append(min(extent.stop + pad, shape[axis]))
    side = max(high - low for low, high in zip(lows, highs))
    starts = []
    for low, high, n in zip(lows, highs, shape):
        start = low - (side - (high - low)) // 2
        starts.append(int(np.clip(start, min(0, n - side), max(0, n - side))))
    return starts[0], starts[1], int(side)


def _box_overlap(box_yx: Sequence[int], shape_yx: Sequence[int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(image slices, box slices) of the part of the box ``(y0, x0, side)`` inside an image of
    in-plane shape ``shape_yx``; ``ValueError`` when they do not overlap."""
    y0, x0, side = (int(v) for v in box_yx)
    image, box = [], []
    for start, n in ((y0, shape_yx[0]), (x0, shape_yx[1])):
        low, high = max(start, 0), min(start + side, int(n))
        if side < 1 or low >= high:
            raise ValueError(f"crop box {tuple(box_yx)} (y0, x0, side) does not overlap a {tuple(shape_yx)} image")
        image.append(slice(low, high))
        box.append(slice(low - start, high - start))
    return (image[0], image[1]), (box[0], box[1])


def crop_to_box(volume_zyx: np.ndarray, box_yx: Sequence[int], fill: float = 0) -> np.ndarray:
    """The box ``(y0, x0, side)`` of every slice of a (Z, Y, X) volume -> (Z, side, side), same dtype.

    Pixels of the box outside the image get ``fill`` (air for a CT, 0 = background for labels).
    A view of ``volume_zyx`` when the box lies inside the image, a new array otherwise. No
    interpolation: labels keep their values.
    """
    volume = np.asarray(volume_zyx)
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
    (image_y, image_x), (box_y, box_x) = _box_overlap(box_yx, volume.shape[1:])
    side = int(box_yx[2])
    if (box_y.stop - box_y.start, box_x.stop - box_x.start) == (side, side):
        return volume[:, image_y, image_x]
    out = np.full((volume.shape[0], side, side), fill, dtype=volume.dtype)
    out[:, box_y, box_x] = volume[:, image_y, image_x]
    return out


# --------------------------------------------------------------------------------------------
# In-plane resizing (z is never touched)
# --------------------------------------------------------------------------------------------
def resize_ct_slices(volume_zyx: np.ndarray, size: int) -> np.ndarray:
    """Resize every axial slice of ``volume_zyx`` (Z, Y, X) to (size, size) -> float32 (Z, S, S).

    Bilinear with pixel centres aligned (``align_corners=False``); when shrinking, the
    interpolation kernel is a tent widened by the shrink factor (anti-aliasing, as PIL's
    bilinear resize), so every input pixel contributes. A 2x shrink of the row 0, 1, 2, 3 gives
    5/7, 16/7. The same slice count comes back. About 10x faster than
    ``skimage.transform.resize(order=1, anti_aliasing=True)`` on a 512x512 CT.
    """
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    volume = np.asarray(volume_zyx)
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
    return _bilinear_resize(volume.astype(np.float32, copy=False), (int(size), int(size)))


def _bilinear_resize(stack: np.ndarray, out_shape_yx: tuple[int, int]) -> np.ndarray:
    """(N, ..., Y, X) float32 -> (N, ..., H, W) float32, anti-aliased; chunked over N."""
    lead, yx = stack.shape[:-2], stack.shape[-2:]
    if tuple(yx) == tuple(out_shape_yx):
        return np.array(stack, dtype=np.float32)
    flat = np.ascontiguousarray(stack, dtype=np.float32).reshape(-1, 1, *yx)
    out = np.empty((flat.shape[0], *out_shape_yx), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, flat.shape[0], _SLICES_PER_CHUNK):
            chunk = torch.from_numpy(flat[start:start + _SLICES_PER_CHUNK])
            out[start:start + len(chunk)] = F.interpolate(
                chunk, size=out_shape_yx, mode="bilinear", align_corners=False, antialias=True
            )[:, 0].numpy()
    return out.reshape(*lead, *out_shape_yx)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel, pixel centres aligned: floor((i + 0.5) * n_in / n_out)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def resize_labels_to_shape(labels_zyx: np.ndarray, out_shape_yx: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour in-plane resize of a label stack (Z, Y, X) -> uint8 (Z, H, W).

    Pixel centres are aligned, as in :func:`resize_ct_slices`, so it inverts the phase 3 resize:
    ``resize_labels_to_shape(labels_256, original_shape_zyx[1:])`` puts a prediction back on the
    original grid. Every output value is a value of the input (no new label can appear).
    """
    labels = np.asarray(labels_zyx)
    if labels.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label volume, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels must be in 0-255, got {labels.min()}..{labels.max()}")
    height, width = (int(n) for n in out_shape_yx)
    rows = _nearest_indices(labels.shape[1], height)
    cols = _nearest_indices(labels.shape[2], width)
    return np.ascontiguousarray(labels[:, rows[:, None], cols[None, :]], dtype=np.uint8)


def resize_mask_slices(mask_zyx: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of every slice of a label map (Z, Y, X) -> uint8 (Z, S, S)."""
    return resize_labels_to_shape(mask_zyx, (size, size))


def probabilities_to_ct_labels(
    probabilities: np.ndarray | torch.Tensor, output_shape_yx: Sequence[int], batch_size: int | None = None,
    box_yx: Sequence[int] | None = None,
) -> np.ndarray:
    """(B, C, S, S) class probabilities -> (B, H, W) uint8 labels on the CT's in-plane grid H x W.

    The inverse of :func:`resize_ct_slices` (the network grid -> CT grid half of the pair) used by
    evaluation, prediction and the figures. ``probabilities`` are softmax outputs (take the
    softmax first: resizing logits gives other labels), a torch tensor on any device (resized
    there) or a numpy array; B is slices (z), C classes. Resized bilinearly with pixel centres
    aligned (``align_corners=False``), anti-aliased when shrinking either axis (when enlarging,
    anti-aliasing changes the probabilities only by float rounding, ~1e-7, and costs 1.7x), then
    arg-maxed over C (first class wins a tie). Identity when H x W is S x S. Exact inverse of the phase 3 nearest-neighbour
    shrink of the labels when H x W is 2S x 2S (512 -> 256, the usual case): every pixel of a
    2x2 block takes 9/16 of its weight from its own block; for larger factors the outer corners
    of the blocks are rounded off. ``batch_size`` slices at a time (None: all) bound the memory.

    ``box_yx`` ``(y0, x0, side)``: phase 3 cropped the slices to this box of the H x W grid
    (``--crop-body``, :func:`body_box`, recorded in ``meta.json``) before the resize: the
    probabilities go back to side x side as above, the labels are pasted at the box, and every
    pixel outside it is background (0); the part of the box beyond the image is dropped. None
    (no crop): the whole S x S goes to H x W, as before the option existed.
    """
    if not isinstance(probabilities, torch.Tensor):
        probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"expected (B, C, S, S) class probabilities, got shape {tuple(probabilities.shape)}")
    if len(output_shape_yx) != 2 or any(isinstance(n, bool) or int(n) != n or n < 1 for n in output_shape_yx):
        raise ValueError(f"output_shape_yx must be two positive integers (H, W), got {tuple(output_shape_yx)}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    shape = (int(output_shape_yx[0]), int(output_shape_yx[1]))
    if box_yx is not None:
        (image_y, image_x), (box_y, box_x) = _box_overlap(box_yx, shape)
        target = (int(box_yx[2]), int(box_yx[2]))
    else:
        target = shape
    in_shape = tuple(int(n) for n in probabilities.shape[-2:])
    shrinking = target[0] < in_shape[0] or target[1] < in_shape[1]
    n_slices = int(probabilities.shape[0])
    step = int(batch_size) if batch_size is not None else max(n_slices, 1)
    labels = (np.empty if box_yx is None else np.zeros)((n_slices, *shape), dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, n_slices, step):
            chunk = probabilities[start:start + step]
            if isinstance(chunk, torch.Tensor):
                chunk = chunk.float()
            else:  # a copy: float32, writable (memory maps are read-only)
                chunk = torch.from_numpy(np.array(chunk, dtype=np.float32))
            if in_shape != target:
                chunk = F.interpolate(chunk, size=target, mode="bilinear", align_corners=False, antialias=shrinking)
            # max(dim).indices: the argmax, 6x faster than argmax(dim) over the class axis on a CPU
            chunk_labels = chunk.max(dim=1).indices.to(torch.uint8).cpu().numpy()
            if box_yx is None:
                labels[start:start + len(chunk)] = chunk_labels
            else:
                labels[start:start + len(chunk), image_y, image_x] = chunk_labels[:, box_y, box_x]
    return labels


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def resized_geometry(
    image: sitk.Image, size: int, box_yx: Sequence[int] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(spacing, origin, direction)`` (SimpleITK, x-y-z, LPS mm) of ``image`` resized in-plane.

    The physical extent of the image (from the outer corner of the first voxel to the outer
    corner of the last) is kept: in-plane spacing becomes ``spacing * old_size / size`` and the
    origin (centre of the first voxel) moves by half the change of spacing along the image axes.
    z spacing, z origin and the direction are unchanged.

    ``box_yx`` ``(y0, x0, side)`` (pixels of ``image``, :func:`body_box`): the extent is that of
    the box instead, a side x side image whose first voxel is voxel (x0, y0) of ``image`` (a
    negative y0 or x0 lies outside it): spacing ``spacing * side / size``.
    """
    old_size = np.array(image.GetSize(), dtype=np.float64)
    old_spacing = np.array(image.GetSpacing(), dtype=np.float64)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    old_origin = np.array(image.GetOrigin(), dtype=np.float64)
    if box_yx is not None:
        y0, x0, side = (int(v) for v in box_yx)
        old_origin = old_origin + direction @ (np.array([x0, y0, 0.0]) * old_spacing)
        old_size[:2] = side
    new_spacing = old_spacing.copy()
    new_spacing[:2] = old_spacing[:2] * old_size[:2] / size
    shift = np.zeros(3)
    shift[:2] = (new_spacing[:2] - old_spacing[:2]) / 2.0
    new_origin = old_origin + direction @ shift
    return tuple(new_spacing.tolist()), tuple(new_origin.tolist()), image.GetDirection()


def image_on_resized_grid(array_zyx: np.ndarray, source: sitk.Image,
                          box_yx: Sequence[int] | None = None) -> sitk.Image:
    """A SimpleITK image of ``array_zyx`` (Z, S, S) carrying ``source``'s geometry (cropped to
    ``box_yx`` when given, :func:`resized_geometry`) resized to S."""
    if array_zyx.shape[0] != source.GetSize()[2] or array_zyx.shape[1] != array_zyx.shape[2]:
        raise ValueError(
            f"array of shape {array_zyx.shape} does not fit a {source.GetSize()[2]}-slice source"
        )
    spacing, origin, direction = resized_geometry(source, array_zyx.shape[1], box_yx)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


# --------------------------------------------------------------------------------------------
# Orientation: one voxel order for the network (axis permutations and flips only, exact)
# --------------------------------------------------------------------------------------------
#: The voxel order the network sees, as the SimpleITK/DICOM orientation code of the image axes
#: (columns, rows, slices): head-first supine axial, columns towards the patient's left (patient
#: right on image left), rows towards posterior (anterior up), slices towards the head. The
#: training data are in it; a volume stored otherwise (feet first, prone, RAS NIfTI) is brought
#: to it by :func:`to_network_orientation` and its labels go back by :func:`from_network_orientation`.
NETWORK_ORIENTATION = "LPS"
#: Largest angle between an image axis and the patient axis it is mapped onto: phase 2's limit
#: for an axial series. A volume beyond it is oblique: no permutation of axes makes it LPS.
MAX_AXIS_ANGLE_DEG = MAX_AXIAL_ANGLE_DEG
_AXIS_LETTERS = ("LR", "PA", "SI")  # the letter of each patient axis (x, y, z of LPS), + then -


def orientation_code(image: sitk.Image) -> str:
    """The orientation code of ``image``'s axes (columns, rows, slices), e.g. ``LPS``, ``RPI``.

    Each letter says towards which side of the patient the index of that axis increases
    (``L``/``R``, ``P``/``A``, ``S``/``I``), as ``sitk.DICOMOrientImageFilter`` writes it.

    Raises:
        ValueError: for an oblique image: an axis more than :data:`MAX_AXIS_ANGLE_DEG` degrees
            from every patient axis (the message gives the direction and what to do).
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    code = ""
    for axis in range(3):
        column = direction[:, axis] / np.linalg.norm(direction[:, axis])
        nearest = int(np.argmax(np.abs(column)))
        angle = math.degrees(math.acos(min(1.0, abs(column[nearest]))))
        if angle > MAX_AXIS_ANGLE_DEG or _AXIS_LETTERS[nearest][0] in code or _AXIS_LETTERS[nearest][1] in code:
            raise ValueError(
                f"oblique image: axis {'xyz'[axis]} points along {(np.round(column, 4) + 0.0).tolist()} (LPS), "
                f"{angle:.1f} deg from the nearest patient axis (at most {MAX_AXIS_ANGLE_DEG:g} deg); direction "
                f"{(np.round(direction.ravel(), 4) + 0.0).tolist()}: it cannot be brought to "
                f"{NETWORK_ORIENTATION} by permuting and flipping axes; resample it to an axial grid first"
            )
        code += _AXIS_LETTERS[nearest][0 if column[nearest] > 0 else 1]
    return code


def _orientation_axes(stored_code: str) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """(numpy transpose axes, array axes to flip afterwards) taking a (Z, Y, X) array stored in
    ``stored_code`` to :data:`NETWORK_ORIENTATION`."""
    code = str(stored_code).upper()
    pairs = [next((k for k, pair in enumerate(_AXIS_LETTERS) if letter in pair), None) for letter in code]
    if len(code) != 3 or sorted(p for p in pairs if p is not None) != [0, 1, 2]:
        raise ValueError(f"orientation code must be three letters, one of each of L/R, P/A, S/I "
                         f"(e.g. LPS, RAI), got {stored_code!r}")
    source = {}  # network image axis -> (stored image axis, flipped)
    for stored_axis, (letter, pair) in enumerate(zip(code, pairs)):
        network_axis = next(k for k, n in enumerate(NETWORK_ORIENTATION) if n in _AXIS_LETTERS[pair])
        source[network_axis] = (stored_axis, letter != NETWORK_ORIENTATION[network_axis])
    # array axis a holds image axis 2 - a
    axes = tuple(2 - source[2 - a][0] for a in range(3))
    flips = tuple(a for a in range(3) if source[2 - a][1])
    return axes, flips  # type: ignore[return-value]


def to_network_orientation(image: sitk.Image) -> tuple[sitk.Image, str]:
    """``(image in NETWORK_ORIENTATION, the orientation code it was stored in)``.

    Exact: the voxels are only permuted (``sitk.DICOMOrient``: axis permutations and flips, no
    resampling) and the geometry follows them, so every voxel keeps its patient position. Phase 3
    (cache and normalized NIfTIs), evaluation and prediction call it before the network; the
    labels go back with :func:`from_network_orientation`. An image already in LPS comes back as is.

    Raises:
        ValueError: for an oblique image (:func:`orientation_code`).
    """
    stored = orientation_code(image)
    if stored == NETWORK_ORIENTATION:
        return image, stored
    return sitk.DICOMOrient(image, NETWORK_ORIENTATION), stored


def to_network_array(array_zyx: np.ndarray, stored_code: str) -> np.ndarray:
    """A (Z, Y, X) array of an image stored in ``stored_code`` in network order (a view).

    The array half of :func:`to_network_orientation` (same voxels, same order), for data already
    read as arrays; ``from_network_orientation(to_network_array(a, code), code)`` is ``a``.
    """
    array = np.asarray(array_zyx)
    if array.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) array, got shape {array.shape}")
    axes, flips = _orientation_axes(stored_code)
    return np.flip(np.transpose(array, axes), flips) if flips else np.transpose(array, axes)


def from_network_orientation(array_zyx: np.ndarray, stored_code: str) -> np.ndarray:
    """A (Z, Y, X) array in network order (e.g. predicted labels, any dtype) -> the array order of
    the image stored in ``stored_code`` (C-contiguous copy): the inverse of
    :func:`to_network_orientation`, exact (flips and a transpose, no interpolation)."""
    array = np.asarray(array_zyx)
    if array.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) array, got shape {array.shape}")
    axes, flips = _orientation_axes(stored_code)
    if flips:
        array = np.flip(array, flips)
    return np.ascontiguousarray(np.transpose(array, np.argsort(axes)))


def network_shape_zyx(shape_zyx: Sequence[int], stored_code: str) -> tuple[int, int, int]:
    """The (Z, Y, X) shape of a volume of shape ``shape_zyx`` stored in ``stored_code`` once in
    network order (the in-plane axes swap for a stored code such as ``PLS``)."""
    axes, _ = _orientation_axes(stored_code)
    return tuple(int(shape_zyx[a]) for a in axes)  # type: ignore[return-value]


def stored_orientation_of(record: dict[str, Any], where: str) -> str:
    """The stored orientation code from a phase-3 record (``meta.json`` or ``normalization.json``).

    Raises ``ValueError`` naming ``where`` and the phase to re-run when the record has no
    orientation (written by an earlier version: its arrays may be mirrored) or another network
    orientation."""
    orientation = record.get("orientation")
    if not isinstance(orientation, dict) or orientation.get("network") != NETWORK_ORIENTATION:
        raise ValueError(
            f"{where} was written by an earlier version of this pipeline (orientation "
            f"{orientation!r}, this version brings every volume to {{'network': '{NETWORK_ORIENTATION}'}} "
            "before the network); re-run normalize_ct_and_masks.py --overwrite"
        )
    stored = str(orientation.get("stored"))
    _orientation_axes(stored)
    return stored


# --------------------------------------------------------------------------------------------
# Training cache
# --------------------------------------------------------------------------------------------
def cache_dir(data_root: Path | str, patient_id: str) -> Path:
    """``<data_root>/processed/training_cache/<patient_id>``."""
    return DataLayout(Path(data_root)).training_cache / patient_id


def read_cache_meta(data_root: Path | str, patient_id: str) -> dict[str, Any]:
    """The ``meta.json`` of a patient's training cache.

    Raises ``FileNotFoundError`` (run phase 3) when it is missing and ``ValueError`` when it was
    written by an earlier version (format 1 painted a synthetic PTV into the label map, so its
    annotated flags and masks would teach the PTV as a label; a cache without an ``orientation``
    record kept each series' stored voxel order, so a feet-first or prone patient reached the
    network mirrored): the message names the phases to re-run.
    """
    path = cache_dir(data_root, patient_id) / CACHE_META
    if not path.is_file():
        raise FileNotFoundError(
            f"{patient_id}: no training cache ({path} is missing); run normalize_ct_and_masks.py"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != PROCESSED_FORMAT:
        raise ValueError(
            f"{patient_id}: {path} was written by an earlier version of this pipeline (format "
            f"{meta.get('format', 1)}, this version reads {PROCESSED_FORMAT}: the PTV was painted into the "
            "label map); re-run extract_multi_organ_masks.py --overwrite, then normalize_ct_and_masks.py "
            "--overwrite"
        )
    stored_orientation_of(meta, f"{patient_id}: {path}")
    return meta


def slice_label_bits(mask_zyx: np.ndarray) -> list[int]:
    """Per slice, an integer whose bit k is set when label k occurs on that slice (labels 0-7).

    Stored in ``meta.json`` as ``slice_labels`` so the dataset can find the tumour slices
    without reading any mask.
    """
    bits = np.zeros(mask_zyx.shape[0], dtype=np.int64)
    for label in range(organs.NUM_CLASSES):
        present = (mask_zyx == label).any(axis=(1, 2))
        bits |= present.astype(np.int64) << label
    return bits.tolist()


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _write_json(data: dict[str, Any], path: Path) -> None:
    """One top-level key per line, each value compact: readable, and diffs stay small."""
    lines = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in data.items())
    write_text_atomic(path, "{\n" + lines + "\n}\n")


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------
def _outputs(layout: DataLayout, patient_id: str) -> dict[str, Path]:
    cache = layout.training_cache / patient_id
    return {
        "ct_nifti": layout.normalized_ct / f"{patient_id}.nii.gz",
        "mask_nifti": layout.normalized_masks / f"{patient_id}.nii.gz",
        "ct_npy": cache / CACHE_CT,
        "mask_npy": cache / CACHE_MASK,
        "meta": cache / CACHE_META,  # written last: its presence means the patient is complete
    }


def _normalization_record(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("window", "mean", "std", "size", "crop", "orientation", "original_shape_zyx", "original_spacing_xyz",
            "original_origin_xyz", "original_direction")
    return {k: meta.get(k) for k in keys}  # "crop" None: no crop (or a cache written before the option)


def _inputs_fingerprint(ct_path: Path, mask_path: Path, record: dict[str, Any]) -> str:
    """What phase 3 reads for a patient: the CT and label-map bytes and phase 2.5's decisions."""
    return fingerprint({"format": PROCESSED_FORMAT, "ct_nifti": file_sha256(ct_path),
                        "mask": file_sha256(mask_path), "annotated": record.get("annotated"),
                        "ptv": record.get("ptv")})


def _skip_or_why(out: dict[str, Path], fingerprint_now: str, window: tuple[float, float],
                 size: int, patient_id: str, crop: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str]:
    """(meta of up-to-date outputs, or None and why they are redone) when all outputs exist."""
    meta = json.loads(out["meta"].read_text(encoding="utf-8"))
    if meta.get("format") != PROCESSED_FORMAT:
        return None, "redone: its training cache was written by an earlier version"
    if not isinstance(meta.get("orientation"), dict):
        return None, "redone: its training cache was written by an earlier version (no orientation record)"
    if meta.get("inputs_fingerprint") != fingerprint_now:
        return None, "redone: its CT, label map or phase 2.5 record changed since it was normalised"
    wanted = {"window": [_plain_number(v) for v in window], "size": size}
    if any(meta.get(key) != value for key, value in wanted.items()):
        raise PatientError(  # a cohort must never mix two preprocessings
            f"{patient_id}: outputs exist with window {meta.get('window')} and size "
            f"{meta.get('size')}, this run asks for window {wanted['window']} and size "
            f"{size}; pass --overwrite to redo them"
        )
    try:
        existing_crop = crop_settings_of(meta, f"{patient_id}: {out['meta']}")
    except ValueError as exc:
        return None, f"redone: {exc}"
    if existing_crop != crop:
        raise PatientError(
            f"{patient_id}: outputs exist with {describe_crop(existing_crop)}, this run asks for "
            f"{describe_crop(crop)}; pass --overwrite to redo them"
        )
    return meta, ""


def normalize_patient(
    patient_id: str,
    *,
    data_root: Path,
    window: tuple[float, float],
    size: int,
    overwrite: bool,
    torch_threads: int | None = None,
    crop: dict[str, Any] | None = None,
) -> PatientResult:
    """Phase 3 for one patient; returns its :class:`PatientResult` (``info["normalization"]``).

    ``crop`` (:func:`crop_settings`, None: off): after the z-score (statistics of the whole
    windowed volume), every slice is cropped to the body's square box (:func:`body_box` on the
    network-orientation HU; padding with air, labels with background) and then resized; the box
    is recorded as ``crop.box_yx`` and the normalized NIfTIs carry the box's geometry.

    The annotated flags and the PTV's making come from phase 2.5's record ``<PatientID>.json``.
    Without ``overwrite``, existing outputs are kept only when ``meta.json`` holds the fingerprint
    of the current inputs; otherwise the patient is redone and the message says why. Every input
    is checked before anything is written; ``meta.json`` is written last, so a patient is either
    complete or reprocessed by the next run.
    """
    if torch_threads:
        torch.set_num_threads(torch_threads)  # worker processes: one thread each, no oversubscription
    layout = DataLayout(Path(data_root))
    out = _outputs(layout, patient_id)
    ct_path = layout.ct_nifti / f"{patient_id}.nii.gz"
    mask_path = layout.masks / f"{patient_id}.nii.gz"
    if not ct_path.is_file():
        raise PatientError(f"{patient_id}: no CT NIfTI at {ct_path}; run convert_dicom_to_nifti.py")
    try:
        record = read_mask_record(mask_path)
    except (FileNotFoundError, ValueError) as exc:
        raise PatientError(f"{patient_id}: {exc}") from None
    annotated = record.get("annotated")
    if not isinstance(annotated, list) or len(annotated) != organs.NUM_CLASSES:
        raise PatientError(
            f"{patient_id}: {mask_path.name[:-7]}.json has annotated flags {annotated!r}, expected "
            f"{organs.NUM_CLASSES}; re-run extract_multi_organ_masks.py --overwrite for this patient"
        )
    fingerprint_now = _inputs_fingerprint(ct_path, mask_path, record)
    redo_reason = ""
    # A skipped patient writes nothing, so nothing else would clean what a killed run left here.
    for folder in {p.parent for p in out.values()}:
        remove_stale_partials(folder)
    if not overwrite and all(p.is_file() for p in out.values()):
        meta, redo_reason = _skip_or_why(out, fingerprint_now, window, size, patient_id, crop)
        if meta is not None:
            return PatientResult(patient_id, SKIPPED, "", {"normalization": _normalization_record(meta)})

    ct = read_nifti(ct_path)
    mask = read_nifti(mask_path)
    if ct.GetDimension() != 3:
        raise PatientError(f"{patient_id}: {ct_path} is {ct.GetDimension()}-D, expected a 3-D CT")
    check_same_geometry(ct, mask, f"{patient_id}: label map {mask_path} vs CT {ct_path}")
    try:
        ct_network, stored_orientation = to_network_orientation(ct)
    except ValueError as exc:
        raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
    mask_network, _ = to_network_orientation(mask)
    hu = sitk.GetArrayFromImage(ct_network)
    labels = sitk.GetArrayFromImage(mask_network)
    found = np.unique(labels)
    if found.min() < 0 or found.max() >= organs.NUM_CLASSES:
        raise PatientError(
            f"{patient_id}: {mask_path} holds label values {found.tolist()}, "
            f"expected 0-{organs.NUM_CLASSES - 1}"
        )
    box = crop_record = None
    if crop is not None:
        spacing_x, spacing_y = ct_network.GetSpacing()[:2]
        try:
            box = body_box(hu, (spacing_y, spacing_x), crop["threshold_hu"], crop["margin_mm"])
        except ValueError as exc:
            raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
        crop_record = {**crop, "box_yx": list(box)}
    try:
        normalized, mean, std = window_and_zscore(hu, window)
    except ValueError as exc:
        raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
    del hu
    if box is not None:  # statistics above are of the whole volume; the crop comes after them
        air = float(apply_zscore(np.array([AIR_HU]), window, mean, std)[0])
        normalized = crop_to_box(normalized, box, fill=air)
        labels_in = crop_to_box(labels, box, fill=organs.BACKGROUND)
    else:
        labels_in = labels
    ct_small = resize_ct_slices(normalized, size)
    del normalized
    mask_small = resize_mask_slices(labels_in, size)

    ct_image = image_on_resized_grid(ct_small, ct_network, box)
    mask_image = image_on_resized_grid(mask_small, ct_network, box)
    check_same_geometry(ct_image, mask_image, f"{patient_id}: normalized label map vs CT")
    meta = {
        "format": PROCESSED_FORMAT,
        "patient_id": patient_id,
        "shape_zyx": list(ct_small.shape),
        "annotated": [bool(a) for a in annotated],
        "ptv": record.get("ptv", {}),
        "inputs_fingerprint": fingerprint_now,
        "window": [_plain_number(v) for v in window],
        "mean": mean,
        "std": std,
        "size": size,
        "crop": crop_record,
        "orientation": {"stored": stored_orientation, "network": NETWORK_ORIENTATION},
        "original_shape_zyx": list(ct.GetSize()[::-1]),
        "original_spacing_xyz": list(ct.GetSpacing()),
        "original_origin_xyz": list(ct.GetOrigin()),
        "original_direction": list(ct.GetDirection()),
        "slice_labels": slice_label_bits(mask_small),
    }

    out["meta"].unlink(missing_ok=True)  # an interrupted overwrite must not look complete
    for folder in {p.parent for p in out.values()}:
        folder.mkdir(parents=True, exist_ok=True)
    write_nifti(ct_image, out["ct_nifti"])
    write_nifti(mask_image, out["mask_nifti"])
    _save_npy(ct_small.astype(CACHE_CT_DTYPE), out["ct_npy"])
    _save_npy(mask_small, out["mask_npy"])
    _write_json(meta, out["meta"])
    message = f"{labels.shape} -> {ct_small.shape}, mean {mean:.1f} HU, std {std:.1f} HU"
    if box is not None:
        message += f", body box (y0, x0, side) {box}"
    if stored_orientation != NETWORK_ORIENTATION:
        message += f", stored {stored_orientation} -> {NETWORK_ORIENTATION}"
    if redo_reason:
        message = f"{redo_reason}; {message}"
    return PatientResult(patient_id, DONE, message, {"normalization": _normalization_record(meta)})


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------
def run(
    *,
    data_root: Path | str = DEFAULT_DATA_ROOT,
    patients: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    window: Sequence[float] = DEFAULT_WINDOW,
    size: int = DEFAULT_SIZE,
    crop_body: bool = False,
    crop_margin_mm: float = DEFAULT_CROP_MARGIN_MM,
) -> list[PatientResult]:
    """Normalize every patient of ``processed/ct_nifti`` (or ``patients``); update
    ``normalization.json`` with the records of the patients done or skipped.

    ``crop_body``: crop every slice to the body's square box widened by ``crop_margin_mm`` (mm)
    before the resize (:func:`body_box`); off by default."""
    window = check_window(window)
    size = check_size(size)
    crop = crop_settings(crop_margin_mm) if crop_body else None
    layout = DataLayout(Path(data_root))
    patient_ids = list(patients) if patients else list_patients(layout.ct_nifti)
    if not patient_ids:
        raise FileNotFoundError(f"no CT NIfTI (<PatientID>.nii.gz) in {layout.ct_nifti.resolve()}; "
                                "run convert_dicom_to_nifti.py first")
    task = functools.partial(
        normalize_patient, data_root=layout.root, window=window, size=size, overwrite=overwrite,
        torch_threads=1 if workers > 1 else None, crop=crop,
    )
    results = run_batch(patient_ids, task, workers=workers, desc="Phase 3 normalize",
                        patient_id_of=lambda pid: pid)
    _update_normalization_json(layout.normalized_ct / NORMALIZATION_JSON, results)
    return results


def _update_normalization_json(path: Path, results: Sequence[PatientResult]) -> None:
    records = {r.patient_id: r.info["normalization"] for r in results if "normalization" in r.info}
    if not records:
        return
    existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    existing.update(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(dict(sorted(existing.items())), path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _size_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    try:
        return check_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 3: window, z-score and resize CT and label maps; write the training cache."
    )
    add_common_arguments(parser)
    parser.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        default=list(DEFAULT_WINDOW),
                        help="HU window clipped before the z-score (default: %(default)s)")
    parser.add_argument("--size", type=_size_argument, default=DEFAULT_SIZE,
                        help="in-plane size of every slice, a multiple of 16 >= 32 "
                             "(default: %(default)s)")
    parser.add_argument("--crop-body", action="store_true",
                        help=f"crop every slice to the square box of the body (> {DEFAULT_CROP_THRESHOLD_HU} HU, "
                             "largest 3D component) before the resize: finer pixels; measured better on real "
                             "patients and recommended for them (README), off by default so earlier caches stay valid")
    parser.add_argument("--crop-margin-mm", type=float, default=None, metavar="MM",
                        help=f"margin around the body box with --crop-body (default: {DEFAULT_CROP_MARGIN_MM})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        window = check_window(args.window)
    except ValueError as exc:
        parser.error(f"argument --window: {exc}")
    margin = DEFAULT_CROP_MARGIN_MM if args.crop_margin_mm is None else args.crop_margin_mm
    if args.crop_margin_mm is not None and not args.crop_body:
        parser.error("argument --crop-margin-mm: only with --crop-body")
    try:
        crop_settings(margin)
    except ValueError as exc:
        parser.error(f"argument --crop-margin-mm: {exc}")
    setup_logging(args.verbose)
    try:
        results = run(data_root=args.data_root, patients=args.patients, workers=args.workers,
                      overwrite=args.overwrite, window=window, size=args.size, crop_body=args.crop_body,
                      crop_margin_mm=margin)
    except (ValueError, FileNotFoundError) as exc:  # FileNotFoundError: no patient at all
        log.error("%s", exc)
        return 1
    print(summary_line("Phase 3", results, done_word="normalized"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
