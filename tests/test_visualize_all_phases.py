"""visualize_all_phases.py: the pure helpers (exact values), the raw-DICOM slice matching, and the
whole command on a tiny synthetic cohort run through phases 2-5 (every figure written, a valid
non-blank PNG, the label colours where they belong, clear errors)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

import visualize_all_phases as viz
from thoracic_seg import organs
from thoracic_seg.figures import (
    FIGURES, _dice_series, best_slice, label_colormap, levels_around, load_patient, multi_organ_figure,
    pick_examples, present_labels, read_history, slice_dice, spread, structure_flags, structures_per_slice,
    volume_histogram,
)
from thoracic_seg.layout import BEST_CHECKPOINT, DataLayout

ALL_FIGURES = [FIGURES[k] for k in (*viz.PHASE_FIGURES, *viz.RUN_FIGURES)]


# --------------------------------------------------------------------------------------------
# A tiny processed cohort and training run (phases 2-5 in process, ~10 s)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(synthetic_cohort, tmp_path_factory):
    """(data_root, splits_dir, run_dir) after phases 2, 2.5, 3, 4, a 2-step training and its evaluation."""
    import convert_dicom_to_nifti
    import evaluate_multi_organ
    import extract_multi_organ_masks
    import normalize_ct_and_masks
    import prepare_train_val_test_splits
    import train_multi_organ

    raw_dir, _, _ = synthetic_cohort
    root = tmp_path_factory.mktemp("viz")
    splits, run_dir = root / "splits", root / "runs" / "tiny"
    for results in (
        convert_dicom_to_nifti.run(data_root=root, dicom_root=raw_dir, workers=1),
        extract_multi_organ_masks.run(data_root=root, dicom_root=raw_dir, workers=1),
        normalize_ct_and_masks.run(data_root=root, size=64, workers=1),
    ):
        assert all(r.status == "done" for r in results), [(r.patient_id, r.message) for r in results]
    prepare_train_val_test_splits.run(data_root=root, splits_dir=splits)
    train_multi_organ.run(data_root=root, splits_dir=splits, output_dir=run_dir, base_channels=4,
                          epochs=2, batch_size=4, max_steps=2, device="cpu", workers=0)
    evaluate_multi_organ.run(checkpoint=run_dir / BEST_CHECKPOINT, data_root=root,
                             splits_dir=splits, device="cpu")
    return root, splits, run_dir


@pytest.fixture(scope="module")
def figures(demo, tmp_path_factory):
    """The output folder of one ``main([...])`` run with ``--run``, and its exit status."""
    root, splits, run_dir = demo
    out = tmp_path_factory.mktemp("figures")
    status = viz.main(["--data-root", str(root), "--splits-dir", str(splits), "--run", str(run_dir),
                       "--output", str(out), "--dpi", "60"])
    return out, status


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------
def test_label_colormap_maps_each_label_to_its_organs_colour():
    cmap = label_colormap()
    overlay = label_colormap(transparent_background=True)
    assert cmap.N == overlay.N == organs.NUM_CLASSES
    for s in organs.STRUCTURES:
        assert cmap(s.label)[:3] == pytest.approx(s.color_float)
        assert cmap(s.label)[3] == 1.0
    assert overlay(organs.BACKGROUND)[3] == 0.0
    assert overlay(organs.HEART) == pytest.approx((1.0, 0.0, 1.0, 1.0))


def test_structures_per_slice_and_best_slice():
    labels = np.zeros((4, 5, 5), np.uint8)
    labels[1, 0, :3] = [organs.GTV, organs.HEART, organs.SPINAL_CORD]  # 3 structures, 3 voxels
    labels[2, :2, :] = organs.RIGHT_LUNG  # 3 structures, 12 voxels: wins the tie
    labels[2, 4, :2] = [organs.HEART, organs.ESOPHAGUS]
    labels[3, 0, 0] = organs.GTV
    assert structures_per_slice(labels).tolist() == [0, 3, 3, 1]
    assert best_slice(labels) == 2
    assert present_labels(labels[1]) == [organs.GTV, organs.HEART, organs.SPINAL_CORD]


@pytest.mark.parametrize("items, n, expected", [
    (list(range(10)), 4, [0, 3, 6, 9]),
    (list(range(3)), 4, [0, 1, 2]),
    ([], 4, []),
])
def test_spread(items, n, expected):
    assert spread(items, n) == expected


def test_pick_examples_shares_the_picks_between_patients_at_the_centres_of_their_slices():
    candidates = [("A", z) for z in range(10, 15)] + [("B", 3), ("B", 4)]
    assert pick_examples(candidates, 2) == [("A", 12), ("B", 4)]
    assert pick_examples(candidates, 4) == [("A", 11), ("A", 13), ("B", 3), ("B", 4)]
    assert pick_examples(candidates[:2], 4) == [("A", 10), ("A", 11)]
    one_patient = [("A", z) for z in range(24)]
    assert pick_examples(one_patient, 4) == [("A", 3), ("A", 9), ("A", 15), ("A", 21)]
    many = [(p, 0) for p in "ABCDEFG"]
    assert pick_examples(many, 3) == [("A", 0), ("D", 0), ("G", 0)]


def test_levels_around_keeps_the_chosen_slice_and_spreads_two_others():
    labels = np.zeros((30, 4, 4), np.uint8)
    labels[10:21, 0, 0] = organs.HEART  # labelled extent 10-20: others at 12 and 18
    assert levels_around(labels, 15) == [12, 15, 18]
    assert levels_around(labels, 12) == [12, 18]  # never the same level twice


def test_volume_histogram_counts_every_voxel_chunk_by_chunk():
    volume = np.array([-1024, -1000, -500, 0, 400, 1500], np.int16).reshape(6, 1, 1)
    counts, edges = volume_histogram(volume, bins=4, chunk=4)
    assert edges.tolist() == [-1024, -393, 238, 869, 1500]
    assert counts.tolist() == [3, 1, 1, 1]
    counts, edges = volume_histogram(volume, bins=2, clip=(-1000, 400), chunk=1)
    assert edges.tolist() == [-1000, -300, 400] and counts.tolist() == [3, 3]


def test_slice_dice():
    truth = np.array([[3, 3, 0, 5]])
    prediction = np.array([[3, 0, 0, 5]])
    assert slice_dice(prediction, truth) == pytest.approx((2 / 3 + 1) / 2)
    assert math.isnan(slice_dice(np.zeros((2, 2)), np.zeros((2, 2))))


def test_read_history_from_json_or_csv(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.5, "val_loss": 1.6, "dice_heart": 0.25},
            {"epoch": 2, "train_loss": 1.2, "val_loss": 1.4, "dice_heart": 0.5}]
    (tmp_path / "history.json").write_text(json.dumps(rows))
    assert read_history(tmp_path) == rows
    (tmp_path / "history.json").unlink()
    (tmp_path / "history.csv").write_text("epoch,train_loss,val_loss,dice_heart\n1,1.5,1.6,\n2,1.2,1.4,0.5\n")
    history = read_history(tmp_path)
    assert [r["val_loss"] for r in history] == [1.6, 1.4]
    series = _dice_series(history)
    assert list(series) == ["heart"] and math.isnan(series["heart"][0]) and series["heart"][1] == 0.5
    (tmp_path / "history.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no history.json or history.csv in run folder"):
        read_history(tmp_path)


# --------------------------------------------------------------------------------------------
# Raw DICOM slice of phase 2
# --------------------------------------------------------------------------------------------
def test_find_raw_slice_matches_the_nifti_slice_by_position(demo):
    """The synthetic series' file names are shuffled against z: only the position can match."""
    from thoracic_seg.layout import REPORT_NAME, read_report

    root, _, _ = demo
    layout = DataLayout(root)
    patient_id, row = sorted(read_report(layout.ct_nifti / REPORT_NAME).items())[0]
    image = sitk.ReadImage(str(layout.ct_nifti / f"{patient_id}.nii.gz"))
    hu = sitk.GetArrayFromImage(image)
    names = set()
    for z in (0, 7, hu.shape[0] - 1):
        raw = viz.find_raw_slice(row["series_folder"], row["series_uid"], image, z)
        assert raw.distance_mm == pytest.approx(0, abs=1e-3)
        np.testing.assert_array_equal(raw.hu, hu[z])
        assert raw.stored.min() >= 0 and (raw.slope, raw.intercept) == (1.0, -1024.0)
        names.add(raw.path.name)
    assert len(names) == 3
    with pytest.raises(FileNotFoundError, match="no DICOM file of series 1.2.3"):
        viz.find_raw_slice(row["series_folder"], "1.2.3", image, 0)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def test_every_figure_is_written_as_a_non_blank_png(figures):
    out, status = figures
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_FIGURES)
    for name in ALL_FIGURES:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        rgb = _rgb(path)
        assert rgb.shape[0] > 200 and rgb.shape[1] > 300, (name, rgb.shape)
        assert rgb.std() > 20, f"{name} looks blank (pixel std {rgb.std():.1f})"
        assert (rgb.sum(axis=2) < 100).mean() > 0.001, f"{name} has no dark pixels"


