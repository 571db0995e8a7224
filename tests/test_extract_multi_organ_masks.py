"""Phase 2.5 (extract_multi_organ_masks.py): rasteriser, structures, RTSTRUCT pairing, batch behaviour.

Hand-made grids give exact voxel counts; the synthetic generator gives whole patients whose RTSTRUCT
each error-path test edits with pydicom; the two real NSCLC-Radiomics patients are compared with
plastimatch's reference masks.
"""
from __future__ import annotations

import errno
import logging
import pathlib
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import extract_multi_organ_masks as em
from thoracic_seg import organs
from thoracic_seg.batch import DONE, FAILED, SKIPPED
from thoracic_seg.geometry import BoxMask, Grid
from thoracic_seg.layout import (
    CONVERSION_REPORT, STRUCTURES_COLUMNS, STRUCTURES_CSV, UNMATCHED_CSV, DataLayout, read_csv_rows,
    read_mask_record, read_structures_csv,
)
from thoracic_seg.ptv import expand_mm, ptv_from_gtv
from thoracic_seg.rtstruct_read import (
    _RTSTRUCT_IN_HEADER, Contour, RasterNotes, Roi, fill_polygons_2d, masks_from_rtstruct, planar_polygons,
    rasterize_contours, read_rois, referenced_uids,
)


def make_image(size_xyz=(20, 12, 4), spacing=(0.5, 0.8, 2.5), origin=(-10.0, 20.0, -30.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.Image(list(size_xyz), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(v) for v in direction])
    return image


def lps(image: sitk.Image, index_points) -> np.ndarray:
    """Continuous (i, j, k) indices -> LPS mm through SimpleITK itself (the reference for geometry)."""
    return np.array([image.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in index_points])


def rectangle(image, x0, x1, y0, y1, k) -> np.ndarray:
    return lps(image, [(x0, y0, k), (x1, y0, k), (x1, y1, k), (x0, y1, k)])


# --------------------------------------------------------------------------------------------
# Geometry and rasterisation on hand-made grids
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (0, 1, 0, 1, 0, 0, 0, 0, -1)])
def test_continuous_index_inverts_simpleitk(direction) -> None:
    image = make_image(direction=direction)
    index = np.array([[0, 0, 0], [3.25, 7.5, 2], [19, 11, 3]])
    np.testing.assert_allclose(Grid.of(image).continuous_index(lps(image, index)), index, atol=1e-9)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1)])
def test_rectangle_fills_voxel_centres_inside_without_transpose(direction) -> None:
    image = make_image(direction=direction)
    # Columns 3..12 (x centres 3..12 lie in (2.5, 12.5)), rows 2..5, slice 1.
    mask = rasterize_contours([rectangle(image, 2.5, 12.5, 1.5, 5.5, 1)], image)
    expected = np.zeros((4, 12, 20), dtype=bool)
    expected[1, 2:6, 3:13] = True
    assert mask.dtype == bool and mask.shape == (4, 12, 20)
    np.testing.assert_array_equal(mask, expected)


def test_square_ring_keeps_its_hole_and_the_island_inside() -> None:
    image = make_image(size_xyz=(20, 20, 3), spacing=(1.0, 1.0, 3.0))
    outer = rectangle(image, 2.5, 12.5, 2.5, 12.5, 1)  # 10 x 10 = 100 voxels
    hole = rectangle(image, 5.5, 9.5, 5.5, 9.5, 1)[::-1]  # 4 x 4 = 16, drawn the other way round
    island = rectangle(image, 6.5, 8.5, 6.5, 8.5, 1)  # 2 x 2 = 4, inside the hole
    ring = rasterize_contours([outer, hole], image)
    assert ring.sum() == 84
    assert not ring[1, 6:10, 6:10].any() and ring[1, 3:13, 3].all()
    assert rasterize_contours([outer, hole, island], image).sum() == 88
    # Same contours in any order: even-odd does not care.
    assert rasterize_contours([island, hole, outer], image).sum() == 88
    # An exported duplicate must not cancel its twin.
    assert rasterize_contours([outer, outer.copy(), hole], image).sum() == 84


def test_fill_agrees_with_point_in_polygon_on_random_polygons() -> None:
    from skimage.draw import polygon

    rng = np.random.default_rng(3)
    image = make_image(size_xyz=(40, 30, 1), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    for _ in range(20):
        n = rng.integers(3, 12)
        xy = rng.uniform(-5, 45, size=(n, 2))  # self-intersecting, partly outside: even-odd everywhere
        mask = rasterize_contours([np.c_[xy, np.zeros(n)]], image)[0]
        expected = np.zeros((30, 40), dtype=bool)
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape=(30, 40))
        expected[rr, cc] = True
        np.testing.assert_array_equal(mask, expected)


def test_fill_polygons_2d_counts_voxel_centres_and_makes_holes() -> None:
    square = np.array([[0.5, 0.5], [3.5, 0.5], [3.5, 3.5], [0.5, 3.5]])  # centres 1, 2, 3 inside
    hole = np.array([[1.5, 1.5], [2.5, 1.5], [2.5, 2.5], [1.5, 2.5]])  # centre (2, 2) inside
    assert fill_polygons_2d([square], (6, 6)).sum() == 9
    filled = fill_polygons_2d([square, hole], (6, 6))
    assert filled.dtype == bool and filled.shape == (6, 6)
    assert filled.sum() == 8 and not filled[2, 2] and filled[1, 1]
    # x is the column, y the row: a wide, short rectangle fills a row band
    wide = np.array([[0.5, 0.5], [4.5, 0.5], [4.5, 1.5], [0.5, 1.5]])
    assert np.array_equal(np.nonzero(fill_polygons_2d([wide], (6, 6)))[0], [1, 1, 1, 1])
    # polygons reaching outside the grid are clipped, not wrapped
    assert fill_polygons_2d([square - 2.0], (6, 6)).sum() == 4  # centres 0 and 1 on each axis
    assert not fill_polygons_2d([], (6, 6)).any()


def test_fill_polygons_2d_centres_on_an_edge_follow_the_half_open_rule() -> None:
    """Centres on the left or top edge are inside, on the right or bottom edge outside: x in [1, 3), y in [1, 3)."""
    square = np.array([[1.0, 1.0], [3.0, 1.0], [3.0, 3.0], [1.0, 3.0]])
    expected = np.zeros((5, 5), dtype=bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(fill_polygons_2d([square], (5, 5)), expected)
    np.testing.assert_array_equal(fill_polygons_2d([square[::-1]], (5, 5)), expected)  # either winding


def test_fill_polygons_2d_agrees_with_matplotlib_on_random_star_shapes() -> None:
    from matplotlib.path import Path as MplPath

    rng = np.random.default_rng(3)
    cols, rows = np.meshgrid(np.arange(40), np.arange(30))
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1)
    for _ in range(20):
        theta = np.sort(rng.uniform(0, 2 * np.pi, 15))
        r = rng.uniform(3, 14, 15)
        poly = np.stack([20 + r * np.cos(theta), 15 + r * np.sin(theta)], axis=1)
        expected = MplPath(poly).contains_points(centres).reshape(30, 40)
        np.testing.assert_array_equal(fill_polygons_2d([poly], (30, 40)), expected)


