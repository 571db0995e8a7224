"""benchmarks/bench_quality.py: configurations, folds, the table, and main() end to end on a tiny
cohort (two tiny synthetic patients standing in for the real ones, one synthetic training patient)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark, modules_loaded_by

from thoracic_seg.metrics import score_structures

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
STRUCTURES = ("gtv", "ptv", "lung_right", "lung_left", "heart", "esophagus", "spinal_cord")


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_quality")


@pytest.mark.parametrize("name, context, crop", [
    ("2d", 0, False), ("2.5d-k1", 1, False), ("2.5d-k2", 2, False), ("crop", 0, True),
    ("crop+2.5d-k1", 1, True), ("2.5d-k2+crop", 2, True), ("crop+2d", 0, True),
])
def test_parse_config(bench, name, context, crop):
    assert bench.parse_config(name) == bench.Config(name, context, crop)


@pytest.mark.parametrize("name, message", [
    ("3d", "cannot read '3d'"), ("2d+2.5d-k1", "cannot read '2.5d-k1'"), ("crop+crop", "cannot read 'crop'"),
    ("2.5d-k0", "2.5d needs K >= 1"), ("2.5d-kx", "cannot read '2.5d-kx'"),
])
def test_parse_config_refuses(bench, name, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_config(name)


def test_folds_and_epochs(bench):
    assert bench.make_folds(["B", "A"]) == [["A"], ["B"]]
    assert bench.make_folds(["E", "D", "C", "B", "A"], 2) == [["A", "C", "E"], ["B", "D"]]
    with pytest.raises(ValueError, match="at least 2 patients"):
        bench.make_folds(["A", "A"])
    with pytest.raises(ValueError, match="folds must be 2-2 for 2 patients, got 3"):
        bench.make_folds(["A", "B"], 3)
    # 91 slices, batch 8: 11 steps per epoch (last short batch dropped); 500 steps -> 46 epochs.
    assert bench.steps_per_epoch(91, 8) == 11 and bench.epochs_for(500, 91, 8) == 46
    assert bench.steps_per_epoch(10, 8) == 2 and bench.epochs_for(3, 10, 8) == 2


def test_table_format(bench):
    rows = [{"config": "2d", "postprocess": pp, "structure": "heart", "annotated": True, "fold": fold,
             "patient_id": f"P{fold}", "seed": seed, "dice": d, "hd95_mm": h, "hd95_inf": h is None}
            for pp in ("none", "--postprocess")
            for fold, seed, d, h in ((0, 0, 0.8, 10.0), (0, 1, 0.6, 20.0), (1, 0, 0.0, None))]
    summary = bench.summarize(rows, ["2d"])
    heart = [s for s in summary if s["structure"] == "heart"]
    assert [(s["postprocess"], s["n"], s["hd95_inf"]) for s in heart] == [("none", 3, 1), ("--postprocess", 3, 1)]
    lines = bench.format_table(summary).splitlines()
    assert lines[0] == ("| structure | configuration | post-processing | n | Dice mean ± std | Dice seed std "
                        "| HD95 mean ± std (mm) | HD95 inf |")
    assert lines[1] == "|---|---|---|---:|---:|---:|---:|---:|"
    # Dice 0.8, 0.6, 0: mean 0.467, sample std 0.416; HD95 over the finite 10 and 20: 15.0 ± 7.1.
    # Seed spread: patient P0's two seeds (0.8, 0.6) have std 0.141; P1 has one seed, left out.
    assert "| Heart | 2d | none | 3 | 0.467 ± 0.416 | 0.141 | 15.0 ± 7.1 | 1 |" in lines
    assert "| Heart | 2d | --postprocess | 3 | 0.467 ± 0.416 | 0.141 | 15.0 ± 7.1 | 1 |" in lines
    assert "| GTV | 2d | none | 0 | - | - | - | 0 |" in lines
    assert len(lines) == 2 + 7 * 2


def _row(pp, dice, hd95, config="2d", seed=0, structure="esophagus"):
    return {"config": config, "fold": 0, "seed": seed, "patient_id": "P", "structure": structure,
            "postprocess": pp, "annotated": True, "dice": dice, "hd95_mm": hd95}


def test_postprocessing_comparison_and_choice(bench):
    """Paired changes per structure; the choice is the candidate never worse and best on average."""
    rows = [
        # esophagus: 'largest' gains on one seed and loses on the other; 'drop<10%' never loses.
        _row("none", 0.50, 20.0, seed=0), _row("none", 0.60, 10.0, seed=1),
        _row("largest", 0.70, 8.0, seed=0), _row("largest", 0.55, 30.0, seed=1),
        _row("drop<10%", 0.55, 12.0, seed=0), _row("drop<10%", 0.60, 10.0, seed=1),
        # heart: 'largest' never worse and better on average; an unscored (None) pair is left out.
        _row("none", 0.80, 10.0, structure="heart"), _row("largest", 0.90, None, structure="heart"),
        _row("drop<10%", 0.85, 9.0, structure="heart"),
        _row("none", None, None, seed=1, structure="heart"), _row("largest", None, None, seed=1, structure="heart"),
        # cord: nothing changes anything: no post-processing.
        _row("none", 0.7, 5.0, structure="spinal_cord"), _row("largest", 0.7, 5.0, structure="spinal_cord"),
    ]
    comparison = bench.compare_postprocessing(rows, ["largest", "drop<10%"], ["esophagus", "heart", "spinal_cord"])
    by = {(e["structure"], e["postprocess"]): e for e in comparison}
    largest = by["esophagus", "largest"]
    assert largest["n"] == 2 and largest["dice"] == pytest.approx(0.625)
    assert largest["dice_change_mean"] == pytest.approx(0.075) and largest["dice_change_worst"] == pytest.approx(-0.05)
    assert largest["hd95_change_mean"] == pytest.approx(4.0)          # (-12 + 20) / 2
    assert by["esophagus", "drop<10%"]["dice_change_worst"] == pytest.approx(0.0)
    assert by["heart", "largest"]["n"] == 1 and by["heart", "largest"]["hd95_change_mean"] is None
    assert by["spinal_cord", "drop<10%"] == {"structure": "spinal_cord", "postprocess": "drop<10%", "n": 0,
                                             "dice": None, "dice_change_mean": None, "dice_change_worst": None,
                                             "hd95_change_mean": None}
    chosen = bench.choose_postprocessing(comparison, ["largest", "drop<10%"])
    assert chosen == {"esophagus": "drop<10%", "heart": "largest", "spinal_cord": "none"}
    # A loss within the tolerance (a few lung voxels) still counts as never worse; a larger one not.
    for worst, expected in ((-0.0009, "largest"), (-0.0011, "none")):
        entry = {"structure": "lung_right", "postprocess": "largest", "n": 4, "dice": 0.9,
                 "dice_change_mean": 0.002, "dice_change_worst": worst, "hd95_change_mean": -6.0}
        assert bench.choose_postprocessing([entry], ["largest"]) == {"lung_right": expected}
    lines = bench.format_candidates_table(comparison, chosen).splitlines()
    assert lines[0] == bench.CANDIDATES_HEADER and lines[1] == bench.CANDIDATES_RULE
    assert "| Esophagus | largest | 2 | 0.625 | +0.0750 | -0.0500 | +4.0 |  |" in lines
    assert "| Esophagus | drop<10% | 2 | 0.575 | +0.0250 | +0.0000 | -4.0 | yes |" in lines
    assert "| Spinal cord | drop<10% | 0 | - | - | - | - |  |" in lines


def test_postprocessed_rows_rescore_what_a_rule_changed(bench, tmp_path, monkeypatch):
    """A stray voxel of the right lung: 'largest' removes it and its row is scored again (Dice 1);
    the cord, one piece, keeps the plain row's numbers."""
    import numpy as np
    import SimpleITK as sitk

    from thoracic_seg import batch, organs
    from thoracic_seg import layout as layout_module

    truth = np.zeros((4, 8, 8), np.uint8)
    truth[0:3, 0:4, 0:4] = organs.RIGHT_LUNG
    truth[0:4, 6, 6] = organs.SPINAL_CORD
    predicted = truth.copy()
    predicted[3, 0, 7] = organs.RIGHT_LUNG                      # not touching the lung: a second piece
    predicted[3, 6, 6] = 0                                      # the cord one voxel short
    arrays = {"pred": predicted, "masks": truth}
    monkeypatch.setattr(batch, "read_nifti",
                        lambda path: sitk.GetImageFromArray(arrays["pred" if "pred" in str(path) else "masks"]))
    monkeypatch.setattr(layout_module, "truth_record", lambda layout, pid: ([True] * organs.NUM_CLASSES, {}))
    plain = [{"config": "2d", "fold": 0, "seed": 0, "patient_id": "P", "postprocess": "none", **row}
             for row in score_structures(predicted, truth, (1.0, 1.0, 1.0), [True] * organs.NUM_CLASSES)]
    rows = bench.postprocessed_rows(plain, data_root=tmp_path, predictions_dir=tmp_path / "pred",
                                    variants={"largest": {organs.RIGHT_LUNG: 1.0, organs.SPINAL_CORD: 1.0}})
    by = {r["structure"]: r for r in rows}
    assert [r["postprocess"] for r in rows] == ["largest"] * len(plain)
    lung = next(r for r in plain if r["structure"] == "lung_right")
    assert lung["dice"] == pytest.approx(2 * 48 / 97) and by["lung_right"]["dice"] == 1.0
    assert by["lung_right"]["predicted_ml"] == pytest.approx(0.048)
    assert lung["surface_dice"] < 1 and lung["apl_mm"] == 0.0          # the stray piece: surface, no contour to draw
    assert (by["lung_right"]["surface_dice"], by["lung_right"]["apl_mm"]) == (1.0, 0.0)
    cord = next(r for r in plain if r["structure"] == "spinal_cord")
    assert by["spinal_cord"] == {**cord, "postprocess": "largest"}


