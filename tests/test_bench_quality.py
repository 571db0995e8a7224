"""benchmarks/bench_quality.py: configurations, folds, the table, and main() end to end on a tiny
cohort (two tiny synthetic patients standing in for the real ones, one synthetic training patient)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

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
    rows = [{"config": "2d", "postprocess": pp, "structure": "heart", "annotated": True,
             "dice": d, "hd95_mm": h, "hd95_inf": h is None}
            for pp in (False, True) for d, h in ((0.8, 10.0), (0.6, 20.0), (0.0, None))]
    summary = bench.summarize(rows, ["2d"])
    heart = [s for s in summary if s["structure"] == "heart"]
    assert [(s["postprocess"], s["n"], s["hd95_inf"]) for s in heart] == [(False, 3, 1), (True, 3, 1)]
    lines = bench.format_table(summary).splitlines()
    assert lines[0] == ("| structure | configuration | post-processing | n | Dice mean ± std "
                        "| HD95 mean ± std (mm) | HD95 inf |")
    assert lines[1] == "|---|---|---|---:|---:|---:|---:|"
    # Dice 0.8, 0.6, 0: mean 0.467, sample std 0.416; HD95 over the finite 10 and 20: 15.0 ± 7.1.
    assert "| Heart | 2d | no | 3 | 0.467 ± 0.416 | 15.0 ± 7.1 | 1 |" in lines
    assert "| Heart | 2d | yes | 3 | 0.467 ± 0.416 | 15.0 ± 7.1 | 1 |" in lines
    assert "| GTV | 2d | no | 0 | - | - | 0 |" in lines
    assert len(lines) == 2 + 7 * 2


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
    # Every held-out patient x structure, without and with post-processing, per configuration.
    keys = {(r["config"], r["fold"], r["postprocess"], r["patient_id"], r["structure"]) for r in report["rows"]}
    assert keys == {(c, f, pp, f"CV-00{f + 1}", s) for c in ran for f in (0, 1) for pp in (False, True)
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
        (c, pp) for c in ran for pp in ("no", "yes")]
    for line in body:
        assert line.startswith("| ") and line.endswith(" |") and line.count("|") == 8
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
            "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; spec.loader.exec_module(m)\n"
            "print('IMPORTED', sorted(x for x in ('torch', 'SimpleITK', 'pydicom', 'scipy') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "IMPORTED []"
