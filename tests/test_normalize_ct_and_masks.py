"""Phase 3 (normalize_ct_and_masks.py): window, z-score, in-plane resize, geometry, training cache."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import write_mask_record

import normalize_ct_and_masks as n3
from thoracic_seg import organs, precision
from thoracic_seg.batch import DONE, FAILED, PARTIAL_DIR_NAME, SKIPPED, exit_status, write_nifti
from thoracic_seg.grid import (
    _AXIS_LETTERS, DEFAULT_FOV_MM, _bilinear_resize, apply_zscore, body_box, body_centroid, box_for_crop,
    crop_box_of, crop_settings, crop_settings_of, crop_to_box, describe_crop, fov_box, fov_box_at,
    from_network_orientation, network_shape_zyx, orientation_code, probabilities_to_ct_labels,
    resize_ct_slices, resize_labels_to_shape, resize_mask_slices, to_network_array, window_and_zscore,
)
from thoracic_seg.image_grid import image_on_resized_grid, to_network_orientation
from thoracic_seg.layout import PROCESSED_FORMAT, DataLayout, read_cache_meta, slice_label_bits
from thoracic_seg.splits import SPLIT_NAMES

STRUCTURES_HEADER = "patient_id,label,structure,annotated,source_rois,derived,voxels,volume_ml,voxels_lost"
DERIVED_PTV = {"source": "derived", "margin_mm": 10.0}


# --------------------------------------------------------------------------------------------
# Inputs built by hand: phase 2 / 2.5 outputs in the contract's format
# --------------------------------------------------------------------------------------------
def make_image(array_zyx: np.ndarray, spacing=(0.8, 0.9, 3.0), origin=(-20.0, -15.0, 100.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def phantom(shape_zyx=(6, 40, 48), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, labels uint8): air around a soft-tissue body, two lungs, a heart, a tumour."""
    z, y, x = shape_zyx
    rng = np.random.default_rng(seed)
    hu = np.full(shape_zyx, -1000, dtype=np.int16)
    labels = np.zeros(shape_zyx, dtype=np.uint8)
    hu[:, 4:y - 4, 4:x - 4] = 40
    labels[:, 8:y - 8, 8:x // 2 - 3] = organs.RIGHT_LUNG  # patient right = low x (LPS)
    labels[:, 8:y - 8, x // 2 + 3:x - 8] = organs.LEFT_LUNG
    labels[1:4, y // 2 - 3:y // 2 + 3, x // 2 - 2:x // 2 + 2] = organs.HEART
    labels[2:3, 12:16, 12:16] = organs.GTV
    hu[np.isin(labels, (organs.RIGHT_LUNG, organs.LEFT_LUNG))] = -850
    hu += rng.integers(-30, 30, size=shape_zyx, dtype=np.int16)
    return hu, labels


def structures_rows(patient_id: str, annotated: list[bool]) -> list[str]:
    rows = []
    for label in organs.FOREGROUND_LABELS:
        key = organs.structure(label).key
        flag = "yes" if annotated[label] else "no"
        rows.append(f"{patient_id},{label},{key},{flag},{key.upper() if annotated[label] else ''},"
                    f",10,0.02,0")
    return rows


def make_data_root(root: Path, patients: dict[str, dict]) -> Path:
    """Write ct_nifti/, masks_multi_organ/ and structures.csv for ``patients``:
    ``{pid: {"shape": (z, y, x), "annotated": [8 bools], "mask_spacing": optional, ...}}``."""
    layout = DataLayout(root)
    layout.ct_nifti.mkdir(parents=True)
    layout.masks.mkdir(parents=True)
    rows = [STRUCTURES_HEADER]
    for seed, (pid, spec) in enumerate(patients.items()):
        hu, labels = phantom(spec.get("shape", (6, 40, 48)), seed)
        geometry = {"direction": spec.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1))}
        write_nifti(make_image(hu, **geometry), layout.ct_nifti / f"{pid}.nii.gz")
        mask_geometry = dict(geometry, spacing=spec.get("mask_spacing", (0.8, 0.9, 3.0)))
        write_nifti(make_image(spec.get("labels", labels), **mask_geometry),
                    layout.masks / f"{pid}.nii.gz")
        if spec.get("in_csv", True):
            rows += structures_rows(pid, spec.get("annotated", [True] * 8))
            write_mask_record(layout.masks, pid, spec.get("annotated", [True] * 8))
    (layout.masks / "structures.csv").write_text("\n".join(rows) + "\n")
    return root


NO_HEART = [True, True, False, True, True, False, True, True]


@pytest.fixture()
def data_root(tmp_path) -> Path:
    return make_data_root(tmp_path / "DATA", {
        "P1": {},
        "P2": {"annotated": NO_HEART, "direction": (0, 1, 0, -1, 0, 0, 0, 0, 1)},
    })


# --------------------------------------------------------------------------------------------
# Window and z-score
# --------------------------------------------------------------------------------------------
def test_window_and_zscore_exact_values() -> None:
    # Clipped to [-1000, 400]: -1000, -1000, 400, 400 -> mean -300 HU, std 700 HU.
    hu = np.tile(np.array([-3000, -1000, 400, 2000], dtype=np.int16), (4, 1))
    z, mean, std = window_and_zscore(hu)
    assert (mean, std) == (-300.0, 700.0)
    assert z.dtype == np.float32 and z.shape == (4, 4)
    np.testing.assert_array_equal(z, np.tile(np.float32([-1, -1, 1, 1]), (4, 1)))


def test_window_and_zscore_custom_window() -> None:
    hu = np.array([[-50, 25], [75, 300]], dtype=np.int16)  # clipped to 0, 25, 75, 100
    z, mean, std = window_and_zscore(hu, window=(0, 100))
    assert mean == 50.0 and std == pytest.approx(np.sqrt(1562.5))
    np.testing.assert_allclose(z, (np.array([[0, 25], [75, 100]]) - 50) / np.sqrt(1562.5), rtol=1e-6)


def test_apply_zscore_reproduces_phase_3() -> None:
    hu, _ = phantom()
    z, mean, std = window_and_zscore(hu, (-1000, 400))
    np.testing.assert_array_equal(apply_zscore(hu, (-1000, 400), mean, std), z)


@pytest.mark.parametrize("window,match", [
    ((400, -1000), "LOW must be below HIGH"),
    ((0, 0), "LOW must be below HIGH"),
    ((0,), "two HU values"),
])
def test_bad_window(window, match) -> None:
    with pytest.raises(ValueError, match=match):
        window_and_zscore(np.zeros((2, 2)), window)


def test_constant_volume_cannot_be_zscored() -> None:
    with pytest.raises(ValueError, match="constant"):
        window_and_zscore(np.full((2, 3, 3), -2000, dtype=np.int16))


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------
def test_resize_ct_shrink_is_antialiased_bilinear() -> None:
    ramp = np.tile(np.arange(4, dtype=np.float32), (3, 4, 1))  # 3 slices of rows 0 1 2 3
    out = resize_ct_slices(ramp, 2)
    # Tent kernel widened 2x around the output centre (input coordinate 0.5): weights 3, 3, 1.
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.tile(np.float32([5 / 7, 16 / 7]), (3, 2, 1)), rtol=1e-6)


def test_resize_ct_enlarge_is_bilinear() -> None:
    out = resize_ct_slices(np.array([[[0, 1], [0, 1]]], dtype=np.int16), 4)
    np.testing.assert_allclose(out, np.tile(np.float32([0, 0.25, 0.75, 1]), (1, 4, 1)))


def test_resize_ct_same_size_and_constant() -> None:
    volume = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize_ct_slices(volume, 8), volume)
    np.testing.assert_allclose(resize_ct_slices(np.full((2, 30, 50), 7.5), 16), 7.5, rtol=1e-6)


def test_resize_mask_nearest_exact() -> None:
    mask = (np.arange(16, dtype=np.uint8).reshape(1, 4, 4) % 8)
    # Shrink 2x: output pixel i takes input floor((i + 0.5) * 2) = 1, 3.
    np.testing.assert_array_equal(resize_mask_slices(mask, 2), [[[5, 7], [5, 7]]])
    # Enlarge 2x: every pixel doubled.
    small = np.array([[[1, 2], [3, 4]]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_mask_slices(small, 4)[0], np.kron(small[0], np.ones((2, 2))))


def test_resize_mask_never_creates_labels() -> None:
    rng = np.random.default_rng(1)
    mask = rng.choice(np.array([0, 3, 4, 7], dtype=np.uint8), size=(5, 37, 53))
    for size in (32, 64):
        out = resize_mask_slices(mask, size)
        assert out.dtype == np.uint8 and out.shape == (5, size, size)
        assert set(np.unique(out)) <= {0, 3, 4, 7}


def test_resize_labels_to_shape_inverts_the_resize() -> None:
    labels = np.random.default_rng(2).integers(0, 8, size=(3, 32, 32), dtype=np.uint8)
    enlarged = resize_labels_to_shape(labels, (64, 64))
    np.testing.assert_array_equal(resize_mask_slices(enlarged, 32), labels)
    assert resize_labels_to_shape(labels, (40, 50)).shape == (3, 40, 50)


# --------------------------------------------------------------------------------------------
# Back to the CT grid: probabilities_to_ct_labels (the inverse of the resize)
# --------------------------------------------------------------------------------------------
def _one_hot(labels: np.ndarray) -> np.ndarray:
    """(Z, S, S) labels -> (Z, 8, S, S) float32 probabilities of a certain model."""
    return np.moveaxis(np.eye(organs.NUM_CLASSES, dtype=np.float32)[labels], -1, 1)


def _random_labels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, organs.NUM_CLASSES, shape).astype(np.uint8)


