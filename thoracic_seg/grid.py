"""The network grid: how a CT volume reaches the network and how labels go back to the CT grid.

Window and per-patient z-score, orientation (every volume reaches the network head-first supine,
``LPS``, by exact flips and transposes), the optional crop (the body's box or a fixed field of view
centred on the body: :func:`box_for_crop`), the in-plane resize to S x S and its
inverse (:func:`probabilities_to_ct_labels`), and the slice context of 2.5D inputs. Phase 3,
training, evaluation and prediction all use these functions; numpy and torch only.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from thoracic_seg import organs
from scipy import ndimage


#: Largest angle between an image axis and the patient axis it is mapped onto (phase 2: the slice
#: normal and the head-foot axis of an axial series). Beyond it a volume is oblique: no permutation
#: of axes makes it LPS.
MAX_AXIAL_ANGLE_DEG = 10.0
DEFAULT_WINDOW: tuple[float, float] = (-1000, 400)
DEFAULT_SIZE = 256
SIZE_MULTIPLE = 16  # the U-Net halves the slice four times
MIN_SIZE = 32
CACHE_CT_DTYPE = np.float16  # z-scored values lie in about [-2, 4]: float16 keeps ~1e-3 precision
CACHE_MASK_DTYPE = np.uint8
_SLICES_PER_CHUNK = 32  # bounds the float32 working memory of the resize
#: ``--crop-body``: the in-plane box of the body (the largest 3D connected component above
#: ``threshold_hu``), widened by ``margin_mm`` and made square. Off by default.
CROP_METHOD = "body"
#: ``--crop-body --fov-mm MM``: a square field of view of MM mm centred on the body's centroid
#: (:func:`fov_box`), so every patient reaches the network at MM / S mm per pixel.
FOV_CROP_METHOD = "fov"
DEFAULT_CROP_THRESHOLD_HU = -500  # between lung (about -850 HU) and soft tissue: the body wall
DEFAULT_CROP_MARGIN_MM = 10
#: The largest field of view that lungs, heart, esophagus and cord needed around the body centroid on
#: the six real patients was 339 mm (benchmarks/bench_crop_fov.py): 380 leaves 20 mm a side to spare.
DEFAULT_FOV_MM = 380
AIR_HU = -1000  # what a box reaching beyond the image is padded with (before the window)


def check_window(window: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` HU with ``low < high``; ``ValueError`` naming the values otherwise."""
    if len(window) != 2:
        raise ValueError(f"window must be two HU values (LOW HIGH), got {list(window)}")
    low, high = (plain_number(v) for v in window)
    if not np.isfinite([low, high]).all() or not low < high:
        raise ValueError(f"window LOW must be below HIGH (HU), got LOW={low} HIGH={high}")
    return low, high


def check_size(size: int) -> int:
    """A slice size that is a multiple of 16 and at least 32; ``ValueError`` otherwise."""
    if isinstance(size, bool) or int(size) != size or size < MIN_SIZE or size % SIZE_MULTIPLE:
        raise ValueError(f"size must be a multiple of {SIZE_MULTIPLE} and >= {MIN_SIZE} (e.g. 256), got {size}")
    return int(size)


def plain_number(value: float) -> float:
    """-1000.0 -> -1000 so JSON records read like the command line."""
    value = float(value)
    return int(value) if value.is_integer() else value


def window_and_zscore(hu: np.ndarray, window: Sequence[float] = DEFAULT_WINDOW) -> tuple[np.ndarray, float, float]:
    """Clip ``hu`` (any shape and numeric dtype, normally int16 (Z, Y, X)) to ``window`` ``(low, high)`` HU
    and z-score with the windowed volume's own mean and std.

    Returns ``(normalized float32 same shape, mean HU, std HU)``: mean and population std (ddof=0) of
    the clipped volume, in float64. ``ValueError`` for an empty volume or a constant one (std 0).
    """
    low, high = check_window(window)
    if hu.size == 0:
        raise ValueError("cannot z-score an empty volume")
    clipped = _clip(hu, low, high)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    if not std > 0:
        raise ValueError(f"the windowed volume is constant ({mean} HU in window [{low}, {high}]): cannot z-score")
    return _zscore_clipped(clipped, mean, std), mean, std


