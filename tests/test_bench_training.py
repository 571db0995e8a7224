"""benchmarks/bench_training.py and benchmarks/gpu_check.py run end to end on CPU with tiny
networks and write their JSON; the GPU check reports a failed check and exits 1."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, modules_loaded_by

from thoracic_seg.precision import Precision

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"
CHECK_PATH = BENCH_PATH.with_name("gpu_check.py")


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


@pytest.mark.parametrize("path", [BENCH_PATH, CHECK_PATH])
def test_bench_imports_no_imaging_stack(path):
    """The benchmark and the GPU check must start on a machine with only PyTorch: no SimpleITK,
    pydicom, scipy (the GPU check imports the Predictor, which needs scipy, only when it runs)."""
    code = (f"import runpy, sys; sys.argv = ['x', '--help']\n"
            f"try:\n    runpy.run_path({str(path)!r}, run_name='__main__')\nexcept SystemExit:\n    pass")
    assert modules_loaded_by(code, ("SimpleITK", "pydicom", "scipy", "skimage", "matplotlib")) == []


@pytest.mark.parametrize("precision, compiled, name", [
    (Precision(), False, "fp32"),
    (Precision(torch.bfloat16, False, True), False, "bf16+channels_last"),
    (Precision(torch.float16, True, True), False, "fp16+scaler+channels_last"),
    (Precision(torch.float16, True, True), True, "fp16+scaler+channels_last+compile"),
])
def test_setting_names_say_precision_scaler_layout_and_compile(bench, precision, compiled, name):
    setting = bench.Setting(precision, compiled)
    assert setting.name == name
    assert setting.record()["grad_scaler"] is precision.grad_scaler and setting.record()["compile"] is compiled


def test_learnable_batch_labels_are_intensity_bands(bench):
    batch = bench.synthetic_batch(3, 32, torch.device("cpu"), learnable=True)
    assert batch.images.shape == (3, 1, 32, 32) and batch.targets.shape == (3, 32, 32)
    assert batch.images.std().item() == pytest.approx(1.0)
    assert torch.equal(batch.targets == 0, batch.images[:, 0] <= -1.0)
    assert torch.equal(batch.targets == 4, batch.images[:, 0] > 1.0)
    assert batch.targets.unique().tolist() == [0, 1, 2, 3, 4]
    assert batch.annotated[:, -1].tolist() == [False] * 3 and batch.annotated[:, :-1].all()
    other = bench.synthetic_batch(3, 32, torch.device("cpu"), learnable=True, seed=1)
    assert not torch.equal(other.images, batch.images)


# --------------------------------------------------------------------------------------------
# benchmarks/gpu_check.py
# --------------------------------------------------------------------------------------------
NO_CUDA = "skipped: no CUDA"
TINY_CHECK = ["--device", "cpu", "--size", "32", "--base-channels", "4", "--batch-size", "2", "--steps", "1",
              "--warmup", "1", "--small-size", "32", "--small-base-channels", "4", "--train-steps", "12"]


@pytest.fixture(scope="module")
def check():
    yield from load_benchmark("gpu_check")


def test_gpu_check_runs_on_cpu(check, tmp_path, capsys):
    """Every check runs on a CPU in tiny sizes: the CUDA ones say so, the others pass."""
    output = tmp_path / "check.json"
    assert check.main(TINY_CHECK + ["--output", str(output)]) == 0

    report = json.loads(output.read_text())
    assert {"benchmark", "machine", "config", "checks", "passed", "seconds", "command"} <= set(report)
    assert report["passed"] is True and report["machine"]["device"] == "cpu"
    assert {name: r["status"] for name, r in report["checks"].items()} == {
        "policy": NO_CUDA, "speed": "pass", "fp16_training": "pass", "agreement": NO_CUDA, "ddp": "pass"}
    speed = report["checks"]["speed"]["rows"]
    assert [r["setting"] for r in speed] == [
        "fp32", "bf16+channels_last", "fp16+scaler+channels_last", "bf16+channels_last+compile"]
    assert all(r["train_slices_per_s"] > 0 and r["infer_slices_per_s"] > 0 for r in speed[:3])
    assert speed[3]["error"].startswith("skipped: compile on CPU")
    training = report["checks"]["fp16_training"]
    assert training["all_finite"] and training["logits_dtype"] == "float16" and len(training["losses"]) == 12
    assert training["last_loss"] <= 0.9 * training["first_loss"] and training["scale_end"] == 65536.0
    agreement = report["checks"]["agreement"]
    assert agreement["path"] == "thoracic_seg.inference.Predictor"
    assert agreement["labels"] == 16 * 48 * 40 and agreement["fraction_equal"] == 1.0
    assert agreement["labels_present"] >= 2  # the trained network predicts more than background
    ddp = report["checks"]["ddp"]
    assert (ddp["backend"], ddp["world_size"], ddp["all_reduce"], ddp["gradients_finite"]) == ("gloo", 1, 1.0, True)
    out = capsys.readouterr().out
    assert "| fp16_training | pass | loss " in out and "| fp16+scaler+channels_last | 2 |" in out
    assert "no check failed" in out


def _nan_loss(check):
    real = check.train_step
    return lambda *args, **kwargs: real(*args, **kwargs) * float("nan")


def _out_of_memory(**kwargs):
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("name, patch, expected", [
    ("fp16_training", lambda check: ("train_step", _nan_loss(check)), "1 of 1 losses not finite"),
    ("speed", lambda check: ("measure", _out_of_memory),
     "failed: fp32, bf16+channels_last, fp16+scaler+channels_last; 1 skipped"),
    ("ddp", lambda check: ("ddp_command", lambda device, output: [sys.executable, "-c", "raise SystemExit(3)"]),
     "torchrun exited with 3"),
])
def test_gpu_check_reports_a_failed_check_and_exits_1(check, tmp_path, monkeypatch, capsys, name, patch, expected):
    attribute, replacement = patch(check)
    monkeypatch.setattr(check, attribute, replacement)
    output = tmp_path / "check.json"
    assert check.main(TINY_CHECK + ["--train-steps", "1", "--checks", name, "--output", str(output)]) == 1

    report = json.loads(output.read_text())
    assert list(report["checks"]) == [name] and report["passed"] is False
    assert report["checks"][name]["status"] == "fail" and expected in report["checks"][name]["summary"]
    assert f"FAILED: {name}" in capsys.readouterr().out


@pytest.mark.parametrize("losses, scale_end, dtype, status, reason", [
    ([1.5, 1.2, 1.0], 65536.0, "float16", "pass", "the loss fell by 33%"),
    ([1.5, float("nan"), 1.0], 65536.0, "float16", "fail", "1 of 3 losses not finite"),
    ([1.5, 1.4], 65536.0, "float16", "fail", "the loss did not fall by 10%: 1.5000 -> 1.4000"),
    ([1.5, 1.0], 65536.0, "float32", "fail", "the network ran in float32 under float16 autocast"),
    ([1.5, 1.0], 0.5, "float16", "fail", "the gradient scaler's scale fell to 0.5"),
    ([], 65536.0, "float16", "fail", "0 of 0 losses not finite"),
])
def test_judge_training(check, losses, scale_end, dtype, status, reason):
    assert check.judge_training(losses, scale_end, dtype) == (status, reason)


@pytest.mark.parametrize("capability, policy, status, summary", [
    ((7, 5), Precision(torch.float16, True, True), "pass",
     "compute capability 7.5: training runs fp16+scaler+channels_last"),
    ((7, 5), Precision(torch.bfloat16, False, True), "fail",  # a T4 given emulated bfloat16
     "compute capability 7.5: training runs bf16+channels_last, expected fp16+scaler+channels_last"),
    ((9, 0), Precision(torch.bfloat16, False, True), "pass",
     "compute capability 9.0: training runs bf16+channels_last"),
    ((8, 0), Precision(torch.float16, True, True), "fail",
     "compute capability 8.0: training runs fp16+scaler+channels_last, expected bf16+channels_last"),
])
def test_policy_check_wants_bfloat16_exactly_where_it_is_native(check, monkeypatch, capability, policy, status,
                                                                 summary):
    """A fake GPU of each kind (the check's judgement; tests/test_precision.py tests the policy)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(check, "training_precision", lambda device, amp=None: policy)
    record = check.check_policy(torch.device("cuda"))
    assert (record["status"], record["summary"]) == (status, summary)
    assert record["compute_capability"] == f"{capability[0]}.{capability[1]}" and record["is_bf16_supported"]


@pytest.mark.parametrize("fraction, present, threshold, on_cuda, status, reason", [
    (1.0, 5, 0.999, True, "pass", "1.000000 of the labels equal (>= 0.999)"),
    (0.9995, 5, 0.999, True, "pass", "0.999500 of the labels equal (>= 0.999)"),
    (0.998, 5, 0.999, True, "fail", "0.998000 of the labels equal, below 0.999"),
    (1.0, 5, 1.5, True, "fail", "1.000000 of the labels equal, below 1.5"),  # a threshold no run can meet
    (1.0, 1, 0.999, True, "fail", "the network predicts one label everywhere: agreement would prove nothing"),
    (0.5, 5, 0.999, False, NO_CUDA, "the CPU against itself"),
])
def test_judge_agreement(check, fraction, present, threshold, on_cuda, status, reason):
    assert check.judge_agreement(fraction, present, threshold, on_cuda) == (status, reason)


@pytest.mark.parametrize("argv, message", [
    (["--size", "40"], "--size must be a multiple of 16"),
    (["--small-size", "24"], "--small-size must be a multiple of 16"),
    (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
    (["--min-agreement", "1.5"], "--min-agreement in (0, 1], got 0 and 1.5"),
])
def test_gpu_check_bad_arguments(check, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--device", "cpu", "--warmup", "0"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_check_without_scipy_compares_the_networks_argmax(tmp_path):
    """On a machine with PyTorch and numpy only, thoracic_seg.inference (scipy through
    thoracic_seg.grid) cannot be imported: the agreement check compares the network's argmax."""
    output = tmp_path / "check.json"
    argv = ["x", "--device", "cpu", "--checks", "agreement", "--small-size", "32", "--small-base-channels", "4",
            "--train-steps", "1", "--output", str(output)]
    code = ("import importlib.abc, runpy, sys\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('scipy', 'SimpleITK', 'pydicom'):\n"
            "            raise ImportError(f'No module named {name!r} (blocked)')\n"
            f"sys.meta_path.insert(0, Block()); sys.argv = {argv!r}\n"
            f"try:\n    runpy.run_path({str(CHECK_PATH)!r}, run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code")
    assert modules_loaded_by(code, ("SimpleITK", "pydicom", "scipy")) == []
    agreement = json.loads(output.read_text())["checks"]["agreement"]
    assert agreement["status"] == NO_CUDA and agreement["fraction_equal"] == 1.0
    assert agreement["path"] == "network argmax (no Predictor: No module named 'scipy' (blocked))"
    assert agreement["labels"] == 16 * 32 * 32  # at the network's size: no map back without the Predictor