def _labels_of_evaluate(probabilities: torch.Tensor, shape) -> np.ndarray:
    """The former ``evaluate_multi_organ.probabilities_to_labels`` / ``map_to_original_grid``:
    bilinear, always anti-aliased, ``argmax``."""
    if tuple(probabilities.shape[-2:]) != tuple(shape):
        probabilities = F.interpolate(probabilities.float(), size=tuple(shape), mode="bilinear",
                                      align_corners=False, antialias=True)
    return probabilities.argmax(dim=1).to(torch.uint8).numpy()


def _labels_of_phase3(probabilities: np.ndarray, shape) -> np.ndarray:
    """The former ``resize_probabilities_to_shape``: every class plane resized on its own, numpy argmax."""
    return _bilinear_resize(probabilities.astype(np.float32), tuple(shape)).argmax(axis=1).astype(np.uint8)


def _labels_of_predict(logits: torch.Tensor, shape) -> np.ndarray:
    """The former ``predict_multi_organ.logits_to_labels``: softmax, anti-aliased only when
    shrinking, ``max(dim=1).indices``."""
    probabilities = torch.softmax(logits.float(), dim=1)
    if tuple(probabilities.shape[-2:]) != tuple(shape):
        shrinking = shape[0] < probabilities.shape[-2] or shape[1] < probabilities.shape[-1]
        probabilities = F.interpolate(probabilities, size=tuple(shape), mode="bilinear", align_corners=False,
                                      antialias=shrinking)
    return probabilities.max(dim=1).indices.to(torch.uint8).numpy()


def test_probabilities_to_ct_labels_of_one_hot_blocks() -> None:
    labels = np.kron(np.array([[0, 5], [3, 4]], dtype=np.uint8), np.ones((2, 2), np.uint8))[None]
    probs = np.eye(8, dtype=np.float32)[labels].transpose(0, 3, 1, 2)  # one-hot (1, 8, 4, 4)
    out = probabilities_to_ct_labels(probs, (8, 8))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, resize_labels_to_shape(labels, (8, 8)))


def test_probabilities_to_ct_labels_same_size_is_identity() -> None:
    small = _random_labels((3, 16, 16))
    np.testing.assert_array_equal(probabilities_to_ct_labels(_one_hot(small), (16, 16)), small)


def test_probabilities_to_ct_labels_inverts_a_2x_shrink() -> None:
    """512 -> 256 -> 512, the usual case, is exact even for the worst case: a new label every pixel.

    (Each pixel of a 2x2 block takes 9/16 of its bilinear weight from its own block. For larger
    factors bilinear rounds the outer corners of the blocks, by design.)"""
    small = _random_labels((3, 16, 16), seed=2)
    original = np.kron(small, np.ones((1, 2, 2), np.uint8))
    np.testing.assert_array_equal(resize_mask_slices(original, 16), small)   # phase 3 down
    np.testing.assert_array_equal(probabilities_to_ct_labels(_one_hot(small), original.shape[1:], batch_size=2),
                                  original)                                     # and back up


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (80, 72), (20, 24), (10, 12), (48, 100), (20, 100)],
                         ids=["identity", "enlarge-2x", "enlarge", "shrink", "shrink-3x", "enlarge-uneven",
                              "shrink-one-axis"])