@pytest.mark.parametrize("polygons, shape, match", [
    ([np.zeros((4, 3))], (6, 6), r"each polygon must be an \(N, 2\) array of \(x, y\); got shape \(4, 3\)"),
    ([np.zeros(4)], (6, 6), r"got shape \(4,\)"),
    ([], (6,), r"shape_yx must be \(rows, cols\), two non-negative integers; got \(6,\)"),
    ([], (6.5, 6), r"got \(6.5, 6\)"),
    ([], (-1, 6), r"got \(-1, 6\)"),
])
def test_fill_polygons_2d_rejects_bad_arguments(polygons, shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        fill_polygons_2d(polygons, shape)


def _rtstruct_references(series=(), frames=(), roi_frames=()) -> pydicom.Dataset:
    """An RTSTRUCT header holding only the reference sequences. ``frames=None`` leaves
    ReferencedFrameOfReferenceSequence out; a ``None`` in ``roi_frames`` leaves that ROI's UID out."""
    ds = pydicom.Dataset()
    if frames is not None:
        study = pydicom.Dataset()
        study.RTReferencedSeriesSequence = [pydicom.Dataset() for _ in series]
        for item, uid in zip(study.RTReferencedSeriesSequence, series):
            item.SeriesInstanceUID = uid
        ds.ReferencedFrameOfReferenceSequence = [pydicom.Dataset() for _ in frames or [None]]
        for item, uid in zip(ds.ReferencedFrameOfReferenceSequence, frames or [None]):
            if uid is not None:
                item.FrameOfReferenceUID = uid
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence = [study]
    ds.StructureSetROISequence = [pydicom.Dataset() for _ in roi_frames]
    for item, uid in zip(ds.StructureSetROISequence, roi_frames):
        if uid is not None:
            item.ReferencedFrameOfReferenceUID = uid
    return ds


@pytest.mark.parametrize("kwargs, series, frames", [
    ({"series": ["1.1"], "frames": ["9.1"], "roi_frames": ["9.1", "9.1"]}, {"1.1"}, {"9.1"}),
    # the ROI level may name a frame the (optional) top-level sequence leaves out
    ({"series": ["1.1"], "frames": None, "roi_frames": ["9.1"]}, set(), {"9.1"}),
    ({"series": ["1.1", "1.2"], "frames": ["9.1"], "roi_frames": ["9.2", None]}, {"1.1", "1.2"}, {"9.1", "9.2"}),
    ({"series": [], "frames": [], "roi_frames": []}, set(), set()),
    pytest.param({"series": ["1.1 "], "frames": ["9.1 "], "roi_frames": ["9.1 "]}, {"1.1"}, {"9.1"},
                 marks=pytest.mark.filterwarnings("ignore:Invalid value for VR UI"), id="padding-stripped"),
])
def test_referenced_uids_reads_series_and_both_frame_of_reference_places(kwargs, series, frames) -> None:
    assert referenced_uids(_rtstruct_references(**kwargs)) == (series, frames)


def test_contours_go_to_the_slice_within_half_a_thickness_and_bad_ones_are_reported(caplog) -> None:
    image = make_image()  # slices at z = -30, -27.5, -25, -22.5 (spacing 2.5 mm)
    square = rectangle(image, 2.5, 6.5, 2.5, 6.5, 0)
    shifted = square + [0, 0, 2.5 + 1.2]  # 1.2 mm above slice 1: slice 1
    beyond = square + [0, 0, 4 * 2.5 + 0.1]  # 1.35 mm past the last slice's half thickness
    with caplog.at_level(logging.WARNING):
        mask = rasterize_contours([shifted, beyond, square[:2]], image, roi_name="Heart")
    assert mask.sum() == 16 and mask[1].sum() == 16
    text = caplog.text
    assert "ROI 'Heart': contour matching no CT slice (slices span z = -30.00 .. -22.50 mm" in text
    assert "z = -19.90 mm" in text
    assert "ROI 'Heart': contour with fewer than 3 points (2), skipped (slice 0, z = -30.00 mm)" in text


def test_point_and_open_contours_are_skipped_with_the_roi_and_slice_named() -> None:
    image = make_image()
    notes = RasterNotes()
    contours = [Contour("POINT", lps(image, [(4, 4, 2)])),
                Contour("OPEN_PLANAR", rectangle(image, 2.5, 6.5, 2.5, 6.5, 3)),
                Contour("CLOSED_PLANAR", rectangle(image, 2.5, 6.5, 2.5, 6.5, 3))]
    polygons = planar_polygons(contours, Grid.of(image), "GTV-1", notes)
    assert [k for k, _ in polygons] == [3]
    assert notes.all() == [
        "ROI 'GTV-1': contour of type POINT (not CLOSED_PLANAR), skipped (slice 2, z = -25.00 mm)",
        "ROI 'GTV-1': contour of type OPEN_PLANAR (not CLOSED_PLANAR), skipped (slice 3, z = -22.50 mm)",
    ]


# Found by tests/test_hostile_headers.py (issue 13): a NaN/infinite contour point raised ValueError /
# OverflowError before the non-numeric check, an IS the reader cannot convert raised OverflowError
# past the ValueError handler, and a geometric type holding a newline split the patient's message.
def test_non_finite_contour_points_are_skipped_with_the_roi_named() -> None:
    image = make_image()
    notes = RasterNotes()
    square = rectangle(image, 2.5, 6.5, 2.5, 6.5, 1)
    nan_z, inf_x = square.copy(), square.copy()
    nan_z[0, 2], inf_x[1, 0] = np.nan, np.inf
    contours = [Contour("CLOSED_PLANAR", np.array([[1e-320, 1.5, np.nan]])),
                Contour("CLOSED_PLANAR", nan_z), Contour("CLOSED_PLANAR", inf_x),
                Contour("CLOSED_PLANAR", square)]
    polygons = planar_polygons(contours, Grid.of(image), "Heart", notes)
    assert [k for k, _ in polygons] == [1]
    assert notes.all() == [
        "ROI 'Heart': contour with fewer than 3 points (1), skipped (z = nan mm)",
        "ROI 'Heart': 2 contours with non-numeric coordinates, skipped (z = nan mm, z = -27.50 mm)",
    ]


def _raw(item: pydicom.Dataset, keyword: str, vr: str, value: bytes) -> None:
    tag = pydicom.tag.Tag(keyword)
    value += b" " * (len(value) % 2)
    item[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)


def test_read_rois_keeps_unconvertible_roi_numbers_and_one_line_geometric_types() -> None:
    ds = pydicom.Dataset()
    roi, roi_contour, contour = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    roi.ROIName = "Heart"
    _raw(roi, "ROINumber", "IS", b"1e309")
    _raw(roi_contour, "ReferencedROINumber", "IS", b"1e309")
    _raw(contour, "ContourGeometricType", "CS", b"OPEN\nPLANAR")
    contour.ContourData = [0.0, 0.0, 0.0] * 3
    roi_contour.ContourSequence = [contour]
    ds.StructureSetROISequence, ds.ROIContourSequence = [roi], [roi_contour]
    rois = read_rois(ds)
    assert [(r.number, r.name, [c.geometric_type for c in r.contours]) for r in rois] == [
        ("1e309", "Heart", ["OPEN PLANAR"])]


def hand_roi(number: int, name: str, algorithm: str, image: sitk.Image, k: int = 1) -> Roi:
    """An ROI of one 4 x 4 voxel square on slice ``k`` of ``image``, generated by ``algorithm``."""
    return Roi(str(number), name, "", [Contour("CLOSED_PLANAR", rectangle(image, 2.5, 6.5, 2.5, 6.5, k))],
                  generation_algorithm=algorithm)


def test_read_rois_reads_the_generation_algorithm_where_the_standard_puts_it() -> None:
    ds = pydicom.Dataset()
    items = []
    for number, (name, algorithm) in enumerate([("zGTV^Auto", "AUTOMATIC"), ("GTV", "MANUAL "), ("Heart", None)], 1):
        item = pydicom.Dataset()
        item.ROINumber, item.ROIName = number, name
        if algorithm is not None:
            item.ROIGenerationAlgorithm = algorithm
        items.append(item)
    ds.StructureSetROISequence, ds.ROIContourSequence = items, []
    assert [(r.name, r.generation_algorithm) for r in read_rois(ds)] == [
        ("zGTV^Auto", "AUTOMATIC"), ("GTV", "MANUAL"), ("Heart", "")]


def test_our_automatic_rois_give_no_label_and_are_listed_with_a_reason() -> None:
    """Ours (qualifier ^Auto + AUTOMATIC) and our names saved by anything else are skipped; a physician's
    GTV stays GTV whatever its algorithm; someone else's GTV_auto is an unknown name."""
    image = make_image(size_xyz=(10, 10, 3), spacing=(1.0, 1.0, 3.0))
    rois = [hand_roi(1, "zGTV^Auto", "AUTOMATIC", image), hand_roi(2, "zHeart^Auto", "MANUAL", image),
            hand_roi(3, "zLung_R^Auto", "", image), hand_roi(4, "GTV", "MANUAL", image, k=0),
            hand_roi(5, "Heart", "AUTOMATIC", image, k=2), hand_roi(6, "GTV_auto", "AUTOMATIC", image)]
    notes = RasterNotes()
    structures, unmatched = em.build_structures(rois, Grid.of(image), derive_ptv=False, notes=notes)
    assert unmatched == {
        "zGTV^Auto": em.OWN_AUTOMATIC,
        "zHeart^Auto": "named as our automatic contour (^Auto) but ROIGenerationAlgorithm MANUAL: taken as not "
                       "reviewed; a physician who accepts it renames it",
        "zLung_R^Auto": em.OWN_NAME_NOT_AUTOMATIC.format(algorithm="absent"),
        "GTV_auto": em.UNKNOWN_NAME,
    }
    assert {label: s.source_rois for label, s in structures.items() if s.annotated} == {
        organs.GTV: ["GTV"], organs.HEART: ["Heart"]}
    gtv = structures[organs.GTV].mask.to_full(Grid.of(image).shape_zyx)
    assert gtv.sum() == 16 and gtv[0].sum() == 16  # the physician's square only, on slice 0
    assert notes.all() == ["automatic ROI(s) of ours skipped, never training truth: 'zGTV^Auto', 'zHeart^Auto', "
                           "'zLung_R^Auto'"]


def test_unmatched_csv_keeps_a_reason_per_name_and_reads_the_earlier_format(tmp_path) -> None:
    from thoracic_seg.batch import PatientResult

    (tmp_path / UNMATCHED_CSV).write_text("roi_name,patients,patient_ids\nExternal,2,P1|P2\n")  # no reason column
    em.write_summaries(tmp_path, [PatientResult("P2", DONE, "", {
        "rows": [], "unmatched": {"zGTV^Auto": em.OWN_AUTOMATIC, "External": em.UNKNOWN_NAME}})])
    rows = read_csv_rows(tmp_path / UNMATCHED_CSV)
    assert [tuple(r.values()) for r in rows] == [
        ("External", "2", "P1|P2", em.UNKNOWN_NAME), ("zGTV^Auto", "1", "P2", em.OWN_AUTOMATIC)]
    assert tuple(rows[0]) == em.UNMATCHED_COLUMNS == ("roi_name", "patients", "patient_ids", "reason")


def test_expand_mm_is_isotropic_in_mm_on_an_anisotropic_grid() -> None:
    grid = Grid.of(make_image(size_xyz=(15, 15, 9), spacing=(1.0, 1.0, 3.0)))
    seed = BoxMask((4, 7, 7), np.ones((1, 1, 1), dtype=bool))
    # Within 3 mm: the 29 in-plane voxels with i^2 + j^2 <= 9, plus one voxel 3 mm above and below.
    grown = expand_mm(seed, 3.0, grid)
    assert grown.count() == 31
    full = grown.to_full(grid.shape_zyx)
    assert full[3, 7, 7] and full[5, 7, 7] and not full[3, 7, 8] and full[4, 7, 10] and not full[4, 7, 11]
    assert expand_mm(seed, 0.0, grid).count() == 1
    # Clipped at the grid's corner: the quadrant i, j in 0..2 (i^2 + j^2 <= 8 <= 2.9^2), z neighbours 3 mm away.
    corner = BoxMask((4, 0, 0), np.ones((1, 1, 1), dtype=bool))
    assert expand_mm(corner, 2.9, grid).count() == 9


def test_expand_mm_rejects_a_negative_margin() -> None:
    grid = Grid.of(make_image())
    with pytest.raises(ValueError, match="margin must be a finite number >= 0 mm, got -1"):
        expand_mm(BoxMask((0, 0, 0), np.ones((1, 1, 1), bool)), -1, grid)


def _box(shape_zyx, region) -> BoxMask:
    full = np.zeros(shape_zyx, dtype=bool)
    full[region] = True
    return BoxMask((0, 0, 0), full)


def test_split_at_midline_follows_the_spinal_cord_per_slice() -> None:
    grid = Grid.of(make_image(size_xyz=(20, 10, 3), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)))
    lungs = _box((3, 10, 20), np.s_[:, 2:8, 1:19])
    square = np.array([[-0.4, -0.4], [0.4, -0.4], [0.4, 0.4], [-0.4, 0.4]])  # smaller than a voxel
    # Slice 0: two pieces of opposite winding centred at 9.5 together; slice 1 interpolates to x = 7.5.
    cord = [(0, square + [9.0, 8.2]), (0, square[::-1] + [10.0, 8.2]), (2, square + [5.5, 8.2])]
    centres = em.polygon_centres(cord, grid)
    np.testing.assert_allclose(centres[1], [9.5, 5.5])
    right, left, method = em.split_at_midline(lungs, grid, centres)
    assert method == "spinal cord centre per slice"
    # LPS +x is the patient's left: right lung = columns with x below the midline.
    assert [right.array[k].any(axis=0).nonzero()[0].max() for k in range(3)] == [9, 7, 5]
    assert right.count() + left.count() == lungs.count() and not (right.array & left.array).any()