def test_label_map_and_overlay_use_the_organ_colours(demo, figures):
    out, _ = figures
    root, splits, _ = demo
    layout = DataLayout(root)
    patient = viz.default_patient(layout, splits)
    assert patient == (splits / "test.txt").read_text().split()[0]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks / f"{patient}.nii.gz")))
    levels = levels_around(labels, best_slice(labels))
    shown = present_labels(labels[levels])
    assert {organs.HEART, organs.RIGHT_LUNG} <= set(shown)  # the synthetic default slice has both
    if load_patient(layout, patient)["ptv"][levels].any():
        shown.append(organs.PTV)  # the derived PTV: an outline in its colour, not in the label map

    rgb = _rgb(out / FIGURES["phase2_5"])
    height = rgb.shape[0]
    for label in organs.FOREGROUND_LABELS:
        exact = np.all(rgb == organs.structure(label).color, axis=2).sum()
        if label in shown:
            assert exact >= 10, f"{organs.label_name(label)}: only {exact} pixels of its colour"
        else:
            assert exact == 0, f"{organs.label_name(label)} is drawn but not on these slices"
    # Bottom row: colour x 0.7 + grey x 0.3, i.e. heart: R == B, R - G = 0.7 x 255;
    # right lung: G == B, G - R = 0.7 x 255.
    r, g, b = (rgb[2 * height // 3:, :, c] for c in range(3))
    heart = (abs(r - b) <= 2) & (abs(r - g - 178) <= 3)
    lung = (abs(g - b) <= 2) & (abs(g - r - 178) <= 3)
    assert heart.sum() >= 10 and lung.sum() >= 10, (heart.sum(), lung.sum())


def test_figures_of_a_chosen_patient_and_slice(demo, tmp_path):
    root, splits, _ = demo
    patient = DataLayout(root).ct_nifti.glob("*.nii.gz").__next__().name[: -len(".nii.gz")]
    results = viz.run(data_root=root, splits_dir=splits, output=tmp_path, patient=patient,
                      slice_index=3, dpi=40)
    assert [r.name for r in results] == list(viz.PHASE_FIGURES)
    assert all(r.path is not None and r.path.is_file() for r in results)


def test_structure_flags_read_annotated_and_derived_structures(demo, synthetic_cohort):
    root, _, _ = demo
    layout = DataLayout(root)
    for record in synthetic_cohort[2]:
        annotated, ptv = structure_flags(layout, record["patient_id"])
        assert annotated == list(record["annotated"])  # no PTV ROI: not a label, derived from the GTV
        assert annotated[organs.PTV] is False and ptv == {"source": "derived", "margin_mm": 10.0}
    assert structure_flags(layout, "NOPE") == (None, {})
    assert structure_flags(DataLayout(root / "nowhere"), "SYN-001") == (None, {})


def test_phase2_5_figure_draws_the_derived_ptv_as_an_outline(demo):
    root, _, _ = demo
    layout = DataLayout(root)
    patient = sorted(p.name[: -len(".nii.gz")] for p in layout.masks.glob("*.nii.gz"))[0]
    data = load_patient(layout, patient)
    assert data["ptv"] is not None and data["ptv"].sum() > (data["labels"] == organs.GTV).sum() > 0
    z = int(np.argmax((data["labels"] == organs.GTV).sum(axis=(1, 2))))
    fig = multi_organ_figure(patient, data["hu"], data["labels"], z, data["annotated"], data["ptv"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "PTV (derived, outline)" in legend and not any("not annotated: PTV" in t for t in legend)
    overlays = fig.axes[2 * len(fig.axes) // 3:]  # third row: the overlays
    assert any(len(ax.collections) for ax in overlays)  # the PTV contour drawn over the organs


@pytest.mark.parametrize("args, message", [
    (["--slice", "999"], "--slice 999 is outside"),
    (["--patient", "NOPE-1"], "NOPE-1.nii.gz not found; run convert_dicom_to_nifti.py"),
    (["--dpi", "5"], "--dpi must be in 20-600, got 5"),
])
def test_bad_arguments_are_one_line_errors(demo, tmp_path, capsys, args, message):
    root, splits, _ = demo
    with pytest.raises(SystemExit) as exc:
        viz.main(["--data-root", str(root), "--splits-dir", str(splits), "--output", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_run_outputs_are_reported_and_the_other_figures_written(demo, tmp_path, capsys):
    root, splits, _ = demo
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    status = viz.main(["--data-root", str(root), "--splits-dir", str(splits), "--run", str(empty_run),
                       "--output", str(tmp_path / "out"), "--dpi", "40"])
    assert status == 1
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(FIGURES[k] for k in viz.PHASE_FIGURES)
    assert "5 written" in capsys.readouterr().out


def test_run_reports_which_input_is_missing(demo, tmp_path):
    root, splits, _ = demo
    results = viz.run(data_root=root, splits_dir=splits, output=tmp_path, run_dir=tmp_path, dpi=40)
    errors = {r.name: r.error for r in results if r.error}
    assert set(errors) == set(viz.RUN_FIGURES)
    assert "no history.json or history.csv" in errors["curves"]
    assert "run evaluate_multi_organ.py" in errors["predictions"]