def test_probabilities_to_ct_labels_gives_the_labels_of_the_three_former_versions(shape) -> None:
    """Evaluation, phase 3 and prediction each had their own map back; the one that is left gives
    the labels of all three, on softmax outputs and on random scores, numpy or torch, in any batch."""
    logits = torch.randn(5, organs.NUM_CLASSES, 32, 32, generator=torch.Generator().manual_seed(0)) * 3
    probabilities = torch.softmax(logits, dim=1)
    got = probabilities_to_ct_labels(probabilities, shape)
    assert got.dtype == np.uint8 and got.shape == (5, *shape)
    np.testing.assert_array_equal(got, _labels_of_evaluate(probabilities, shape))
    np.testing.assert_array_equal(got, _labels_of_phase3(probabilities.numpy(), shape))
    np.testing.assert_array_equal(got, _labels_of_predict(logits, shape))
    np.testing.assert_array_equal(probabilities_to_ct_labels(probabilities.numpy(), shape, batch_size=2), got)
    scores = np.random.default_rng(3).random((5, organs.NUM_CLASSES, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(probabilities_to_ct_labels(scores, shape),
                                  _labels_of_phase3(scores, shape))
    np.testing.assert_array_equal(probabilities_to_ct_labels(torch.from_numpy(scores).double(), shape),
                                  _labels_of_evaluate(torch.from_numpy(scores), shape))


def test_probabilities_to_ct_labels_ties_go_to_the_first_class() -> None:
    probs = np.zeros((1, organs.NUM_CLASSES, 2, 2), np.float32)
    probs[:, [2, 5]] = 0.5
    np.testing.assert_array_equal(probabilities_to_ct_labels(probs, (2, 2)), np.full((1, 2, 2), 2))
    np.testing.assert_array_equal(probabilities_to_ct_labels(probs, (4, 3)), np.full((1, 4, 3), 2))


@pytest.mark.parametrize("probs, shape, batch_size, match", [
    (np.zeros((8, 4, 4)), (4, 4), None, r"expected \(B, C, S, S\) class probabilities, got shape \(8, 4, 4\)"),
    (np.zeros((1, 8, 4, 4)), (4,), None, r"output_shape_yx must be two positive integers \(H, W\), got \(4,\)"),
    (np.zeros((1, 8, 4, 4)), (0, 4), None, r"two positive integers \(H, W\), got \(0, 4\)"),
    (np.zeros((1, 8, 4, 4)), (4, 4), 0, "batch_size must be a positive integer or None, got 0"),
])
def test_probabilities_to_ct_labels_bad_arguments(probs, shape, batch_size, match) -> None:
    with pytest.raises(ValueError, match=match):
        probabilities_to_ct_labels(probs, shape, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# Body crop (--crop-body): the box, the crop and the way back
# --------------------------------------------------------------------------------------------
def body_phantom(shape_yx=(40, 60), rows=(10, 20), cols=(15, 35), z=3) -> np.ndarray:
    """HU (Z, Y, X): air with a soft-tissue rectangle rows[0]..rows[1]-1 x cols[0]..cols[1]-1."""
    hu = np.full((z, *shape_yx), -1000, np.int16)
    hu[:, rows[0]:rows[1], cols[0]:cols[1]] = 40
    return hu


@pytest.mark.parametrize("hu, spacing_yx, margin_mm, expected", [
    # rows 10-19 + 2 px = 8-21 (14), cols 15-34 + 2 px = 13-36 (24): square 24, rows widened 5 + 5
    (body_phantom(), (1.0, 1.0), 2, (3, 13, 24)),
    # margin in mm per axis: ceil(2 / 0.5) = 4 rows, ceil(2 / 2) = 1 column -> rows 6-23, cols 14-35
    (body_phantom(), (0.5, 2.0), 2, (4, 14, 22)),
    # ceil(2 / 0.8) = 3 px: rows 7-22 (16), cols 12-37 (26): rows widened 5 before, 5 after
    (body_phantom(), (0.8, 0.8), 2, (2, 12, 26)),
    # odd difference: rows 10-19 + 0 (10), cols 15-34 (20): 5 before, 5 after; cols 15-36 (22): 6 and 6
    (body_phantom(cols=(15, 37)), (1.0, 1.0), 0, (4, 15, 22)),
    # body at the top: rows cut at the border 0-11 (12), centred start -6 shifted inside to 0
    (body_phantom(rows=(0, 10)), (1.0, 1.0), 2, (0, 13, 24)),
    # body at the bottom: rows 28-39, centred start 22 > 40 - 24 = 16: shifted inside to 16
    (body_phantom(rows=(30, 40)), (1.0, 1.0), 2, (16, 13, 24)),
    # wider than the image is high: square 54 > 20 rows, cannot fit: covers all rows, reaches
    # 17 rows above and 17 below (padded with air by crop_to_box)
    (body_phantom((20, 60), rows=(5, 15), cols=(5, 55)), (1.0, 1.0), 2, (-17, 3, 54)),
    # the body touches the left and right borders: the margin is cut there, square 60 > 40 rows
    (body_phantom(rows=(10, 30), cols=(0, 60)), (1.0, 1.0), 2, (-10, 0, 60)),
    # body fills a square image: the box is the whole image (the crop is the identity)
    (body_phantom((32, 32), rows=(0, 32), cols=(0, 32)), (1.0, 1.0), 10, (0, 0, 32)),
])
def test_body_box_exact(hu, spacing_yx, margin_mm, expected) -> None:
    assert body_box(hu, spacing_yx, margin_mm=margin_mm) == expected


def test_body_box_keeps_the_largest_component_and_uses_the_threshold() -> None:
    hu = body_phantom()
    hu[:, 36:38, 0:60] = 100       # the couch: 120 px per slice, apart from the body (200 px)
    hu[1, 0, 0] = 1000             # a bright stray voxel
    hu[:, 20:23, 15:35] = -600     # below -500 HU: not body, so not in the box
    assert body_box(hu, (1.0, 1.0), margin_mm=2) == (3, 13, 24)
    # above -700 HU it is: rows 10-22 + 2 px = 8-24 (17), widened 3 rows before, 4 after
    assert body_box(hu, (1.0, 1.0), threshold_hu=-700, margin_mm=2) == (5, 13, 24)
    hu[:, 28:36, 0:60] = 100       # the couch (rows 28-37, 600 px) grows larger than the body: it wins,
    assert body_box(hu, (1.0, 1.0), margin_mm=0) == (0, 0, 60)  # centred start 3 shifted to cover all rows


@pytest.mark.parametrize("kwargs, match", [
    ({"hu_zyx": np.full((2, 8, 8), -1000, np.int16), "spacing_yx": (1, 1)},
     r"no voxel above -500 HU \(max -1000 HU\): no body to crop to"),
    ({"hu_zyx": np.zeros((8, 8)), "spacing_yx": (1, 1)}, r"expected a non-empty \(Z, Y, X\) CT, got shape \(8, 8\)"),
    ({"hu_zyx": np.zeros((1, 8, 8)), "spacing_yx": (1, 0)}, r"spacing_yx must be two positive mm values, got \(1, 0\)"),
    ({"hu_zyx": np.zeros((1, 8, 8)), "spacing_yx": (1, 1), "margin_mm": -1},
     "crop margin must be a finite number >= 0 mm, got -1"),
])
def test_body_box_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        body_box(**kwargs)


def test_crop_to_box_inside_is_a_view_and_outside_is_filled() -> None:
    volume = np.arange(2 * 4 * 5, dtype=np.int16).reshape(2, 4, 5)
    inside = crop_to_box(volume, (1, 2, 3))
    assert inside.shape == (2, 3, 3) and np.shares_memory(inside, volume)
    np.testing.assert_array_equal(inside, volume[:, 1:4, 2:5])
    padded = crop_to_box(volume, (-1, 0, 6), fill=-7)   # one row above, one below, a column right
    assert padded.shape == (2, 6, 6) and padded.dtype == np.int16
    np.testing.assert_array_equal(padded[:, 1:5, 0:5], volume)
    assert (padded[:, 0] == -7).all() and (padded[:, 5] == -7).all() and (padded[:, :, 5] == -7).all()
    with pytest.raises(ValueError, match=r"crop box \(4, 0, 2\) \(y0, x0, side\) does not overlap a \(4, 5\) image"):
        crop_to_box(volume, (4, 0, 2))


def test_probabilities_to_ct_labels_pastes_the_box_back_exactly() -> None:
    """S x S labels of a box of side S go back exactly into the box; outside it is background;
    the part of the box beyond the image is dropped."""
    small = _random_labels((3, 16, 16), seed=4)
    out = probabilities_to_ct_labels(_one_hot(small), (20, 30), box_yx=(2, 5, 16), batch_size=2)
    assert out.shape == (3, 20, 30) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 2:18, 5:21], small)
    out[:, 2:18, 5:21] = 0
    assert not out.any()
    out = probabilities_to_ct_labels(_one_hot(small), (10, 30), box_yx=(-3, 5, 16))   # 3 rows above, 3 below
    np.testing.assert_array_equal(out[:, :, 5:21], small[:, 3:13])
    assert not out[:, :, :5].any() and not out[:, :, 21:].any()
    original = np.kron(small, np.ones((1, 2, 2), np.uint8))  # a 2x shrink of the box, inverted exactly
    out = probabilities_to_ct_labels(_one_hot(small), (40, 40), box_yx=(4, 6, 32))
    np.testing.assert_array_equal(out[:, 4:36, 6:38], original)


def test_a_label_map_goes_through_crop_resize_and_back_to_its_place() -> None:
    """Body box, crop, nearest-neighbour resize (phase 3), one-hot back through the box (evaluation
    and prediction): a large structure lands where it was (Dice >= 0.99), with pixels 260 / 201 =
    1.3x finer than a resize of the whole slice, and no worse than that resize."""
    yy, xx = np.mgrid[:240, :260]
    body = ((yy - 110) / 70) ** 2 + ((xx - 120) / 95) ** 2 <= 1
    lung = ((yy - 105) / 40) ** 2 + ((xx - 95) / 30) ** 2 <= 1
    hu = np.where(body, 40, -1000).astype(np.int16)[None].repeat(2, axis=0)
    labels = np.where(lung, organs.RIGHT_LUNG, organs.BACKGROUND).astype(np.uint8)[None].repeat(2, axis=0)
    box = body_box(hu, (1.0, 1.0), margin_mm=5)
    assert box == (10, 20, 201)  # rows 40-180 and cols 25-215 + 5 px: square 201, 25 rows more each side
    small = resize_mask_slices(crop_to_box(labels, box), 144)
    back = probabilities_to_ct_labels(_one_hot(small), labels.shape[1:], box_yx=box)
    dice = 2 * np.sum((back == 3) & lung) / (np.sum(back == 3) + 2 * np.sum(lung))
    assert dice >= 0.99, dice
    whole = probabilities_to_ct_labels(_one_hot(resize_mask_slices(labels, 144)), labels.shape[1:])
    assert 2 * np.sum((whole == 3) & lung) / (np.sum(whole == 3) + 2 * np.sum(lung)) <= dice


@pytest.mark.parametrize("record, expected", [
    ({}, None),
    ({"crop": None}, None),
    ({"crop": {"method": "body", "threshold_hu": -500.0, "margin_mm": 10.0, "box_yx": [1, 2, 3]}},
     {"method": "body", "threshold_hu": -500, "margin_mm": 10}),
])
def test_crop_settings_of_records(record, expected) -> None:
    assert crop_settings_of(record, "here") == expected
    assert crop_box_of(record, "here") == (None if expected is None else (1, 2, 3))


@pytest.mark.parametrize("crop, match", [
    ({"method": "ring"}, r"^here: unknown crop \{'method': 'ring'\}"),
    ({"method": "body", "threshold_hu": -500}, r"^here: invalid crop .*'margin_mm'"),
    ({"method": "body", "threshold_hu": -500, "margin_mm": -2}, "crop margin must be a finite number >= 0 mm"),
])
def test_crop_settings_of_bad_records(crop, match) -> None:
    with pytest.raises(ValueError, match=match):
        crop_settings_of({"crop": crop}, "here")


def test_crop_box_of_a_bad_box() -> None:
    record = {"crop": {"method": "body", "threshold_hu": -500, "margin_mm": 10, "box_yx": [1, 2]}}
    with pytest.raises(ValueError, match=r"here: crop box_yx must be three integers \[y0, x0, side >= 1\], got \[1, 2\]"):
        crop_box_of(record, "here")


# --------------------------------------------------------------------------------------------
# Field of view (--crop-body --fov-mm): a fixed size in mm, centred on the body
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("centre_yx, spacing_yx, fov_mm, expected", [
    # 30 / 2 = 15 px; centre 19.5 is a pixel corner, an odd side is centred on a pixel: 20 (ties up)
    ((19.5, 19.5), (2.0, 2.0), 30, (13, 13, 15)),
    # an even side is centred between two pixels: 20 -> 20.5, rows 16-25
    ((20.0, 30.0), (1.0, 1.0), 10, (16, 26, 10)),
    # the default at the collection's 0.977 mm: floor(380 / 0.977 + 1/2) = 389 px, rows 62-450
    ((256.0, 256.0), (0.977, 0.977), 380, (62, 62, 389)),
    # 380 / 0.9765625 = 389.12: 389 px; 0.5 mm more is 389.63: 390 px, centred on 256.5 (rows 62-451)
    ((256.0, 256.0), (0.9765625, 0.9765625), 380, (62, 62, 389)),
    ((256.0, 256.0), (0.9765625, 0.9765625), 380.5, (62, 62, 390)),
    # other spacings along y and x: the finer one decides (10 / 0.5 = 20 px; 10 mm along y, 20 along x)
    ((10.0, 10.0), (0.5, 1.0), 10, (1, 1, 20)),
    # near the top edge: the box starts 3 rows above the image (padded with air, not moved inside)
    ((2.0, 40.0), (1.0, 1.0), 11, (-3, 35, 11)),
    # wider than the image: both ends outside (rows -9 to 20, centred on 5.5)
    ((5.0, 5.0), (1.0, 1.0), 30, (-9, -9, 30)),
    # at least one pixel
    ((3.4, 3.6), (1.0, 1.0), 0.1, (3, 4, 1)),
])
def test_fov_box_at_exact(centre_yx, spacing_yx, fov_mm, expected) -> None:
    assert fov_box_at(centre_yx, spacing_yx, fov_mm) == expected


def test_fov_box_is_centred_on_the_body_centroid_couch_and_all() -> None:
    """The body (rows 10-19, cols 15-34: centroid 14.5, 24.5) and a 16 mm field of view at 1 mm:
    rows 7-22, cols 17-32. A couch joined to the body drags the body box over the whole width;
    the centroid moves by its share of the voxels only."""
    hu = body_phantom()
    assert body_centroid(hu) == (14.5, 24.5)
    assert fov_box(hu, (1.0, 1.0), 16) == (7, 17, 16)
    hu[:, 20:22, 0:60] = 100   # the couch top, touching the body's last row: 120 px against 200
    # rows (200 x 14.5 + 60 x 20 + 60 x 21) / 320 = 16.75, cols (200 x 24.5 + 120 x 29.5) / 320 = 26.375
    assert body_centroid(hu) == (16.75, 26.375)
    assert fov_box(hu, (1.0, 1.0), 16) == (9, 19, 16)
    assert body_box(hu, (1.0, 1.0), margin_mm=0) == (-14, 0, 60)   # rows 10-21, cols 0-59: the whole width
    hu[:, 20:22, 0:60] = -600  # below the threshold it is not body; above -700 HU it is again
    assert body_centroid(hu) == (14.5, 24.5) and body_centroid(hu, threshold_hu=-700) == (16.75, 26.375)
    # the body at the top: rows 0-9, centroid 4.5, 20 px box from row -5 (5 rows of air above)
    assert fov_box(body_phantom(rows=(0, 10)), (1.0, 1.0), 20) == (-5, 15, 20)


def test_crop_settings_and_box_for_crop_of_a_field_of_view() -> None:
    settings = crop_settings(fov_mm=360.0)
    assert settings == {"method": "fov", "threshold_hu": -500, "fov_mm": 360}
    assert crop_settings(5, -400, fov_mm=340.5) == {"method": "fov", "threshold_hu": -400, "fov_mm": 340.5}
    assert describe_crop(settings) == "360 mm field of view on the body (> -500 HU)"
    hu = body_phantom()
    assert box_for_crop(hu, (1.0, 1.0), crop_settings(fov_mm=16)) == fov_box(hu, (1.0, 1.0), 16) == (7, 17, 16)
    assert box_for_crop(hu, (1.0, 1.0), crop_settings(2)) == body_box(hu, (1.0, 1.0), margin_mm=2) == (3, 13, 24)
    record = {"crop": {**settings, "box_yx": [-5, 17, 369]}}
    assert crop_settings_of(record, "here") == settings and crop_box_of(record, "here") == (-5, 17, 369)


@pytest.mark.parametrize("fov_mm", [0, -5, float("nan"), float("inf")])
def test_a_field_of_view_must_be_positive(fov_mm) -> None:
    match = rf"fov_mm \(the field of view\) must be a finite number > 0 mm, got {re.escape(repr(fov_mm))}"
    with pytest.raises(ValueError, match=match):
        crop_settings(fov_mm=fov_mm)
    with pytest.raises(ValueError, match=match):
        fov_box_at((5.0, 5.0), (1.0, 1.0), fov_mm)
    with pytest.raises(ValueError, match=match):
        fov_box(body_phantom(), (1.0, 1.0), fov_mm)


@pytest.mark.parametrize("call, match", [
    (lambda: fov_box(np.full((2, 8, 8), -1000, np.int16), (1, 1), 10),
     r"no voxel above -500 HU \(max -1000 HU\): no body to crop to"),
    (lambda: fov_box(np.zeros((8, 8)), (1, 1), 10), r"expected a non-empty \(Z, Y, X\) CT, got shape \(8, 8\)"),
    (lambda: fov_box(np.zeros((1, 8, 8)), (1, -1), 10), r"spacing_yx must be two positive mm values, got \(1, -1\)"),
    (lambda: fov_box_at((float("nan"), 1.0), (1, 1), 10), r"centre_yx must be two finite pixel coordinates"),
    (lambda: body_centroid(np.zeros((1, 8, 8)), threshold_hu=float("nan")), "crop threshold must be a finite HU value"),
])
def test_fov_box_bad_arguments(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("crop, match", [
    ({"method": "fov", "threshold_hu": -500}, r"^here: invalid crop .*'fov_mm'"),
    ({"method": "fov", "threshold_hu": -500, "fov_mm": None}, r"^here: invalid crop .*fov_mm is null"),
    ({"method": "fov", "threshold_hu": -500, "fov_mm": -1}, r"^here: invalid crop .*must be a finite number > 0 mm"),
    ({"method": "fov", "fov_mm": 360}, r"^here: invalid crop .*'threshold_hu'"),
])
def test_crop_settings_of_bad_field_of_view_records(crop, match) -> None:
    with pytest.raises(ValueError, match=match):
        crop_settings_of({"crop": crop}, "here")


@pytest.mark.parametrize("centre_yx, fov_mm, expected_box", [
    ((110.0, 130.0), 200, (11, 31, 200)),     # inside the image
    ((40.0, 130.0), 200, (-59, 31, 200)),     # 59 rows above the image
    ((120.0, 130.0), 300, (-29, -19, 300)),   # wider and higher than the 240 x 260 image
])
def test_a_label_map_goes_through_a_field_of_view_and_back_to_its_place(centre_yx, fov_mm, expected_box) -> None:
    """A lung-sized blob cropped with a field-of-view box (past the image edge too), resized to the
    network grid (nearest neighbour, as phase 3) and mapped back (one-hot through the box, as
    evaluation and prediction) lands where it was: Dice > 0.99 (0.9996, 0.9996 and 0.9966)."""
    cy, cx = centre_yx
    yy, xx = np.mgrid[:240, :260]
    body = ((yy - cy) / 45) ** 2 + ((xx - cx) / 90) ** 2 <= 1
    lung = ((yy - cy + 5) / 60) ** 2 + ((xx - cx + 30) / 45) ** 2 <= 1   # cut by the image in the 2nd case
    hu = np.where(body, 40, -1000).astype(np.int16)[None].repeat(2, axis=0)
    labels = np.where(lung, organs.RIGHT_LUNG, organs.BACKGROUND).astype(np.uint8)[None].repeat(2, axis=0)
    box = fov_box(hu, (1.0, 1.0), fov_mm)
    assert box == expected_box
    small = resize_mask_slices(crop_to_box(labels, box), 256)   # pixels of 0.78 and 1.17 mm
    back = probabilities_to_ct_labels(_one_hot(small), labels.shape[1:], box_yx=box)
    assert back.shape == labels.shape and set(np.unique(back)) == {0, organs.RIGHT_LUNG}
    dice = 2 * np.sum((back == 3) & lung) / (np.sum(back == 3) + 2 * np.sum(lung))
    assert dice > 0.99, dice


# --------------------------------------------------------------------------------------------
# Geometry: the resized grid covers the same physical extent
# --------------------------------------------------------------------------------------------
def corners_and_centre(image: sitk.Image) -> np.ndarray:
    sx, sy, sz = image.GetSize()
    points = [(-0.5, -0.5, 0), (sx - 0.5, -0.5, 0), (-0.5, sy - 0.5, sz - 1),
              (sx - 0.5, sy - 0.5, sz - 1), ((sx - 1) / 2, (sy - 1) / 2, (sz - 1) / 2)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in points])


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 1, 0, -1, 0, 0, 0, 0, 1),
                                       (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_resized_grid_overlays_the_original(direction) -> None:
    original = make_image(np.zeros((5, 30, 40), np.int16), direction=direction)
    resized = image_on_resized_grid(np.zeros((5, 32, 32), np.float32), original)
    np.testing.assert_allclose(corners_and_centre(resized), corners_and_centre(original), atol=1e-9)
    assert resized.GetSpacing() == pytest.approx((0.8 * 40 / 32, 0.9 * 30 / 32, 3.0))
    assert resized.GetDirection() == original.GetDirection()


# --------------------------------------------------------------------------------------------
# run(): outputs, values, geometry, cache
# --------------------------------------------------------------------------------------------
def test_run_writes_normalized_volumes_and_cache(data_root) -> None:
    results = n3.run(data_root=data_root, size=32)
    assert [(r.patient_id, r.status) for r in results] == [("P1", DONE), ("P2", DONE)]
    layout = DataLayout(data_root)
    normalization = json.loads((layout.normalized_ct / "normalization.json").read_text())
    assert sorted(normalization) == ["P1", "P2"]
    # P2 is stored with columns towards anterior and rows towards the patient's left (ALS):
    # phase 3 transposes and flips it into the network's LPS, its phase-2 NIfTIs stay as they are.
    for pid, annotated, stored in (("P1", [True] * 8, "LPS"), ("P2", NO_HEART, "ALS")):
        ct = sitk.ReadImage(str(layout.ct_nifti / f"{pid}.nii.gz"))
        mask = sitk.ReadImage(str(layout.masks / f"{pid}.nii.gz"))
        assert orientation_code(ct) == stored
        ct_network, code = to_network_orientation(ct)
        assert code == stored and ct_network.GetDirection() == pytest.approx(np.eye(3).ravel())
        hu = sitk.GetArrayFromImage(ct_network)
        labels = to_network_array(sitk.GetArrayFromImage(mask), stored)
        assert np.array_equal(hu, to_network_array(sitk.GetArrayFromImage(ct), stored))
        assert (stored == "LPS") == np.array_equal(hu, sitk.GetArrayFromImage(ct))
        zscored, mean, std = window_and_zscore(hu)

        norm_ct = sitk.ReadImage(str(layout.normalized_ct / f"{pid}.nii.gz"))
        norm_mask = sitk.ReadImage(str(layout.normalized_masks / f"{pid}.nii.gz"))
        ct_array = sitk.GetArrayFromImage(norm_ct)
        mask_array = sitk.GetArrayFromImage(norm_mask)
        assert ct_array.dtype == np.float32 and ct_array.shape == (6, 32, 32)
        assert mask_array.dtype == np.uint8 and mask_array.shape == (6, 32, 32)
        np.testing.assert_allclose(ct_array, resize_ct_slices(zscored, 32), atol=1e-5)
        np.testing.assert_array_equal(mask_array, resize_mask_slices(labels, 32))
        assert set(np.unique(mask_array)) <= set(np.unique(labels))

        # Overlay: same corners and centre (in network order), and each structure's centre of mass
        # stays put; the normalized volumes are LPS.
        for image in (norm_ct, norm_mask):
            np.testing.assert_allclose(corners_and_centre(image), corners_and_centre(ct_network), atol=1e-4)
            assert orientation_code(image) == "LPS"
        for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART):
            before = centre_of_mass_mm(mask, label)
            after = centre_of_mass_mm(norm_mask, label)
            assert np.abs(after - before).max() < max(norm_mask.GetSpacing()[:2]) / 2

        cache = layout.training_cache / pid
        ct_npy, mask_npy = np.load(cache / "ct.npy"), np.load(cache / "mask.npy")
        assert ct_npy.dtype == np.float16 and mask_npy.dtype == np.uint8
        np.testing.assert_allclose(ct_npy, ct_array, atol=2e-3)
        np.testing.assert_array_equal(mask_npy, mask_array)
        meta = json.loads((cache / "meta.json").read_text())
        assert meta == read_cache_meta(data_root, pid)
        assert meta["format"] == PROCESSED_FORMAT and meta["ptv"] == DERIVED_PTV
        assert meta["annotated"] == annotated
        assert meta["shape_zyx"] == [6, 32, 32] and meta["original_shape_zyx"] == [6, 40, 48]
        assert meta["orientation"] == {"stored": stored, "network": "LPS"}
        assert meta["window"] == [-1000, 400] and meta["size"] == 32
        assert (meta["mean"], meta["std"]) == (mean, std)
        assert meta["original_spacing_xyz"] == pytest.approx([0.8, 0.9, 3.0])
        assert meta["original_direction"] == pytest.approx(list(ct.GetDirection()))  # phase 2's grid
        assert meta["original_origin_xyz"] == pytest.approx(list(ct.GetOrigin()))
        assert meta["slice_labels"] == slice_label_bits(mask_npy)
        assert meta["slice_labels"][2] == 0b111011  # slice 2: background, GTV, lungs, heart
        assert normalization[pid] == {k: meta[k] for k in normalization[pid]}
    assert not list(data_root.rglob(PARTIAL_DIR_NAME))