def test_split_at_midline_without_cord_uses_the_lungs_centroid() -> None:
    grid = Grid.of(make_image(size_xyz=(20, 10, 2), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)))
    lungs = _box((2, 10, 20), np.s_[:, 2:8, 2:16])  # centroid x = 8.5
    right, left, method = em.split_at_midline(lungs, grid)
    assert method == "lungs centroid"
    assert right.count() == 2 * 6 * 7 and left.count() == 2 * 6 * 7


def test_combine_labels_applies_priority_and_counts_lost_voxels() -> None:
    shape = (1, 4, 10)
    structures = {label: em.StructureMask(label) for label in organs.FOREGROUND_LABELS}
    structures[organs.RIGHT_LUNG].mask = _box(shape, np.s_[0, :, 0:6])  # 24 voxels
    structures[organs.GTV].mask = _box(shape, np.s_[0, 1:3, 4:8])  # 8 voxels, 4 of them inside the lung
    structures[organs.HEART].mask = _box(shape, np.s_[0, 0, 5:10])  # 5 voxels, 1 inside the lung
    labels, voxels, lost = em.combine_labels(structures, shape)
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert voxels[organs.GTV] == 8 and lost[organs.GTV] == 0
    assert voxels[organs.HEART] == 5 and lost[organs.HEART] == 0
    assert voxels[organs.RIGHT_LUNG] == 24 - 4 - 1 and lost[organs.RIGHT_LUNG] == 5
    assert np.bincount(labels.ravel(), minlength=8).tolist() == [40 - 32, 8, 0, 19, 0, 5, 0, 0]


