"""GPU check: the precision, inference and distributed paths of training on one GPU, one command.

Five checks, each pass, fail or skipped with the numbers behind it (:data:`CHECKS`): the training
precision this GPU gets; training and inference slices/s of the default network
(``bench_training.measure``); a short training of a small network on the forced float16 + gradient
scaler path a T4 takes; labels of ``thoracic_seg.inference.Predictor`` on the GPU against the CPU;
one DistributedDataParallel step under torchrun (NCCL; gloo on a CPU). Synthetic tensors only;
needs PyTorch (numpy and scipy for the Predictor, else the network's argmax is compared).
Under 5 minutes on one GPU; exit status 1 when a check fails:

    python benchmarks/gpu_check.py                  # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --size 32 --base-channels 4 --batch-size 2 --steps 1 \\
        --warmup 1 --small-size 32 --small-base-channels 4 --train-steps 12     # tiny, as in make test

Prints a table and writes JSON (``--output``, default ``benchmarks/gpu_check.json``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
for folder in (str(REPO_ROOT), str(BENCHMARKS)):  # `python benchmarks/gpu_check.py` from anywhere
    if folder not in sys.path:
        sys.path.insert(0, folder)

from bench_training import (  # noqa: E402  (torch, unet_multi_organ, thoracic_seg losses and precision)
    NUM_CLASSES, Setting, format_table, is_out_of_memory, machine_description, measure, synthetic_batch,
    train_step,
)
from thoracic_seg.precision import (  # noqa: E402
    FLOAT32, Precision, exact_float32, resolve_device, training_precision,
)
from unet_multi_organ import UNetMultiOrgan  # noqa: E402

DEFAULT_OUTPUT = BENCHMARKS / "gpu_check.json"
CHECKS = ("policy", "speed", "fp16_training", "agreement", "ddp")
NO_CUDA = "skipped: no CUDA"
#: The training policy of a GPU without native bfloat16 (T4, V100): float16 autocast + gradient scaler.
FLOAT16_SCALER = Precision(torch.float16, grad_scaler=True, channels_last=True)
BFLOAT16 = Precision(torch.bfloat16, grad_scaler=False, channels_last=True)
#: float16 training passes when its last loss is at most (1 - this) x its first.
MIN_LOSS_DROP = 0.1
TRAIN_LR = 3e-3
#: Fraction of equal GPU and CPU labels for the agreement check to pass (``--min-agreement``).
MIN_AGREEMENT = 0.999
AGREEMENT_SLICES = 16
DDP_TIMEOUT_S = 180
DDP_BASE_CHANNELS, DDP_SIZE = 4, 32


# --------------------------------------------------------------------------------------------
# Judgements (pure)
# --------------------------------------------------------------------------------------------
def jsonable(value: float, digits: int = 4) -> float | str:
    """``value`` rounded, or ``"nan"``/``"inf"`` (strict JSON has no non-finite numbers)."""
    return round(value, digits) if math.isfinite(value) else str(value)


def judge_training(losses: Sequence[float], scale_end: float, logits_dtype: str,
                   min_drop: float = MIN_LOSS_DROP) -> tuple[str, str]:
    """``(status, reason)`` of the float16 training: every loss finite, the autocast really in
    float16, a finite scale >= 1 at the end, and the last loss <= ``(1 - min_drop)`` x the first."""
    if not losses or not all(math.isfinite(v) for v in losses):
        bad = sum(not math.isfinite(v) for v in losses)
        return "fail", f"{bad} of {len(losses)} losses not finite"
    if logits_dtype != "float16":
        return "fail", f"the network ran in {logits_dtype} under float16 autocast"
    if not math.isfinite(scale_end) or scale_end < 1:
        return "fail", f"the gradient scaler's scale fell to {scale_end}"
    if losses[-1] > (1 - min_drop) * losses[0]:
        return "fail", f"the loss did not fall by {min_drop:.0%}: {losses[0]:.4f} -> {losses[-1]:.4f}"
    return "pass", f"the loss fell by {1 - losses[-1] / losses[0]:.0%}"


def judge_agreement(fraction: float, labels_present: int, threshold: float, on_cuda: bool) -> tuple[str, str]:
    """``(status, reason)``: pass when at least ``threshold`` of the labels are equal and the network
    predicts more than one label (a constant map would agree trivially); skipped without CUDA
    (the CPU against itself proves only that the path runs)."""
    if not on_cuda:
        return NO_CUDA, "the CPU against itself"
    if labels_present < 2:
        return "fail", "the network predicts one label everywhere: agreement would prove nothing"
    if fraction < threshold:
        return "fail", f"{fraction:.6f} of the labels equal, below {threshold}"
    return "pass", f"{fraction:.6f} of the labels equal (>= {threshold})"


# --------------------------------------------------------------------------------------------
# The checks: each returns a JSON-able record whose ``status`` is pass, fail or skipped: <why>
# --------------------------------------------------------------------------------------------
def native_bfloat16(device: torch.device) -> bool:
    """CUDA: compute capability >= 8.0 (``torch.cuda.is_bf16_supported()`` also says yes where
    bfloat16 is only emulated, e.g. a T4). CPU: True (bfloat16 autocast runs on every CPU)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def check_policy(device: torch.device) -> dict[str, Any]:
    """Does ``precision.training_precision`` give this GPU bfloat16 where it is native and float16
    with a gradient scaler elsewhere (docs/training.md)?"""
    if device.type != "cuda":
        return {"status": NO_CUDA, "summary": "the CPU's policy is tested in tests/test_precision.py"}
    major, minor = torch.cuda.get_device_capability(device)
    emulated_too = torch.cuda.is_bf16_supported()  # True on a T4 too: emulation counts by default
    policy = training_precision(device, amp=None)
    expected = BFLOAT16 if native_bfloat16(device) else FLOAT16_SCALER
    got, want = Setting(policy, False).name, Setting(expected, False).name
    ok = (policy.autocast_dtype, policy.grad_scaler) == (expected.autocast_dtype, expected.grad_scaler)
    summary = f"compute capability {major}.{minor}: training runs {got}" + ("" if ok else f", expected {want}")
    return {"status": "pass" if ok else "fail", "compute_capability": f"{major}.{minor}",
            "is_bf16_supported": emulated_too, "training_precision": got, "expected": want, "summary": summary}