def box_corners_mm(image: sitk.Image, box_yx) -> np.ndarray:
    """Physical points (LPS mm) of the outer corners and centre of the box (y0, x0, side) on ``image``'s grid."""
    y0, x0, side = box_yx
    sz = image.GetSize()[2]
    points = [(x0 - 0.5, y0 - 0.5, 0), (x0 + side - 0.5, y0 - 0.5, 0), (x0 - 0.5, y0 + side - 0.5, sz - 1),
              (x0 + side - 0.5, y0 + side - 0.5, sz - 1), (x0 + (side - 1) / 2, y0 + (side - 1) / 2, (sz - 1) / 2)]
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in points])


def test_run_with_crop_body_records_the_box_and_overlays_the_ct(data_root) -> None:
    """P1 (LPS, 40 x 48, body rows 4-35, cols 4-43) and P2 (stored ALS: 48 x 40 in LPS) with a 2 mm
    margin (3 px at 0.8 and 0.9 mm): squares of 46 px, wider than the image, padded with air."""
    results = n3.run(data_root=data_root, size=32, crop_body=True, crop_margin_mm=2)
    assert [(r.patient_id, r.status) for r in results] == [("P1", DONE), ("P2", DONE)]
    assert results[0].message.endswith("body box (y0, x0, side) (-3, 1, 46)")
    layout = DataLayout(data_root)
    normalization = json.loads((layout.normalized_ct / "normalization.json").read_text())
    for pid, stored, box in (("P1", "LPS", (-3, 1, 46)), ("P2", "ALS", (1, -3, 46))):
        hu, spacing_yx = _network_ct(layout, pid)
        assert body_box(hu, spacing_yx, margin_mm=2) == box
        meta = read_cache_meta(data_root, pid)
        assert meta["crop"] == {"method": "body", "threshold_hu": -500, "margin_mm": 2, "box_yx": list(box)}
        assert normalization[pid]["crop"] == meta["crop"]
        assert meta["shape_zyx"] == [6, 32, 32] and meta["original_shape_zyx"] == [6, 40, 48]
        _assert_outputs_are_the_box_of_the_ct(layout, pid, stored, box)