def _tiny_patients(folder: Path) -> Path:
    from make_synthetic_cohort import generate_patient

    raw = folder / "raw"
    for i, pid in enumerate(("CV-001", "CV-002")):
        generate_patient(raw, folder / "truth", pid, seed=i, size=64, slices=16)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("crop", [False, True], ids=["crop-unsupported", "crop-supported"])
def test_main_end_to_end(bench, tmp_path, capsys, monkeypatch, crop):
    """main() on 2 stand-in patients (2 folds) + 1 synthetic training patient, 32 px, 2 steps.

    ``crop-unsupported``: phase 3 without ``crop_body`` (before the body crop is merged): crop is
    skipped. ``crop-supported``: a phase 3 that takes ``crop_body`` (a stand-in that records the
    call and normalizes as before): phase 3 runs once per (size, crop) and crop is scored.
    """
    import normalize_ct_and_masks

    calls = []
    if crop:
        original = normalize_ct_and_masks.run

        def run_with_crop(*, crop_body: bool = False, **kwargs):
            calls.append((kwargs["size"], crop_body))
            return original(**kwargs)

        monkeypatch.setattr(normalize_ct_and_masks, "run", run_with_crop)
    else:
        monkeypatch.setattr(bench, "crop_supported", lambda: False)
    raw = _tiny_patients(tmp_path / "patients")
    output, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    configs = ["2d", "2.5d-k1", "crop"]
    argv = ["--no-sample", "--extra-root", str(raw), "--synthetic", "1", "--synthetic-px", "64",
            "--synthetic-slices", "16", "--configs", *configs, "--seeds", "0", "--device", "cpu",
            "--size", "32", "--base-channels", "4", "--batch-size", "4", "--steps", "2",
            "--work-dir", str(tmp_path / "work"), "--output", str(output), "--markdown", str(markdown)]
    assert bench.main(argv) == 0

    report = json.loads(output.read_text())
    ran = configs if crop else ["2d", "2.5d-k1"]
    assert report["configs"] == ran
    if crop:
        assert report["skipped"] == {} and calls == [(32, False), (32, True)]
    else:
        assert list(report["skipped"]) == ["crop"] and "no crop_body option" in report["skipped"]["crop"]
    assert report["budget"] == {"steps": 2, "batch_size": 4, "size": 32, "base_channels": 4, "lr": 1e-3,
                                "device": "cpu", "checkpoint": "last", "synthetic": 1}
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["command"].startswith("python benchmarks/bench_quality.py --no-sample")
    assert report["wall_seconds"] > 0
    assert report["folds"] == [{"fold": 0, "test": ["CV-001"], "train": ["CV-002", "SYN-001"]},
                               {"fold": 1, "test": ["CV-002"], "train": ["CV-001", "SYN-001"]}]
    assert [(r["config"], r["fold"], r["seed"]) for r in report["runs"]] == [
        (c, f, 0) for c in ran for f in (0, 1)]
    assert all(r["failed"] == [] and r["train_seconds"] > 0 for r in report["runs"])
    assert all("max-steps (2 steps)" in r["stop_reason"] for r in report["runs"])
    # Every held-out patient x structure, without post-processing, with the pipeline's and with
    # each candidate rule, per configuration.
    variants = ("none", "--postprocess", "largest", "drop<10%", "drop<1%")
    keys = {(r["config"], r["fold"], r["postprocess"], r["patient_id"], r["structure"]) for r in report["rows"]}
    assert keys == {(c, f, pp, f"CV-00{f + 1}", s) for c in ran for f in (0, 1) for pp in variants
                    for s in STRUCTURES}
    assert len(report["rows"]) == len(keys)
    for row in report["rows"]:
        assert row["context_slices"] == {"2d": 0, "2.5d-k1": 1, "crop": 0}[row["config"]]
        assert row["dice"] is None or 0 <= row["dice"] <= 1
        assert row["hd95_inf"] == (row["annotated"] and row["dice"] == 0.0 and row["hd95_mm"] is None) \
            or not row["hd95_inf"]

    out = capsys.readouterr().out
    table = out[out.index("| structure |"):].splitlines()
    assert table[0] == bench.TABLE_HEADER and table[1] == bench.TABLE_RULE
    body = [line for line in table[2:2 + 7 * 2 * len(ran)]]
    assert [(cells[1], cells[2]) for cells in (line.split(" | ") for line in body)][:2 * len(ran)] == [
        (c, pp) for c in ran for pp in ("none", "--postprocess")]
    for line in body:
        assert line.startswith("| ") and line.endswith(" |") and line.count("|") == 9
    assert bench.CANDIDATES_HEADER in out
    assert [e["postprocess"] for e in report["postprocess_comparison"]][:4] == ["--postprocess", "largest",
                                                                                "drop<10%", "drop<1%"]
    assert set(report["postprocess_chosen"]) == {"lung_right", "lung_left", "heart", "esophagus", "spinal_cord"}

    # The benchmark's '--postprocess' rows are what evaluate_multi_organ.py --postprocess scores.
    import evaluate_multi_organ as ev

    run_dir = Path(report["runs"][0]["run_dir"])
    data_root = tmp_path / "work" / "data-32px"
    ev.run(checkpoint=run_dir / "last_checkpoint.pth", data_root=data_root, patients=["CV-001"],
           output_dir=tmp_path / "pp", device="cpu", postprocess=True)
    expected = {r["structure"]: bench._jsonable_row(r) for r in bench.read_metrics(tmp_path / "pp" / "metrics.csv")}
    mine = {r["structure"]: r for r in report["rows"]
            if (r["config"], r["fold"], r["seed"], r["postprocess"]) == (ran[0], 0, 0, "--postprocess")}
    assert set(mine) == set(STRUCTURES)
    for key, row in mine.items():
        for metric in ("dice", "hd95_mm"):
            want = expected[key][metric]
            assert row[metric] == (None if want is None else pytest.approx(want, rel=1e-5, abs=1e-6)), (key, metric)
    assert bench.RUNS_HEADER in out and f"wrote {output}" in out
    if not crop:
        assert "Skipped: crop: the installed normalize_ct_and_masks.run has no crop_body option" in out
    md = markdown.read_text()
    assert md.startswith("## Quality on real patients (`bench_quality.py`)")
    assert bench.TABLE_HEADER in md and "2 folds by patient (held out: CV-001; CV-002)" in md

    # The same --work-dir with another budget: the finished runs are not continued as if they matched.
    if not crop:
        assert bench.main([a if a != "2" else "3" for a in argv]) == 1
        assert "holds a run of other settings" in capsys.readouterr().err


def test_bad_arguments(bench, capsys):
    for argv, message in ((["--configs", "3d"], "cannot read '3d'"),
                          (["--steps", "0"], "--steps must be >= 1, got 0"),
                          (["--size", "40"], "--size must be a multiple of 16"),
                          (["--no-sample"], "--no-sample needs --extra-root")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_import_does_no_work():
    """Importing the script loads neither torch nor the imaging stack (argument parsing stays fast)."""
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {str(BENCH_PATH)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; spec.loader.exec_module(m)")
    assert modules_loaded_by(code, ("torch", "SimpleITK", "pydicom", "scipy")) == []