def speed_settings(device: torch.device, compile_on: bool) -> tuple[list[Setting], list[dict[str, Any]]]:
    """The settings to time (fp32, bf16 where native, fp16 + scaler, torch.compile of the fastest
    mixed precision) and the rows of those skipped here."""
    native = native_bfloat16(device)
    settings = [Setting(FLOAT32, False)] + [Setting(BFLOAT16, False)] * native + [Setting(FLOAT16_SCALER, False)]
    fast = Setting(BFLOAT16 if native else FLOAT16_SCALER, True)
    skipped = [] if native else [{"setting": Setting(BFLOAT16, False).name, "error": "skipped: no native bfloat16"}]
    if device.type != "cuda":
        skipped.append({"setting": fast.name, "error": "skipped: compile on CPU (a C++ tool chain, minutes)"})
    elif not compile_on:
        skipped.append({"setting": fast.name, "error": "skipped: --no-compile"})
    else:
        settings.append(fast)
    return settings, skipped


def check_speed(device: torch.device, *, size: int, base_channels: int, batch_size: int, steps: int,
                warmup: int, compile_on: bool) -> dict[str, Any]:
    """Training and inference slices/s of each setting (``bench_training.measure``); fails when a
    setting errs (out of memory, a compile error)."""
    settings, skipped = speed_settings(device, compile_on)
    rows = []
    for setting in settings:
        start = time.perf_counter()
        try:
            row = measure(base_channels=base_channels, size=size, batch_size=batch_size, setting=setting,
                          device=device, warmup=warmup, steps=steps)
        except Exception as exc:  # noqa: BLE001  (recorded as a failed row; the other settings go on)
            row = {"setting": setting.name, **setting.record(),
                   "error": "out of memory" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"[:300]}
        row.update(batch_size=batch_size, seconds=round(time.perf_counter() - start, 1))
        rows.append(row)
        print(f"    {setting.name:<34} " + (row["error"] if "error" in row else
              f"train {row['train_slices_per_s']}, infer {row['infer_slices_per_s']} slices/s") +
              f" ({row['seconds']} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [r["setting"] for r in rows if "error" in r]
    timed = ", ".join(f"{r['setting']} {r['train_slices_per_s']:g}/{r['infer_slices_per_s']:g}"
                      for r in rows if "error" not in r)
    rows += [{"batch_size": batch_size, **r} for r in skipped]
    summary = f"failed: {', '.join(failed)}" if failed else f"train/infer slices/s at batch {batch_size}: {timed}"
    return {"status": "fail" if failed else "pass", "rows": rows,
            "summary": summary + (f"; {len(skipped)} skipped" if skipped else "")}


def train_small_network(device: torch.device, *, size: int, base_channels: int, steps: int,
                        batch_size: int = 8) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``steps`` Adam steps of a small U-Net on one learnable synthetic batch
    (``bench_training.synthetic_batch(learnable=True)``) on the forced float16 + gradient scaler
    path; returns the network (eval mode) and the record :func:`judge_training` judges."""
    torch.manual_seed(0)
    policy = FLOAT16_SCALER
    model = UNetMultiOrgan(1, NUM_CLASSES, base_channels).to(device).to(memory_format=policy.memory_format)
    batch = synthetic_batch(batch_size, size, device, policy.memory_format, learnable=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    scaler = torch.amp.GradScaler(device.type, enabled=True)
    scale_start = scaler.get_scale()
    losses, scales = [], []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        losses.append(train_step(model, optimizer, scaler, policy, device, batch))
        scales.append(scaler.get_scale())  # a host sync per step: fine for a few dozen steps
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad(), policy.autocast(device):
        logits_dtype = str(model(batch.images).dtype).replace("torch.", "")
    loss_values = [float(v) for v in torch.stack(losses).float().cpu()]
    scale_end = scales[-1]
    skipped_steps = sum(b < a for a, b in zip([scale_start] + scales, scales))
    status, reason = judge_training(loss_values, scale_end, logits_dtype)
    record = {"status": status, "steps": steps, "size": size, "base_channels": base_channels,
              "batch_size": batch_size, "lr": TRAIN_LR, "first_loss": jsonable(loss_values[0]),
              "last_loss": jsonable(loss_values[-1]), "losses": [jsonable(v) for v in loss_values],
              "all_finite": all(math.isfinite(v) for v in loss_values), "logits_dtype": logits_dtype,
              "scale_start": jsonable(scale_start), "scale_end": jsonable(scale_end),
              "skipped_steps": skipped_steps, "seconds": round(seconds, 2)}
    record["summary"] = (f"loss {record['first_loss']} -> {record['last_loss']} in {steps} steps, scale "
                         f"{scale_start:g} -> {scale_end:g} ({skipped_steps} steps skipped): {reason}")
    return model, record


def predict_labels(model: torch.nn.Module, device: torch.device, ct: torch.Tensor,
                   output_shape_yx: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """uint8 labels (Z, H, W) of ``model`` (a copy on ``device``) for network input ``ct`` (Z, S, S),
    in float32 through ``thoracic_seg.inference.Predictor.predict``; where that cannot be imported
    (no numpy or scipy), the network's argmax at S x S in exact float32. Returns (labels, path)."""
    model = copy.deepcopy(model).to(device).to(memory_format=torch.contiguous_format).eval()
    try:
        from thoracic_seg.inference import Predictor  # numpy, scipy (thoracic_seg.grid)
    except ImportError as exc:
        with torch.inference_mode(), exact_float32(device):
            logits = model(ct[:, None].to(device))
        return logits.argmax(dim=1).to(torch.uint8).cpu(), f"network argmax (no Predictor: {exc})"
    size = ct.shape[-1]
    predictor = Predictor(model, Path("gpu_check.pth"), device, FLOAT32, batch_size=8,
                          window=(-1000.0, 400.0), size=size)
    labels = predictor.predict(ct.numpy(), output_shape_yx)
    return torch.from_numpy(labels), "thoracic_seg.inference.Predictor"


def check_agreement(model: torch.nn.Module, device: torch.device, *, size: int, threshold: float) -> dict[str, Any]:
    """Labels of the same weights and input on ``device`` and on the CPU (float32; a synthetic
    volume of :data:`AGREEMENT_SLICES` slices unseen in training, mapped to a non-square CT grid)."""
    ct = synthetic_batch(AGREEMENT_SLICES, size, torch.device("cpu"), learnable=True, seed=1).images[:, 0]
    shape = (size + size // 2, size + size // 4)
    on_device, path = predict_labels(model, device, ct, shape)
    on_cpu, _ = predict_labels(model, torch.device("cpu"), ct, shape)
    fraction = float((on_device == on_cpu).double().mean())
    present = int(torch.unique(on_cpu).numel())
    status, reason = judge_agreement(fraction, present, threshold, device.type == "cuda")
    return {"status": status, "path": path, "fraction_equal": round(fraction, 6), "threshold": threshold,
            "labels": on_cpu.numel(), "different": int((on_device != on_cpu).sum()), "labels_present": present,
            "summary": f"{device} vs cpu, {path.split(' (')[0]}, {on_cpu.numel():,} labels, "
                       f"{present} classes present: {reason}"}


def ddp_command(device: torch.device, output: Path) -> list[str]:
    """torchrun with one process on this machine, running this script's :func:`ddp_worker`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(Path(__file__).resolve()), "--ddp-worker", "--device", str(device), "--output", str(output)]


def check_ddp(device: torch.device) -> dict[str, Any]:
    """One DistributedDataParallel step under torchrun in a subprocess (:func:`ddp_worker`)."""
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "ddp.json"
        start = time.perf_counter()
        try:
            done = subprocess.run(ddp_command(device, output), check=False, capture_output=True, text=True,
                                  timeout=DDP_TIMEOUT_S, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            return {"status": "fail", "summary": f"torchrun did not finish in {DDP_TIMEOUT_S} s"}
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode != 0 or not output.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"status": "fail", "returncode": done.returncode, "seconds": seconds,
                    "summary": f"torchrun exited with {done.returncode}: {' | '.join(tail)}"[:500]}
        result = json.loads(output.read_text(encoding="utf-8"))
    ok = result["all_reduce"] == result["world_size"] and result["gradients_finite"] and math.isfinite(result["loss"])
    gradients = "finite" if result["gradients_finite"] else "NOT finite"
    return {"status": "pass" if ok else "fail", **result, "loss": jsonable(result["loss"]), "seconds": seconds,
            "summary": f"{result['backend']}, world size {result['world_size']}, one step, loss {result['loss']:.4f}, "
                       f"all-reduce {result['all_reduce']:g}, gradients {gradients}"}


def ddp_worker(device_name: str, output: Path) -> int:
    """Run by torchrun for :func:`check_ddp`: join the process group (nccl on CUDA, gloo on CPU),
    one DistributedDataParallel training step of a tiny U-Net, one all-reduce; rank 0 writes the result."""
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            UNetMultiOrgan(1, NUM_CLASSES, DDP_BASE_CHANNELS).to(device),
            device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        batch = synthetic_batch(2, DDP_SIZE, device, learnable=True)
        loss = train_step(model, optimizer, scaler, FLOAT32, device, batch)
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        result = {"backend": str(dist.get_backend()), "world_size": dist.get_world_size(), "loss": float(loss),
                  "all_reduce": float(total), "gradients_finite": all(
                      bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        output.write_text(json.dumps(result), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def guarded(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The check's record, or a failed one naming the exception (the other checks go on)."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001  (reported as this check's failure, never swallowed)
        return {"status": "fail", "summary": f"{type(exc).__name__}: {exc}"[:500]}


def run(*, device: str = "auto", checks: Sequence[str] = CHECKS, size: int = 256, base_channels: int = 64,
        batch_size: int = 8, steps: int = 10, warmup: int = 3, compile_on: bool = True, small_size: int = 64,
        small_base_channels: int = 16, train_steps: int = 40, min_agreement: float = MIN_AGREEMENT) -> dict[str, Any]:
    """Run ``checks`` (names from :data:`CHECKS`, in that order) on ``device``; the JSON-able report.
    ``fp16_training`` and ``agreement`` share the small network (``small_*``, trained once)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    trained: dict[str, Any] = {}

    def small_network() -> tuple[torch.nn.Module, dict[str, Any]]:
        if not trained:
            trained["model"], trained["record"] = train_small_network(
                dev, size=small_size, base_channels=small_base_channels, steps=train_steps)
        return trained["model"], trained["record"]

    actions = {
        "policy": lambda: check_policy(dev),
        "speed": lambda: check_speed(dev, size=size, base_channels=base_channels, batch_size=batch_size,
                                     steps=steps, warmup=warmup, compile_on=compile_on),
        "fp16_training": lambda: small_network()[1],
        "agreement": lambda: check_agreement(small_network()[0], dev, size=small_size, threshold=min_agreement),
        "ddp": lambda: check_ddp(dev),
    }
    for name in CHECKS:
        if name in checks:
            results[name] = guarded(actions[name])
            print(f"  {name:<14} {results[name]['status']}: {results[name]['summary']}", flush=True)
    return {
        "benchmark": "gpu_check",
        "machine": machine_description(dev),
        "config": {"size": size, "base_channels": base_channels, "batch_size": batch_size, "steps": steps,
                   "warmup": warmup, "compile": compile_on, "small_size": small_size,
                   "small_base_channels": small_base_channels, "train_steps": train_steps,
                   "min_agreement": min_agreement, "min_loss_drop": MIN_LOSS_DROP},
        "checks": results,
        "passed": all(r["status"] != "fail" for r in results.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_report(report: dict[str, Any]) -> str:
    """The checks table, then the speed rows (``bench_training.format_table``)."""
    machine = report["machine"]
    title = f"GPU check on {machine.get('gpu', machine['device'])} (torch {machine['torch']}, {report['seconds']} s)"
    lines = [title, "", "| check | status | numbers |", "|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['summary']} |" for name, r in report["checks"].items()]
    speed = report["checks"].get("speed", {}).get("rows")
    if speed:
        lines += ["", format_table(speed, [])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), help="default: all")
    parser.add_argument("--size", type=int, default=256, help="speed: slice size (default: %(default)s)")
    parser.add_argument("--base-channels", type=int, default=64, help="speed: U-Net width (64: the default network)")
    parser.add_argument("--batch-size", type=int, default=8, help="speed: batch (default: training's, %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="speed: timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="speed: untimed steps first (default: %(default)s)")
    parser.add_argument("--no-compile", dest="compile_on", action="store_false",
                        help="speed: no torch.compile row (compiling takes a minute or more)")
    parser.add_argument("--small-size", type=int, default=64, help="float16 training and agreement: slice size")
    parser.add_argument("--small-base-channels", type=int, default=16, help="float16 training and agreement: width")
    parser.add_argument("--train-steps", type=int, default=40, help="float16 training: steps (default: %(default)s)")
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                        help="agreement: fraction of equal labels to pass (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file (default: %(default)s)")
    parser.add_argument("--ddp-worker", action="store_true", help="internal: the process torchrun starts (ddp)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("size", "base_channels", "batch_size", "steps", "small_size", "small_base_channels", "train_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("size", "small_size"):
        if getattr(args, name) % 16:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of 16 (four 2x poolings), "
                         f"got {getattr(args, name)}")
    if args.warmup < 0 or not 0 < args.min_agreement <= 1:
        parser.error(f"--warmup must be >= 0 and --min-agreement in (0, 1], got {args.warmup} and {args.min_agreement}")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.ddp_worker:
        return ddp_worker(args.device, args.output)

    print(f"gpu_check on {device}: {', '.join(args.checks)}", flush=True)
    report = run(device=str(device), checks=args.checks, size=args.size, base_channels=args.base_channels,
                 batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, compile_on=args.compile_on,
                 small_size=args.small_size, small_base_channels=args.small_base_channels,
                 train_steps=args.train_steps, min_agreement=args.min_agreement)
    report["command"] = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print()
    print(format_report(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    failed = [name for name, r in report["checks"].items() if r["status"] == "fail"]
    print(f"\nwrote {args.output}; " + (f"FAILED: {', '.join(failed)}" if failed else "no check failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