def _network_ct(layout: DataLayout, pid: str) -> tuple[np.ndarray, tuple[float, float]]:
    """(HU (Z, Y, X) in the network's orientation, (spacing y, spacing x) mm) of phase 2's CT."""
    ct_network, _ = to_network_orientation(sitk.ReadImage(str(layout.ct_nifti / f"{pid}.nii.gz")))
    spacing_x, spacing_y = ct_network.GetSpacing()[:2]
    return sitk.GetArrayFromImage(ct_network), (spacing_y, spacing_x)


def _assert_outputs_are_the_box_of_the_ct(layout: DataLayout, pid: str, stored: str, box) -> None:
    """Phase 3's outputs of a cropped patient (32 px) are its CT and label map cropped to ``box`` (air
    and background past the image), z-scored with the whole volume's statistics and resized, and
    the normalized NIfTIs lie on the box, over the CT."""
    ct_network, _ = to_network_orientation(sitk.ReadImage(str(layout.ct_nifti / f"{pid}.nii.gz")))
    mask = sitk.ReadImage(str(layout.masks / f"{pid}.nii.gz"))
    hu = sitk.GetArrayFromImage(ct_network)
    labels = to_network_array(sitk.GetArrayFromImage(mask), stored)
    zscored, mean, std = window_and_zscore(hu)
    meta = read_cache_meta(layout.root, pid)
    assert (meta["mean"], meta["std"]) == (mean, std)  # statistics of the whole windowed volume
    norm_ct = sitk.ReadImage(str(layout.normalized_ct / f"{pid}.nii.gz"))
    norm_mask = sitk.ReadImage(str(layout.normalized_masks / f"{pid}.nii.gz"))
    air = np.float32((-1000 - mean) / std)
    expected_ct = resize_ct_slices(crop_to_box(zscored, box, fill=air), 32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(norm_ct), expected_ct, atol=1e-5)
    assert sitk.GetArrayFromImage(norm_ct)[:, 0, 0] == pytest.approx(air, abs=1e-5)  # padded with air
    expected_mask = resize_mask_slices(crop_to_box(labels, box), 32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(norm_mask), expected_mask)
    np.testing.assert_array_equal(np.load(layout.training_cache / pid / "mask.npy"), expected_mask)
    spacing_x, spacing_y = ct_network.GetSpacing()[:2]
    assert norm_ct.GetSpacing() == pytest.approx((spacing_x * box[2] / 32, spacing_y * box[2] / 32, 3.0))
    for image in (norm_ct, norm_mask):  # the normalized volumes cover the box, on the CT
        np.testing.assert_allclose(corners_and_centre(image), box_corners_mm(ct_network, box), atol=1e-4)
    for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART):
        assert np.abs(centre_of_mass_mm(norm_mask, label) - centre_of_mass_mm(mask, label)).max() \
            < max(norm_mask.GetSpacing()[:2]) / 2


def test_rerun_with_other_crop_settings_is_refused(data_root) -> None:
    n3.run(data_root=data_root, size=32, crop_body=True, crop_margin_mm=2)
    assert [r.status for r in n3.run(data_root=data_root, size=32, crop_body=True, crop_margin_mm=2)] == [SKIPPED] * 2
    for kwargs, asked in (({}, "no crop"), ({"crop_body": True}, "body crop (> -500 HU, margin 10 mm)")):
        results = n3.run(data_root=data_root, size=32, patients=["P1"], **kwargs)
        assert [r.status for r in results] == [FAILED]
        assert results[0].message == (f"P1: outputs exist with body crop (> -500 HU, margin 2 mm), this run asks "
                                      f"for {asked}; pass --overwrite to redo them")
    assert [r.status for r in n3.run(data_root=data_root, size=32, overwrite=True)] == [DONE] * 2
    assert read_cache_meta(data_root, "P1")["crop"] is None   # off: recorded as null
    normalization = json.loads((DataLayout(data_root).normalized_ct / "normalization.json").read_text())
    assert normalization["P1"]["crop"] is None
    results = n3.run(data_root=data_root, size=32, crop_body=True, crop_margin_mm=2, patients=["P2"])
    assert results[0].message == ("P2: outputs exist with no crop, this run asks for body crop (> -500 HU, "
                                  "margin 2 mm); pass --overwrite to redo them")


