"""Phase 5's machinery (``train_multi_organ.py`` holds the loop): the training configuration, device
and torchrun ranks, seeded sampling, the lr schedule and limits, checkpoints and exact ``--resume``
(docs/reliability.md), class weights, the training patients' structure volumes."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from thoracic_seg import organs
from thoracic_seg.batch import atomic_output, write_text_atomic
from thoracic_seg.grid import cache_voxel_mm, check_context_slices
from thoracic_seg.layout import (
    BEST_CHECKPOINT, CACHE_MASK, CLASS_WEIGHTS_JSON, DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, HISTORY_CSV,
    HISTORY_JSON, LAST_CHECKPOINT, LOG_FILE, cache_dir, read_cache_meta,
)
from thoracic_seg.precision import Precision, resolve_device, training_precision, use_fast_cuda_kernels
from thoracic_seg.ptv import PTV_CONTOURED, PTV_DERIVED, PTV_NONE
from thoracic_seg.qa import patient_volumes_ml, training_volume_record
from unet_multi_organ import CHECKPOINT_FORMAT, build_checkpoint

log = logging.getLogger(__name__)

DEFAULT_BASE_CHANNELS = 64
LR_SCHEDULES = ("constant", "cosine")
#: The cosine schedule ends at this fraction of --lr.
COSINE_FINAL_FRACTION = 0.01

#: Class weight = sqrt(frequency of the most frequent class / frequency of the class), capped
#: at 10. A weight w moves the decision threshold of a class to p > 1 / (1 + w): on the synthetic
#: demo the uncapped square root (spinal cord x48) over-segmented the cord by ~35% in volume,
#: while a fourth root (heart x3.5) under-segmented the heart by ~40%.
CLASS_WEIGHT_POWER = 0.5
MAX_CLASS_WEIGHT = 10.0
CLASS_WEIGHTS_METHOD = "inverse-frequency-power-0.5-max-10-v1"
FOREGROUND_KEYS: tuple[str, ...] = tuple(organs.structure(l).key for l in organs.FOREGROUND_LABELS)

#: Settings a resumed run must share with the run it continues (``--epochs`` may be raised).
RESUME_MUST_MATCH = ("batch_size", "lr", "lr_schedule", "augment", "augment_scanner", "tumour_oversampling",
                     "context_slices")


#: The training clock (seconds) of the limits, the schedule and the epoch timings, here and in
#: ``train_multi_organ.py``. Tests replace it with a fake clock: they never depend on wall-clock time.
clock: Callable[[], float] = time.monotonic


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stopped, the last good checkpoint was kept."""

    @classmethod
    def at(cls, what: str, epoch: int, step: int, last_good: str) -> NonFiniteLossError:
        return cls(f"non-finite {what} loss at epoch {epoch}, step {step}: training stopped. {last_good} "
                   "Try a lower --lr, or --no-amp if mixed precision is on, and check the input data.")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (``run()``'s keyword arguments, the command line's defaults),
    validated on creation (``ValueError`` naming the value); the last checkpoint's ``train_config``.

    ``base_channels`` and ``output_dir`` None: the resumed run's, else 64 and ``runs/<timestamp>``
    (:meth:`resolved`). ``workers`` None: 0 on CPU (its cores compute), min(8, cores per process) on
    CUDA. ``time_limit`` (s) and ``max_steps`` count the whole run; the epoch they cut is validated
    and saved, and ``resume`` finishes it with the same lr, slices and augmentations."""

    data_root: Path | str = DEFAULT_DATA_ROOT
    splits_dir: Path | str = DEFAULT_SPLITS_DIR
    output_dir: Path | str | None = None
    epochs: int = 50
    batch_size: int = 8  # per process under torchrun
    lr: float = 1e-4
    lr_schedule: str = "constant"
    base_channels: int | None = None
    workers: int | None = None
    augment: bool = False
    augment_scanner: bool = False  # scanner.ScannerAugmentation of the training slices
    tumour_oversampling: float | None = None  # the fraction of GTV slices drawn
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    max_steps: int | None = None
    time_limit: float | None = None
    patience: int = 10
    resume: Path | str | None = None  # a last checkpoint or its run folder
    amp: bool | None = None
    log_every: int = 20
    context_slices: int = 0

    def __post_init__(self) -> None:
        def check(name: str, ok: Callable[[Any], bool], rule: str) -> None:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value}")

        for name in ("epochs", "batch_size", "patience", "log_every", "max_steps", "base_channels"):
            check(name, lambda v: int(v) >= 1, ">= 1")
        check("lr", lambda v: v > 0, "> 0")
        learning_rate(self.lr, 0.0, self.lr_schedule)  # rejects an unknown schedule
        check("tumour_oversampling", lambda v: 0 < v < 1, "a fraction in (0, 1)")
        check("time_limit", lambda v: v > 0, "> 0 seconds")
        check("workers", lambda v: v >= 0, ">= 0")
        check("device", lambda v: v in ("auto", "cuda", "cpu"), "auto, cuda or cpu")
        for name, kind in (("epochs", int), ("batch_size", int), ("patience", int), ("log_every", int),
                           ("seed", int), ("lr", float), ("context_slices", check_context_slices)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    def jsonable(self) -> dict[str, Any]:
        """The options by name, paths as strings (the checkpoint's ``train_config``)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def resolved(self, resumed: dict[str, Any] | None) -> TrainConfig:
        """With the U-Net width and run folder of the resumed run (``resumed``: its last checkpoint,
        refused when these options would not continue it exactly), else the defaults; refuses a run
        folder that already holds a run it does not resume."""
        base_channels, output_dir = self.base_channels, self.output_dir
        if resumed is not None:
            saved_channels = resumed["model_config"]["base_channels"]
            if base_channels not in (None, saved_channels):
                raise ValueError(f"--base-channels {base_channels} differs from the resumed checkpoint's "
                                 f"{saved_channels} ({resumed['_path']})")
            if int(resumed["seed"]) != self.seed:
                raise ValueError(f"--seed {self.seed} differs from the resumed run's {resumed['seed']} "
                                 f"({resumed['_path']}): the data order would not continue")
            saved, mine = resumed.get("train_config") or {}, self.jsonable()
            for name in RESUME_MUST_MATCH:  # what decides the data order and the optimisation
                if name in saved and saved[name] != mine[name]:
                    raise ValueError(f"--{name.replace('_', '-')} {mine[name]} differs from the resumed "
                                     f"run's {saved[name]} ({resumed['_path']}): it would not continue exactly")
            base_channels = saved_channels
            output_dir = output_dir or Path(resumed["_path"]).parent
        output_dir = Path(output_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        if resumed is None and (output_dir / LAST_CHECKPOINT).exists():
            raise ValueError(f"{output_dir} already holds a training run: continue it with --resume "
                             f"{output_dir / LAST_CHECKPOINT}, or choose another --output-dir")
        return replace(self, base_channels=base_channels or DEFAULT_BASE_CHANNELS, output_dir=output_dir)


# ---- Device, distribution, precision ---------------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: Precision = Precision()  # autocast dtype, gradient scaler, channels-last

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped in DistributedDataParallel under torchrun, else itself."""
        if not self.distributed:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics: what the checkpoint will hold)."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets (0, 1, 0 without)."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ValueError(f"invalid RANK/WORLD_SIZE/LOCAL_RANK environment variable: {exc}") from None


def setup_runtime(device: str, amp: bool | None) -> Runtime:
    """Pick the device (``auto``: CUDA when available; under torchrun ``cuda:<local rank>``) and the
    precision (``precision.training_precision``); join torchrun's process group (nccl on CUDA, gloo
    on CPU). CUDA: ``precision.use_fast_cuda_kernels``; CPU: the cores shared between local processes."""
    rank, world_size, local_rank = distributed_env()
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend)
    if torch_device.type == "cuda":
        use_fast_cuda_kernels()
    elif "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // max(1, local_world)))
    return Runtime(torch_device, rank, world_size, local_rank, training_precision(torch_device, amp))


def all_reduce(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum over ranks, in place (no-op in a single process)."""
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def agree(flag: bool | torch.Tensor, runtime: Runtime) -> bool:
    """True on every rank when ``flag`` is true on any rank (a host sync)."""
    if not runtime.distributed:
        return bool(flag)
    value = torch.as_tensor(flag, device=runtime.device).to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextlib.contextmanager
def run_log(output_dir: Path, runtime: Runtime) -> Iterator[None]:
    """Rank 0: make the run folder and copy the log (INFO and up) to its ``train.log`` while inside."""
    if not runtime.is_main:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)  # the log file records the run
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ---- Sampling, augmentation, RNG states (deterministic per seed and epoch, whatever the worker count) ----
class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` that can also draw weighted (tumour oversampling) and hand each item
    its own augmentation seed. The draw depends only on ``seed`` and ``set_epoch(epoch)``, so a resumed
    run sees exactly an uninterrupted one's slices and augmentations, and ranks get disjoint shares of
    one draw. ``set_epoch(epoch, skip=n)`` skips this rank's first ``n`` items (trained before
    ``--resume``). Yields ``index`` or, with ``with_seeds``, ``(index, seed)``.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 weights: torch.Tensor | None = None, with_seeds: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.with_seeds = with_seeds
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be 0-{self.num_samples} (items of this rank's share), got {skip}")
        super().set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def __iter__(self) -> Iterator[Any]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.weights is None:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]  # pad like DDP
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=generator)
        mine = slice(self.rank + self.skip * self.num_replicas, self.total_size, self.num_replicas)
        if not self.with_seeds:
            return iter(order[mine].tolist())
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and built-in types (``weights_only``)."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["algorithm"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- The lr schedule, the limits, where training stands; history, checkpoints and resume -----
def training_progress(epoch: int, epochs: int, elapsed: float = 0.0, time_limit: float | None = None,
                      steps_done: int = 0, max_steps: int | None = None) -> float:
    """Fraction of the run done at the start of ``epoch`` (1-based), 0 to 1: by epochs, or by
    time when ``--time-limit`` will run out first (``elapsed``: training seconds of the whole
    run, earlier invocations of a resumed run included), or by optimizer steps when
    ``--max-steps`` will (``steps_done``: steps of the whole run before this epoch)."""
    done = (epoch - 1) / (epochs - 1) if epochs > 1 else 0.0
    if time_limit:
        done = max(done, elapsed / time_limit)
    if max_steps:
        done = max(done, steps_done / max_steps)
    return min(max(done, 0.0), 1.0)


def learning_rate(base_lr: float, progress: float, schedule: str) -> float:
    """``constant``: ``base_lr``; ``cosine``: from ``base_lr`` at progress 0 down to
    ``COSINE_FINAL_FRACTION * base_lr`` at progress 1 (see :func:`training_progress`).

    A function of the epoch (and, with a time limit or a step budget, of the run's training time
    or optimizer steps, which the last checkpoint carries) only, so a resumed run follows the same
    schedule without any stored scheduler state."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return base_lr
    final = COSINE_FINAL_FRACTION * base_lr
    return final + 0.5 * (base_lr - final) * (1 + math.cos(math.pi * progress))


@dataclass
class StepLimits:
    """When to stop training early, and the training time of the whole run: ``--max-steps`` and
    ``--time-limit`` count the steps and seconds a resumed run's checkpoint carries plus this
    invocation's."""

    max_steps: int | None = None
    time_limit: float | None = None  # seconds
    steps_done: int = 0  # of the whole run
    seconds_before: float = 0.0  # training seconds of the earlier invocations
    started: float = 0.0  # clock() when this invocation started

    def elapsed(self) -> float:
        """Training seconds of the whole run."""
        return self.seconds_before + clock() - self.started

    def reached(self) -> bool:
        deadline = self.started - self.seconds_before + float(self.time_limit) if self.time_limit else None
        return ((self.max_steps is not None and self.steps_done >= self.max_steps)
                or (deadline is not None and clock() >= deadline))

    def reason(self) -> str:
        if self.max_steps is not None and self.steps_done >= self.max_steps:
            return f"--max-steps ({self.max_steps} steps)"
        return "--time-limit"


@dataclass
class EpochPart:
    """How far an epoch got (totals over all ranks). A limit that cuts an epoch stores this in
    the last checkpoint; ``--resume`` trains the rest of the epoch from here."""

    epoch: int
    lr: float  # set at the epoch's start, kept for its rest
    steps: int = 0  # optimizer steps (batches of each rank) done
    slices: int = 0
    loss_sum: float = 0.0  # sum over the slices done of the training loss
    seconds: float = 0.0  # training seconds spent in the epoch

    @property
    def train_loss(self) -> float:
        return self.loss_sum / max(self.slices, 1)


@dataclass
class Progress:
    """Where training stands; restored from the last checkpoint by ``--resume``."""

    next_epoch: int = 1
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    steps_done: int = 0  # optimizer steps of the whole run
    seconds: float = 0.0  # training seconds of the whole run when the checkpoint was written
    #: An epoch a limit cut, finished first: ``part`` (an :class:`EpochPart`), ``progress_before``
    #: (best score, best epoch, patience before its snapshot was validated) and, when the snapshot
    #: replaced an earlier best checkpoint, ``best_before``.
    cut: dict[str, Any] | None = None

    def start_epoch(self, epoch: int, config: TrainConfig, limits: StepLimits, best_path: Path,
                    runtime: Runtime) -> EpochPart:
        """Where ``epoch`` starts: at the schedule's lr or, for an epoch a limit cut, where it stopped
        at its lr, undoing what validating its snapshot decided (history row, best score, patience,
        best checkpoint), as a run never cut has none of it."""
        if self.cut is None:
            done = training_progress(epoch, config.epochs, limits.elapsed(), config.time_limit,
                                     limits.steps_done, config.max_steps)
            return EpochPart(epoch, learning_rate(config.lr, done, config.lr_schedule))
        cut, self.cut = self.cut, None
        before = cut["progress_before"]
        self.best_val_loss, self.best_epoch = float(before["best_val_loss"]), int(before["best_epoch"])
        self.epochs_without_improvement = int(before["epochs_without_improvement"])
        self.history.pop()
        if cut.get("best_before") is not None and runtime.is_main:
            save_checkpoint(cut["best_before"], best_path)
        return cut["part"]

    def score(self, epoch: int, monitored: float, part: EpochPart, partial: bool) -> tuple[bool, dict | None]:
        """Count ``epoch``'s monitored loss towards best score and patience: ``(improved, cut)``; ``cut``
        (a ``partial`` epoch) is what ``--resume`` needs to finish it as if it had never been cut."""
        cut = None
        if partial:
            cut = {"part": asdict(part), "progress_before": {
                "best_val_loss": self.best_val_loss, "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.epochs_without_improvement}}
        improved = monitored < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch = monitored, epoch
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        return improved, cut

    def last_good(self, last_path: Path) -> str:
        """What a non-finite loss error says about the checkpoint it leaves."""
        return (f"The last good checkpoint is {last_path} (epoch {self.history[-1]['epoch']})."
                if self.history else "No checkpoint was written yet.")


def epoch_row(epoch: int, train_loss: float, val_loss: float, dice: list[float], improved: bool, seen: int,
              lr: float, train_seconds: float, epoch_seconds: float, partial: bool) -> dict[str, Any]:
    """One line of the history: losses, validation Dice per organ (NaN: nothing to score)."""
    fg = [dice[label] for label in organs.FOREGROUND_LABELS]
    scored = [d for d in fg if not math.isnan(d)]
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            **{f"dice_{key}": d for key, d in zip(FOREGROUND_KEYS, fg)},
            "mean_dice": float(np.mean(scored)) if scored else math.nan,
            "lr": lr, "train_slices": seen, "train_seconds": round(train_seconds, 3),
            "slices_per_second": round(seen / max(train_seconds, 1e-9), 2),
            "epoch_seconds": round(epoch_seconds, 3), "partial_epoch": partial, "best": improved}


def write_history(history: list[dict[str, Any]], output_dir: Path) -> None:
    """``history.json`` and ``history.csv``: one row per epoch (losses, Dice per organ, timing)."""
    write_text_atomic(output_dir / HISTORY_JSON, json.dumps(history, indent=2) + "\n")
    if not history:
        return
    columns = list(history[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text_atomic(output_dir / HISTORY_CSV, buffer.getvalue())


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


def write_epoch_outputs(plain_model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        progress: Progress, config: TrainConfig, preprocessing: dict[str, Any],
                        ptv: dict[str, Any], training_seconds: float, cut: dict[str, Any] | None,
                        training_volumes: dict[str, Any] | None = None) -> None:
    """Rank 0, after each epoch: best checkpoint (when improved), last checkpoint, history. Both
    checkpoints carry ``training_volumes`` (:func:`training_volumes`) for prediction's quality check.

    ``cut`` (an epoch a limit cut: how far it got, the progress before its snapshot was validated)
    goes into the last checkpoint; when the snapshot replaces an earlier best checkpoint, that one
    goes with it, so ``--resume`` can put it back before finishing the epoch.
    """
    output_dir = Path(config.output_dir)
    best_path = output_dir / BEST_CHECKPOINT
    row = progress.history[-1]
    val_dice = {key: row[f"dice_{key}"] for key in FOREGROUND_KEYS}
    common = dict(preprocessing=preprocessing, ptv=ptv, context_slices=config.context_slices,
                  epoch=row["epoch"], val_loss=row["val_loss"], val_dice=val_dice, training_volumes=training_volumes)
    if row["best"]:
        if cut is not None and cut["progress_before"]["best_epoch"] > 0 and best_path.is_file():
            cut["best_before"] = torch.load(best_path, map_location="cpu", weights_only=True)
        save_checkpoint(build_checkpoint(plain_model, **common), best_path)
    save_checkpoint(build_checkpoint(plain_model, **common, extra={
        "optimizer_state": optimizer.state_dict(),
        "scaler_state": scaler.state_dict() if scaler.is_enabled() else {},
        "rng_state": get_rng_state(), "seed": config.seed,
        "best_val_loss": progress.best_val_loss, "best_epoch": progress.best_epoch,
        "epochs_without_improvement": progress.epochs_without_improvement,
        "history": progress.history, "train_config": config.jsonable(),
        "steps_done": progress.steps_done, "training_seconds": float(training_seconds),
        **({"cut_epoch": cut} if cut is not None else {})}), output_dir / LAST_CHECKPOINT)
    write_history(progress.history, output_dir)


def load_resume(path: Path | str) -> dict[str, Any]:
    """The last checkpoint ``path`` (or the one in the run folder ``path``) on CPU, with ``_path``."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found (give a run folder or its {LAST_CHECKPOINT})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "optimizer_state" not in state:
        raise ValueError(f"--resume: {path} is not a last checkpoint of train_multi_organ.py "
                         f"(best checkpoints hold no optimizer state; use {LAST_CHECKPOINT})")
    state["_path"] = str(path)
    return state


def restore(resumed: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> Progress:
    """Put the model, optimizer, scaler and RNG states of a last checkpoint back; where it stood."""
    model.load_state_dict(resumed["model_state"])
    optimizer.load_state_dict(resumed["optimizer_state"])  # the lr is set at each epoch start
    if resumed.get("scaler_state"):
        scaler.load_state_dict(resumed["scaler_state"])
    set_rng_state(resumed["rng_state"])
    spent = dict(steps_done=int(resumed.get("steps_done", 0)), seconds=float(resumed.get("training_seconds", 0.0)))
    progress = Progress(int(resumed["epoch"]) + 1, float(resumed["best_val_loss"]),
                        int(resumed["best_epoch"]), int(resumed["epochs_without_improvement"]),
                        list(resumed["history"]), **spent)
    cut = resumed.get("cut_epoch")
    if cut is not None:  # a limit cut the epoch: it is finished first
        progress.next_epoch = int(cut["part"]["epoch"])
        progress.cut = dict(cut, part=EpochPart(**cut["part"]))
    return progress


# ---- Class weights (computed once per training split, cached next to the split files); the PTV ----
def split_fingerprint(data_root: Path | str, patients: Sequence[str]) -> str:
    """sha256 of the training patients, their cached volume shapes and annotation flags.

    Changes when the split file lists other patients or the training cache of one of them was
    rebuilt with another size or other annotations; then the class weights are recomputed.
    """
    records = []
    for pid in sorted(patients):
        meta = read_cache_meta(data_root, pid)
        records.append([pid, list(meta["shape_zyx"]), [bool(a) for a in meta["annotated"]]])
    text = json.dumps({"method": CLASS_WEIGHTS_METHOD, "patients": records}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compute_class_weights(data_root: Path | str, patients: Sequence[str]) -> dict[str, Any]:
    """Pixel counts and loss weights per label over the training patients' cached masks.

    Frequency counts only patients annotating the class (an uncontoured heart is not "no heart"):
    ``frequency[c] = pixels labelled c / pixels of the patients annotating c``; ``weight[c] =
    sqrt(max(frequency) / frequency[c])`` capped at :data:`MAX_CLASS_WEIGHT`, 1 for a class never seen.
    Returns the record stored in ``class_weights.json``.
    """
    n = organs.NUM_CLASSES
    counts = np.zeros(n, dtype=np.int64)
    pixels = np.zeros(n, dtype=np.int64)
    for pid in patients:
        meta = read_cache_meta(data_root, pid)
        annotated = np.array([bool(a) for a in meta["annotated"]], dtype=bool)
        annotated[organs.BACKGROUND] = True
        mask = np.load(cache_dir(data_root, pid) / CACHE_MASK, mmap_mode="r")
        found = np.bincount(np.asarray(mask).reshape(-1), minlength=n)
        if found.size > n:
            raise ValueError(f"{pid}: cached mask holds label {found.size - 1}, labels are 0-{n - 1}")
        counts += np.where(annotated, found, 0)
        pixels += np.where(annotated, mask.size, 0)
    frequency = np.where(pixels > 0, counts / np.maximum(pixels, 1), 0.0)
    seen = frequency > 0
    weights = np.ones(n, dtype=np.float64)
    if seen.any():
        ratio = frequency[seen].max() / frequency[seen]
        weights[seen] = np.minimum(ratio ** CLASS_WEIGHT_POWER, MAX_CLASS_WEIGHT)
    return {"method": CLASS_WEIGHTS_METHOD, "labels": [s.key for s in organs.STRUCTURES],
            "weights": [round(float(w), 6) for w in weights], "pixel_counts": counts.tolist(),
            "annotated_pixels": pixels.tolist(), "n_patients": len(patients)}


def load_or_compute_class_weights(data_root: Path | str, splits_dir: Path | str, patients: Sequence[str], *,
                                  write: bool = True) -> tuple[list[float], bool]:
    """``(weights per label, reused)`` from ``<splits_dir>/class_weights.json`` when its
    fingerprint matches the training split, else computed (and written when ``write``)."""
    path = Path(splits_dir) / CLASS_WEIGHTS_JSON
    fingerprint = split_fingerprint(data_root, patients)
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("fingerprint") == fingerprint and len(cached["weights"]) == organs.NUM_CLASSES:
                return [float(w) for w in cached["weights"]], True
            log.info("%s belongs to another training split: recomputing the class weights", path)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s): recomputing the class weights", path, exc)
    record = compute_class_weights(data_root, patients)
    record["fingerprint"] = fingerprint
    if write:
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return record["weights"], False


def ptv_of_patients(data_root: Path | str, patients: Sequence[str]) -> dict[str, Any]:
    """How the model's PTV is made, from the training patients' phase 3 records (stored in the
    checkpoint as ``ptv``, so evaluation and prediction grow the GTV by the margin of the run).

    ``{"source": "derived", "margin_mm": m}`` when no training patient has a contoured PTV (label 2
    is then never taught: it is not annotated for them); ``{"source": "contoured"}`` (plus the
    margin of the derived ones, if any) when some have one, so the network learns label 2.
    Raises ``ValueError`` when derived PTVs use different margins (re-run phase 2.5 with one).
    """
    sources: dict[str, list[str]] = {}
    margins: dict[float, list[str]] = {}
    for pid in patients:
        record = read_cache_meta(data_root, pid).get("ptv") or {}
        sources.setdefault(str(record.get("source", PTV_NONE)), []).append(pid)
        if record.get("source") == PTV_DERIVED:
            margins.setdefault(float(record["margin_mm"]), []).append(pid)
    if len(margins) > 1:
        shown = "; ".join(f"{m:g} mm: {', '.join(sorted(p)[:3])}" for m, p in sorted(margins.items()))
        raise ValueError(f"the training patients' PTVs are derived with different margins ({shown}); "
                         "re-run extract_multi_organ_masks.py --overwrite with one --ptv-margin-mm")
    ptv: dict[str, Any] = {"source": PTV_CONTOURED if PTV_CONTOURED in sources
                           else PTV_DERIVED if margins else PTV_NONE}
    if margins:
        ptv["margin_mm"] = next(iter(margins))
    return ptv


#: How :func:`training_volumes` measures, recorded with the numbers.
TRAINING_VOLUMES_SOURCE = "phase 3 training cache: voxels x the cache's voxel size"


def training_volumes(data_root: Path | str, patients: Sequence[str]) -> dict[str, Any]:
    """The volume distribution (ml) of each structure over the training ``patients`` that annotate it
    (``qa.training_volume_record``; the checkpoint stores it as ``training_volumes`` and prediction's
    quality check flags a volume outside it). Measured on the phase 3 cache: labels counted in
    ``mask.npy`` x the cache's voxel size (``grid.cache_voxel_mm``: the CT's, resized in-plane), within
    a few percent of phase 2.5's full-resolution volumes (the nearest-neighbour resize). ``ValueError``
    naming the patient for a cache without its grid geometry (re-run phase 3)."""
    per_patient = {}
    for pid in patients:
        meta = read_cache_meta(data_root, pid)
        mask = np.load(cache_dir(data_root, pid) / CACHE_MASK, mmap_mode="r")
        voxel_mm = cache_voxel_mm(meta, f"{pid}: {cache_dir(data_root, pid) / 'meta.json'}")
        per_patient[pid] = patient_volumes_ml(mask, voxel_mm, [bool(a) for a in meta["annotated"]])
    return training_volume_record(per_patient, TRAINING_VOLUMES_SOURCE)
