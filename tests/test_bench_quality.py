"""benchmarks/bench_quality.py and quality_stats.py: balanced folds, the statistics and the decision rule,
post-processing chosen out of sample, and --smoke end to end with a killed run resumed from its cache."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark, modules_loaded_by

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
#: The annotated structures of the six real development patients (../shared/data/README.md).
REAL = {"LUNG1-001": {"gtv", "lung_right", "lung_left", "spinal_cord"},
        "LUNG1-002": {"gtv", "lung_right", "lung_left", "heart", "esophagus", "spinal_cord"},
        "LUNG1-003": {"gtv", "lung_right", "lung_left", "heart", "esophagus", "spinal_cord"},
        "LUNG1-004": {"gtv", "lung_right", "lung_left", "esophagus", "spinal_cord"},
        "LUNG1-005": {"gtv", "lung_right", "lung_left", "heart", "esophagus", "spinal_cord"},
        "LUNG1-010": {"gtv", "lung_right", "lung_left", "heart", "esophagus", "spinal_cord"}}


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_quality")


@pytest.fixture(scope="module")
def qs():
    yield from load_benchmark("quality_stats")


def test_folds_are_balanced_on_the_real_patients(bench):
    folds = bench.balanced_folds(REAL, 3, ("heart", "esophagus"))
    # by hand: 001 (neither) -> 0; 004 (esophagus) -> 1; 002 -> 2 (lacks both, empty); 003 -> 0 (lacks
    # both, 1 patient); 005 -> 1 (0 is full); 010 -> 2
    assert folds == [["LUNG1-001", "LUNG1-003"], ["LUNG1-004", "LUNG1-005"], ["LUNG1-002", "LUNG1-010"]]
    for fold in folds:  # every fold scores a heart and an esophagus
        assert {"heart", "esophagus"} <= set().union(*(REAL[p] for p in fold))
    assert sorted(p for f in folds for p in f) == sorted(REAL)
    # 4 hearts cannot fill 6 folds: nothing to balance, one patient per fold in id order
    assert bench.balanced_folds(REAL, 6, ("heart",)) == [[p] for p in sorted(REAL)]
    with pytest.raises(ValueError, match="folds must be 2-6 for 6 patients, got 7"):
        bench.balanced_folds(REAL, 7, ())


def test_epochs_span_the_step_budget(bench):
    assert bench.steps_per_epoch(100, 8) == 12 and bench.steps_per_epoch(10, 8) == 2
    assert bench.epochs_for(3000, 500, 8) == 49  # 62 steps an epoch: 48 epochs hold 2976


def row(candidate="baseline", fold=0, seed=0, patient="P1", structure="heart", dice=0.5, postprocess="none",
        rendering="original", **more):
    return {"candidate": candidate, "fold": fold, "seed": seed, "patient_id": patient, "structure": structure,
            "dice": dice, "postprocess": postprocess, "rendering": rendering, "annotated": True,
            "hd95_mm": 4.0, "diagonal_mm": 600.0, **more}


def test_describe_penalises_an_empty_prediction(qs):
    rows = [row(dice=0.8, hd95_mm=2.0, surface_dice=0.9, apl_mm=100.0),
            row(dice=0.0, hd95_mm=math.inf, surface_dice=0.0, apl_mm=500.0),
            row(dice=0.6, hd95_mm=6.0), row(annotated=False, dice=None, hd95_mm=None)]
    d = qs.describe(rows)
    assert d["n"] == 3 and d["dice"] == pytest.approx(1.4 / 3) and d["surface_dice"] == pytest.approx(0.45)
    assert d["hd95_median"] == 6.0 and d["hd95_inf"] == 1
    assert d["hd95_penalised_mean"] == pytest.approx((2.0 + 600.0 + 6.0) / 3)  # not 4.0: nothing predicted costs
    assert d["apl_mm"] == 300.0
    assert qs.median([1.0, 3.0]) == 2.0 and qs.median([]) is None


def test_paired_differences_and_the_bootstrap_interval(qs):
    rows = [row(patient=p, seed=s, dice=base) for p, base in (("P1", 0.5), ("P2", 0.6)) for s in (0, 1)]
    rows += [row("cand", patient="P1", seed=s, dice=0.6) for s in (0, 1)]
    rows += [row("cand", patient="P2", seed=s, dice=0.6 + 0.1 * s) for s in (0, 1)]
    rows += [row("ens", patient="P1", seed=None, dice=0.55), row("ens", patient="P2", seed=None, dice=0.5)]
    pairs = qs.paired_differences(rows, "cand", "baseline", "heart")
    assert [round(p["difference"], 6) for p in pairs] == [0.1, 0.1, 0.0, 0.1]
    ens = qs.paired_differences(rows, "ens", "baseline", "heart")  # one ensemble against each seed
    assert [(p["patient_id"], p["seed"], round(p["difference"], 6)) for p in ens] == [
        ("P1", 0, 0.05), ("P1", 1, 0.05), ("P2", 0, -0.1), ("P2", 1, -0.1)]
    low, high = qs.bootstrap_interval(pairs)  # patients resampled: P1 means 0.1, P2 0.05
    assert (round(low, 6), round(high, 6)) == (0.05, 0.1)
    assert qs.bootstrap_interval([]) is None
    c = qs.compare(rows, "cand", "baseline", ["heart"])[0]
    assert (c["n"], c["patients"], c["up"], c["down"], c["equal"]) == (4, 2, 3, 0, 1)
    assert c["mean"] == pytest.approx(0.075)


@pytest.mark.parametrize("changes, verdict", [
    ({"P1": 0.05, "P2": 0.04, "P3": 0.06}, "switch"),
    ({"P1": 0.05, "P2": -0.04, "P3": 0.01}, "no measurable difference"),
    ({"P1": -0.05, "P2": -0.04, "P3": -0.06}, "worse"),
])
def test_the_decision_rule(qs, changes, verdict):
    rows = []
    for patient, change in changes.items():
        for structure in ("heart", "esophagus"):
            rows += [row(patient=patient, structure=structure, dice=0.5),
                     row("cand", patient=patient, structure=structure, dice=0.5 + change)]
    assert qs.decide(rows, "cand", "baseline", ["heart"], ["heart", "esophagus"])["verdict"] == verdict


def test_a_harmed_structure_blocks_a_switch(qs):
    rows = []
    for patient in ("P1", "P2", "P3"):
        rows += [row(patient=patient, dice=0.5), row("cand", patient=patient, dice=0.6),
                 row(patient=patient, structure="esophagus", dice=0.5),
                 row("cand", patient=patient, structure="esophagus", dice=0.45)]
    d = qs.decide(rows, "cand", "baseline", ["heart"], ["heart", "esophagus"])
    assert d["harmed"] == ["esophagus"] and d["verdict"] == "worse"


def test_post_processing_is_chosen_on_the_other_folds(qs):
    rows = []
    for fold, patient, gain in ((0, "P1", 0.02), (1, "P2", 0.03), (2, "P3", -0.05)):
        rows += [row(fold=fold, patient=patient, dice=0.7), row(fold=fold, patient=patient, dice=0.7 + gain,
                                                                 postprocess="largest")]
        rows += [row(fold=fold, patient=patient, structure="esophagus", dice=0.3),
                 row(fold=fold, patient=patient, structure="esophagus", dice=0.4, postprocess="largest")]
    held = qs.held_out_postprocessing(rows, "baseline", ["heart", "esophagus"], ["largest"])
    by = {(h["fold"], h["structure"]): h for h in held}
    assert by[(0, "heart")]["rule"] == "none"  # fold 2 lost 0.05 on the other folds' pairs
    assert by[(1, "heart")]["rule"] == "none"
    assert by[(2, "heart")]["rule"] == "largest"  # folds 0 and 1 gained, then fold 2 loses out of sample
    assert by[(2, "heart")]["change_mean"] == pytest.approx(-0.05)
    assert all(by[(f, "esophagus")]["rule"] == "none" for f in range(3))  # Dice 0.3 < the 0.5 floor
    assert by[(0, "esophagus")]["change_mean"] == 0.0


def test_unknown_candidate(bench, tmp_path):
    budget = bench.Budget(steps=1, size=32, device="cpu", phase3_args=(), train_args=())
    with pytest.raises(ValueError, match=r"unknown candidate\(s\) \['3d'\]"):
        bench.run(candidates=["3d"], work=tmp_path, budget=budget, dicom_roots=[], data_id="x")


@pytest.mark.slow
def test_smoke_runs_and_a_killed_run_resumes_without_redoing_cells(bench, tmp_path, capsys):
    """--smoke end to end; a run killed in its third training resumes: the two finished cells come from the
    cache (the stand-in trainer is not called for them), the rest are trained; a third run trains nothing."""
    calls: list[str] = []

    def stand_in(cell, **kwargs):
        calls.append(cell.folder)
        if len(calls) == 3 and not (tmp_path / "killed").exists():
            (tmp_path / "killed").touch()
            raise KeyboardInterrupt("killed")
        return bench.train_cell(cell, **kwargs)

    argv = ["--smoke", "--steps", "12", "--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "q.json"),
            "--markdown", str(tmp_path / "q.md"), "--candidates", "baseline", "ensemble"]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv, trainer=stand_in)
    assert len(calls) == 3
    killed = calls[-1]
    calls.clear()
    assert bench.main(argv, trainer=stand_in) == 0
    assert calls[0] == killed and len(calls) == 4  # 6 trainings: 2 cached, the killed one redone, 3 more
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["cells_cached"] == 2 and len(report["records"]) == 9  # 6 trainings + 3 fold ensembles
    assert report["skipped"] == {}
    markdown = (tmp_path / "q.md").read_text()
    for title in ("Held-out patients", "Paired with the baseline", "Decision rule", "out of sample"):
        assert title in markdown
    qs = bench.stats
    for structure, n in (("heart", 8), ("esophagus", 8), ("lung_left", 12)):  # SYN-002/006: no heart, 004/006 no
        scored = [r for r in map(bench.from_json_row, report["rows"]) if r["candidate"] == "baseline" and r["structure"] == structure
                  and r["postprocess"] == "none" and r["rendering"] == "original"]  # esophagus; x 2 seeds
        assert qs.describe(scored)["n"] == n
    held_out = tmp_path / "work" / "cells" / "baseline" / "fold-0-seed-0-steps-12" / "held_out"
    assert sorted(p.name for p in held_out.iterdir())[:2] == ["SYN-001.nii.gz", "SYN-001_probabilities.npz"]
    calls.clear()  # the default candidates: the baseline's cells and ensembles cached, the others trained
    assert bench.main(argv[:-3], trainer=stand_in) == 0
    assert sorted({c.split("/")[0] for c in calls}) == ["fov-crop", "scanner-aug"] and len(calls) == 12
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["cells_cached"] == 9 and len(report["records"]) == 21
    assert {r["rendering"] for r in report["rows"]} == {"original", "rerendered"}
    capsys.readouterr()


def test_a_cell_started_under_other_settings_starts_afresh(bench, tmp_path):
    """Other training settings: the folder is kept aside (renamed, never deleted) and training starts afresh."""
    folder = tmp_path / "cells" / "baseline" / "fold-0-seed-0-steps-5"
    (folder / "run").mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps({"training": {"other": 1}, "scoring": {}}))
    (folder / "run" / "last_checkpoint.pth").write_text("of another experiment")
    cell = bench.Cell(bench.CANDIDATES["baseline"], 0, 0, ("A",), ("B",), 5)
    budget = bench.Budget(steps=5, size=32, device="cpu", phase3_args=(), train_args=())

    def stand_in(cell, run_dir, **kwargs):
        assert not (run_dir / "last_checkpoint.pth").exists()  # the other experiment's checkpoint is gone
        raise KeyboardInterrupt

    key = {"training": {"k": 2}, "scoring": {}}
    with pytest.raises(KeyboardInterrupt):
        bench.run_cell(cell, work=tmp_path, data_root=tmp_path, rerendered=None, budget=budget, key=key,
                       trainer=stand_in)
    assert json.loads((folder / "key.json").read_text()) == key
    kept = [p for p in folder.parent.iterdir() if p.name.startswith(folder.name + ".stale-")]
    assert len(kept) == 1 and (kept[0] / "run" / "last_checkpoint.pth").read_text() == "of another experiment"


def test_only_a_scoring_change_keeps_the_network(bench, tmp_path):
    folder = tmp_path / "cells" / "baseline" / "fold-0-seed-0-steps-5"
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "last_checkpoint.pth").write_text("trained")
    (folder / "key.json").write_text(json.dumps({"training": {"k": 1}, "scoring": {"code": "old"}}))
    cell = bench.Cell(bench.CANDIDATES["baseline"], 0, 0, ("A",), ("B",), 5)
    budget = bench.Budget(steps=5, size=32, device="cpu", phase3_args=(), train_args=())

    def stand_in(cell, run_dir, **kwargs):
        assert (run_dir / "last_checkpoint.pth").read_text() == "trained"  # resumed, not retrained
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench.run_cell(cell, work=tmp_path, data_root=tmp_path, rerendered=None, budget=budget,
                       key={"training": {"k": 1}, "scoring": {"code": "new"}}, trainer=stand_in)
    assert not [p for p in folder.parent.iterdir() if ".stale-" in p.name]


def test_the_key_separates_training_from_scoring(bench):
    cell = bench.Cell(bench.CANDIDATES["baseline"], 0, 1, ("A", "B"), ("C",), 2000)
    budget = bench.Budget(steps=3000, size=128, device="cpu", phase3_args=("--crop-body",), train_args=("--augment",))
    data = {"A": "a", "B": "b", "C": "c", "D": "d"}
    key = bench.cell_key(cell, budget, {"train": "t", "score": "s"}, data, (0, 1))
    assert key["training"]["train"] == {"A": "a", "B": "b"} and key["scoring"]["test"] == {"C": "c"}
    assert key["training"]["steps"] == 2000 and "steps" not in key["training"]["budget"]  # the cell's, not --steps'
    assert key["training"]["code"] == "t" and key["scoring"]["code"] == "s"
    other = bench.cell_key(cell, replace_steps(bench, budget), {"train": "t", "score": "s"}, data, (0, 1))
    assert other == key  # a learning curve's cell and the run's cell of the same steps are one cell


def replace_steps(bench, budget):
    from dataclasses import replace

    return replace(budget, steps=1000)


def test_code_fingerprints_cover_our_modules_only(bench, tmp_path, monkeypatch):
    train = {str(f.relative_to(bench.REPO_ROOT)) for f in bench.code_files(bench.TRAIN_ENTRY_MODULES)}
    score = {str(f.relative_to(bench.REPO_ROOT)) for f in bench.code_files(bench.SCORE_ENTRY_MODULES)}
    assert {"train_multi_organ.py", "thoracic_seg/training.py", "dataset_multi_organ.py"} <= train
    assert {"thoracic_seg/inference.py", "thoracic_seg/metrics.py", "thoracic_seg/scanner.py"} <= score
    assert "thoracic_seg/metrics.py" not in train and "train_multi_organ.py" not in score
    assert not any(n.startswith((".venv", "benchmarks", "tests")) for n in train | score)
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path)  # one changed byte changes the fingerprint
    (tmp_path / "a.py").write_text("x = 1\n")
    before = bench.code_fingerprint([tmp_path / "a.py"])
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench.code_fingerprint([tmp_path / "a.py"]) != before


def test_bad_arguments(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--steps", "0"])
    assert exit_info.value.code == 2 and "--steps and --learning-curve budgets must be >= 1" in capsys.readouterr().err


def test_import_does_no_work():
    """Importing the script loads neither torch nor the imaging stack (argument parsing stays fast)."""
    code = (f"import importlib.util, sys\nsys.path.insert(0, {str(BENCH_PATH.parent)!r})\n"
            f"spec = importlib.util.spec_from_file_location('b', {str(BENCH_PATH)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; spec.loader.exec_module(m)")
    assert modules_loaded_by(code, ("torch", "SimpleITK", "pydicom", "scipy")) == []