def test_read_structures_csv(tmp_path) -> None:
    path = tmp_path / "structures.csv"
    rows = [{"patient_id": "P1", "label": label, "annotated": "yes" if label in (1, 3, 4) else "no"}
            for label in range(1, 8)] + [{"patient_id": "P2", "label": 5, "annotated": "yes"}]
    path.write_text(em._csv_text(STRUCTURES_COLUMNS, rows))
    assert read_structures_csv(path) == {
        "P1": [True, True, False, True, True, False, False, False],
        "P2": [True, False, False, False, False, True, False, False],
    }
    path.write_text("patient_id,label\nP1,1\n")
    with pytest.raises(ValueError, match=r"structures.csv: missing columns \['annotated'\]"):
        read_structures_csv(path)
    path.write_text("patient_id,label,annotated\nP1,9,yes\n")
    with pytest.raises(ValueError, match="line 2: label '9', annotated 'yes'; expected label 1-7"):
        read_structures_csv(path)


# --------------------------------------------------------------------------------------------
# Whole patients from the synthetic generator; each error-path test edits its own copy
# --------------------------------------------------------------------------------------------
def convert_ct(data_root: Path, raw_dir: Path, record: dict) -> None:
    """Phase 2's output for one synthetic patient, made independently of convert_dicom_to_nifti.py:
    SimpleITK.ImageSeriesReader -> int16 NIfTI, plus its conversion_report.csv row."""
    pid = record["patient_id"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(raw_dir / record["ct_folder"])))
    layout = DataLayout(data_root)
    layout.ct_nifti.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.Cast(reader.Execute(), sitk.sitkInt16), str(layout.ct_nifti / f"{pid}.nii.gz"))
    report = layout.ct_nifti / CONVERSION_REPORT
    rows = [r for r in read_csv_rows(report) if r["patient_id"] != pid] + [{
        "patient_id": pid, "dicom_patient_id": pid, "patient_folder": pid,  # relative to --dicom-root
        "series_uid": record["ct_series_uid"], "frame_of_reference_uid": record["frame_of_reference_uid"]}]
    report.write_text(em._csv_text(list(rows[-1]), rows))


def make_patients(root: Path, options: dict[str, dict]) -> dict[str, dict]:
    """Generate, convert and return {patient id: cohort record} under ``root`` (raw/synthetic, truth)."""
    from make_synthetic_cohort import generate_patient

    raw, truth = root / "raw" / "synthetic", root / "synthetic_truth"
    records = {}
    for seed, (pid, kwargs) in enumerate(options.items(), start=11):
        records[pid] = generate_patient(raw, truth, pid, seed=seed, **{"size": 32, "slices": 8, **kwargs})
        convert_ct(root, raw, records[pid])
    return records


def run_phase(root: Path, **kwargs) -> dict[str, object]:
    results = em.run(data_root=root, dicom_root=root / "raw" / "synthetic", workers=1, **kwargs)
    return {r.patient_id: r for r in results}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Two small patients (the one every test edits, SYN-001, and a healthy neighbour), generated once."""
    root = tmp_path_factory.mktemp("pristine")
    return root, make_patients(root, {"SYN-001": {}, "SYN-002": {"extra_gtvs": 1}})


@pytest.fixture
def cohort(pristine, tmp_path) -> tuple[Path, dict[str, dict]]:
    root, records = pristine
    shutil.copytree(root, tmp_path / "data")
    return tmp_path / "data", records


def rtstruct_of(root: Path, record: dict) -> tuple[Path, pydicom.Dataset]:
    path = root / "raw" / "synthetic" / record["rtstruct_file"]
    return path, pydicom.dcmread(path)


def roi_contours(ds: pydicom.Dataset, name: str) -> pydicom.Dataset:
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == name)
    return next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)


def mask_of(root: Path, pid: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(DataLayout(root).masks / f"{pid}.nii.gz")))


def structure_rows(root: Path) -> dict[tuple[str, str], dict]:
    rows = read_csv_rows(DataLayout(root).masks / STRUCTURES_CSV)
    return {(r["patient_id"], r["structure"]): r for r in rows}


def ct_image(root: Path, pid: str) -> sitk.Image:
    return sitk.ReadImage(str(DataLayout(root).ct_nifti / f"{pid}.nii.gz"))


def assert_failed_cleanly(root: Path, results: dict, pid: str, match: str) -> None:
    """The bad patient failed with the message, its neighbour was done, nothing half-written."""
    assert results[pid].status == FAILED
    assert re.search(match, results[pid].message), results[pid].message
    assert results["SYN-002"].status == DONE
    masks = DataLayout(root).masks
    assert sorted(p.name for p in masks.iterdir()) == ["SYN-002.json", "SYN-002.nii.gz", STRUCTURES_CSV, UNMATCHED_CSV]
    assert {r["patient_id"] for r in read_csv_rows(masks / STRUCTURES_CSV)} == {"SYN-002"}


def test_run_reproduces_the_synthetic_truth(synthetic_cohort, tmp_path) -> None:
    """Phase 2 then phase 2.5 on the shared synthetic cohort: every annotated structure with >= 1000
    true voxels at Dice >= 0.97. Voxels whose true label has no ROI (an uncontoured heart) cannot be
    known from the RTSTRUCT and are left out of both sides.

    Not an independent check of the rasteriser: the generator makes its truth with this phase's own
    fill (``fill_polygons_2d``) from the polygons it writes, so a fill error would be on both sides.
    This checks UIDs, geometry, ROI names, the lung split and the overlay; the rasteriser's
    independent checks are the matplotlib / scikit-image tests above and the real patients against
    plastimatch's reference masks below."""
    import convert_dicom_to_nifti

    raw_dir, truth_dir, records = synthetic_cohort
    assert all(r.status == DONE for r in convert_dicom_to_nifti.run(data_root=tmp_path, dicom_root=raw_dir, workers=1))
    results = em.run(data_root=tmp_path, dicom_root=raw_dir, workers=1, derive_ptv=False)
    assert [r.status for r in results] == [DONE] * len(records)
    flags = read_structures_csv(DataLayout(tmp_path).masks / STRUCTURES_CSV)
    checked = 0
    for record in records:
        pid = record["patient_id"]
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / f"{pid}.nii.gz")))
        ours = mask_of(tmp_path, pid)
        assert flags[pid] == record["annotated"]
        known = np.asarray(record["annotated"])[truth]
        for label in organs.FOREGROUND_LABELS:
            true_mask, our_mask = (truth == label) & known, (ours == label) & known
            if record["annotated"][label] and true_mask.sum() >= 1000:
                dice = 2 * (true_mask & our_mask).sum() / (true_mask.sum() + our_mask.sum())
                assert dice >= 0.97, (pid, organs.structure(label).key, dice)
                checked += 1
    assert checked >= 8  # lungs and hearts of the 64-px cohort
    unmatched = {r["roi_name"] for r in read_csv_rows(DataLayout(tmp_path).masks / UNMATCHED_CSV)}
    assert unmatched == {n for r in records for n, label in r["roi_names"].items() if label is None}


