"""Phase 5b: 3D metrics against hand-computed values, the way back to the original CT grid, and
end-to-end evaluation of a perfect model and of a real (tiny, untrained) checkpoint."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_mask_record
from scipy.spatial.distance import cdist

import evaluate_multi_organ as ev
import normalize_ct_and_masks as phase3
import predict_multi_organ as pm
from thoracic_seg import inference
from thoracic_seg import organs, precision
from thoracic_seg.batch import DONE, FAILED, exit_status, file_sha256, same_geometry
from thoracic_seg.grid import resize_labels_to_shape, to_network_array
from thoracic_seg.layout import DataLayout, read_cache_meta
from thoracic_seg.metrics import dice_3d, hd95_mm, score_structures, volume_ml
from thoracic_seg.postprocess import (
    describe_postprocess, keep_largest_component, postprocess_labels, remove_small_components,
)
from thoracic_seg.ptv import ptv_from_gtv

STRUCTURE_COLUMNS = ("patient_id", "label", "structure", "annotated", "source_rois", "derived",
                     "voxels", "volume_ml", "voxels_lost")
CONTOURED = {"source": "contoured"}
SIZE = 64  # phase-3 slice size of the test data


def cube(shape=(12, 12, 12), z=(2, 6), y=(2, 6), x=(2, 6)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def point(zyx, shape=(12, 12, 12)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[zyx] = True
    return mask


EMPTY = np.zeros((12, 12, 12), bool)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, truth, expected", [
    (cube(), cube(), 1.0),
    (cube(z=(3, 7)), cube(), 2 * 48 / 128),          # 4x4x4 cubes overlapping on 3x4x4
    (cube(x=(2, 4)), cube(), 2 * 32 / 96),           # half a cube inside the cube
    (cube(z=(7, 11)), cube(), 0.0),                  # disjoint
    (EMPTY, cube(), 0.0),
    (cube(), EMPTY, 0.0),
])
def test_dice_3d_hand_values(pred, truth, expected):
    assert dice_3d(pred, truth) == pytest.approx(expected, abs=1e-12)


def test_dice_3d_both_empty_is_nan():
    assert math.isnan(dice_3d(EMPTY, EMPTY))


@pytest.mark.parametrize("pred, truth, spacing, expected", [
    (cube(), cube(), (3.0, 1.0, 1.0), 0.0),
    # Two voxels one slice apart with 2 and 2 voxels offset in plane: sqrt(3² + 2² + 2²).
    (point((4, 5, 5)), point((5, 7, 7)), (3.0, 1.0, 1.0), math.sqrt(17.0)),
    # 4x4x4 cubes offset by one slice of 3 mm: of the 56 surface voxels, 36 lie on the other
    # surface, the 4 inner voxels of the overlapped face are 1 mm from the other's side faces and
    # the 16 of the uncovered face are 3 mm away, in both directions: 95th percentile = 3 mm.
    (cube(z=(3, 7)), cube(), (3.0, 1.0, 1.0), 3.0),
    # The same offset along x, where voxels are 1 mm wide.
    (cube(x=(3, 7)), cube(), (3.0, 1.0, 1.0), 1.0),
    # The same offset along z, isotropic 0.5 mm.
    (cube(z=(3, 7)), cube(), (0.5, 0.5, 0.5), 0.5),
])
def test_hd95_mm_hand_values(pred, truth, spacing, expected):
    assert hd95_mm(pred, truth, spacing) == pytest.approx(expected, abs=1e-9)
    assert hd95_mm(truth, pred, spacing) == pytest.approx(expected, abs=1e-9)  # symmetric


def test_hd95_mm_empty_rules():
    assert math.isnan(hd95_mm(EMPTY, EMPTY, (1, 1, 1)))
    assert hd95_mm(EMPTY, cube(), (1, 1, 1)) == math.inf
    assert hd95_mm(cube(), EMPTY, (1, 1, 1)) == math.inf


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """HD95 from all pairwise distances between surface voxels (a voxel with a face neighbour outside)."""
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    distances = cdist(surface(a), surface(b))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_mm_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:10, :20, :18]
    blobs = []
    for _ in range(2):
        c = rng.uniform((3, 5, 5), (7, 15, 13))
        r = rng.uniform((2, 3, 3), (4, 7, 7))
        blobs.append(((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1)
    spacing = (2.5, 0.7, 0.9)
    assert hd95_mm(blobs[0], blobs[1], spacing) == pytest.approx(_brute_force_hd95(*blobs, spacing), abs=1e-9)


@pytest.mark.parametrize("args, match", [
    ((cube(), cube(shape=(12, 12, 11)), (1, 1, 1)), r"prediction shape \(12, 12, 12\) differs from truth shape \(12, 12, 11\)"),
    ((cube()[0], cube()[0], (1, 1, 1)), r"expected 3D \(z, y, x\) masks, got 2 dimensions"),
    ((cube(), cube(), (1, 1)), r"spacing must be 3 positive finite mm values .*got \(1, 1\)"),
    ((cube(), cube(), (0, 1, 1)), r"spacing must be 3 positive finite mm values"),
    ((cube(), cube(), (float("nan"), 1, 1)), r"spacing must be 3 positive finite mm values"),
])
def test_hd95_mm_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        hd95_mm(*args)


def test_volume_ml_uses_the_voxel_volume():
    assert volume_ml(cube(), (3.0, 0.5, 2.0)) == pytest.approx(64 * 3.0 / 1000)


# --------------------------------------------------------------------------------------------
# Per-structure scoring rules
# --------------------------------------------------------------------------------------------
def test_score_structures_ptv_union_and_unannotated_skipped():
    truth = np.zeros((6, 10, 10), np.uint8)
    truth[1:5, 2:8, 2:8] = organs.PTV
    truth[2:4, 4:6, 4:6] = organs.GTV          # the GTV inside its PTV wins the voxels
    truth[0, 0, :3] = organs.HEART             # heart contoured on a patient where it is "not annotated"
    predicted = np.where(truth > 0, organs.PTV, 0).astype(np.uint8)  # a PTV with no GTV inside
    predicted[0, 0, :3] = 0
    annotated = [True, True, True, False, False, False, False, False]

    rows = {r["structure"]: r for r in score_structures(predicted, truth, (2.0, 1.0, 1.0), annotated)}

    assert [r["structure"] for r in rows.values()] == [organs.structure(k).key for k in range(1, 8)]
    ptv = rows["ptv"]
    assert ptv["labels"] == "1+2" and ptv["dice"] == 1.0 and ptv["hd95_mm"] == 0.0
    assert ptv["surface_dice"] == 1.0 and ptv["apl_mm"] == 0.0
    assert ptv["truth_ml"] == pytest.approx(4 * 6 * 6 * 2.0 / 1000) == ptv["predicted_ml"]
    assert ptv["volume_diff_ml"] == 0.0 and ptv["volume_diff_pct"] == 0.0
    gtv = rows["gtv"]
    assert gtv["dice"] == 0.0 and gtv["hd95_mm"] == math.inf and gtv["surface_dice"] == 0.0
    assert gtv["apl_mm"] == 2 * 4 * 1.0  # nothing predicted: both slices' 4-pixel contours (1 mm pixels) drawn
    assert gtv["volume_diff_ml"] == pytest.approx(-8 * 2.0 / 1000) and gtv["volume_diff_pct"] == -100.0
    heart = rows["heart"]
    assert heart["annotated"] is False
    assert all(heart[c] is None for c in ("dice", "hd95_mm", "truth_ml", "volume_diff_pct", "surface_dice", "apl_mm"))


def test_score_structures_derived_ptv_is_the_margin_of_each_gtv():
    """A derived PTV: margin(predicted GTV) vs margin(true GTV), on the anisotropic grid; a label 2
    the network might predict is ignored, and the lung under the PTV is scored as a whole."""
    truth = np.zeros((8, 16, 16), np.uint8)
    truth[:, 2:14, 2:14] = organs.RIGHT_LUNG
    truth[3:5, 6:9, 6:9] = organs.GTV
    predicted = truth.copy()
    predicted[3:5, 6:9, 6:9] = organs.RIGHT_LUNG
    predicted[3:5, 7:10, 6:9] = organs.GTV                   # the GTV one row off
    predicted[0, 0, 0] = organs.PTV                          # never counted for a derived PTV
    spacing = (3.0, 1.0, 1.0)
    annotated = [True, True, False, True, False, False, False, False]
    rows = {r["structure"]: r for r in score_structures(predicted, truth, spacing, annotated,
                                                            {"source": "derived", "margin_mm": 4.0})}
    ptv = rows["ptv"]
    pred_ptv = ptv_from_gtv(predicted == organs.GTV, spacing, 4.0)
    true_ptv = ptv_from_gtv(truth == organs.GTV, spacing, 4.0)
    assert (ptv["annotated"], ptv["labels"]) == (True, "GTV + 4 mm")
    assert ptv["dice"] == pytest.approx(dice_3d(pred_ptv, true_ptv)) and 0.8 < ptv["dice"] < 1
    assert ptv["truth_ml"] == pytest.approx(true_ptv.sum() * 3.0 / 1000)
    assert rows["gtv"]["dice"] == pytest.approx(2 * 12 / 36)
    # Without a GTV contour there is nothing to grow: PTV not scored. A contoured PTV: labels 1 + 2.
    annotated[organs.GTV] = False
    no_gtv = {r["structure"]: r for r in score_structures(predicted, truth, spacing, annotated,
                                                              {"source": "derived", "margin_mm": 4.0})}
    assert no_gtv["ptv"]["annotated"] is False and no_gtv["ptv"]["dice"] is None
    assert score_structures(predicted, truth, spacing, annotated, CONTOURED)[1]["labels"] == "1+2"


def test_ptv_scoring_line_of_the_summary():
    rows = [{"labels": "GTV + 10 mm", "ptv_source": "derived"}] * 2 + [{"labels": "1+2"}]
    assert ev.ptv_scoring(rows) == ("derived (GTV + 10 mm) in 2 patient(s): margin(predicted GTV) vs "
                                    "margin(true GTV); contoured in 1 patient(s): labels GTV + PTV")
    assert ev.ptv_scoring([]) == "not scored (no PTV, contoured or derived)"


def test_score_structures_of_a_model_that_predicts_some_labels_only():
    """A structure the model does not predict is not scored (no metrics, ``predicted=False``, its
    ``annotated`` kept); one it predicts but misses is Dice 0. A derived PTV needs the GTV."""
    truth = np.zeros((6, 10, 10), np.uint8)
    truth[1:5, 1:5, 1:5] = organs.RIGHT_LUNG
    truth[1:5, 6:9, 6:9] = organs.HEART
    truth[2:4, 2:4, 2:4] = organs.GTV
    predicted = np.where(truth == organs.RIGHT_LUNG, organs.RIGHT_LUNG, 0).astype(np.uint8)  # no heart, no GTV
    annotated = [True, True, False, True, False, True, False, False]
    derived = {"source": "derived", "margin_mm": 2.0}

    rows = {r["structure"]: r for r in score_structures(predicted, truth, (2.0, 1.0, 1.0), annotated, derived,
                                                            predicted_labels={organs.RIGHT_LUNG, organs.HEART})}
    assert rows["lung_right"]["dice"] == 1.0 and "predicted" not in rows["lung_right"]
    assert rows["heart"]["dice"] == 0.0 and rows["heart"]["hd95_mm"] == math.inf   # predicted, missed
    for key in ("gtv", "ptv"):                                                       # not predicted
        assert (rows[key]["annotated"], rows[key]["predicted"]) == (True, False)
        assert all(rows[key][c] is None for c in ("dice", "hd95_mm", "truth_ml", "predicted_ml", "volume_diff_pct"))
    assert (rows["ptv"]["labels"], rows["ptv"]["ptv_source"]) == ("GTV + 2 mm", "derived")
    assert rows["lung_left"]["annotated"] is False and rows["lung_left"]["predicted"] is False
    # With the GTV among the model's labels the derived PTV is scored; a contoured PTV needs label PTV.
    with_gtv = {r["structure"]: r for r in score_structures(predicted, truth, (2.0, 1.0, 1.0), annotated, derived,
                                                                predicted_labels={organs.GTV})}
    assert with_gtv["ptv"]["dice"] == 0.0 and "predicted" not in with_gtv["ptv"]
    annotated[organs.PTV] = True
    contoured = score_structures(predicted, truth, (2.0, 1.0, 1.0), annotated, CONTOURED,
                                 predicted_labels={organs.GTV})
    assert contoured[1]["predicted"] is False and contoured[1]["dice"] is None
    assert ev.ptv_scoring([contoured[1], {**with_gtv["ptv"]}]) == (
        "derived (GTV + 2 mm) in 1 patient(s): margin(predicted GTV) vs margin(true GTV); not scored in 1 "
        "patient(s): the model predicts no GTV (for a derived PTV) or no PTV (for a contoured one)")


def test_score_structures_needs_8_flags():
    with pytest.raises(ValueError, match="annotated needs 8 flags .*got 7"):
        score_structures(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), (1, 1, 1), [True] * 7)


def test_summarize_counts_and_ignores_unscored_rows():
    def row(structure, dice, hd=1.0, annotated=True, surface=None, apl=None):
        return {"structure": structure, "annotated": annotated, "dice": dice, "hd95_mm": hd,
                "volume_diff_pct": 10.0, "surface_dice": surface, "apl_mm": apl, "diagonal_mm": 500.0}

    rows = [row("heart", 0.8, 2.0, surface=0.9, apl=10.0), row("heart", 0.6, math.inf, surface=0.0, apl=50.0),
            row("heart", None, None, annotated=False), row("heart", math.nan, math.nan, surface=math.nan, apl=0.0)]
    heart = ev.summarize(rows)["heart"]
    assert heart["dice"] == {"mean": pytest.approx(0.7), "median": pytest.approx(0.7),
                             "std": pytest.approx(0.1), "n": 2}
    # the missed heart counts at the CT's diagonal in the penalised mean: (2 + 500) / 2
    assert heart["hd95_mm"] == {"mean": 2.0, "median": 2.0, "std": 0.0, "n": 1, "n_inf": 1, "penalised_mean": 251.0}
    # the missed heart (surface Dice 0, its whole contour to draw) counts; the both-empty row does not
    assert heart["surface_dice"] == {"mean": pytest.approx(0.45), "median": pytest.approx(0.45),
                                     "std": pytest.approx(0.45), "n": 2}
    assert heart["apl_mm"] == {"mean": 30.0, "median": 30.0, "std": 20.0, "n": 2}
    assert heart["n_not_annotated"] == 1 and heart["n_empty"] == 1
    assert ev.summarize(rows)["gtv"]["dice"] == {"mean": None, "median": None, "std": None, "n": 0}


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------
def test_keep_largest_component_per_organ_but_not_tumour():
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[0:4, 0:4, 0:4] = organs.RIGHT_LUNG        # 64 voxels, kept
    labels[5, 10, 10] = organs.RIGHT_LUNG            # stray voxel, removed
    labels[0:2, 8:10, 0:2] = organs.HEART            # 8 voxels
    labels[2, 10, 2] = organs.HEART                  # touches the heart only by a corner: same body
    labels[5, 0, 6] = organs.HEART                   # stray, removed
    labels[0:2, 0:2, 8:10] = organs.GTV              # primary
    labels[4, 8, 8] = organs.GTV                     # node: a second focus, kept
    out = keep_largest_component(labels)

    expected = labels.copy()
    expected[5, 10, 10] = 0
    expected[5, 0, 6] = 0
    np.testing.assert_array_equal(out, expected)
    assert labels[5, 10, 10] == organs.RIGHT_LUNG    # the input is not modified


def test_remove_small_components_by_fraction_of_the_largest():
    labels = np.zeros((6, 12, 12), np.uint8)
    labels[0:5, 0:4, 0:4] = organs.ESOPHAGUS         # 80 voxels: the largest piece
    labels[0:1, 8:12, 8:12] = organs.ESOPHAGUS       # 16 voxels: 20% of the largest
    labels[5, 10, 0] = organs.ESOPHAGUS              # 1 voxel: 1.25%
    labels[3, 10, 5] = organs.HEART                  # left alone: not in the rule
    labels[5, 0, 11] = organs.HEART
    rules = {organs.ESOPHAGUS: 0.1}
    out = remove_small_components(labels, rules)
    expected = labels.copy()
    expected[5, 10, 0] = 0                           # under 10%: removed; the 20% piece stays
    np.testing.assert_array_equal(out, expected)
    expected[0, 8:12, 8:12] = 0                      # under 25%: the 20% piece goes too
    np.testing.assert_array_equal(remove_small_components(labels, {organs.ESOPHAGUS: 0.25}), expected)
    np.testing.assert_array_equal(remove_small_components(labels, {organs.ESOPHAGUS: 0.0}), labels)
    only_largest = labels.copy()
    only_largest[(labels == organs.ESOPHAGUS) & ~np.pad(np.ones((5, 4, 4), bool), ((0, 1), (0, 8), (0, 8)))] = 0
    np.testing.assert_array_equal(remove_small_components(labels, {organs.ESOPHAGUS: 1.0}), only_largest)
    with pytest.raises(ValueError, match="label 6: the fraction of the largest component must be >= 0, got -0.1"):
        remove_small_components(labels, {organs.ESOPHAGUS: -0.1})
    with pytest.raises(ValueError, match="label 6: the fraction of the largest component must be >= 0, got nan"):
        remove_small_components(labels, {organs.ESOPHAGUS: float("nan")})
    for label in (0, -1, 8):
        with pytest.raises(ValueError, match=f"rules are for labels 1-7, got label {label}"):
            remove_small_components(labels, {label: 0.5})


def test_describe_postprocess():
    assert describe_postprocess({}) == "none"
    assert describe_postprocess({organs.HEART: 1.0, organs.RIGHT_LUNG: 1.0, organs.ESOPHAGUS: 0.1,
                                    organs.SPINAL_CORD: 0.0}) == (
        "largest component: Right lung, Heart; components under 10% of the largest removed: Esophagus")
    assert describe_postprocess({organs.HEART: 0.005, organs.ESOPHAGUS: 0.125}) == (
        "components under 12.5% of the largest removed: Esophagus; "
        "components under 0.5% of the largest removed: Heart")


def test_keep_largest_component_rejects_2d():
    with pytest.raises(ValueError, match=r"expected a 3D \(z, y, x\) label map, got shape \(4, 4\)"):
        keep_largest_component(np.zeros((4, 4), np.uint8))


# --------------------------------------------------------------------------------------------
# Back to the original grid
# --------------------------------------------------------------------------------------------
def _one_hot(labels: np.ndarray) -> np.ndarray:
    """(Z, S, S) labels -> (Z, 8, S, S) float32 probabilities of a certain model."""
    return np.moveaxis(np.eye(organs.NUM_CLASSES, dtype=np.float32)[labels], -1, 1)


class PerfectModel(torch.nn.Module):
    """Returns confident logits of the cached (phase-3) mask of whichever cached slice it is given.

    The input is made from the HU volume in float32 (prediction's path), the cache holds the same
    values in float16: a slice matches when it is within float16 rounding of a cached one."""

    def __init__(self, cache_dirs: list[Path]):
        super().__init__()
        self.ct = np.concatenate([np.load(d / "ct.npy").astype(np.float32) for d in cache_dirs])
        self.mask = np.concatenate([np.load(d / "mask.npy") for d in cache_dirs])
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        images = x[:, 0].cpu().numpy()
        differences = np.abs(images[:, None] - self.ct[None]).sum(axis=(2, 3))
        index = differences.argmin(axis=1)
        per_pixel = differences[np.arange(len(index)), index] / images[0].size
        assert (per_pixel < 2e-3).all(), f"slice not from the cache ({per_pixel.max():.2g} per pixel)"
        return 20.0 * torch.from_numpy(_one_hot(self.mask[index]))


# --------------------------------------------------------------------------------------------
# End to end on a tiny data root
# --------------------------------------------------------------------------------------------
def _ellipse(shape_yx, centre, radii) -> np.ndarray:
    yy, xx = np.mgrid[:shape_yx[0], :shape_yx[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1


def _phantom(shape_zyx: tuple[int, int, int], block: int = 1) -> np.ndarray:
    """Label map with every structure, built at shape/block and repeated in block x block pixels."""
    z, h, w = shape_zyx[0], shape_zyx[1] // block, shape_zyx[2] // block
    labels = np.zeros((z, h, w), np.uint8)
    for k in range(1, z - 1):
        labels[k][_ellipse((h, w), (h * 0.5, w * 0.28), (h * 0.3, w * 0.16))] = organs.RIGHT_LUNG
        labels[k][_ellipse((h, w), (h * 0.5, w * 0.72), (h * 0.3, w * 0.16))] = organs.LEFT_LUNG
        labels[k][_ellipse((h, w), (h * 0.62, w * 0.5), (h * 0.12, w * 0.1))] = organs.HEART
        labels[k][_ellipse((h, w), (h * 0.3, w * 0.5), (h * 0.05, w * 0.05))] = organs.ESOPHAGUS
        labels[k][_ellipse((h, w), (h * 0.85, w * 0.5), (h * 0.04, w * 0.04))] = organs.SPINAL_CORD
    for k in range(3, min(7, z - 1)):
        labels[k][_ellipse((h, w), (h * 0.45, w * 0.3), (h * 0.12, w * 0.08))] = organs.PTV
        labels[k][_ellipse((h, w), (h * 0.45, w * 0.3), (h * 0.07, w * 0.05))] = organs.GTV
    return np.kron(labels, np.ones((1, block, block), np.uint8))


#: Phase 2's stored grid of the test patients: a flipped y axis must survive the round trip.
FLIPPED_Y = (1, 0, 0, 0, -1, 0, 0, 0, 1)
#: Feet first and prone, rows and columns swapped: columns towards anterior, rows towards the
#: patient's right, slices towards the feet (orientation code ARI).
FEET_FIRST_TRANSPOSED = (0, -1, 0, -1, 0, 0, 0, 0, -1)


def _write_patient(root: Path, patient_id: str, labels: np.ndarray, spacing_xyz, annotated,
                   ptv: dict = CONTOURED, direction=FLIPPED_Y, body: np.ndarray | None = None) -> None:
    """CT + label map on the same grid, as phases 2 and 2.5 write them, phase 2.5's record and a
    structures.csv row. ``body`` (bool, like ``labels``): background there is soft tissue (0 HU)."""
    layout = DataLayout(root)
    rng = np.random.default_rng(len(patient_id) + labels.shape[1])
    hu = np.array([-1000, 40, 30, -850, -850, 35, 20, 30], np.int16)[labels]
    if body is not None:
        hu[body & (labels == organs.BACKGROUND)] = 0
    hu = (hu + rng.integers(-20, 20, labels.shape)).astype(np.int16)  # every slice distinct
    for array, folder in ((hu, layout.ct_nifti), (labels, layout.masks)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing_xyz)
        image.SetOrigin((-120.0, -80.5, 300.0))
        image.SetDirection(direction)
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(folder / f"{patient_id}.nii.gz"))
    table = layout.masks / "structures.csv"
    new = not table.is_file()
    with open(table, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(STRUCTURE_COLUMNS)
        for label in range(1, organs.NUM_CLASSES):
            voxels = int((labels == label).sum()) if annotated[label] else 0
            writer.writerow([patient_id, label, organs.structure(label).key, "yes" if annotated[label] else "no",
                             "", "", voxels, voxels * np.prod(spacing_xyz) / 1000, 0])
    write_mask_record(layout.masks, patient_id, annotated, ptv)


ALL = [True] * 8
NO_HEART = [True] * 5 + [False] + [True] * 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Three patients, normalised to 64 px by the real phase 3: in-plane 64x64 (= S), 128x128 (2 S,
    labels constant on 2x2 blocks, heart not annotated) and 80x72 (not a multiple)."""
    root = tmp_path_factory.mktemp("eval_root")
    _write_patient(root, "P-SAME", _phantom((10, 64, 64)), (0.9, 0.9, 3.0), ALL)
    labels = _phantom((10, 128, 128), block=2)
    labels[labels == organs.HEART] = organs.BACKGROUND   # no heart contour: not annotated, never scored
    _write_patient(root, "P-DOUBLE", labels, (0.7, 0.7, 2.5), NO_HEART)
    _write_patient(root, "P-ODD", _phantom((10, 80, 72)), (0.8, 0.6, 3.0), ALL)
    labels = _phantom((10, 64, 64))  # NSCLC-Radiomics-like: no PTV contour, the PTV is derived
    labels[labels == organs.PTV] = organs.RIGHT_LUNG
    derived = list(ALL)
    derived[organs.PTV] = False
    _write_patient(root, "P-DERIVED", labels, (0.9, 0.9, 3.0), derived, {"source": "derived", "margin_mm": 5.0})
    # 64 x 128 (labels constant on 1x2 blocks) stored ARI: the network sees it as 128 x 64, LPS
    _write_patient(root, "P-FEET", np.repeat(_phantom((10, 64, 64)), 2, axis=2), (0.35, 0.7, 3.0), ALL,
                   direction=FEET_FIRST_TRANSPOSED)
    results = phase3.run(data_root=root, size=SIZE, workers=1)
    assert [r.status for r in results] == [DONE] * 5, [r.message for r in results]
    splits = root / "splits"
    splits.mkdir()
    (splits / "test.txt").write_text("P-SAME\nP-DOUBLE\nP-ODD\n")
    return root


CROP_2MM = {"method": "body", "threshold_hu": -500, "margin_mm": 2}


@pytest.fixture(scope="module")
def cropped_root(tmp_path_factory) -> Path:
    """Two patients whose body (a 28 x 28 px square holding every structure, 1 mm pixels) sits
    off-centre in an 80 x 72 field of view, normalised by phase 3 with --crop-body, 2 mm margin:
    a 32 px box enlarged 2x to 64 px. C-SAME is stored with a flipped y axis, C-FEET feet first,
    prone and transposed (ARI): the box is on the network's (LPS) grid."""
    return _cropped_patients(tmp_path_factory.mktemp("crop_root"), 20, crop_body=True, crop_margin_mm=2)


def _cropped_patients(root: Path, first_row: int, **crop) -> Path:
    """C-SAME and C-FEET (see ``cropped_root``), their body in stored rows ``first_row`` to
    ``first_row + 27``, normalised to 64 px by phase 3 with the ``crop`` options."""
    labels = np.zeros((10, 80, 72), np.uint8)
    labels[:, first_row:first_row + 28, 30:58] = _phantom((10, 28, 28))
    body = np.zeros(labels.shape, bool)
    body[:, first_row:first_row + 28, 30:58] = True
    _write_patient(root, "C-SAME", labels, (1.0, 1.0, 3.0), ALL, body=body)
    _write_patient(root, "C-FEET", labels, (1.0, 1.0, 3.0), ALL, direction=FEET_FIRST_TRANSPOSED, body=body)
    results = phase3.run(data_root=root, size=SIZE, **crop)
    assert [r.status for r in results] == [DONE] * 2, [r.message for r in results]
    return root


def _read_metrics(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(r["patient_id"], r["structure"]): r for r in csv.DictReader(handle)}


def _stand_in_checkpoint(model: torch.nn.Module, tmp_path: Path, monkeypatch, crop: dict | None = None) -> Path:
    """``<tmp>/run/best.pth``, a stand-in file: the checkpoint loader prediction and evaluation
    share is replaced to return ``model`` with phase 3's settings (``crop``: its body crop)."""
    checkpoint = tmp_path / "run" / "best.pth"
    checkpoint.parent.mkdir(exist_ok=True)
    checkpoint.write_bytes(b"stand-in: load_checkpoint_model is replaced")
    preprocessing = {"size": SIZE, "window": [-1000, 400], "zscore": "per_patient",
                     **({"crop": dict(crop)} if crop else {})}
    record = {"preprocessing": preprocessing, "model_config": {"in_channels": 1, "out_channels": organs.NUM_CLASSES},
              "ptv": CONTOURED}
    monkeypatch.setattr(inference, "load_checkpoint_model", lambda path, device: (model, record))
    return checkpoint


def test_perfect_model_scores_dice_one_on_the_original_grid(data_root, tmp_path, monkeypatch):
    layout = DataLayout(data_root)
    model = PerfectModel([layout.training_cache / p for p in ("P-SAME", "P-DOUBLE", "P-ODD", "P-DERIVED")])
    checkpoint = _stand_in_checkpoint(model, tmp_path, monkeypatch)

    results = ev.run(checkpoint=checkpoint, data_root=data_root, splits_dir=data_root / "splits",
                     batch_size=4, device="cpu")

    assert [(r.patient_id, r.status) for r in results] == [("P-SAME", DONE), ("P-DOUBLE", DONE), ("P-ODD", DONE)]
    assert model.calls == 3 * math.ceil(10 / 4)   # every slice predicted once, in batches of 4
    out = tmp_path / "run" / "evaluation"
    metrics = _read_metrics(out / "metrics.csv")
    for patient in ("P-SAME", "P-DOUBLE"):       # exact inverse of the phase-3 resize
        prediction = sitk.ReadImage(str(out / "predictions" / f"{patient}.nii.gz"))
        truth = sitk.ReadImage(str(layout.masks / f"{patient}.nii.gz"))
        assert same_geometry(prediction, sitk.ReadImage(str(layout.ct_nifti / f"{patient}.nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction), sitk.GetArrayFromImage(truth))
        for label in range(1, 8):
            row = metrics[(patient, organs.structure(label).key)]
            if patient == "P-DOUBLE" and label == organs.HEART:
                assert row["annotated"] == "no" and row["dice"] == "" and row["hd95_mm"] == ""  # not "nan"
            else:
                assert (row["annotated"], row["dice"], row["hd95_mm"], row["volume_diff_ml"]) == ("yes", "1", "0", "0")
                assert (row["surface_dice"], row["apl_mm"]) == ("1", "0")
    # 80x72 -> 64x64 -> 80x72 loses up to a pixel at the borders: Dice >= 0.9 for the small
    # structures (cord radius 3 px), >= 0.97 for lungs and heart, HD95 within one voxel diagonal.
    for label in range(1, 8):
        row = metrics[("P-ODD", organs.structure(label).key)]
        big = label in (organs.RIGHT_LUNG, organs.LEFT_LUNG, organs.HEART, organs.PTV)
        assert float(row["dice"]) >= (0.97 if big else 0.9), (label, row)
        assert float(row["hd95_mm"]) <= math.hypot(0.8, 0.6) + 1e-9, (label, row)
        # The pixels the resize moves are one 0.6 mm (y) or 0.8 mm (x) pixel off, within every structure's
        # surface-Dice tolerance and the APL's (all >= 1 mm): the radiotherapy metrics see no error.
        assert (row["surface_dice"], row["apl_mm"]) == ("1", "0"), (label, row)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_patients"] == 3 and summary["split"] == "test" and summary["postprocess"] is False
    assert summary["structures"]["heart"]["dice"]["n"] == 2
    assert summary["structures"]["heart"]["n_not_annotated"] == 1
    assert summary["structures"]["lung_left"]["dice"]["n"] == 3
    assert summary["structures"]["lung_left"]["surface_dice"]["n"] == 3 == summary["structures"]["lung_left"]["apl_mm"]["n"]
    assert summary["tolerances_mm"]["surface_dice"]["heart"]["mm"] == 7.0
    assert summary["tolerances_mm"]["apl"]["mm"] == 1.0
    assert "| Surface Dice mean ± std (tolerance) | APL mean (mm) |" in (out / "summary.md").read_text()
    assert "| Heart | 2 |" in (out / "summary.md").read_text()
    assert "- PTV: contoured in 3 patient(s): labels GTV + PTV" in (out / "summary.md").read_text()
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_derived_ptv_is_scored_as_the_margin_of_the_gtv_end_to_end(data_root, tmp_path, monkeypatch):
    layout = DataLayout(data_root)
    checkpoint = _stand_in_checkpoint(PerfectModel([layout.training_cache / "P-DERIVED"]), tmp_path, monkeypatch)
    [result] = ev.run(checkpoint=checkpoint, data_root=data_root, patients=["P-DERIVED"], device="cpu")
    assert result.status == DONE
    out = tmp_path / "run" / "evaluation"
    metrics = _read_metrics(out / "metrics.csv")
    ptv = metrics[("P-DERIVED", "ptv")]
    assert (ptv["annotated"], ptv["labels"], ptv["dice"], ptv["hd95_mm"]) == ("yes", "GTV + 5 mm", "1", "0")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / "P-DERIVED.nii.gz")))
    assert float(ptv["truth_ml"]) == pytest.approx(
        ptv_from_gtv(truth == organs.GTV, (3.0, 0.9, 0.9), 5.0).sum() * 0.9 * 0.9 * 3.0 / 1000, rel=1e-5)
    assert metrics[("P-DERIVED", "lung_right")]["dice"] == "1"  # no PTV hole in the lung
    assert ("- PTV: derived (GTV + 5 mm) in 1 patient(s): margin(predicted GTV) vs margin(true GTV)"
            in (out / "summary.md").read_text())


def test_a_feet_first_transposed_patient_is_predicted_in_lps_and_scored_on_its_stored_grid(
        data_root, tmp_path, monkeypatch):
    """The network sees the ARI patient in LPS (phase 3's cache, 128 x 64 before the resize); its
    labels go back to phase 2's stored order and grid exactly: Dice 1 against masks_multi_organ."""
    layout = DataLayout(data_root)
    meta = read_cache_meta(data_root, "P-FEET")
    assert meta["orientation"] == {"stored": "ARI", "network": "LPS"}
    assert meta["original_shape_zyx"] == [10, 64, 128] and meta["original_direction"] == list(FEET_FIRST_TRANSPOSED)
    truth = sitk.ReadImage(str(layout.masks / "P-FEET.nii.gz"))
    cached = np.load(layout.training_cache / "P-FEET" / "mask.npy")
    network_truth = to_network_array(sitk.GetArrayFromImage(truth), "ARI")
    assert network_truth.shape == (10, 128, 64)
    np.testing.assert_array_equal(cached, resize_labels_to_shape(network_truth, (SIZE, SIZE)))
    checkpoint = _stand_in_checkpoint(PerfectModel([layout.training_cache / "P-FEET"]), tmp_path, monkeypatch)
    [result] = ev.run(checkpoint=checkpoint, data_root=data_root, patients=["P-FEET"], device="cpu")
    assert result.status == DONE, result.message
    prediction = sitk.ReadImage(str(tmp_path / "run" / "evaluation" / "predictions" / "P-FEET.nii.gz"))
    assert same_geometry(prediction, sitk.ReadImage(str(layout.ct_nifti / "P-FEET.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction), sitk.GetArrayFromImage(truth))
    metrics = _read_metrics(tmp_path / "run" / "evaluation" / "metrics.csv")
    assert {metrics[("P-FEET", organs.structure(label).key)]["dice"] for label in range(1, 8)} == {"1"}


def test_a_label_map_of_an_earlier_version_is_refused(data_root, tmp_path):
    root = tmp_path / "old"
    (root / "processed").mkdir(parents=True)
    for folder in ("ct_nifti", "masks_multi_organ", "training_cache"):
        shutil.copytree(data_root / "processed" / folder, root / "processed" / folder)
    (root / "processed" / "masks_multi_organ" / "P-SAME.json").unlink()
    [result] = ev.run(checkpoint=_tiny_checkpoint(tmp_path / "best.pth"), data_root=root, patients=["P-SAME"],
                      output_dir=tmp_path / "eval", device="cpu")
    assert result.status == FAILED
    assert re.search(r"P-SAME: .*P-SAME.nii.gz was written by an earlier version of extract_multi_organ_masks.py"
                     r".*re-run extract_multi_organ_masks.py --overwrite", result.message), result.message


def _tiny_checkpoint(path: Path, seed: int = 0, crop: dict | None = None, gain: float = 1.0) -> Path:
    """A checkpoint in the phase-5 format of a small untrained network (``crop``: phase 3's body
    crop; ``gain``: its weights multiplied by it, so that it answers several labels, not one)."""
    from unet_multi_organ import UNetMultiOrgan, build_checkpoint

    torch.manual_seed(seed)
    model = UNetMultiOrgan(in_channels=1, out_channels=8, base_channels=4)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(gain)
    preprocessing = {"window": [-1000, 400], "size": SIZE, "zscore": "per_patient",
                     **({"crop": dict(crop)} if crop else {})}
    torch.save(build_checkpoint(model, preprocessing=preprocessing, epoch=0, val_loss=1.0), path)
    return path


def test_main_with_a_real_checkpoint_writes_predictions_and_reuses_them(data_root, tmp_path, capsys):
    checkpoint = _tiny_checkpoint(tmp_path / "best.pth")
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(data_root), "--patients", "P-ODD",
            "--output-dir", str(out), "--device", "cpu", "--batch-size", "3", "--postprocess"]

    assert ev.main(argv) == 0
    assert "Phase 5b: 1 evaluated, 0 skipped, 0 failed" in capsys.readouterr().out
    prediction = sitk.ReadImage(str(out / "predictions" / "P-ODD.nii.gz"))
    assert same_geometry(prediction, sitk.ReadImage(str(DataLayout(data_root).ct_nifti / "P-ODD.nii.gz")))
    labels = sitk.GetArrayFromImage(prediction)
    assert labels.dtype == np.uint8 and labels.max() < organs.NUM_CLASSES
    np.testing.assert_array_equal(postprocess_labels(labels), labels)       # post-processed
    first = (out / "metrics.csv").read_text()

    assert ev.main(argv) == 0                                               # predictions reused
    assert (out / "metrics.csv").read_text() == first

    other = _tiny_checkpoint(tmp_path / "other.pth", seed=1)               # not this checkpoint's
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--checkpoint", str(other)] + argv[2:])
    assert exit_info.value.code == 2
    assert "holds predictions of checkpoint sha256" in capsys.readouterr().err


def test_a_saved_prediction_is_redone_when_its_ct_changed(data_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(data_root / "processed", root / "processed")
    checkpoint, out = _tiny_checkpoint(tmp_path / "best.pth", gain=3.0), tmp_path / "eval"
    kwargs = dict(checkpoint=checkpoint, data_root=root, patients=["P-SAME"], output_dir=out, device="cpu")
    assert ev.run(**kwargs)[0].message == ""
    assert ev.run(**kwargs)[0].message == "reused saved prediction"
    ct_path = root / "processed" / "ct_nifti" / "P-SAME.nii.gz"
    image = sitk.ReadImage(str(ct_path))
    changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())  # mirrored, same grid
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(ct_path))
    [result] = ev.run(**kwargs)
    assert result.status == DONE and result.message == "redone: its CT changed since the saved prediction"
    assert json.loads((out / "predictions" / "P-SAME.json").read_text()) == {"ct_sha256": file_sha256(ct_path)}
    assert ev.run(**kwargs)[0].message == "reused saved prediction"


def test_failed_patient_is_reported_and_batch_goes_on(data_root, tmp_path, monkeypatch):
    checkpoint = _tiny_checkpoint(tmp_path / "best.pth")
    results = ev.run(checkpoint=checkpoint, data_root=data_root, patients=["P-SAME", "NOBODY"],
                     output_dir=tmp_path / "eval", device="cpu")
    assert [r.status for r in results] == [DONE, FAILED]
    assert "NOBODY" in results[1].message and "ct_nifti/NOBODY.nii.gz not found" in results[1].message
    assert exit_status(results) == 1


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "missing.pth"], "checkpoint missing.pth not found"),
    (["--checkpoint", "x.pth", "--batch-size", "0"], "must be >= 1, got 0"),
])
def test_main_bad_arguments_give_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Evaluation segments through prediction's path: same input, same precision, same labels
# --------------------------------------------------------------------------------------------
class _AutocastRecorder(torch.nn.Conv2d):
    """A 1x1 convolution to 8 classes that records whether autocast was on in each forward."""

    def __init__(self) -> None:
        super().__init__(1, organs.NUM_CLASSES, kernel_size=1)
        self.autocast_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return super().forward(x)