def test_run_with_a_field_of_view_records_the_box_pads_past_the_edges_and_overlays_the_ct(data_root) -> None:
    """--crop-body --fov-mm 40: 40 / 0.8 = 50 px (the finer of 0.8 and 0.9 mm), more than the 40 x 48
    image. P1's body (rows 4-35, cols 4-43, lungs cut out symmetrically) has its centroid at
    (19.5, 23.5): rows -5 to 44, cols -1 to 48, air all round. P2 is stored ALS: (23.5, 19.5) in LPS.
    The predictor, given the checkpoint's settings, finds the same box on the same CT."""
    from thoracic_seg.inference import Predictor

    results = n3.run(data_root=data_root, size=32, crop_body=True, fov_mm=40)
    assert [(r.patient_id, r.status) for r in results] == [("P1", DONE), ("P2", DONE)]
    assert results[0].message.endswith("field-of-view box (y0, x0, side) (-5, -1, 50)")
    layout = DataLayout(data_root)
    normalization = json.loads((layout.normalized_ct / "normalization.json").read_text())
    settings = {"method": "fov", "threshold_hu": -500, "fov_mm": 40}
    predictor = Predictor(torch.nn.Identity(), Path("fov.pth"), torch.device("cpu"), precision.FLOAT32,
                          batch_size=4, window=(-1000.0, 400.0), size=32, crop=dict(settings))
    for pid, stored, box in (("P1", "LPS", (-5, -1, 50)), ("P2", "ALS", (-1, -5, 50))):
        hu, spacing_yx = _network_ct(layout, pid)
        assert fov_box(hu, spacing_yx, 40) == box
        meta = read_cache_meta(data_root, pid)
        assert meta["crop"] == {**settings, "box_yx": list(box)} and normalization[pid]["crop"] == meta["crop"]
        assert crop_settings_of(meta, "meta") == settings and crop_box_of(meta, "meta") == box
        assert predictor.crop_box(hu, spacing_yx) == box      # prediction's box = phase 3's
        cached = np.load(layout.training_cache / pid / "ct.npy").astype(np.float32)
        np.testing.assert_allclose(predictor.preprocess(hu, box), cached, atol=4e-3)   # float16 cache
        _assert_outputs_are_the_box_of_the_ct(layout, pid, stored, box)   # 50 px of 0.8 and 0.9 mm in 32


def test_rerun_with_another_field_of_view_is_refused_and_fov_needs_the_crop(data_root) -> None:
    n3.run(data_root=data_root, size=32, crop_body=True, fov_mm=40)
    assert [r.status for r in n3.run(data_root=data_root, size=32, crop_body=True, fov_mm=40.0)] == [SKIPPED] * 2
    for kwargs, asked in (({"crop_body": True, "fov_mm": 50}, "50 mm field of view on the body (> -500 HU)"),
                          ({"crop_body": True}, "body crop (> -500 HU, margin 10 mm)")):
        results = n3.run(data_root=data_root, size=32, patients=["P1"], **kwargs)
        assert results[0].status == FAILED
        assert results[0].message == ("P1: outputs exist with 40 mm field of view on the body (> -500 HU), this run "
                                      f"asks for {asked}; pass --overwrite to redo them")
    with pytest.raises(ValueError, match=r"fov_mm=40 crops to a field of view on the body: it needs crop_body=True"):
        n3.run(data_root=data_root, size=32, fov_mm=40)
    with pytest.raises(ValueError, match=r"fov_mm \(the field of view\) must be a finite number > 0 mm, got 0"):
        n3.run(data_root=data_root, size=32, crop_body=True, fov_mm=0)


def test_main_fov_mm_without_a_value_takes_the_default(data_root, capsys) -> None:
    assert n3.main(["--data-root", str(data_root), "--size", "32", "--crop-body", "--fov-mm", "--patients", "P1"]) == 0
    assert read_cache_meta(data_root, "P1")["crop"] == {"method": "fov", "threshold_hu": -500, "fov_mm": DEFAULT_FOV_MM,
                                                        "box_yx": [-217, -213, 475]}   # 380 / 0.8 = 475 px
    assert "Phase 3: 1 normalized, 0 skipped, 0 failed" in capsys.readouterr().out


def centre_of_mass_mm(image: sitk.Image, label: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayFromImage(image) == label).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))


def test_slice_label_bits() -> None:
    mask = np.zeros((3, 2, 2), np.uint8)
    mask[1, 0, 0], mask[2] = organs.GTV, organs.SPINAL_CORD
    assert slice_label_bits(mask) == [0b1, 0b11, 0b10000000]


def test_rerun_skips_and_overwrite_redoes(data_root) -> None:
    n3.run(data_root=data_root, size=32)
    cache = DataLayout(data_root).training_cache
    before = (cache / "P1" / "ct.npy").stat().st_mtime_ns
    assert [r.status for r in n3.run(data_root=data_root, size=32)] == [SKIPPED, SKIPPED]
    assert (cache / "P1" / "ct.npy").stat().st_mtime_ns == before
    (cache / "P2" / "mask.npy").unlink()  # an incomplete patient is redone without --overwrite
    assert [r.status for r in n3.run(data_root=data_root, size=32)] == [SKIPPED, DONE]
    results = n3.run(data_root=data_root, size=32, overwrite=True, patients=["P1"])
    assert [r.status for r in results] == [DONE]
    assert (cache / "P1" / "ct.npy").stat().st_mtime_ns != before
    normalization = json.loads((DataLayout(data_root).normalized_ct / "normalization.json").read_text())
    assert sorted(normalization) == ["P1", "P2"]  # a partial run keeps the other records
    changed = n3.run(data_root=data_root, size=64, patients=["P2"])  # never mix two preprocessings
    assert changed[0].status == FAILED
    assert changed[0].message == ("P2: outputs exist with window [-1000, 400] and size 32, this run "
                                  "asks for window [-1000, 400] and size 64; pass --overwrite to redo them")


def test_changed_inputs_are_redone_without_overwrite_and_said(data_root) -> None:
    """Phase 2.5 re-run with another margin (only its record changes) or a new label map: phase 3
    without --overwrite recomputes that patient and says why; the run after skips it."""
    masks, cache = DataLayout(data_root).masks, DataLayout(data_root).training_cache
    n3.run(data_root=data_root, size=32)
    write_mask_record(masks, "P1", [True] * 8, {"source": "derived", "margin_mm": 5.0})
    results = n3.run(data_root=data_root, size=32)
    assert [r.status for r in results] == [DONE, SKIPPED]
    assert results[0].message.startswith("redone: its CT, label map or phase 2.5 record changed")
    assert read_cache_meta(data_root, "P1")["ptv"] == {"source": "derived", "margin_mm": 5.0}
    assert [r.status for r in n3.run(data_root=data_root, size=32)] == [SKIPPED, SKIPPED]
    _, labels = phantom(seed=1)
    labels[0, 10:14, 10:14] = organs.SPINAL_CORD
    mask = sitk.ReadImage(str(masks / "P2.nii.gz"))
    write_nifti(make_image(labels, direction=mask.GetDirection()), masks / "P2.nii.gz")
    results = n3.run(data_root=data_root, size=32)
    assert [r.status for r in results] == [SKIPPED, DONE] and "changed" in results[1].message
    assert organs.SPINAL_CORD in np.load(cache / "P2" / "mask.npy")


def test_a_cache_of_an_earlier_version_is_redone_here_and_refused_downstream(data_root) -> None:
    n3.run(data_root=data_root, size=32)
    meta_path = DataLayout(data_root).training_cache / "P1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["format"], meta["ptv"], meta["inputs_fingerprint"]  # what the previous version wrote
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"P1: .*meta.json was written by an earlier version of this pipeline "
                                         r"\(format 1.*re-run extract_multi_organ_masks.py --overwrite, then "
                                         r"normalize_ct_and_masks.py --overwrite"):
        read_cache_meta(data_root, "P1")
    results = n3.run(data_root=data_root, size=32)
    assert [r.status for r in results] == [DONE, SKIPPED] and "earlier version" in results[0].message
    assert read_cache_meta(data_root, "P1")["format"] == PROCESSED_FORMAT


def test_a_cache_without_orientation_record_is_redone_here_and_refused_downstream(data_root) -> None:
    n3.run(data_root=data_root, size=32)
    meta_path = DataLayout(data_root).training_cache / "P2" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["orientation"]  # what the version before the orientation step wrote (format 2)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"^P2: .*meta.json was written by an earlier version of this pipeline "
                                         r"\(orientation None, .*re-run normalize_ct_and_masks.py --overwrite$"):
        read_cache_meta(data_root, "P2")
    results = n3.run(data_root=data_root, size=32)
    assert [r.status for r in results] == [SKIPPED, DONE]
    assert results[1].message.startswith("redone: its training cache was written by an earlier version "
                                         "(no orientation record)")
    assert results[1].message.endswith(", stored ALS -> LPS")
    assert read_cache_meta(data_root, "P2")["orientation"] == {"stored": "ALS", "network": "LPS"}