def test_structures_csv_says_uncontoured_heart_and_esophagus_are_not_annotated(tmp_path) -> None:
    records = make_patients(tmp_path, {"SYN-001": {"heart_contour": False, "esophagus_contour": False}})
    results = run_phase(tmp_path)
    assert results["SYN-001"].status == DONE
    assert "not annotated: heart, esophagus" in results["SYN-001"].message
    rows = structure_rows(tmp_path)
    for key in ("heart", "esophagus"):
        assert (rows["SYN-001", key]["annotated"], rows["SYN-001", key]["voxels"]) == ("no", "0")
    assert rows["SYN-001", "gtv"]["annotated"] == "yes"
    flags = read_structures_csv(DataLayout(tmp_path).masks / STRUCTURES_CSV)["SYN-001"]
    assert flags == [True, True, False, True, True, False, False, True]  # PTV: derived, not a label
    assert records["SYN-001"]["annotated"][organs.HEART] is False


def test_lungs_total_is_split_at_the_midline_and_recorded(tmp_path) -> None:
    records = make_patients(tmp_path, {"SYN-001": {"lungs_total": True, "size": 48}})
    results = run_phase(tmp_path, derive_ptv=False)
    assert "Lungs-Total split into right and left lung at the midline (spinal cord centre per slice)" \
        in results["SYN-001"].message
    rows = structure_rows(tmp_path)
    for key in ("lung_right", "lung_left"):
        assert rows["SYN-001", key]["source_rois"] == "Lungs-Total (split at the midline: spinal cord centre per slice)"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "synthetic_truth" / "SYN-001.nii.gz")))
    ours = mask_of(tmp_path, "SYN-001")
    known = np.asarray(records["SYN-001"]["annotated"])[truth]
    for label in (organs.RIGHT_LUNG, organs.LEFT_LUNG):
        a, b = (truth == label) & known, (ours == label) & known
        assert a.sum() > 300 and 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.97


def test_ptv_derived_by_default_contoured_when_given_and_optional(tmp_path) -> None:
    """Without a PTV ROI the PTV is derived (recorded, never painted); a PTV ROI stays label 2."""
    make_patients(tmp_path, {"SYN-001": {"extra_gtvs": 1}, "SYN-002": {"with_ptv": True}})
    results = run_phase(tmp_path, ptv_margin_mm=0.0)
    rows = structure_rows(tmp_path)
    gtv, ptv = rows["SYN-001", "gtv"], rows["SYN-001", "ptv"]
    assert (ptv["annotated"], ptv["derived"]) == ("no", "GTV + 0 mm")
    assert ptv["source_rois"] == gtv["source_rois"] and "|" in gtv["source_rois"]
    assert "ptv derived (GTV + 0 mm)" in results["SYN-001"].message
    # A 0 mm margin gives exactly the fused GTV; a derived PTV overlaps freely and loses nothing.
    assert (int(ptv["voxels"]), int(ptv["voxels_lost"])) == (int(gtv["voxels"]), 0)
    assert organs.PTV not in np.unique(mask_of(tmp_path, "SYN-001"))
    assert (rows["SYN-002", "ptv"]["annotated"], rows["SYN-002", "ptv"]["derived"],
            rows["SYN-002", "ptv"]["source_rois"]) == ("yes", "", "PTV")
    assert organs.PTV in np.unique(mask_of(tmp_path, "SYN-002"))
    masks = DataLayout(tmp_path).masks
    assert read_mask_record(masks / "SYN-001.nii.gz")["ptv"] == {"source": "derived", "margin_mm": 0.0}
    assert read_mask_record(masks / "SYN-002.nii.gz")["ptv"] == {"source": "contoured"}

    run_phase(tmp_path, overwrite=True, derive_ptv=False)
    rows = structure_rows(tmp_path)
    assert (rows["SYN-001", "ptv"]["annotated"], rows["SYN-001", "ptv"]["derived"],
            rows["SYN-001", "ptv"]["voxels"]) == ("no", "", "0")
    assert read_mask_record(masks / "SYN-001.nii.gz")["ptv"] == {"source": "none"}
    assert rows["SYN-002", "ptv"]["annotated"] == "yes"


def test_ptv_from_gtv_single_voxel_on_a_1x1x3_mm_grid() -> None:
    """Hand count: voxel centres (i, j, k) with i^2 + j^2 + (3k)^2 <= 100 mm^2 (x, y 1 mm, z 3 mm).
    k = 0: 317 lattice points in the disc of radius 10; k = +-1: 293 (r^2 = 91); k = +-2: 197
    (r^2 = 64); k = +-3: 61 (r^2 = 19); |k| = 4 is 12 mm away. 317 + 2 * (293 + 197 + 61) = 1419."""
    gtv = np.zeros((11, 25, 25), dtype=np.uint8)
    gtv[5, 12, 12] = 1
    ptv = ptv_from_gtv(gtv, (3.0, 1.0, 1.0), 10.0)
    assert ptv.dtype == bool and ptv.shape == gtv.shape
    assert ptv.sum() == 1419
    assert ptv[5, 12, 2] and ptv[5, 12, 22] and not ptv[5, 12, 1]  # 10 mm along x, not 11
    assert ptv[2, 12, 12] and not ptv[1, 12, 12]  # 9 mm along z, not 12
    assert ptv.sum(axis=(1, 2)).tolist() == [0, 0, 61, 197, 293, 317, 293, 197, 61, 0, 0]
    # 0 mm is the GTV itself; an empty GTV gives an empty PTV; the edge of the grid clips.
    assert (ptv_from_gtv(gtv, (3.0, 1.0, 1.0), 0.0) == gtv.astype(bool)).all()
    assert not ptv_from_gtv(np.zeros((3, 4, 4)), (3.0, 1.0, 1.0), 10.0).any()
    corner = np.zeros((2, 3, 3), dtype=bool)
    corner[0, 0, 0] = True
    assert ptv_from_gtv(corner, (3.0, 1.0, 1.0), 1.0).sum() == 3