def test_evaluation_runs_float32_on_cpu_even_with_native_bfloat16(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    model = _AutocastRecorder()
    checkpoint = _stand_in_checkpoint(model, tmp_path, monkeypatch)
    [result] = ev.run(checkpoint=checkpoint, data_root=data_root, patients=["P-SAME"], batch_size=4, device="cpu")
    assert result.status == DONE
    assert model.autocast_seen == [False, False, False]  # batches of 4, 4 and 2 slices


@pytest.mark.parametrize("crop", [None, CROP_2MM])
def test_evaluation_labels_equal_the_labels_prediction_writes(data_root, cropped_root, tmp_path, crop):
    """The same checkpoint and CT give the same label map through evaluate_multi_organ.py and
    predict_multi_organ.py (whole slices, and a body crop whose box each computes on the CT)."""
    root, patient = (data_root, "P-ODD") if crop is None else (cropped_root, "C-FEET")
    checkpoint = _tiny_checkpoint(tmp_path / "best.pth", crop=crop, gain=3.0)
    [result] = ev.run(checkpoint=checkpoint, data_root=root, patients=[patient], output_dir=tmp_path / "eval",
                      device="cpu", postprocess=True)
    assert result.status == DONE, result.message
    ct = DataLayout(root).ct_nifti / f"{patient}.nii.gz"
    assert pm.main(["--input", str(ct), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "pred"),
                    "--device", "cpu", "--postprocess"]) == 0
    evaluated = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "eval" / "predictions" / f"{patient}.nii.gz")))
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / f"{patient}_labels.nii.gz")))
    assert len(np.unique(evaluated)) >= 3  # an untrained network still gives several labels: the test can fail
    np.testing.assert_array_equal(evaluated, predicted)


