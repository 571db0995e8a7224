"""Surface Dice at a tolerance (Nikolov et al. 2021) and added path length (Vaassen et al. 2020):
hand-computed values on cubes, DeepMind's surface-distance package (the reference implementation) on
random shapes, a brute-force added path length, the empty cases and the bad tolerances."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import surface_distance

from thoracic_seg import organs
from thoracic_seg.metrics import (APL_TOLERANCE, SURFACE_DICE_TOLERANCE, added_path_length_mm, contour_pixels,
                                  surface_dice, surface_distances)

SPACING = (3.0, 1.0, 1.0)  # mm, z-y-x: 3 mm slices of 1 mm pixels


def cube(offset=(0, 0, 0), shape=(8, 8, 8)) -> np.ndarray:
    """A 4x4x4-voxel cube at voxels 2..5 on each axis, moved by ``offset`` voxels."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(2 + o, 6 + o) for o in offset)] = True
    return mask


EMPTY = np.zeros((8, 8, 8), bool)


def reference_surface_dice(pred, truth, spacing, tolerance):
    """DeepMind's surface-distance: the truth is its ``mask_gt``."""
    distances = surface_distance.compute_surface_distances(truth, pred, spacing)
    return surface_distance.compute_surface_dice_at_tolerance(distances, tolerance)


# Surfels of one 4x4x4 cube on the (3, 1, 1) mm grid. A surfel sits on a voxel corner of the box
# [0, 4]^3 (in voxels); its area is the marching-cubes area of its 2x2x2 neighbourhood, a sum of
# triangle normals n scaled to (n_z·s_y·s_x, n_y·s_z·s_x, n_x·s_z·s_y):
#   face corner (4 of 8 voxels in): normal to z s_y·s_x = 1 mm², normal to y or x s_z·s_x = 3 mm²;
#   edge corner (2 in): along x or y ½·√((s_y·s_x)² + (s_z·s_x)²) = √10/2, along z ½·√(9 + 9) = 3√2/2;
#   vertex (1 in): ⅛·√(1 + 9 + 9) = √19/8.
# Per cube: 8 vertices, 4 edges per axis of 3 inner corners, 2 faces per axis of 3x3 inner corners:
#   area = √19 + 8·3·√10/2 + 4·3·3√2/2 + 2·9·1 + 4·9·3 = 126 + 18√2 + 12√10 + √19 mm².
CUBE_AREA = 126 + 18 * math.sqrt(2) + 12 * math.sqrt(10) + math.sqrt(19)
# Moved one slice (3 mm) along z, the truth's surfels at z corners 1-4 on the sides lie on the
# predicted surface: the side faces (2·9·3 + 2·9·3 = 108), the z-edges (18√2), the 4 top vertices
# (√19/2) and the 4 top x- and y-edges (6√10). Its top face's 3x3 inner corners (1 mm² each) lie inside
# the prediction, 1 mm from its side faces but the centre, 2 mm; its bottom face and rim are 3 mm from
# the prediction, beyond both tolerances. The prediction's surfels mirror these. So the surface Dice is
#   within 1 mm: (108 + 8 + 18√2 + 6√10 + √19/2) / CUBE_AREA,  within 2 mm: (108 + 9 + ...) / CUBE_AREA.
ON_SIDES = 108 + 18 * math.sqrt(2) + 6 * math.sqrt(10) + math.sqrt(19) / 2


@pytest.mark.parametrize("offset, spacing, tolerance, expected_surface_dice, expected_apl_mm", [
    # One slice apart along z (3 mm): only the top face's 1-2 mm helps. APL: the truth's first slice
    # has no prediction, its contour (the 12 border pixels of a 4x4 square, 1 mm each) is drawn; the
    # other 3 slices coincide.
    ((1, 0, 0), SPACING, 1.0, (ON_SIDES + 8) / CUBE_AREA, 12.0),
    ((1, 0, 0), SPACING, 2.0, (ON_SIDES + 9) / CUBE_AREA, 12.0),
    # One voxel apart along x (1 mm): every surfel and every contour pixel is within 1 mm of the other.
    ((0, 0, 1), SPACING, 1.0, 1.0, 0.0),
    ((0, 0, 1), SPACING, 2.0, 1.0, 0.0),
    # The same shift along z on a 1 mm grid is 1 mm: anisotropy is what made it 3 mm.
    ((1, 0, 0), (1.0, 1.0, 1.0), 1.0, 1.0, 12.0),
])
def test_two_cubes_one_voxel_apart(offset, spacing, tolerance, expected_surface_dice, expected_apl_mm):
    truth, pred = cube(), cube(offset)
    assert surface_dice(pred, truth, spacing, tolerance) == pytest.approx(expected_surface_dice, abs=1e-12)
    assert surface_dice(pred, truth, spacing, tolerance) == pytest.approx(
        reference_surface_dice(pred, truth, spacing, tolerance), abs=1e-6)
    assert surface_dice(truth, pred, spacing, tolerance) == pytest.approx(expected_surface_dice, abs=1e-12)
    assert added_path_length_mm(pred, truth, spacing, tolerance) == pytest.approx(expected_apl_mm, abs=1e-12)


