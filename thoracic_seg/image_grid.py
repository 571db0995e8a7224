"""The network grid on SimpleITK images: orientation of a whole image, the geometry of a resized
image, and :func:`segment_image` (a CT image to labels on its own grid with ``inference.Predictor``)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from thoracic_seg.grid import NETWORK_ORIENTATION, orientation_code


def resized_geometry(
    image: sitk.Image, size: int, box_yx: Sequence[int] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(spacing, origin, direction)`` (SimpleITK, x-y-z, LPS mm) of ``image`` resized in-plane.

    The physical extent (outer corner to outer corner) is kept: in-plane spacing becomes ``spacing *
    old_size / size``, the origin (first voxel centre) moves by half the spacing change along the image
    axes; z and the direction are unchanged. ``box_yx`` ``(y0, x0, side)`` (``grid.box_for_crop``): the extent
    is the box's, whose first voxel is (x0, y0) of ``image`` (may be negative): spacing ``spacing * side / size``.
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


def image_on_resized_grid(array_zyx: np.ndarray, source: sitk.Image, box_yx: Sequence[int] | None = None) -> sitk.Image:
    """A SimpleITK image of ``array_zyx`` (Z, S, S) carrying ``source``'s geometry (cropped to
    ``box_yx`` when given, :func:`resized_geometry`) resized to S."""
    if array_zyx.shape[0] != source.GetSize()[2] or array_zyx.shape[1] != array_zyx.shape[2]:
        raise ValueError(f"array of shape {array_zyx.shape} does not fit a {source.GetSize()[2]}-slice source")
    spacing, origin, direction = resized_geometry(source, array_zyx.shape[1], box_yx)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def to_network_orientation(image: sitk.Image) -> tuple[sitk.Image, str]:
    """``(image in NETWORK_ORIENTATION, the orientation code it was stored in)``.

    Exact: ``sitk.DICOMOrient`` only permutes and flips axes, so every voxel keeps its patient position.
    The array half is ``grid.to_network_array``; labels go back with ``grid.from_network_orientation``. An
    LPS image comes back as is. ``ValueError`` for an oblique image (:func:`orientation_code`).
    """
    stored = orientation_code(image)
    if stored == NETWORK_ORIENTATION:
        return image, stored
    return sitk.DICOMOrient(image, NETWORK_ORIENTATION), stored


def segment_image(predictor: Any, image: sitk.Image, seconds: dict[str, float] | None = None,
                  probabilities: np.ndarray | None = None, before_postprocess: np.ndarray | None = None) -> np.ndarray:
    """A CT image (HU, any axis-aligned orientation) -> uint8 labels (Z, Y, X) in its own stored array
    order and grid, by ``predictor`` (``inference.Predictor``: evaluation and prediction both call
    this; ``probabilities``, ``before_postprocess``: see ``Predictor.segment_stored``). ``ValueError``
    for an oblique image."""
    return predictor.segment_stored(sitk.GetArrayFromImage(image), orientation_code(image),
                                    image.GetSpacing()[::-1], seconds, probabilities, before_postprocess)