def test_a_context_checkpoint_is_refused_by_a_reader_asking_for_another_context(data_root, tmp_path, capsys):
    from unet_multi_organ import UNetMultiOrgan, build_checkpoint

    torch.manual_seed(0)
    model = UNetMultiOrgan(in_channels=5, out_channels=8, base_channels=4)
    preprocessing = {"window": [-1000, 400], "size": SIZE, "zscore": "per_patient"}
    checkpoint = tmp_path / "k2.pth"
    torch.save(build_checkpoint(model, preprocessing=preprocessing, context_slices=2, epoch=0, val_loss=1.0),
               checkpoint)
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", str(checkpoint), "--data-root", str(data_root), "--patients", "P-SAME",
                 "--output-dir", str(tmp_path / "eval"), "--device", "cpu", "--context-slices", "0"])
    assert "trained with 2 context slice(s) per side (5 input channels); this run asks for 0" in capsys.readouterr().err
    # Without the option the checkpoint's K is used: 5-channel stacks reach the network.
    [result] = ev.run(checkpoint=checkpoint, data_root=data_root, patients=["P-SAME"],
                      output_dir=tmp_path / "eval2", device="cpu")
    assert result.status == DONE


# --------------------------------------------------------------------------------------------
# Body crop (phase 3 --crop-body): the network's box goes back into the CT grid
# --------------------------------------------------------------------------------------------
def test_perfect_model_on_a_cropped_cache_scores_dice_one_on_the_original_grid(cropped_root, tmp_path, monkeypatch):
    layout = DataLayout(cropped_root)
    # 28 px body + 2 px each side; C-SAME's rows are flipped into LPS (80 - 48 = 32 -> rows 30-61);
    # C-FEET's rows are its stored columns reversed (72 - 58 = 14 -> rows 12-43), its columns its
    # stored rows reversed (80 - 48 = 32 -> columns 30-61).
    assert read_cache_meta(cropped_root, "C-SAME")["crop"] == {**CROP_2MM, "box_yx": [30, 28, 32]}
    assert read_cache_meta(cropped_root, "C-FEET")["crop"] == {**CROP_2MM, "box_yx": [12, 30, 32]}
    model = PerfectModel([layout.training_cache / p for p in ("C-SAME", "C-FEET")])
    checkpoint = _stand_in_checkpoint(model, tmp_path, monkeypatch, crop=CROP_2MM)
    results = ev.run(checkpoint=checkpoint, data_root=cropped_root, patients=["C-SAME", "C-FEET"], device="cpu")
    assert [r.status for r in results] == [DONE, DONE], [r.message for r in results]
    metrics = _read_metrics(tmp_path / "run" / "evaluation" / "metrics.csv")
    for patient in ("C-SAME", "C-FEET"):  # the 2x enlargement of the box is inverted exactly
        prediction = sitk.ReadImage(str(tmp_path / "run" / "evaluation" / "predictions" / f"{patient}.nii.gz"))
        assert same_geometry(prediction, sitk.ReadImage(str(layout.ct_nifti / f"{patient}.nii.gz")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / f"{patient}.nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction), truth)
        assert {metrics[(patient, organs.structure(label).key)]["dice"] for label in range(1, 8)} == {"1"}


FOV_32MM = {"method": "fov", "threshold_hu": -500, "fov_mm": 32}


def test_perfect_model_on_a_field_of_view_cache_past_the_edge_scores_dice_one(tmp_path, monkeypatch):
    """--crop-body --fov-mm 32 on a body (28 x 28 px of 1 mm) touching an edge of its 80 x 72 image:
    a 32 px box reaching past the edge (padded with air), enlarged 2x to 64 px. Evaluation finds
    the same box on each CT (the perfect model recognises every cached slice) and the labels come
    back exactly, in both stored orientations."""
    # the body in the last rows: LPS rows 0-27 after C-SAME's y flip
    root = _cropped_patients(tmp_path / "fov_root", 52, crop_body=True, fov_mm=32)
    # the body's centroid is about (13.5, 43.5) in LPS (C-FEET: its rows and columns swapped and
    # reversed, 72 - 58 = 14 -> rows 14-41): the 32 px box starts 2 pixels before the image
    assert read_cache_meta(root, "C-SAME")["crop"] == {**FOV_32MM, "box_yx": [-2, 28, 32]}
    assert read_cache_meta(root, "C-FEET")["crop"] == {**FOV_32MM, "box_yx": [12, -2, 32]}
    layout = DataLayout(root)
    model = PerfectModel([layout.training_cache / p for p in ("C-SAME", "C-FEET")])
    checkpoint = _stand_in_checkpoint(model, tmp_path, monkeypatch, crop=FOV_32MM)
    results = ev.run(checkpoint=checkpoint, data_root=root, patients=["C-SAME", "C-FEET"], device="cpu")
    assert [r.status for r in results] == [DONE, DONE], [r.message for r in results]
    metrics = _read_metrics(tmp_path / "run" / "evaluation" / "metrics.csv")
    for patient in ("C-SAME", "C-FEET"):
        prediction = sitk.ReadImage(str(tmp_path / "run" / "evaluation" / "predictions" / f"{patient}.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / f"{patient}.nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction), truth)
        assert {metrics[(patient, organs.structure(label).key)]["dice"] for label in range(1, 8)} == {"1"}


# --------------------------------------------------------------------------------------------
# Another model's label maps: --predictions DIR --label-map JSON
# --------------------------------------------------------------------------------------------
#: Another model's label table: the right lung in two values (upper and lower slices, as lobes),
#: the esophagus under a value its mapping leaves out, so our esophagus is not predicted.
OTHER_VALUES = {organs.GTV: 30, organs.PTV: 31, organs.LEFT_LUNG: 12, organs.HEART: 20, organs.ESOPHAGUS: 50,
                organs.SPINAL_CORD: 40}
RIGHT_LUNG_UPPER, RIGHT_LUNG_LOWER = 10, 11
OTHER_MAPPING = {"10": "lung_right", "11": "lung_right", "12": "lung_left", "20": "heart", "30": "gtv",
                 "31": "ptv", "40": "spinal_cord"}


def _under_other_table(labels: np.ndarray) -> np.ndarray:
    """Our (z, y, x) labels written in :data:`OTHER_VALUES`' table, int16 as another model may write."""
    other = np.zeros(labels.shape, np.int16)
    for ours, value in OTHER_VALUES.items():
        other[labels == ours] = value
    upper = np.arange(labels.shape[0])[:, None, None] < labels.shape[0] // 2
    other[(labels == organs.RIGHT_LUNG) & upper] = RIGHT_LUNG_UPPER
    other[(labels == organs.RIGHT_LUNG) & ~upper] = RIGHT_LUNG_LOWER
    return other


def _write_like(array: np.ndarray, like: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _write_label_map(path: Path, mapping) -> Path:
    path.write_text(mapping if isinstance(mapping, str) else json.dumps(mapping))
    return path


class ShiftedModel(PerfectModel):
    """:class:`PerfectModel`'s answer moved by 2 pixels along x: good labels, not perfect ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(super().forward(x), 2, dims=-1)


def test_other_model_labels_through_a_mapping_score_as_the_same_labels_natively(data_root, tmp_path, monkeypatch,
                                                                                capsys):
    """Our evaluation of a (shifted) model writes its labels and metrics; the same labels written
    under another table (right lung from two values, esophagus under an unmapped value) and scored
    with --predictions/--label-map give the same rows, the esophagus "not scored", not Dice 0."""
    layout = DataLayout(data_root)
    patients = ["P-SAME", "P-DOUBLE", "P-DERIVED"]   # a heart not annotated, a derived PTV
    checkpoint = _stand_in_checkpoint(ShiftedModel([layout.training_cache / p for p in patients]), tmp_path,
                                      monkeypatch)
    assert [r.status for r in ev.run(checkpoint=checkpoint, data_root=data_root, patients=patients,
                                     device="cpu")] == [DONE] * 3
    native_dir = tmp_path / "run" / "evaluation"
    other_dir = tmp_path / "other model"
    for patient in patients:
        ours = sitk.ReadImage(str(native_dir / "predictions" / f"{patient}.nii.gz"))
        other = _under_other_table(sitk.GetArrayFromImage(ours))
        assert {RIGHT_LUNG_UPPER, RIGHT_LUNG_LOWER, OTHER_VALUES[organs.ESOPHAGUS]} <= set(np.unique(other))
        _write_like(other, ours, other_dir / f"{patient}.nii.gz")
    mapping = _write_label_map(tmp_path / "mapping.json", OTHER_MAPPING)
    capsys.readouterr()

    assert ev.main(["--predictions", str(other_dir), "--label-map", str(mapping), "--data-root", str(data_root),
                    "--patients", *patients]) == 0
    assert "Phase 5b: 3 evaluated, 0 skipped, 0 failed" in capsys.readouterr().out
    out = other_dir / "evaluation"                   # the default output folder
    native, mapped = _read_metrics(native_dir / "metrics.csv"), _read_metrics(out / "metrics.csv")
    assert list(mapped) == list(native) and len(native) == 3 * 7
    assert 0.5 < float(native[("P-SAME", "lung_right")]["dice"]) < 1   # labels worth comparing
    assert native[("P-DERIVED", "ptv")]["labels"] == "GTV + 5 mm" and float(native[("P-DERIVED", "ptv")]["dice"]) < 1
    for (patient, structure), row in native.items():
        if structure != "esophagus":
            assert mapped[(patient, structure)] == row, (patient, structure)
        else:
            assert row["dice"] != "" and mapped[(patient, structure)]["annotated"] == row["annotated"] == "yes"
            assert {mapped[(patient, structure)][c] for c in ev.METRIC_COLUMNS[4:]} == {""}

    summary, native_summary = (json.loads((d / "summary.json").read_text()) for d in (out, native_dir))
    assert summary["not_predicted"] == ["esophagus"] and "checkpoint" not in summary
    assert summary["predictions"] == str(other_dir) and summary["label_map"] == str(mapping)
    assert summary["structures"]["esophagus"]["dice"]["n"] == 0 and summary["structures"]["esophagus"]["n_empty"] == 0
    for key in ("gtv", "ptv", "lung_right", "lung_left", "heart", "spinal_cord"):
        assert summary["structures"][key] == native_summary["structures"][key], key
    assert summary["ptv_scoring"] == native_summary["ptv_scoring"]
    text = (out / "summary.md").read_text()
    assert f"- label maps of another model: `{other_dir}`, mapped to our labels value by value by `{mapping}`" in text
    assert "- not predicted by this model (no label value maps to them), not scored: Esophagus\n" in text
    assert "| Esophagus | 0 | - ± - |" in text
    assert (out / "dice_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "predictions").exists()


def test_other_model_labels_are_post_processed_only_with_postprocess(data_root, tmp_path):
    """The mapped labels go through ``postprocess_labels`` with --postprocess, as our predictions do:
    a stray right-lung voxel (value 11) costs Dice without it and is removed with it."""
    layout = DataLayout(data_root)
    truth = sitk.ReadImage(str(layout.masks / "P-SAME.nii.gz"))
    other = _under_other_table(sitk.GetArrayFromImage(truth))
    assert other[0, 0, 0] == 0
    other[0, 0, 0] = RIGHT_LUNG_LOWER
    _write_like(other, truth, tmp_path / "other" / "P-SAME.nii.gz")
    mapping = ev.load_label_map(_write_label_map(tmp_path / "mapping.json", OTHER_MAPPING))

    def lung_right(postprocess: bool) -> dict:
        result = ev.score_other_patient("P-SAME", layout=layout, predictions_dir=tmp_path / "other",
                                        name_pattern=ev.DEFAULT_NAME_PATTERN, label_map=mapping,
                                        postprocess=postprocess)
        return next(r for r in result.info["rows"] if r["structure"] == "lung_right")

    plain = lung_right(False)
    assert plain["dice"] < 1 and plain["volume_diff_ml"] == pytest.approx(0.9 * 0.9 * 3.0 / 1000)  # one voxel
    assert (lung_right(True)["dice"], lung_right(True)["volume_diff_ml"]) == (1.0, 0.0)


def test_a_missing_or_misplaced_label_map_fails_its_patient_and_the_batch_goes_on(data_root, tmp_path):
    layout = DataLayout(data_root)
    folder = tmp_path / "other"
    for patient in ("P-SAME", "P-DOUBLE"):          # P-DOUBLE's file holds P-SAME's 64 x 64 grid
        truth = sitk.ReadImage(str(layout.masks / "P-SAME.nii.gz"))
        _write_like(_under_other_table(sitk.GetArrayFromImage(truth)), truth, folder / f"{patient}_seg.nii.gz")
    (folder / "P-DERIVED_seg.nii.gz").write_bytes(b"not an image")
    mapping = _write_label_map(tmp_path / "mapping.json", OTHER_MAPPING)

    results = ev.run(predictions=folder, label_map=mapping, name_pattern="{patient_id}_seg.nii.gz",
                     data_root=data_root, patients=["P-SAME", "P-ODD", "P-DOUBLE", "P-DERIVED"],
                     output_dir=tmp_path / "eval")

    assert [r.status for r in results] == [DONE, FAILED, FAILED, FAILED] and exit_status(results) == 1
    assert results[1].message.startswith(f"P-ODD: {folder / 'P-ODD_seg.nii.gz'} not found; the other model made no ")
    assert re.match(rf"P-DOUBLE: {re.escape(str(folder / 'P-DOUBLE_seg.nii.gz'))} vs .*P-DOUBLE.nii.gz: geometry "
                    r"mismatch: size \(64, 64, 10\) vs \(128, 128, 10\)", results[2].message), results[2].message
    assert results[3].message.startswith(f"P-DERIVED: {folder / 'P-DERIVED_seg.nii.gz'} cannot be read as an image")
    metrics = _read_metrics(tmp_path / "eval" / "metrics.csv")
    assert {patient for patient, _ in metrics} == {"P-SAME"} and metrics[("P-SAME", "lung_right")]["dice"] == "1"
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["failed"] == ["P-ODD", "P-DOUBLE", "P-DERIVED"] and summary["n_patients"] == 1


def test_load_label_map_several_values_to_one_structure(tmp_path):
    path = _write_label_map(tmp_path / "m.json", {"1": "lung_right", "2": "lung_right", "3": "lung_left",
                                                  "10": "heart"})
    assert ev.load_label_map(path) == {1: organs.RIGHT_LUNG, 2: organs.RIGHT_LUNG, 3: organs.LEFT_LUNG,
                                       10: organs.HEART}


@pytest.mark.parametrize("text, match", [
    ('{"1": "liver"}', r"value 1 maps to 'liver', not one of our structures \(gtv, ptv, lung_right, lung_left, "
                       r"heart, esophagus, spinal_cord\)"),
    ('{"1": "background"}', r"value 1 maps to 'background', not one of our structures"),
    ('{"1": 5}', r"value 1 maps to 5, not one of our structures"),
    ('{"1.5": "heart"}', r"'1.5' is not a label value: expected an integer >= 1 \(0 is background\)"),
    ('{"lungs": "heart"}', r"'lungs' is not a label value: expected an integer >= 1"),
    ('{"-3": "heart"}', r"'-3' is not a label value"),
    ('{"0": "heart"}', r"'0' is not a label value: expected an integer >= 1 \(0 is background\)"),
    ('{"1": "heart", "01": "gtv"}', r"label value 1 is given twice"),
    ('{"7": "heart", "7": "gtv"}', r"label value 7 is given twice"),
    ('["heart"]', r'expected a JSON object such as \{"1": "lung_right", "2": "heart"\}, got \["heart"\]'),
    ("{}", r"expected a JSON object .*got an empty object"),
    ('{"1": "heart",', r"not valid JSON"),
])
def test_load_label_map_bad_files(tmp_path, text, match):
    path = _write_label_map(tmp_path / "m.json", text)
    with pytest.raises(ValueError, match=f"label map {re.escape(str(path))}: {match}"):
        ev.load_label_map(path)


def test_load_label_map_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"label map .*nothing.json not found"):
        ev.load_label_map(tmp_path / "nothing.json")


def test_apply_label_map_value_by_value():
    values = np.array([0, 1, 2, 3, 10, 99, 255], np.int32).reshape(1, 1, 7)
    mapping = {1: organs.RIGHT_LUNG, 2: organs.RIGHT_LUNG, 3: organs.LEFT_LUNG, 10: organs.HEART}
    expected = np.array([0, 3, 3, 4, 5, 0, 0], np.uint8).reshape(1, 1, 7)
    for array in (values, values.astype(np.uint8), values.astype(np.float32)):
        out = ev.apply_label_map(array, mapping)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match=r"label values must be integers, found non-integer values \(dtype float64\)"):
        ev.apply_label_map(np.full((1, 1, 2), 0.5), mapping)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "x.pth", "--predictions", "."], "argument --predictions: not allowed with argument --checkpoint"),
    ([], "one of the arguments --checkpoint --predictions is required"),
    (["--predictions", "."], "--predictions needs --label-map"),
    (["--predictions", "absent"], "folder of label maps absent not found"),
    (["--predictions", ".", "--label-map", "m.json", "--name-pattern", "{case}.nii.gz"],
     "--name-pattern '{case}.nii.gz': expected a file name relative to the folder with {patient_id}"),
    (["--predictions", ".", "--label-map", "m.json", "--name-pattern", "seg.nii.gz"], "--name-pattern 'seg.nii.gz'"),
    (["--predictions", ".", "--label-map", "m.json"], "label map m.json: value 2 maps to 'liver'"),
    (["--predictions", ".", "--label-map", "absent.json"], "label map absent.json not found"),
    (["--checkpoint", "x.pth", "--label-map", "m.json"], "--label-map is for --predictions"),
])
def test_main_bad_arguments_of_other_model_scoring(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.pth").write_bytes(b"never loaded")
    _write_label_map(tmp_path / "m.json", {"1": "heart", "2": "liver"})
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_wants_a_checkpoint_or_predictions_not_both(tmp_path):
    with pytest.raises(ValueError, match=r"give a checkpoint or the folder of another model's label maps "
                                         r"\(--predictions\), not both"):
        ev.run(checkpoint=tmp_path / "best.pth", predictions=tmp_path, label_map=tmp_path / "m.json")
    with pytest.raises(ValueError, match="not neither"):
        ev.run()