def test_the_cube_surface_area_and_distances_are_the_references():
    """The hand count above, and every surfel's distance and area as the reference lists them."""
    truth, pred = cube(), cube((1, 0, 0))
    mine = surface_distances(pred, truth, SPACING)
    assert mine.truth_areas_mm2.sum() == pytest.approx(CUBE_AREA, abs=1e-9)
    assert mine.pred_areas_mm2.sum() == pytest.approx(CUBE_AREA, abs=1e-9)
    assert sorted(mine.truth_to_pred_mm) == pytest.approx([0.0] * 64 + [1.0] * 8 + [2.0] + [3.0] * 25)
    _assert_same_surfels(mine, surface_distance.compute_surface_distances(truth, pred, SPACING))


def _assert_same_surfels(mine, reference) -> None:
    """Our surfels are the reference's: the same (distance, area) pairs, each way (the reference sorts them)."""
    for distances, areas, ref_distances, ref_areas in (
            (mine.truth_to_pred_mm, mine.truth_areas_mm2, reference["distances_gt_to_pred"], reference["surfel_areas_gt"]),
            (mine.pred_to_truth_mm, mine.pred_areas_mm2, reference["distances_pred_to_gt"], reference["surfel_areas_pred"])):
        order = np.lexsort((areas, distances))
        np.testing.assert_allclose(distances[order], ref_distances, atol=1e-9)
        np.testing.assert_allclose(areas[order], ref_areas, atol=1e-9)


def _random_shape(rng: np.random.Generator, shape=(12, 22, 20)) -> np.ndarray:
    """An ellipsoid with 15% of its voxels knocked out: holes and the ambiguous 2x2x2 neighbourhoods
    where marching-cubes tables differ."""
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    centre, radius = rng.uniform((3, 5, 5), (9, 17, 15)), rng.uniform((1.5, 2, 2), (5, 8, 8))
    blob = ((zz - centre[0]) / radius[0]) ** 2 + ((yy - centre[1]) / radius[1]) ** 2 \
        + ((xx - centre[2]) / radius[2]) ** 2 <= 1
    return blob & (rng.random(shape) > 0.15)


@pytest.mark.parametrize("seed", range(6))
def test_surface_dice_equals_the_reference_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    truth, pred = _random_shape(rng), _random_shape(rng)
    spacing = tuple(rng.uniform(0.4, 3.5, 3))
    for tolerance in (0.0, 0.7, 1.0, 2.0, 3.3):
        assert surface_dice(pred, truth, spacing, tolerance) == pytest.approx(
            reference_surface_dice(pred, truth, spacing, tolerance), abs=1e-6), tolerance
    _assert_same_surfels(surface_distances(pred, truth, spacing),
                         surface_distance.compute_surface_distances(truth, pred, spacing))


def test_masks_touching_the_array_border_and_the_crop_change_nothing():
    """A cube cut by the array's edge is closed there; the same pair inside a larger array (the
    crop then differs) scores the same."""
    truth, pred = cube((-2, 0, 0)), cube((-1, 0, 1))   # truth from slice 0, the edge of the array
    spacing = (2.0, 0.8, 0.6)
    expected = reference_surface_dice(pred, truth, spacing, 1.0)
    assert surface_dice(pred, truth, spacing, 1.0) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1
    big_truth, big_pred = (np.pad(m, ((5, 1), (3, 9), (0, 4))) for m in (truth, pred))
    assert surface_dice(big_pred, big_truth, spacing, 1.0) == pytest.approx(expected, abs=1e-12)
    assert added_path_length_mm(big_pred, big_truth, spacing) == added_path_length_mm(pred, truth, spacing)


# --------------------------------------------------------------------------------------------
# Added path length
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tolerance, expected_mm", [
    # One pixel along x: 6 of the 12 contour pixels of each of the 4 slices are off the predicted
    # contour (the 4 of its left column, the 2 inner ones of its right column), all 1 mm from it.
    (0.0, 6 * 4 * 1.0),
    (1.0, 0.0),
])
def test_apl_of_a_one_pixel_shift(tolerance, expected_mm):
    assert added_path_length_mm(cube((0, 0, 1)), cube(), SPACING, tolerance) == expected_mm


@pytest.mark.parametrize("tolerance, expected_mm", [
    # One pixel along y and x: per slice, 2 of the 12 truth contour pixels lie on the predicted contour,
    # 9 are 1 mm from it and its corner (2, 2) is √2 mm from the nearest, (3, 3).
    (0.0, 10 * 4 * 1.0),
    (1.0, 1 * 4 * 1.0),
    (1.5, 0.0),
])
def test_apl_of_a_diagonal_shift(tolerance, expected_mm):
    assert added_path_length_mm(cube((0, 1, 1)), cube(), SPACING, tolerance) == expected_mm