# --------------------------------------------------------------------------------------------
# Orientation: one voxel order for the network, exact both ways
# --------------------------------------------------------------------------------------------
AXIAL_FLIPS = [(sx, sy, sz) for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)]


@pytest.mark.parametrize("transposed", [False, True], ids=["rows-cols", "cols-rows"])
@pytest.mark.parametrize("signs", AXIAL_FLIPS, ids=lambda s: "".join("+" if v > 0 else "-" for v in s))
def test_orientation_round_trip_of_a_label_map_is_exact(signs, transposed) -> None:
    """Every axis-aligned axial orientation (8 flips, in-plane axes in either order): labels go to
    LPS and back unchanged, every voxel keeps its patient position, and the numpy and SimpleITK
    paths agree."""
    sx, sy, sz = signs
    columns = [(sx, 0, 0), (0, sy, 0), (0, 0, sz)]
    if transposed:
        columns[0], columns[1] = columns[1], columns[0]
    direction = np.array(columns, dtype=float).T.ravel().tolist()
    rng = np.random.default_rng(3)
    labels = rng.integers(0, organs.NUM_CLASSES, size=(4, 5, 6), dtype=np.uint8)
    image = make_image(labels, direction=direction)
    code = orientation_code(image)
    assert code == "".join(_AXIS_LETTERS["xyz".index(a)][0 if v > 0 else 1]
                           for c in columns for a, v in zip("xyz", c) if v)
    network, stored = to_network_orientation(image)
    assert stored == code and orientation_code(network) == "LPS"
    assert network.GetDirection() == pytest.approx(np.eye(3).ravel())
    network_labels = sitk.GetArrayFromImage(network)
    assert network_labels.shape == network_shape_zyx(labels.shape, code)
    assert np.array_equal(network_labels, to_network_array(labels, code))
    back = from_network_orientation(network_labels, code)
    assert back.dtype == np.uint8 and back.flags.c_contiguous and np.array_equal(back, labels)
    assert (code == "LPS") == np.array_equal(network_labels, labels)
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:  # (x, y, z) of the stored image
        point = image.TransformIndexToPhysicalPoint(index)
        moved = network.TransformPhysicalPointToIndex(point)
        assert labels[index[::-1]] == network_labels[moved[::-1]]
    restored = sitk.DICOMOrient(network, code)  # the image path back agrees
    assert np.array_equal(sitk.GetArrayFromImage(restored), labels)
    assert restored.GetOrigin() == pytest.approx(image.GetOrigin())


@pytest.mark.parametrize("code, expected", [("LPS", (3, 4, 5)), ("RAI", (3, 4, 5)), ("pls", (3, 5, 4)),
                                           ("SLP", (5, 3, 4))])
def test_network_shape_of_stored_codes(code, expected) -> None:
    assert network_shape_zyx((3, 4, 5), code) == expected


@pytest.mark.parametrize("code", ["LPX", "LLS", "LP", "", "SPL1"])
def test_bad_orientation_codes_are_refused(code) -> None:
    with pytest.raises(ValueError, match="orientation code must be three letters, one of each of L/R, P/A, S/I"):
        from_network_orientation(np.zeros((2, 2, 2)), code)


def test_an_oblique_image_is_refused_clearly(tmp_path) -> None:
    angle = np.radians(30)
    rotation = [np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1]
    image = make_image(np.zeros((3, 4, 5), np.int16), direction=rotation)
    with pytest.raises(ValueError, match=r"^oblique image: axis x points along \[0.866, 0.5, 0.0\] \(LPS\), "
                                         r"30.0 deg from the nearest patient axis \(at most 10 deg\).*cannot be "
                                         r"brought to LPS by permuting and flipping axes; "
                                         r"resample it to an axial grid"):
        to_network_orientation(image)
    slight = np.radians(4)  # within phase 2's axial limit: permuted, the small rotation kept
    tilted = make_image(np.zeros((3, 4, 5), np.int16),
                        direction=[-np.cos(slight), np.sin(slight), 0, -np.sin(slight), -np.cos(slight), 0, 0, 0, 1])
    network, code = to_network_orientation(tilted)
    assert code == "RAS" and orientation_code(network) == "LPS"
    # phase 3 reports an oblique patient and goes on
    root = make_data_root(tmp_path / "DATA", {"P1": {}, "P9": {"direction": rotation}})
    results = n3.run(data_root=root, size=32)
    assert [r.status for r in results] == [DONE, FAILED]
    assert results[1].message.startswith("P9: ") and "oblique image: axis x" in results[1].message


