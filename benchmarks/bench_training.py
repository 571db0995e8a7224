"""Benchmark: training and inference speed of UNetMultiOrgan on synthetic tensors.

For each batch size and setting (:func:`settings_for`: fp32, or amp as training runs it; torch.compile):
training slices/s (forward + the training loss + backward + Adam step), inference slices/s (forward +
argmax), peak GPU memory, and the time to predict a whole volume (:func:`measure_volume`). Warm-up
steps are excluded; CUDA is synchronised around every timed section, never inside it. Imports only
torch, the standard library, ``unet_multi_organ``, ``thoracic_seg.losses`` and ``thoracic_seg.precision``
(no DICOM/NIfTI stack), so it runs as-is on a bare GPU machine that has only PyTorch:

    python benchmarks/bench_training.py --device cuda                       # the GPU table
    python benchmarks/bench_training.py --device cpu --size 64 --batch-sizes 2 4 --base-channels 8 --steps 3

Prints a table and writes JSON (``--output``, default ``benchmarks/bench_training.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_training.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from thoracic_seg.losses import multi_organ_loss  # noqa: E402  (imports only torch)
from thoracic_seg.precision import (  # noqa: E402  (imports only torch)
    FLOAT32,
    Precision,
    resolve_device,
    training_precision,
)
from unet_multi_organ import UNetMultiOrgan

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "bench_training.json"
DEFAULT_BATCH_SIZES = (8, 16, 32, 64)
NUM_CLASSES = 8
PRECISIONS = ("fp32", "amp")
#: Names of the autocast dtypes in the table and the JSON (None = float32 throughout).
SHORT_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Setting:
    """One way of running the network: a :class:`precision.Precision` (autocast dtype, gradient
    scaler, channels-last) and whether the model is compiled."""

    precision: Precision
    compile: bool

    @property
    def name(self) -> str:
        parts = [SHORT_NAMES[self.precision.autocast_dtype]]
        parts += ["scaler"] if self.precision.grad_scaler else []
        parts += ["channels_last"] if self.precision.channels_last else []
        return "+".join(parts + (["compile"] if self.compile else []))

    def record(self) -> dict[str, Any]:
        """The JSON fields: ``precision`` (``fp32``, ``bf16`` or ``fp16``), ``grad_scaler``,
        ``channels_last``, ``compile``."""
        return {"precision": SHORT_NAMES[self.precision.autocast_dtype], "grad_scaler": self.precision.grad_scaler,
                "channels_last": self.precision.channels_last, "compile": self.compile}


@dataclass(frozen=True)
class Batch:
    """A synthetic training batch on a device, in the shapes ``thoracic_seg.losses`` takes."""

    images: torch.Tensor  # (N, 1, S, S) float32
    targets: torch.Tensor  # (N, S, S) int64 labels 0..NUM_CLASSES-2
    annotated: torch.Tensor  # (N, NUM_CLASSES) bool; the last class unannotated (marginal cross-entropy)
    class_weights: torch.Tensor  # (NUM_CLASSES,) float32, all 1


def synthetic_batch(batch_size: int, size: int, device: torch.device,
                    memory_format: torch.memory_format = torch.contiguous_format, *,
                    learnable: bool = False, seed: int = 0) -> Batch:
    """A fixed batch of ``seed``. ``learnable=False``: noise images, random labels (for timing);
    ``True``: smoothed noise of unit deviation whose labels are its intensity bands
    (< -1, -1..-0.3, -0.3..0.3, 0.3..1, > 1 -> 0..4), which a few dozen steps start to learn."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 1, size, size, generator=generator)
    if learnable:
        images = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
        images = images / images.std()
        targets = torch.bucketize(images[:, 0], torch.tensor([-1.0, -0.3, 0.3, 1.0]))
    else:
        targets = torch.randint(0, NUM_CLASSES - 1, (batch_size, size, size), generator=generator)
    annotated = torch.ones(batch_size, NUM_CLASSES, dtype=torch.bool)
    annotated[:, -1] = False
    return Batch(images.to(device).contiguous(memory_format=memory_format), targets.to(device),
                 annotated.to(device), torch.ones(NUM_CLASSES, device=device))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               precision: Precision, device: torch.device, batch: Batch) -> torch.Tensor:
    """One step as ``train_multi_organ.py`` takes it: forward under ``precision``'s autocast, the
    training loss (0.5 marginal cross-entropy + 0.5 soft Dice, in float32), the scaled backward,
    the scaler's step and update. Returns the loss (0-d, detached, on ``device``; not synchronised)."""
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast(device):
        logits = model(batch.images)
    loss = multi_organ_loss(logits, batch.targets, batch.annotated, batch.class_weights)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model, core count, torch version and (on CUDA) the GPU name."""
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, AttributeError):  # other users' load skews CPU figures
        info["load_average_1_5_15_min"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def build_model(base_channels: int, setting: Setting, device: torch.device) -> torch.nn.Module:
    model = UNetMultiOrgan(in_channels=1, out_channels=NUM_CLASSES, base_channels=base_channels)
    model = model.to(device)
    if setting.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if setting.compile:
        # dynamic=False: one specialised graph per batch size, as training with a fixed batch has.
        model = torch.compile(model, dynamic=False)
    return model


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(
    *, base_channels: int, size: int, batch_size: int, setting: Setting, device: torch.device,
    warmup: int, steps: int,
) -> dict[str, Any]:
    """Training and inference throughput of one (batch size, setting); one result row."""
    torch.manual_seed(0)
    batch = synthetic_batch(batch_size, size, device, setting.precision.memory_format)
    model = build_model(base_channels, setting, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=setting.precision.grad_scaler)

    def infer_step() -> None:
        with torch.inference_mode(), setting.precision.autocast(device):
            model(batch.images).argmax(dim=1)

    reset_peak_memory(device)
    model.train()
    train_s = time_steps(functools.partial(train_step, model, optimizer, scaler, setting.precision, device, batch),
                         device, warmup, steps)
    train_mem = peak_memory_mb(device)

    del optimizer, scaler
    reset_peak_memory(device)
    model.eval()
    infer_s = time_steps(infer_step, device, warmup, steps)
    infer_mem = peak_memory_mb(device)

    slices = batch_size * steps
    return {
        "batch_size": batch_size,
        "setting": setting.name,
        **setting.record(),
        "train_slices_per_s": round(slices / train_s, 2),
        "train_step_ms": round(1000 * train_s / steps, 2),
        "infer_slices_per_s": round(slices / infer_s, 2),
        "peak_train_memory_mb": train_mem,
        "peak_infer_memory_mb": infer_mem,
    }


def measure_volume(
    *, base_channels: int, size: int, slices: int, batch_size: int, setting: Setting,
    device: torch.device, repeats: int = 2,
) -> dict[str, Any]:
    """Seconds to predict a ``slices``-slice volume: host float32 (Z, S, S) in, host uint8 labels out.

    The first pass warms up (cuDNN autotuning, compilation) and is not counted; the best of
    ``repeats`` timed passes is reported.
    """
    torch.manual_seed(0)
    model = build_model(base_channels, setting, device).eval()
    volume = torch.randn(slices, 1, size, size)  # on the host, as a loaded CT would be
    memory_format = setting.precision.memory_format

    def predict() -> torch.Tensor:
        labels = torch.empty(slices, size, size, dtype=torch.uint8)
        with torch.inference_mode(), setting.precision.autocast(device):
            for start in range(0, slices, batch_size):
                batch = volume[start:start + batch_size].to(device, non_blocking=True)
                logits = model(batch.to(memory_format=memory_format))
                labels[start:start + batch_size] = logits.argmax(dim=1).to(torch.uint8).cpu()
        return labels

    predict()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        predict()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"setting": setting.name, **setting.record(), "slices": slices, "batch_size": batch_size,
            "seconds": round(min(times), 3), "slices_per_s": round(slices / min(times), 2)}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def settings_for(device: torch.device, precisions: Sequence[str], compile_modes: Sequence[bool]) -> list[Setting]:
    """``fp32`` runs in float32 in the default memory format; ``amp`` runs as training does with
    mixed precision on (``training_precision(device, amp=True)``: bfloat16, or float16 + gradient
    scaler on GPUs without bfloat16; channels-last)."""
    policies = {"fp32": FLOAT32, "amp": training_precision(device, amp=True)}
    return [Setting(policies[precision], compile=compiled) for compiled in compile_modes for precision in precisions]


def format_table(rows: Sequence[dict[str, Any]], volumes: Sequence[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return "-" if value is None else str(value)

    header = ("| setting | batch | train slices/s | train step ms | infer slices/s "
              "| peak train MiB | peak infer MiB |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['batch_size']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['batch_size']} | {r['train_slices_per_s']} | {r['train_step_ms']} "
            f"| {r['infer_slices_per_s']} | {fmt(r['peak_train_memory_mb'])} | {fmt(r['peak_infer_memory_mb'])} |"
        )
    if volumes:
        lines += ["", "| setting | volume slices | batch | seconds | slices/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {v['setting']} | {v['slices']} | {v['batch_size']} | {v['seconds']} | {v['slices_per_s']} |"
                  for v in volumes]
    return "\n".join(lines)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run(
    *, device: str = "auto", size: int = 256, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    base_channels: int = 64, steps: int = 20, warmup: int = 5, precisions: Sequence[str] = PRECISIONS,
    compile_modes: Sequence[bool] | None = None, volume_slices: int = 300, volume_batch_size: int | None = None,
) -> dict[str, Any]:
    """Run every (setting, batch size) and the volume timing; return the JSON-able report.

    ``compile_modes`` defaults to ``(False, True)`` on CUDA and ``(False,)`` on CPU (compiling
    for CPU needs a C++ tool chain and minutes per graph). A setting that runs out of GPU
    memory is recorded as an ``error`` row and the benchmark goes on.
    """
    dev = resolve_device(device)
    if compile_modes is None:
        compile_modes = (False, True) if dev.type == "cuda" else (False,)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = settings_for(dev, precisions, compile_modes)
    rows: list[dict[str, Any]] = []
    for setting in settings:
        for batch_size in batch_sizes:
            try:
                row = measure(base_channels=base_channels, size=size, batch_size=batch_size,
                              setting=setting, device=dev, warmup=warmup, steps=steps)
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                row = {"batch_size": batch_size, "setting": setting.name, **setting.record(),
                       "error": "out of memory"}
            rows.append(row)
            print(f"  {setting.name:<28} batch {batch_size:>3}: "
                  + ("out of memory" if "error" in row else
                     f"train {row['train_slices_per_s']} slices/s, infer {row['infer_slices_per_s']} slices/s"),
                  flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    volumes = []
    if volume_slices > 0:
        vol_batch = volume_batch_size or max(batch_sizes)
        for setting in settings:
            volumes.append(measure_volume(base_channels=base_channels, size=size, slices=volume_slices,
                                          batch_size=vol_batch, setting=setting, device=dev))
    parameters = sum(p.numel() for p in UNetMultiOrgan(1, NUM_CLASSES, base_channels).parameters())
    return {
        "benchmark": "bench_training",
        "machine": machine_description(dev),
        "config": {"size": size, "batch_sizes": list(batch_sizes), "base_channels": base_channels,
                   "parameters": parameters, "steps": steps, "warmup": warmup,
                   "settings": [s.name for s in settings], "volume_slices": volume_slices},
        "rows": rows,
        "volume": volumes,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="slice size in pixels (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--base-channels", type=int, default=64,
                        help="U-Net width; 64 is the default 31M-parameter network")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32 and/or amp (bf16 where supported, else fp16; with channels-last)")
    parser.add_argument("--compile", choices=("auto", "off", "on", "both"), default="auto",
                        help="torch.compile: auto = both on CUDA, off on CPU")
    parser.add_argument("--volume-slices", type=int, default=300,
                        help="slices of the whole-volume prediction timing (0 = skip)")
    parser.add_argument("--volume-batch-size", type=int, default=None,
                        help="batch size for the volume timing (default: the largest --batch-sizes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("size", "steps", "base_channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16 (four 2x poolings), got {args.size}")
    if min(args.batch_sizes) < 1 or args.warmup < 0 or args.volume_slices < 0:
        parser.error("batch sizes must be >= 1, --warmup and --volume-slices >= 0")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_modes = {"auto": None, "off": (False,), "on": (True,), "both": (False, True)}[args.compile]

    print(f"bench_training on {device}: size {args.size}, base channels {args.base_channels}, "
          f"{args.steps} timed steps after {args.warmup} warm-up", flush=True)
    report = run(device=str(device), size=args.size, batch_sizes=args.batch_sizes,
                 base_channels=args.base_channels, steps=args.steps, warmup=args.warmup,
                 precisions=args.precision, compile_modes=compile_modes,
                 volume_slices=args.volume_slices, volume_batch_size=args.volume_batch_size)
    report["command"] = "python benchmarks/bench_training.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print()
    print(format_table(report["rows"], report["volume"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