def _brute_force_apl(pred, truth, spacing, tolerance) -> float:
    """Per slice of the whole (uncropped) arrays: the truth's border pixels (a 4-neighbour outside,
    found by shifting the padded slice) farther than ``tolerance`` from all of the prediction's, by
    all pairwise distances."""
    def border(slice_):
        padded = np.pad(slice_, 1)
        inner = slice_.copy()
        for axis in (0, 1):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1]
        return np.argwhere(slice_ & ~inner)

    added = 0
    for z in range(truth.shape[0]):
        true_points, pred_points = border(truth[z]), border(pred[z])
        if len(true_points) and len(pred_points):
            # pixel steps times the spacing, as the distance transform measures (no rounding of coordinates)
            steps = true_points[:, None, :] - pred_points[None, :, :]
            distances = np.sqrt(((steps * np.asarray(spacing[1:])) ** 2).sum(axis=2))
            added += int(np.sum(distances.min(axis=1) > tolerance))
        else:
            added += len(true_points)
    return added * (spacing[1] + spacing[2]) / 2


@pytest.mark.parametrize("seed", range(4))
def test_apl_matches_brute_force_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    truth, pred = _random_shape(rng), _random_shape(rng)
    spacing = (2.5, 0.7, 0.9)
    for tolerance in (0.0, 0.9, 2.0):
        assert added_path_length_mm(pred, truth, spacing, tolerance) == pytest.approx(
            _brute_force_apl(pred, truth, spacing, tolerance), abs=1e-9)


def test_contour_pixels_are_in_plane():
    """A 4x4x4 cube's middle slices keep their 12-pixel ring: z neighbours do not count."""
    contour = contour_pixels(cube())
    assert [int(contour[z].sum()) for z in range(8)] == [0, 0, 12, 12, 12, 12, 0, 0]


# --------------------------------------------------------------------------------------------
# Empty masks: an empty prediction is never rewarded
# --------------------------------------------------------------------------------------------
def test_empty_cases():
    spacing = (3.0, 0.5, 0.7)
    assert math.isnan(surface_dice(EMPTY, EMPTY, spacing, 1.0))            # not scored, as Dice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                     # the reference divides 0 by 0
        assert math.isnan(reference_surface_dice(EMPTY, EMPTY, spacing, 1.0))
    assert surface_dice(EMPTY, cube(), spacing, 1.0) == 0.0                 # missed
    assert surface_dice(cube(), EMPTY, spacing, 1.0) == 0.0                 # found something that is not there
    # Nothing predicted: all 4 slices' 12-pixel contours are drawn, at (0.5 + 0.7) / 2 mm a pixel.
    assert added_path_length_mm(EMPTY, cube(), spacing) == pytest.approx(4 * 12 * 0.6, abs=1e-12)
    assert added_path_length_mm(cube(), EMPTY, spacing) == 0.0              # nothing to draw
    assert added_path_length_mm(EMPTY, EMPTY, spacing) == 0.0
    one_empty = surface_distances(EMPTY, cube(), spacing)
    assert len(one_empty.pred_areas_mm2) == len(one_empty.pred_to_truth_mm) == 0
    assert len(one_empty.truth_to_pred_mm) == 98 and np.all(np.isinf(one_empty.truth_to_pred_mm))


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), float("inf"), "1 mm", None])
def test_bad_tolerances(tolerance):
    match = rf"tolerance must be a finite distance >= 0 mm, got {tolerance!r}"
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        surface_dice(cube(), cube(), SPACING, tolerance)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        added_path_length_mm(cube(), cube(), SPACING, tolerance)


def test_bad_masks_and_spacing_are_refused():
    with pytest.raises(ValueError, match=r"prediction shape \(8, 8, 8\) differs from truth shape \(8, 8, 7\)"):
        surface_dice(cube(), cube()[:, :, :7], SPACING, 1.0)
    with pytest.raises(ValueError, match=r"spacing must be 3 positive finite mm values .*got \(3.0, 0.0, 1.0\)"):
        added_path_length_mm(cube(), cube(), (3.0, 0.0, 1.0))


def test_every_structure_has_a_tolerance_with_its_source():
    assert set(SURFACE_DICE_TOLERANCE) == set(organs.FOREGROUND_LABELS)
    for tolerance in (*SURFACE_DICE_TOLERANCE.values(), APL_TOLERANCE):
        assert tolerance.mm > 0 and math.isfinite(tolerance.mm) and len(tolerance.source) > 20
    assert {label: t.mm for label, t in SURFACE_DICE_TOLERANCE.items()
            if label in (organs.HEART, organs.ESOPHAGUS, organs.SPINAL_CORD)} == {
        organs.HEART: 7.0, organs.ESOPHAGUS: 4.0, organs.SPINAL_CORD: 2.0}  # Collier et al. 2003: 0.7, 0.4, 0.2 cm