@pytest.mark.parametrize("margin,spacing,match", [
    (-1.0, (3, 1, 1), "margin must be a finite number >= 0 mm, got -1.0"),
    (float("nan"), (3, 1, 1), "margin must be a finite number >= 0 mm, got nan"),
    (5.0, (3, 0, 1), r"spacing must be 3 positive numbers \(z, y, x\) in mm"),
])
def test_ptv_from_gtv_rejects_bad_arguments(margin, spacing, match) -> None:
    gtv = np.zeros((3, 3, 3), dtype=bool)
    gtv[1, 1, 1] = True
    with pytest.raises(ValueError, match=match):
        ptv_from_gtv(gtv, spacing, margin)


def test_rerun_skips_unchanged_and_redoes_changed_inputs_or_settings(tmp_path) -> None:
    make_patients(tmp_path, {"SYN-001": {}})
    masks = DataLayout(tmp_path).masks
    assert run_phase(tmp_path)["SYN-001"].status == DONE
    first = read_mask_record(masks / "SYN-001.nii.gz")
    assert run_phase(tmp_path)["SYN-001"].status == SKIPPED
    result = run_phase(tmp_path, ptv_margin_mm=5.0)["SYN-001"]  # another margin: redone, and said so
    assert result.status == DONE and "settings changed" in result.message
    record = read_mask_record(masks / "SYN-001.nii.gz")
    assert record["ptv"] == {"source": "derived", "margin_mm": 5.0}
    assert record["inputs_fingerprint"] != first["inputs_fingerprint"]
    assert record["mask_sha256"] == first["mask_sha256"]  # the label map itself holds no PTV
    assert structure_rows(tmp_path)["SYN-001", "ptv"]["derived"] == "GTV + 5 mm"
    assert run_phase(tmp_path, ptv_margin_mm=5.0)["SYN-001"].status == SKIPPED


def test_outputs_of_an_earlier_version_are_redone_or_refused(tmp_path) -> None:
    make_patients(tmp_path, {"SYN-001": {}})
    masks = DataLayout(tmp_path).masks
    run_phase(tmp_path)
    (masks / "SYN-001.json").unlink()  # what the previous version left: a label map without a record
    with pytest.raises(ValueError, match="written by an earlier version of extract_multi_organ_masks.py"):
        read_mask_record(masks / "SYN-001.nii.gz")
    result = run_phase(tmp_path)["SYN-001"]
    assert result.status == DONE and "earlier version" in result.message
    old_csv = masks / "old_structures.csv"
    old_csv.write_text("patient_id,label,structure,annotated,source_rois,synthetic,voxels,volume_ml,voxels_lost\n"
                       "P1,2,ptv,yes,GTV-1 + 10 mm margin,yes,10,0.1,0\n")
    with pytest.raises(ValueError, match="earlier version.*re-run extract_multi_organ_masks.py --overwrite"):
        read_structures_csv(old_csv)


def test_rtstruct_in_another_frame_of_reference_fails_that_patient_only(cohort) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    for item in [*ds.ReferencedFrameOfReferenceSequence, *ds.StructureSetROISequence]:
        key = "FrameOfReferenceUID" if "FrameOfReferenceUID" in item else "ReferencedFrameOfReferenceUID"
        item[key].value = "1.2.3.4.5"
    ds.save_as(path)
    results = run_phase(root)
    assert_failed_cleanly(root, results, "SYN-001",
                          rf"SYN-001: RTSTRUCT .*000000.dcm places contours in frame of reference \['1.2.3.4.5'\], "
                          rf"but the CT series {records['SYN-001']['ct_series_uid']} has frame of reference "
                          rf"{records['SYN-001']['frame_of_reference_uid']}")


def test_rtstruct_of_another_series_and_frame_of_reference_is_not_paired(cohort) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4.5"
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0] \
        .SeriesInstanceUID = "1.2.3.4.6"
    for item in ds.StructureSetROISequence:
        item.ReferencedFrameOfReferenceUID = "1.2.3.4.5"
    ds.save_as(path)
    results = run_phase(root)
    assert_failed_cleanly(root, results, "SYN-001",
                          r"no RTSTRUCT references the CT series .* or its frame of reference .*: 000000.dcm "
                          r"references series \['1.2.3.4.6'\], frame of reference \['1.2.3.4.5'\]")


def test_missing_and_unreadable_rtstruct_fail_that_patient_only(cohort) -> None:
    root, records = cohort
    path, _ = rtstruct_of(root, records["SYN-001"])
    path.write_bytes(path.read_bytes()[:2000])  # truncated in the referenced-UID section
    assert_failed_cleanly(root, run_phase(root), "SYN-001", r"no readable RTSTRUCT under .*SYN-001 \(unreadable "
                          r"RTSTRUCT .*000000.dcm: no ROIContourSequence \(truncated file\?\)\)$")
    path.unlink()
    assert_failed_cleanly(root, run_phase(root, overwrite=True), "SYN-001", r"no readable RTSTRUCT under .*SYN-001$")


@pytest.mark.parametrize("edit,expected", [
    ("two_points", "ROI 'Heart': contour with fewer than 3 points (2), skipped (slice {k}, z = {z:.2f} mm)"),
    ("point", "ROI 'Heart': contour of type POINT (not CLOSED_PLANAR), skipped (slice {k}, z = {z:.2f} mm)"),
    ("no_slice", "ROI 'Heart': contour matching no CT slice (slices span z = "),
])
def test_unusable_contours_are_skipped_with_a_warning_naming_roi_and_slice(cohort, edit, expected) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    before = masks_from_rtstruct(ds, ct_image(root, "SYN-001"))["Heart"]
    contours = roi_contours(ds, "Heart").ContourSequence
    victim = contours[0]
    points = np.asarray(victim.ContourData, dtype=float).reshape(-1, 3)
    spacing_z = ct_image(root, "SYN-001").GetSpacing()[2]
    k = int(round((points[0, 2] - ct_image(root, "SYN-001").GetOrigin()[2]) / spacing_z))
    if edit == "two_points":
        victim.ContourData, victim.NumberOfContourPoints = [float(v) for v in points[:2].ravel()], 2
        expected_mask = before.copy()
        expected_mask[k] = False
    else:
        extra = pydicom.Dataset()
        if edit == "point":
            extra.ContourGeometricType, extra.NumberOfContourPoints = "POINT", 1
            extra.ContourData = [float(v) for v in points[0]]
        else:
            points[:, 2] += 20 * spacing_z  # far beyond the last slice
            extra.ContourGeometricType, extra.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            extra.ContourData = [float(v) for v in points.ravel()]
        contours.append(extra)
        expected_mask = before
    ds.save_as(path)
    results = run_phase(root)
    assert results["SYN-001"].status == DONE and results["SYN-002"].status == DONE
    assert expected.format(k=k, z=points[0, 2] if edit != "no_slice" else 0) in results["SYN-001"].message
    assert (masks_from_rtstruct(path, ct_image(root, "SYN-001"))["Heart"] == expected_mask).all()
    assert expected_mask.any()