def apply_zscore(hu: np.ndarray, window: Sequence[float], mean: float, std: float) -> np.ndarray:
    """Clip HU to ``window`` and z-score with a given ``mean`` and ``std`` (HU) -> float32.

    Phase 3 and ``inference.Predictor`` z-score the body crop's padding (air) with it, using the
    statistics :func:`window_and_zscore` returned for the whole volume.
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


def crop_settings(margin_mm: float = DEFAULT_CROP_MARGIN_MM,
                  threshold_hu: float = DEFAULT_CROP_THRESHOLD_HU, *, fov_mm: float | None = None) -> dict[str, Any]:
    """The record of a crop: ``{"method": "body", "threshold_hu": -500, "margin_mm": 10}`` (the body's
    box, :func:`body_box`), or with ``fov_mm`` ``{"method": "fov", "threshold_hu": -500, "fov_mm": 380}``
    (a field of view of ``fov_mm`` mm centred on the body, :func:`fov_box`; ``margin_mm`` is not used).

    Phase 3 writes it (with the patient's ``box_yx``) into ``meta.json`` and ``normalization.json``,
    training copies it (without the box) into the checkpoint's ``preprocessing``; :func:`box_for_crop`
    turns it into a CT's box. ``ValueError`` for a negative or non-finite margin (mm), a ``fov_mm`` that
    is not a finite number > 0 (mm) or a non-finite threshold (HU).
    """
    threshold = float(threshold_hu)
    if not math.isfinite(threshold):
        raise ValueError(f"crop threshold must be a finite HU value, got {threshold_hu!r}")
    if fov_mm is not None:
        fov = float(fov_mm)
        if not (math.isfinite(fov) and fov > 0):
            raise ValueError(f"fov_mm (the field of view) must be a finite number > 0 mm, got {fov_mm!r}")
        return {"method": FOV_CROP_METHOD, "threshold_hu": plain_number(threshold), "fov_mm": plain_number(fov)}
    margin = float(margin_mm)
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"crop margin must be a finite number >= 0 mm, got {margin_mm!r}")
    return {"method": CROP_METHOD, "threshold_hu": plain_number(threshold), "margin_mm": plain_number(margin)}


def crop_settings_of(record: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """The crop settings (:func:`crop_settings`; no box) of a phase-3 record (``meta.json``,
    ``normalization.json``) or of a checkpoint's ``preprocessing``; None when it crops nothing
    (``"crop": null``, or a record written before the option). A record without ``method: "fov"``
    is the body box, as before. ``ValueError`` naming ``where`` for another method or invalid values."""
    crop = record.get("crop")
    if crop is None:
        return None
    method = crop.get("method") if isinstance(crop, Mapping) else None
    if method not in (CROP_METHOD, FOV_CROP_METHOD):
        raise ValueError(f"{where}: unknown crop {crop!r}; this version knows "
                         f"{{'method': '{CROP_METHOD}', ...}}, {{'method': '{FOV_CROP_METHOD}', ...}} or none")
    try:
        if method == FOV_CROP_METHOD:
            if crop["fov_mm"] is None:
                raise TypeError("fov_mm is null")
            return crop_settings(threshold_hu=crop["threshold_hu"], fov_mm=crop["fov_mm"])
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
    """``body crop (> -500 HU, margin 10 mm)``, ``380 mm field of view on the body (> -500 HU)`` or
    ``no crop``, for messages."""
    if crop is None:
        return "no crop"
    if crop.get("method") == FOV_CROP_METHOD:
        return f"{crop['fov_mm']} mm field of view on the body (> {crop['threshold_hu']} HU)"
    return f"body crop (> {crop['threshold_hu']} HU, margin {crop['margin_mm']} mm)"


def box_for_crop(hu_zyx: np.ndarray, spacing_yx: Sequence[float], crop: Mapping[str, Any]) -> tuple[int, int, int]:
    """The box ``(y0, x0, side)`` that the crop settings ``crop`` (:func:`crop_settings`) give a CT
    ``hu_zyx`` (Z, Y, X) HU in the network's orientation, pixel spacing ``spacing_yx`` mm: :func:`body_box`
    or :func:`fov_box`. Phase 3 records it; ``inference.Predictor.crop_box`` recomputes it on a new CT.
    ``ValueError`` as those functions (no body, a bad volume, spacing or setting)."""
    if crop.get("method") == FOV_CROP_METHOD:
        return fov_box(hu_zyx, spacing_yx, crop["fov_mm"], crop["threshold_hu"])
    return body_box(hu_zyx, spacing_yx, crop["threshold_hu"], crop["margin_mm"])


def _check_ct(hu_zyx: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu_zyx)
    if hu.ndim != 3 or hu.size == 0:
        raise ValueError(f"expected a non-empty (Z, Y, X) CT, got shape {hu.shape}")
    return hu


def _check_spacing(spacing_yx: Sequence[float]) -> list[float]:
    spacing = [float(v) for v in spacing_yx]
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"spacing_yx must be two positive mm values, got {tuple(spacing_yx)}")
    return spacing


def _body_component(hu: np.ndarray, threshold_hu: float) -> tuple[np.ndarray, int]:
    """(labelled 6-connected components above ``threshold_hu``, the largest one's label)."""
    components, count = ndimage.label(hu > threshold_hu)
    if count == 0:
        raise ValueError(f"no voxel above {threshold_hu} HU (max {hu.max()} HU): no body to crop to")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components, int(np.argmax(sizes))


def body_box(
    hu_zyx: np.ndarray, spacing_yx: Sequence[float], threshold_hu: float = DEFAULT_CROP_THRESHOLD_HU,
    margin_mm: float = DEFAULT_CROP_MARGIN_MM,
) -> tuple[int, int, int]:
    """The square in-plane box ``(y0, x0, side)`` (pixels) around the body of a CT ``hu_zyx`` (Z, Y, X) HU,
    in the network's orientation; ``spacing_yx`` in mm (rows, columns).

    The body is the largest 3D 6-connected component above ``threshold_hu`` (the couch and stray bright
    voxels are left out when they do not touch the body), widened by ``ceil(margin_mm / spacing)`` pixels
    per side, cut at the border. The box (rows ``y0 .. y0 + side - 1``, columns ``x0 .. x0 + side - 1``) is
    square so a resize to S x S keeps the pixel aspect: the shorter side is widened equally on both sides,
    the extra pixel after. Where the square fits it is shifted inside (``0 <= y0 <= Y - side``); where it
    does not (a non-square image) it reaches beyond the axis (``Y - side <= y0 <= 0``): :func:`crop_to_box`
    pads air. ``ValueError``: no voxel above ``threshold_hu`` (no body), or a bad volume or spacing.
    """
    hu, spacing = _check_ct(hu_zyx), _check_spacing(spacing_yx)
    settings = crop_settings(margin_mm, threshold_hu)
    components, label = _body_component(hu, settings["threshold_hu"])
    _, rows, cols = ndimage.find_objects(components, max_label=label)[-1]
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


def body_centroid(hu_zyx: np.ndarray, threshold_hu: float = DEFAULT_CROP_THRESHOLD_HU) -> tuple[float, float]:
    """``(row, column)`` (pixels, float) of the in-plane centroid of the body of a CT ``hu_zyx`` (Z, Y, X)
    HU: the mean position of every voxel of the largest 3D 6-connected component above ``threshold_hu``,
    over all slices. The couch top and the arms often join that component (then :func:`body_box` hardly
    crops), but they are thin beside the trunk: on six real patients the centroid needed a smaller field
    of view than the body box's centre (benchmarks/bench_crop_fov.py). ``ValueError``: no body."""
    hu = _check_ct(hu_zyx)
    components, label = _body_component(hu, crop_settings(threshold_hu=threshold_hu)["threshold_hu"])
    body = components == label
    del components
    rows = body.sum(axis=(0, 2), dtype=np.int64)
    cols = body.sum(axis=(0, 1), dtype=np.int64)
    total = int(rows.sum())
    return (float(rows @ np.arange(len(rows), dtype=np.int64)) / total,
            float(cols @ np.arange(len(cols), dtype=np.int64)) / total)


def fov_box_at(centre_yx: Sequence[float], spacing_yx: Sequence[float], fov_mm: float) -> tuple[int, int, int]:
    """The square box ``(y0, x0, side)`` (pixels) of a ``fov_mm`` mm field of view centred on ``centre_yx``
    (row, column; pixels, pixel centres at integers) of a grid of pixel spacing ``spacing_yx`` mm.

    ``side = floor(fov_mm / spacing + 1/2)`` pixels, with the finer spacing where they differ (the box
    covers at least about ``fov_mm`` both ways), at least 1. The box's centre ``y0 + (side - 1) / 2``
    (a pixel centre for an odd side, half-way between two for an even one) is the one nearest
    ``centre_yx``, ties to the larger index: ``y0 = floor(cy - (side - 1) / 2 + 1/2)``. The box is not
    moved inside the image: where it leaves it, :func:`crop_to_box` pads air and
    :func:`probabilities_to_ct_labels` drops that part. At 0.977 mm and 380 mm: 389 pixels.
    ``ValueError`` for a bad spacing, ``fov_mm`` or centre.
    """
    spacing = _check_spacing(spacing_yx)
    fov = crop_settings(fov_mm=fov_mm)["fov_mm"]
    centre = [float(v) for v in centre_yx]
    if len(centre) != 2 or not all(math.isfinite(v) for v in centre):
        raise ValueError(f"centre_yx must be two finite pixel coordinates, got {tuple(centre_yx)}")
    side = max(1, math.floor(fov / min(spacing) + 0.5))
    y0, x0 = (math.floor(c - (side - 1) / 2 + 0.5) for c in centre)
    return int(y0), int(x0), int(side)


def fov_box(hu_zyx: np.ndarray, spacing_yx: Sequence[float], fov_mm: float = DEFAULT_FOV_MM,
            threshold_hu: float = DEFAULT_CROP_THRESHOLD_HU) -> tuple[int, int, int]:
    """The square box ``(y0, x0, side)`` (pixels) of a ``fov_mm`` mm field of view centred on the body
    of a CT ``hu_zyx`` (Z, Y, X) HU in the network's orientation, spacing ``spacing_yx`` mm:
    :func:`fov_box_at` of :func:`body_centroid`. Every CT of the same ``fov_mm`` then reaches the network
    at ``fov_mm / S`` mm per pixel (to half a pixel of the CT). ``ValueError``: no body, a bad volume,
    spacing or ``fov_mm``."""
    hu, spacing = _check_ct(hu_zyx), _check_spacing(spacing_yx)
    settings = crop_settings(threshold_hu=threshold_hu, fov_mm=fov_mm)  # bad settings fail before the work
    return fov_box_at(body_centroid(hu, settings["threshold_hu"]), spacing, settings["fov_mm"])


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


def resize_ct_slices(volume_zyx: np.ndarray, size: int) -> np.ndarray:
    """Resize every axial slice of ``volume_zyx`` (Z, Y, X) to (size, size) -> float32 (Z, S, S).

    Bilinear, ``align_corners=False``; when shrinking, the kernel is a tent widened by the shrink factor
    (anti-aliasing, as PIL's bilinear resize): a 2x shrink of the row 0, 1, 2, 3 gives 5/7, 16/7.
    About 10x faster than ``skimage.transform.resize(order=1, anti_aliasing=True)`` on a 512x512 CT.
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
    box_yx: Sequence[int] | None = None, probabilities_out: np.ndarray | None = None,
) -> np.ndarray:
    """(B, C, S, S) class probabilities -> (B, H, W) uint8 labels on the CT's in-plane grid H x W.

    The inverse of :func:`resize_ct_slices`, used by ``inference.Predictor``. ``probabilities``: softmax
    outputs (resizing logits gives other labels), a torch tensor on any device (resized there) or a numpy
    array; B slices (z), C classes. Resized bilinearly, ``align_corners=False``, anti-aliased when
    shrinking either axis (when enlarging it changes only float rounding, ~1e-7, and costs 1.7x), then
    arg-maxed over C (first class wins a tie). Identity when H x W is S x S; exact inverse of phase 3's
    nearest-neighbour label shrink at 2S x 2S (512 -> 256): each pixel of a 2x2 block takes 9/16 of its
    weight from its own block; larger factors round off the blocks' outer corners. ``batch_size`` slices
    at a time (None: all) bound the memory.

    ``box_yx`` ``(y0, x0, side)``: the ``--crop-body`` box (:func:`box_for_crop`, in ``meta.json``) of
    the H x W grid: probabilities go back to side x side, labels are pasted at the box, background (0)
    outside it, and the part beyond the image (a field of view past the edge) is dropped. None: the
    whole S x S goes to H x W.
    ``probabilities_out`` (B, C, H, W), any float dtype (a memory map will do): filled with the resized
    probabilities the labels are the argmax of (outside a crop box, background 1).
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
    if probabilities_out is not None and tuple(probabilities_out.shape) != (n_slices, probabilities.shape[1], *shape):
        raise ValueError(f"probabilities_out must have shape {(n_slices, probabilities.shape[1], *shape)}, "
                         f"got {tuple(probabilities_out.shape)}")
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
            stop = start + len(chunk)
            if box_yx is None:
                labels[start:stop] = chunk_labels
            else:
                labels[start:stop, image_y, image_x] = chunk_labels[:, box_y, box_x]
            if probabilities_out is not None:
                chunk = chunk.cpu().numpy()
                if box_yx is None:
                    probabilities_out[start:stop] = chunk
                else:
                    probabilities_out[start:stop] = 0
                    probabilities_out[start:stop, organs.BACKGROUND] = 1
                    probabilities_out[start:stop, :, image_y, image_x] = chunk[:, :, box_y, box_x]
    return labels


#: The network's voxel order as the SimpleITK/DICOM orientation code of (columns, rows, slices): head-first
#: supine axial, columns towards the patient's left, rows posterior, slices to the head. Other volumes (feet
#: first, prone, RAS NIfTI) are brought to it by ``image_grid.to_network_orientation`` (arrays:
#: :func:`to_network_array`); labels go back by :func:`from_network_orientation`.
NETWORK_ORIENTATION = "LPS"
_AXIS_LETTERS = ("LR", "PA", "SI")  # the letter of each patient axis (x, y, z of LPS), + then -


def orientation_code(image: Any) -> str:
    """The orientation code of ``image``'s axes (columns, rows, slices), e.g. ``LPS``, ``RPI``: each letter
    is the patient side the axis index increases towards, as ``sitk.DICOMOrientImageFilter`` writes it.
    ``ValueError`` for an oblique image (an axis more than :data:`MAX_AXIAL_ANGLE_DEG` degrees from every
    patient axis; the message gives the direction and what to do).
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    code = ""
    for axis in range(3):
        column = direction[:, axis] / np.linalg.norm(direction[:, axis])
        nearest = int(np.argmax(np.abs(column)))
        angle = math.degrees(math.acos(min(1.0, abs(column[nearest]))))
        if angle > MAX_AXIAL_ANGLE_DEG or _AXIS_LETTERS[nearest][0] in code or _AXIS_LETTERS[nearest][1] in code:
            raise ValueError(
                f"oblique image: axis {'xyz'[axis]} points along {(np.round(column, 4) + 0.0).tolist()} (LPS), "
                f"{angle:.1f} deg from the nearest patient axis (at most {MAX_AXIAL_ANGLE_DEG:g} deg); direction "
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


def to_network_array(array_zyx: np.ndarray, stored_code: str) -> np.ndarray:
    """A (Z, Y, X) array of an image stored in ``stored_code`` in network order (a view).

    The array half of ``image_grid.to_network_orientation`` (same voxels, same order), for data already
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
    :func:`to_network_array` (and of ``image_grid.to_network_orientation``), exact (flips and a
    transpose, no interpolation)."""
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


def cache_voxel_mm(record: Mapping[str, Any], where: str) -> tuple[float, float, float]:
    """The (z, y, x) voxel size in mm of a patient's training cache (the network grid) from its phase-3
    record (``meta.json``): the stored spacing in network order, in-plane times the extent resized to
    ``size`` (the crop box's side when cropped, else the image's rows and columns). ``ValueError``
    naming ``where`` for a record without the geometry (re-run phase 3)."""
    stored = stored_orientation_of(record, where)
    try:
        spacing_zyx = [float(v) for v in reversed(record["original_spacing_xyz"])]
        shape_zyx = [int(v) for v in record["original_shape_zyx"]]
        size = int(record["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} has no grid geometry ({exc!r}); re-run normalize_ct_and_masks.py "
                         "--overwrite") from None
    axes, _ = _orientation_axes(stored)
    spacing = [spacing_zyx[a] for a in axes]
    box = crop_box_of(record, where)
    extent_yx = (box[2], box[2]) if box is not None else tuple(shape_zyx[a] for a in axes[1:])
    return spacing[0], spacing[1] * extent_yx[0] / size, spacing[2] * extent_yx[1] / size


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


MAX_CONTEXT_SLICES = 8


def check_context_slices(k: int) -> int:
    """``k`` as an int in 0..:data:`MAX_CONTEXT_SLICES`; ``ValueError`` naming the value otherwise."""
    if isinstance(k, bool) or int(k) != k or not 0 <= int(k) <= MAX_CONTEXT_SLICES:
        raise ValueError(f"context slices must be an integer in 0-{MAX_CONTEXT_SLICES}, got {k!r}")
    return int(k)


def context_indices(z: int | np.ndarray, depth: int, k: int) -> np.ndarray:
    """The input slices of slice ``z`` (int, or int array (B,)) of a ``depth``-slice volume with
    ``k`` neighbours on each side: int64 (2k + 1,) (or (B, 2k + 1)), z - k .. z + k clamped to
    0 .. depth - 1. For depth 3 and k 2: z 0 -> [0, 0, 0, 1, 2], z 2 -> [0, 1, 2, 2, 2]."""
    k = check_context_slices(k)
    offsets = np.arange(-k, k + 1, dtype=np.int64)
    return np.clip(np.asarray(z, dtype=np.int64)[..., None] + offsets, 0, int(depth) - 1)


def context_stack(volume_zyx: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    """The network input of slices ``start`` .. ``stop`` - 1 of a (Z, S, S) volume: (B, 2k + 1, S, S)
    in the volume's dtype (a copy), neighbours clamped as in :func:`context_indices`."""
    z = np.arange(start, min(stop, len(volume_zyx)))
    return np.asarray(volume_zyx)[context_indices(z, len(volume_zyx), k)]
