"""benchmarks/bench_training.py runs end to end on CPU with a tiny network and writes its JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark, modules_loaded_by

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_training")


def test_bench_runs_on_cpu_and_writes_rows(bench, tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--size", "32", "--batch-sizes", "2", "3", "--base-channels", "4",
            "--steps", "2", "--warmup", "1", "--volume-slices", "5", "--output", str(output)]
    assert bench.main(argv) == 0

    report = json.loads(output.read_text())
    assert report["config"]["size"] == 32 and report["config"]["batch_sizes"] == [2, 3]
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    # CPU: no compile by default; fp32 in the default layout and bf16 autocast with channels-last.
    assert [(r["setting"], r["batch_size"]) for r in report["rows"]] == [
        ("fp32", 2), ("fp32", 3), ("bf16+channels_last", 2), ("bf16+channels_last", 3)]
    for row in report["rows"]:
        assert row["train_slices_per_s"] > 0 and row["infer_slices_per_s"] > 0 and row["train_step_ms"] > 0
        assert row["peak_train_memory_mb"] is None  # GPU memory only
    assert [(v["setting"], v["slices"], v["batch_size"]) for v in report["volume"]] == [
        ("fp32", 5, 3), ("bf16+channels_last", 5, 3)]
    assert all(v["seconds"] > 0 for v in report["volume"])
    table = capsys.readouterr().out
    assert "| bf16+channels_last | 3 |" in table and f"wrote {output}" in table


def test_bench_counts_the_parameters_of_the_network(bench, tmp_path):
    output = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--size", "32", "--batch-sizes", "1", "--base-channels", "2",
                       "--steps", "1", "--warmup", "0", "--precision", "fp32", "--volume-slices", "0",
                       "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    from unet_multi_organ import UNetMultiOrgan

    assert report["config"]["parameters"] == sum(p.numel() for p in UNetMultiOrgan(1, 8, 2).parameters())
    assert [r["setting"] for r in report["rows"]] == ["fp32"] and report["volume"] == []


@pytest.mark.parametrize("argv, message", [
    (["--size", "40"], "--size must be a multiple of 16"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-sizes", "0"], "batch sizes must be >= 1"),
])
def test_bench_bad_arguments(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_imports_no_imaging_stack():
    """The benchmark must run on a machine with only PyTorch: no SimpleITK, pydicom, scipy."""
    code = (f"import runpy, sys; sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_path({str(BENCH_PATH)!r}, run_name='__main__')\nexcept SystemExit:\n    pass")
    assert modules_loaded_by(code, ("SimpleITK", "pydicom", "scipy", "skimage", "matplotlib")) == []