def test_hand_made_square_ring_keeps_its_hole_through_the_whole_phase(cohort) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    image = ct_image(root, "SYN-001")
    ring = pydicom.Sequence()
    for x0, x1 in ((8.5, 18.5), (11.5, 15.5)):  # 10 x 10 voxel centres minus 4 x 4: 84 voxels on slice 3
        item = pydicom.Dataset()
        item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", 4
        item.ContourData = [round(float(v), 4) for v in rectangle(image, x0, x1, x0, x1, 3).ravel()]
        ring.append(item)
    roi_contours(ds, "Heart").ContourSequence = ring
    ds.save_as(path)
    results = run_phase(root, derive_ptv=False)
    assert results["SYN-001"].status == DONE
    heart = structure_rows(root)["SYN-001", "heart"]
    assert int(heart["voxels"]) + int(heart["voxels_lost"]) == 84
    labels = mask_of(root, "SYN-001")
    assert not (labels[3, 12:16, 12:16] == organs.HEART).any()
    assert masks_from_rtstruct(path, image)["Heart"].sum() == 84


def test_roi_without_contours_annotates_nothing(cohort) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    del roi_contours(ds, "Esophagus").ContourSequence
    ds.save_as(path)
    results = run_phase(root)
    assert results["SYN-001"].status == DONE
    assert "ROI 'Esophagus' has no usable contour: it annotates nothing" in results["SYN-001"].message
    row = structure_rows(root)["SYN-001", "esophagus"]
    assert (row["annotated"], row["voxels"], row["source_rois"]) == ("no", "0", "")
    assert not (mask_of(root, "SYN-001") == organs.ESOPHAGUS).any()


@pytest.mark.parametrize("edit", ["no_contour_image_sequence", "unknown_sop_instances"])
def test_contours_are_placed_by_coordinates_not_by_image_references(cohort, edit) -> None:
    root, records = cohort
    run_phase(root)
    before = mask_of(root, "SYN-001")
    path, ds = rtstruct_of(root, records["SYN-001"])
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    items = [c for roi in ds.ROIContourSequence for c in roi.ContourSequence]
    assert all("ContourImageSequence" in c for c in items)
    if edit == "no_contour_image_sequence":
        del series.ContourImageSequence
        for c in items:
            del c.ContourImageSequence
    else:
        for c in items:
            c.ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.999"
    ds.save_as(path)
    results = run_phase(root, overwrite=True)
    assert results["SYN-001"].status == DONE
    np.testing.assert_array_equal(mask_of(root, "SYN-001"), before)


def test_duplicate_roi_names_are_merged_and_reported(cohort) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    before = masks_from_rtstruct(ds, ct_image(root, "SYN-001"))
    next(r for r in ds.StructureSetROISequence if r.ROIName == "Esophagus").ROIName = "Heart"
    ds.save_as(path)
    results = run_phase(root, derive_ptv=False)
    assert "ROI name 'Heart' appears 2 times: its contours were merged (union)" in results["SYN-001"].message
    rows = structure_rows(root)
    merged = before["Heart"] | before["Esophagus"]
    assert int(rows["SYN-001", "heart"]["voxels"]) + int(rows["SYN-001", "heart"]["voxels_lost"]) == merged.sum()
    assert rows["SYN-001", "heart"]["source_rois"] == "Heart"
    assert rows["SYN-001", "esophagus"]["annotated"] == "no"
    np.testing.assert_array_equal(masks_from_rtstruct(path, ct_image(root, "SYN-001"))["Heart"], merged)


def our_prediction_rtstruct(root: Path, record: dict, labels: np.ndarray) -> pydicom.Dataset:
    """The RTSTRUCT prediction would write for ``labels`` on the patient's CT (same series and frame)."""
    from thoracic_seg.dicom_ct import read_ct_series
    from thoracic_seg.rtstruct_write import CTReference, build_rtstruct

    ct = read_ct_series(sorted((root / "raw" / "synthetic" / record["ct_folder"]).glob("*.dcm")))
    header = pydicom.dcmread(ct.slices[0].path, stop_before_pixels=True)
    reference = CTReference.from_image(ct.image, header, [c.sop_instance_uid for c in ct.slices],
                                       [c.position_lps for c in ct.slices])
    return build_rtstruct(labels, reference, model="U-Net test.pth")


def test_our_prediction_rtstruct_beside_the_physicians_changes_nothing_and_is_listed(cohort) -> None:
    """Prediction's RTSTRUCT dropped into the patient's folder (paired by its series UID) gives no label:
    the label map is the physician's alone, and unmatched_roi_names.csv names our ROIs with the reason.
    Alone, it annotates nothing; renamed by a physician (plain names, MANUAL), it is truth again."""
    from thoracic_seg.rtstruct_write import write_rtstruct

    root, records = cohort
    record = records["SYN-001"]
    assert run_phase(root)["SYN-001"].status == DONE
    physician = mask_of(root, "SYN-001")
    ours = our_prediction_rtstruct(root, record, physician)
    path, _ = rtstruct_of(root, record)
    write_rtstruct(ours, path.parent / "prediction_RTSTRUCT.dcm")
    result = run_phase(root, overwrite=True)["SYN-001"]
    assert result.status == DONE
    assert "automatic ROI(s) of ours skipped, never training truth: 'zGTV^Auto'" in result.message
    np.testing.assert_array_equal(mask_of(root, "SYN-001"), physician)
    names = [str(r.ROIName) for r in ours.StructureSetROISequence]
    listed = {r["roi_name"]: r for r in read_csv_rows(DataLayout(root).masks / UNMATCHED_CSV)}
    assert all((listed[n]["patient_ids"], listed[n]["reason"]) == ("SYN-001", em.OWN_AUTOMATIC) for n in names)

    path.unlink()  # our RTSTRUCT alone: nothing annotated
    result = run_phase(root, overwrite=True)["SYN-001"]
    assert result.status == DONE and not mask_of(root, "SYN-001").any()
    assert not any(r["annotated"] == "yes" for (pid, _), r in structure_rows(root).items() if pid == "SYN-001")

    for item in ours.StructureSetROISequence:  # a physician accepts every contour and renames it
        item.ROIName = item.ROIName[1:].removesuffix(organs.AUTOMATIC_QUALIFIER)
        item.ROIGenerationAlgorithm = "MANUAL"
    write_rtstruct(ours, path.parent / "prediction_RTSTRUCT.dcm")
    assert run_phase(root, overwrite=True)["SYN-001"].status == DONE
    np.testing.assert_array_equal(mask_of(root, "SYN-001"), physician)


def test_rtstructs_of_other_series_are_reported_and_other_patients_ignored(cohort) -> None:
    root, records = cohort
    path, ds = rtstruct_of(root, records["SYN-001"])
    stray = path.parent.parent / "9.000000-old" / "000000.dcm"
    stray.parent.mkdir()
    ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    ref.SeriesInstanceUID = "1.2.3.4.6"  # an older CT series of the same patient, same frame of reference
    ds.save_as(stray)
    neighbour, _ = rtstruct_of(root, records["SYN-002"])
    shutil.copy(neighbour, path.parent / "neighbour.dcm")  # another PatientID: not this patient's
    results = run_phase(root)
    assert results["SYN-001"].status == DONE
    assert f"RTSTRUCT {stray} ignored: it references series ['1.2.3.4.6'], not the CT series " \
           f"{records['SYN-001']['ct_series_uid']}" in results["SYN-001"].message
    assert "neighbour.dcm" not in results["SYN-001"].message