def test_bad_patient_fails_cleanly_and_others_are_done(tmp_path) -> None:
    bad_labels = phantom()[1].copy()
    bad_labels[0, 0, 0] = 9
    root = make_data_root(tmp_path / "DATA", {
        "GOOD": {},
        "GRID": {"mask_spacing": (0.8, 0.9, 2.5)},  # label map not on the CT grid
        "LABEL9": {"labels": bad_labels},
        "NOCSV": {"in_csv": False},
    })
    (DataLayout(root).masks / "NOMASK.nii.gz").unlink(missing_ok=True)
    write_nifti(make_image(phantom()[0]), DataLayout(root).ct_nifti / "NOMASK.nii.gz")
    results = {r.patient_id: r for r in n3.run(data_root=root, size=32)}
    assert results["GOOD"].status == DONE
    expected = {
        "GRID": r"GRID: label map .*GRID\.nii\.gz vs CT .*: geometry mismatch",
        "LABEL9": r"LABEL9: .* holds label values \[0, 1, 3, 4, 5, 9\], expected 0-7",
        "NOCSV": r"NOCSV: .*NOCSV\.nii\.gz was written by an earlier version of extract_multi_organ_masks\.py "
                 r"\(no NOCSV\.json.*re-run extract_multi_organ_masks\.py --overwrite",
        "NOMASK": r"NOMASK: no label map .*NOMASK\.nii\.gz; run extract_multi_organ_masks\.py",
    }
    for pid, pattern in expected.items():
        assert results[pid].status == FAILED
        assert re.search(pattern, results[pid].message), results[pid].message
    layout = DataLayout(root)
    for pid in expected:  # nothing half-written for a failed patient
        assert not (layout.normalized_ct / f"{pid}.nii.gz").exists()
        assert not (layout.normalized_masks / f"{pid}.nii.gz").exists()
        assert not (layout.training_cache / pid).exists()
    assert not list(root.rglob(PARTIAL_DIR_NAME))
    assert exit_status(list(results.values())) == 1
    assert list(json.loads((layout.normalized_ct / "normalization.json").read_text())) == ["GOOD"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--window", "400", "-1000"],
     "argument --window: window LOW must be below HIGH (HU), got LOW=400 HIGH=-1000"),
    (["--window", "-1000"], "argument --window: expected 2 arguments"),
    (["--size", "100"], "argument --size: size must be a multiple of 16 and >= 32 (e.g. 256), got 100"),
    (["--size", "16"], "argument --size: size must be a multiple of 16 and >= 32 (e.g. 256), got 16"),
    (["--size", "big"], "argument --size: must be an integer, got 'big'"),
    (["--crop-margin-mm", "5"], "argument --crop-margin-mm: only with --crop-body"),
    (["--crop-body", "--crop-margin-mm", "-1"],
     "argument --crop-margin-mm: crop margin must be a finite number >= 0 mm, got -1.0"),
    (["--fov-mm", "360"], "argument --fov-mm: only with --crop-body"),
    (["--fov-mm"], "argument --fov-mm: only with --crop-body"),
    (["--crop-body", "--fov-mm", "0"],
     "argument --fov-mm: fov_mm (the field of view) must be a finite number > 0 mm, got 0.0"),
    (["--crop-body", "--fov-mm", "-360"],
     "argument --fov-mm: fov_mm (the field of view) must be a finite number > 0 mm, got -360.0"),
    (["--crop-body", "--fov-mm", "wide"], "argument --fov-mm: invalid float value: 'wide'"),
    (["--crop-body", "--fov-mm", "360", "--crop-margin-mm", "5"],
     "argument --crop-margin-mm: not with --fov-mm (a field of view has no margin)"),
])
def test_invalid_arguments_give_one_line_errors(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        n3.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_main_runs_and_summarises(data_root, capsys) -> None:
    assert n3.main(["--data-root", str(data_root), "--size", "32", "--workers", "1"]) == 0
    assert "Phase 3: 2 normalized, 0 skipped, 0 failed" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Real data: phases 2 and 2.5 on the two NSCLC-Radiomics sample patients, then phase 3
# --------------------------------------------------------------------------------------------
REAL_PATIENTS = ["LUNG1-005", "LUNG1-010"]


@pytest.fixture(scope="module")
def real_processed(real_sample_root, tmp_path_factory) -> tuple[Path, list]:
    import convert_dicom_to_nifti
    import extract_multi_organ_masks

    root = tmp_path_factory.mktemp("real") / "DATA"
    for phase in (convert_dicom_to_nifti, extract_multi_organ_masks):
        results = phase.run(data_root=root, dicom_root=real_sample_root)
        assert [(r.patient_id, r.status) for r in results] == [(p, DONE) for p in REAL_PATIENTS]
    return root, n3.run(data_root=root, workers=2)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_patients_normalize_and_overlay(real_processed) -> None:
    from thoracic_seg.layout import read_structures_csv

    root, results = real_processed
    assert [(r.patient_id, r.status) for r in results] == [(p, DONE) for p in REAL_PATIENTS]
    layout = DataLayout(root)
    annotated = read_structures_csv(layout.masks / "structures.csv")
    normalization = json.loads((layout.normalized_ct / "normalization.json").read_text())
    for pid in REAL_PATIENTS:
        ct = sitk.ReadImage(str(layout.ct_nifti / f"{pid}.nii.gz"))
        mask = sitk.ReadImage(str(layout.masks / f"{pid}.nii.gz"))
        norm_ct = sitk.ReadImage(str(layout.normalized_ct / f"{pid}.nii.gz"))
        norm_mask = sitk.ReadImage(str(layout.normalized_masks / f"{pid}.nii.gz"))
        hu, labels = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(mask)
        assert labels.shape == (91, 512, 512)
        ct_array, mask_array = sitk.GetArrayFromImage(norm_ct), sitk.GetArrayFromImage(norm_mask)
        assert ct_array.shape == mask_array.shape == (91, 256, 256)
        assert ct_array.dtype == np.float32 and mask_array.dtype == np.uint8

        zscored, mean, std = window_and_zscore(hu)
        assert normalization[pid]["mean"] == mean and normalization[pid]["std"] == std
        assert -1000 < mean < 400 and std > 100  # a thorax, not a phantom
        np.testing.assert_allclose(ct_array[::10], resize_ct_slices(zscored[::10], 256), atol=1e-4)
        assert set(np.unique(mask_array)) <= set(np.unique(labels)) <= set(range(8))

        for image in (norm_ct, norm_mask):
            np.testing.assert_allclose(corners_and_centre(image), corners_and_centre(ct), atol=1e-3)
        pixel_area_ratio = np.prod(norm_mask.GetSpacing()[:2]) / np.prod(mask.GetSpacing()[:2])
        for label in sorted(set(np.unique(labels)) - {0}):
            before, after = centre_of_mass_mm(mask, label), centre_of_mass_mm(norm_mask, label)
            assert np.abs(after - before).max() < max(norm_mask.GetSpacing()[:2]) / 2, (pid, label)
            volume_before = np.count_nonzero(labels == label)
            volume_after = np.count_nonzero(mask_array == label) * pixel_area_ratio
            assert volume_after == pytest.approx(volume_before, rel=0.05), (pid, label)

        cache = layout.training_cache / pid
        meta = json.loads((cache / "meta.json").read_text())
        assert meta["annotated"] == annotated[pid]
        assert meta["original_shape_zyx"] == [91, 512, 512]
        np.testing.assert_array_equal(np.load(cache / "mask.npy", mmap_mode="r"), mask_array)
        np.testing.assert_allclose(np.load(cache / "ct.npy", mmap_mode="r"), ct_array, atol=4e-3)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_patients_split_and_load(real_processed, tmp_path) -> None:
    import prepare_train_val_test_splits as splits
    from dataset_multi_organ import MultiOrganDataset

    root, _ = real_processed
    summary = splits.run(data_root=root, splits_dir=tmp_path / "splits")
    assert [summary[n]["patients"] for n in SPLIT_NAMES] == [1, 0, 1]
    assert summary["total"]["slices"] == 182
    ds = MultiOrganDataset("train", data_root=root, splits_dir=tmp_path / "splits")
    cache = DataLayout(root).training_cache / ds.patients[0]
    ct, mask = np.load(cache / "ct.npy"), np.load(cache / "mask.npy")
    for i in (0, 45, 90):
        item = ds[i]
        assert item["slice_index"] == i and item["image"].shape == (1, 256, 256)
        np.testing.assert_array_equal(item["image"][0].numpy(), ct[i].astype(np.float32))
        np.testing.assert_array_equal(item["mask"].numpy(), mask[i])
    assert ds.slice_has_label(organs.GTV).sum() == np.count_nonzero((mask == organs.GTV).any(axis=(1, 2)))


@pytest.mark.real_data
@pytest.mark.slow
def test_real_patients_field_of_view_keeps_every_organ_and_maps_back(real_processed, tmp_path) -> None:
    """The default field of view (380 mm, 389 px of 0.977 mm) around the body centroid holds every
    lung, heart, esophagus and cord voxel of both real patients, where the body box spans 449-463 mm
    (couch and arms included); phase 3 with it gives 1.48 mm pixels and the lungs come back
    through the box at Dice > 0.99 (benchmarks/bench_crop_fov.py measures all six patients)."""
    root, _ = real_processed
    layout = DataLayout(root)
    expected = {"LUNG1-005": ((57, 47, 389), 474), "LUNG1-010": ((78, 107, 389), 460)}
    for pid, (box, body_side) in expected.items():
        ct, stored = to_network_orientation(sitk.ReadImage(str(layout.ct_nifti / f"{pid}.nii.gz")))
        hu = sitk.GetArrayFromImage(ct)
        labels = to_network_array(sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / f"{pid}.nii.gz"))), stored)
        spacing_yx = ct.GetSpacing()[1::-1]
        assert fov_box(hu, spacing_yx) == box and body_box(hu, spacing_yx)[2] == body_side
        y0, x0, side = box
        inside = np.zeros(labels.shape[1:], bool)
        inside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = True
        for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART, organs.ESOPHAGUS, organs.SPINAL_CORD):
            assert (labels == label).any() and not (labels[:, ~inside] == label).any(), (pid, label)

    fov_root = DataLayout(tmp_path / "DATA")
    fov_root.ct_nifti.parent.mkdir(parents=True)
    fov_root.ct_nifti.symlink_to(layout.ct_nifti, target_is_directory=True)
    fov_root.masks.symlink_to(layout.masks, target_is_directory=True)
    [result] = n3.run(data_root=fov_root.root, patients=["LUNG1-010"], crop_body=True, fov_mm=DEFAULT_FOV_MM)
    assert result.status == DONE, result.message
    meta = read_cache_meta(fov_root.root, "LUNG1-010")
    assert meta["crop"] == {"method": "fov", "threshold_hu": -500, "fov_mm": 380, "box_yx": [78, 107, 389]}
    norm_mask = sitk.ReadImage(str(fov_root.normalized_masks / "LUNG1-010.nii.gz"))
    assert norm_mask.GetSpacing()[:2] == pytest.approx((389 * 0.977 / 256,) * 2, abs=1e-6)
    small = np.load(fov_root.training_cache / "LUNG1-010" / "mask.npy")[::6]
    ct, stored = to_network_orientation(sitk.ReadImage(str(layout.ct_nifti / "LUNG1-010.nii.gz")))
    truth = to_network_array(sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / "LUNG1-010.nii.gz"))), stored)[::6]
    back = probabilities_to_ct_labels(_one_hot(small), truth.shape[1:], box_yx=(78, 107, 389), batch_size=4)
    for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG):
        dice = 2 * np.sum((back == label) & (truth == label)) / (np.sum(back == label) + np.sum(truth == label))
        assert dice > 0.99, (label, dice)


def test_phase_2_5_rerun_with_another_margin_then_phase_3_recomputes_once(synthetic_cohort, tmp_path) -> None:
    """The real chain: phase 2.5 re-run with another margin (the label map is the same, its record
    is not) and phase 3 without --overwrite redoes the patient, says so, and skips it the next time."""
    import convert_dicom_to_nifti
    import extract_multi_organ_masks

    raw_dir, _, _ = synthetic_cohort
    root = tmp_path / "DATA"
    assert convert_dicom_to_nifti.run(data_root=root, dicom_root=raw_dir, patients=None)[0].status == DONE
    extract_multi_organ_masks.run(data_root=root, dicom_root=raw_dir, patients=["SYN-001"])
    assert [r.status for r in n3.run(data_root=root, size=32, patients=["SYN-001"])] == [DONE]
    assert read_cache_meta(root, "SYN-001")["ptv"] == {"source": "derived", "margin_mm": 10.0}

    [again] = extract_multi_organ_masks.run(data_root=root, dicom_root=raw_dir, patients=["SYN-001"],
                                            ptv_margin_mm=7.5)
    assert again.status == DONE and "settings changed" in again.message
    [redone] = n3.run(data_root=root, size=32, patients=["SYN-001"])
    assert redone.status == DONE and redone.message.startswith("redone: its CT, label map or phase 2.5 record")
    assert read_cache_meta(root, "SYN-001")["ptv"] == {"source": "derived", "margin_mm": 7.5}
    assert [r.status for r in n3.run(data_root=root, size=32, patients=["SYN-001"])] == [SKIPPED]