def test_existing_masks_are_skipped_unless_overwrite(cohort) -> None:
    root, _ = cohort
    assert {r.status for r in run_phase(root).values()} == {DONE}
    mask_path = DataLayout(root).masks / "SYN-001.nii.gz"
    mask_path.write_bytes(b"old")
    results = run_phase(root)
    assert results["SYN-001"].status == SKIPPED and "use --overwrite" in results["SYN-001"].message
    assert mask_path.read_bytes() == b"old"
    assert {pid for pid, _ in structure_rows(root)} == {"SYN-001", "SYN-002"}  # rows of skipped patients kept
    assert em.main(["--data-root", str(root), "--dicom-root", str(root / "raw" / "synthetic"),
                    "--workers", "1", "--overwrite", "--patients", "SYN-001"]) == 0
    assert mask_path.read_bytes()[:2] == b"\x1f\x8b"  # a gzip NIfTI again
    assert len(structure_rows(root)) == 14


def test_unwritable_output_folder_stops_before_any_work(cohort, monkeypatch, capsys) -> None:
    """Tests run as root, for whom chmod does not deny writing: the operating system's refusal is
    simulated by making every file creation inside the output folder raise EACCES."""
    root, _ = cohort
    masks = DataLayout(root).masks
    real_write_bytes = pathlib.Path.write_bytes

    def denied(self, data):
        if masks in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", denied)
    with pytest.raises(PermissionError, match=f"cannot write to output folder {masks}: Permission denied"):
        run_phase(root)
    assert em.main(["--data-root", str(root), "--workers", "1"]) == 1
    assert f"cannot write to output folder {masks}: Permission denied" in capsys.readouterr().err
    assert list(masks.iterdir()) == []


def test_missing_converted_ct_and_bad_arguments(cohort, capsys) -> None:
    root, _ = cohort
    results = em.run(data_root=root, dicom_root=root / "raw" / "synthetic", patients=["SYN-001", "SYN-009"])
    assert results[0].status == DONE
    assert results[1].status == FAILED and "no converted CT" in results[1].message
    with pytest.raises(SystemExit) as exc:
        em.main(["--data-root", str(root), "--ptv-margin-mm", "-2"])
    assert exc.value.code == 2 and "--ptv-margin-mm must be >= 0, got -2.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ptv_margin_mm must be a finite number >= 0, got -1"):
        em.run(data_root=root, ptv_margin_mm=-1)


# --------------------------------------------------------------------------------------------
# The two real NSCLC-Radiomics patients against plastimatch's reference masks
# --------------------------------------------------------------------------------------------
REAL_PATIENTS = ("LUNG1-005", "LUNG1-010")


@pytest.fixture(scope="module")
def real_run(real_sample_root, reference_json, tmp_path_factory) -> Path:
    """Both real patients converted (ImageSeriesReader) and run through phase 2.5 once."""
    root = tmp_path_factory.mktemp("real")
    for pid in REAL_PATIENTS:
        folder = reference_json[pid]["ct_series_folder"]
        first = pydicom.dcmread(next((real_sample_root / folder).iterdir()), stop_before_pixels=True)
        convert_ct(root, real_sample_root, {"patient_id": pid, "ct_folder": folder,
                                            "ct_series_uid": first.SeriesInstanceUID,
                                            "frame_of_reference_uid": first.FrameOfReferenceUID})
    results = em.run(data_root=root, dicom_root=real_sample_root, workers=1)
    assert [(r.status, r.message) for r in results] == [(DONE, "ptv derived (GTV + 10 mm)")] * 2
    return root


@pytest.mark.real_data
@pytest.mark.parametrize("pid", REAL_PATIENTS)
def test_real_structures_match_plastimatch_before_the_overlay(real_run, real_sample_root, reference_json,
                                                             reference_masks_dir, pid) -> None:
    """Every structure's own mask (GTVs fused) at Dice >= 0.995 with the reference; measured
    0.998-1.000 for the lungs and 1.000 for everything else."""
    grid = Grid.of(ct_image(real_run, pid))
    rtstruct = next(p for p in (real_sample_root / pid).rglob("*.dcm")
                    if _RTSTRUCT_IN_HEADER.search(p.read_bytes()[:1024]))
    structures, unmatched = em.build_structures(read_rois(pydicom.dcmread(rtstruct)), grid)
    assert unmatched == {}
    references: dict[int, np.ndarray] = {}
    for roi in reference_json[pid]["reference_masks"]:
        ref = sitk.ReadImage(str(reference_masks_dir / pid / f"{roi}.nii.gz"))
        assert Grid.of(ref).size == grid.size
        label = organs.match_roi_name(roi)
        references[label] = references.get(label, False) | (sitk.GetArrayFromImage(ref) > 0)
    assert sorted(references) == [1, 3, 4, 5, 6, 7]
    for label, reference in references.items():
        ours = structures[label].mask.to_full(grid.shape_zyx)
        dice = 2 * (ours & reference).sum() / (ours.sum() + reference.sum())
        assert dice >= 0.995, (pid, organs.structure(label).key, dice)


@pytest.mark.real_data
def test_real_label_maps_and_structures_csv(real_run, reference_json) -> None:
    rows = structure_rows(real_run)
    for pid in REAL_PATIENTS:
        labels = mask_of(real_run, pid)
        image = sitk.ReadImage(str(DataLayout(real_run).masks / f"{pid}.nii.gz"))
        ct = ct_image(real_run, pid)
        assert image.GetPixelID() == sitk.sitkUInt8 and Grid.of(image) == Grid.of(ct)
        counts = np.bincount(labels.ravel(), minlength=8)
        for label in organs.FOREGROUND_LABELS:
            row = rows[pid, organs.structure(label).key]
            if label == organs.PTV:
                continue
            assert row["annotated"] == "yes" and int(row["voxels"]) == counts[label]
            assert float(row["volume_ml"]) == pytest.approx(counts[label] * np.prod(ct.GetSpacing()) / 1000, abs=1e-3)
        assert (rows[pid, "ptv"]["annotated"], rows[pid, "ptv"]["derived"]) == ("no", "GTV + 10 mm")
        assert counts[organs.PTV] == 0  # a derived PTV is never painted: no label-map voxel is 2
        # The GTV has the top priority: it keeps every voxel of the reference GTV(s).
        gtv_reference = sum(v["voxels"] for roi, v in reference_json[pid]["reference_masks"].items()
                            if organs.match_roi_name(roi) == organs.GTV)
        assert counts[organs.GTV] == gtv_reference
    assert rows["LUNG1-010", "gtv"]["source_rois"] == "gtv-2|GTV-1"


def test_phases_2_5_and_3_without_any_patient_exit_non_zero_naming_the_folder(tmp_path, capsys) -> None:
    import normalize_ct_and_masks

    (tmp_path / "processed" / "ct_nifti").mkdir(parents=True)
    assert em.main(["--data-root", str(tmp_path)]) == 1
    assert normalize_ct_and_masks.main(["--data-root", str(tmp_path)]) == 1
    folder = (tmp_path / "processed" / "ct_nifti").resolve()
    err = capsys.readouterr().err
    assert f"no converted CT (<PatientID>.nii.gz) in {folder}; run convert_dicom_to_nifti.py first" in err
    assert f"no CT NIfTI (<PatientID>.nii.gz) in {folder}; run convert_dicom_to_nifti.py first" in err
