"""Phase 5: train the multi-organ U-Net on the phase 3 training cache, respecting missing annotations.

<data-root>/processed/training_cache + <splits-dir>/{train,val}.txt
    -> <output-dir>/ best_unet_multi_organ.pth, last_checkpoint.pth, history.csv, history.json,
       training_curves.png, train.log        (and <splits-dir>/class_weights.json)

    python train_multi_organ.py --data-root DATA --splits-dir splits --output-dir runs/demo
    torchrun --nproc_per_node=4 train_multi_organ.py --data-root DATA ...   # several GPUs

Loss: 0.5 x class-weighted marginal cross-entropy + 0.5 x soft Dice over the foreground classes
(``losses_multi_organ.py``): structures a patient lacks are never taught as background. Adam,
early stopping on the validation loss, best and last checkpoints; ``--resume`` continues exactly
(model, optimizer, gradient scaler, RNG states, sampler epoch, best score, patience counter, the
training time and steps already spent, and where a cut epoch stopped: it finishes that epoch).

Speed: mixed precision chosen per device (bfloat16 where supported, float16 with a gradient
scaler on older GPUs such as the T4), channels-last, ``cudnn.benchmark``, pinned memory and
persistent workers, no host synchronisation inside a step except every ``--log-every`` steps,
optional ``--compile``. Under ``torchrun`` (``WORLD_SIZE`` > 1) the script trains data-parallel
(DistributedDataParallel, nccl on CUDA, gloo on CPU); ``--batch-size`` is per process; only rank 0
writes files; validation sums are reduced across ranks, so the results have the same format.
The precision policy (dtype per device, channels-last, autocast) lives in ``precision.py``.

The run folder's file names live here (``BEST_CHECKPOINT``, ``HISTORY_CSV``, ...; evaluation and the
figures import them); the curves are drawn by ``visualize_all_phases.training_curves_figure``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from dataset_multi_organ import (
    DEFAULT_TUMOUR_FRACTION, MultiOrganDataset, SliceAugmentation, batch_to_device,
    make_tumour_oversampling_sampler,
)
from thoracic_seg import organs
from thoracic_seg.batch import atomic_output, positive_int, progress_bar, setup_logging, write_text_atomic
from thoracic_seg.figures import FIGURES, save_figure, training_curves_figure
from thoracic_seg.grid import check_context_slices
from thoracic_seg.layout import (
    BEST_CHECKPOINT, CACHE_MASK, CLASS_WEIGHTS_JSON, DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, HISTORY_CSV,
    HISTORY_JSON, LAST_CHECKPOINT, LOG_FILE, DataLayout, cache_dir, read_cache_meta,
)
from thoracic_seg.losses import dice_counts, dice_from_counts, multi_organ_loss
from thoracic_seg.precision import Precision, training_precision
from thoracic_seg.precision import resolve_device as resolve_model_device
from thoracic_seg.ptv import PTV_CONTOURED, PTV_DERIVED, PTV_NONE
from thoracic_seg.splits import load_split
from unet_multi_organ import (
    CHECKPOINT_FORMAT, UNetMultiOrgan, build_checkpoint, count_parameters, preprocessing_from_cache,
)

log = logging.getLogger(__name__)

CURVES_PNG = FIGURES["curves"]

DEFAULT_EPOCHS = 50
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 1e-4
DEFAULT_PATIENCE = 10
DEFAULT_BASE_CHANNELS = 64
DEFAULT_LOG_EVERY = 20
DEFAULT_SEED = 0
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


#: The training clock (seconds): the time limit and the time-based cosine schedule read it. Tests
#: replace it with a fake clock, so they never depend on wall-clock time.
clock: Callable[[], float] = time.monotonic


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stopped, the last good checkpoint was kept."""


# --------------------------------------------------------------------------------------------
# Class weights (computed once per training split, cached next to the split files)
# --------------------------------------------------------------------------------------------
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

    A class's frequency is counted only over the patients where it is annotated (an
    uncontoured heart is not "no heart"): ``frequency[c] = pixels labelled c /
    pixels of the patients annotating c``. ``weight[c] = sqrt(max(frequency) / frequency[c])``,
    capped at :data:`MAX_CLASS_WEIGHT`; a class never seen gets 1 (it has no target pixel, so
    its weight does not matter). Returns the record stored in ``class_weights.json``.
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
    return {
        "method": CLASS_WEIGHTS_METHOD,
        "labels": [s.key for s in organs.STRUCTURES],
        "weights": [round(float(w), 6) for w in weights],
        "pixel_counts": counts.tolist(),
        "annotated_pixels": pixels.tolist(),
        "n_patients": len(patients),
    }


def load_or_compute_class_weights(
    data_root: Path | str, splits_dir: Path | str, patients: Sequence[str], *, write: bool = True
) -> tuple[list[float], bool]:
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


# --------------------------------------------------------------------------------------------
# Device, distribution, precision
# --------------------------------------------------------------------------------------------
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


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets (0, 1, 0 without)."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ValueError(f"invalid RANK/WORLD_SIZE/LOCAL_RANK environment variable: {exc}") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cuda`` or ``cpu``; under torchrun, ``cuda:<local rank>``."""
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {name!r}")
    device = resolve_model_device(name)
    if device.type == "cpu":
        return device
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_runtime(device: str, amp: bool | None) -> Runtime:
    """Pick the device and precision; join the process group when launched by torchrun."""
    rank, world_size, local_rank = distributed_env()
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend=backend)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // max(1, local_world)))
    return Runtime(torch_device, rank, world_size, local_rank, training_precision(torch_device, amp))


def _all_reduce(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum over ranks, in place (no-op in a single process)."""
    if runtime.distributed:
        dist.all_reduce(tensor)
    return tensor


def _agree(flag: bool | torch.Tensor, runtime: Runtime) -> bool:
    """True on every rank when ``flag`` is true on any rank (a host sync)."""
    if not runtime.distributed:
        return bool(flag)
    value = torch.as_tensor(flag, device=runtime.device).to(torch.int32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --------------------------------------------------------------------------------------------
# Sampling and augmentation (deterministic per seed and epoch, whatever the worker count)
# --------------------------------------------------------------------------------------------
class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` that can also draw weighted (tumour oversampling) and hand
    each item its own augmentation seed.

    The epoch's draw depends only on ``seed`` and ``set_epoch(epoch)``, so a resumed run sees
    exactly the slices and augmentations of an uninterrupted one, and every rank sees a
    disjoint share of the same draw. ``set_epoch(epoch, skip=n)`` leaves out the first ``n``
    items of this rank's share: the part of a cut epoch trained before ``--resume``. Yields
    ``index`` or, with ``with_seeds``, ``(index, seed)``.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 weights: torch.Tensor | None = None, with_seeds: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
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


class SeededAugmentation(Dataset):
    """Wraps a dataset of dict items; ``dataset[(index, seed)]`` is item ``index`` augmented with
    a generator seeded by ``seed`` (no dependence on worker processes or global RNG state)."""

    def __init__(self, dataset: Dataset, augmentation: SliceAugmentation) -> None:
        self.dataset = dataset
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        item = dict(self.dataset[index])
        generator = torch.Generator().manual_seed(int(seed))
        image, mask = self.augmentation(item["image"].to(torch.float32), item["mask"].to(torch.int64),
                                        generator=generator)
        item["image"], item["mask"] = image.to(item["image"].dtype), mask.to(item["mask"].dtype)
        return item


# --------------------------------------------------------------------------------------------
# RNG state (stored as tensors and built-in types so weights_only loading works)
# --------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
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


def training_progress(epoch: int, epochs: int, elapsed: float = 0.0,
                      time_limit: float | None = None, steps_done: int = 0,
                      max_steps: int | None = None) -> float:
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


# --------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------
@dataclass
class StepLimits:
    """When to stop training early: optimizer steps and/or time of the whole run (a resumed run
    starts with the steps and seconds its checkpoint carries)."""

    max_steps: int | None = None
    deadline: float | None = None  # a clock() value
    steps_done: int = 0  # of the whole run

    def reached(self) -> bool:
        return ((self.max_steps is not None and self.steps_done >= self.max_steps)
                or (self.deadline is not None and clock() >= self.deadline))

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


def _to_device(batch: dict[str, Any], runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image float32 (B,1,S,S), mask int64 (B,S,S), annotated bool (B,8) on the device. Batches
    travel from the loader workers in the cache's compact dtypes (float16 / uint8, 4x fewer
    bytes than float32 / int64) and are widened on the device."""
    batch = batch_to_device(batch, runtime.device)
    image = batch["image"]
    if runtime.precision.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, batch["mask"], batch["annotated"]


def _raise_non_finite(what: str, epoch: int, step: int, last_good: str) -> None:
    raise NonFiniteLossError(
        f"non-finite {what} loss at epoch {epoch}, step {step}: training stopped. {last_good} "
        "Try a lower --lr, or --no-amp if mixed precision is on, and check the input data."
    )


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    class_weights: torch.Tensor,
    runtime: Runtime,
    *,
    done: EpochPart,
    limits: StepLimits,
    log_every: int,
    last_good: str,
) -> tuple[EpochPart, bool]:
    """Train (the rest of) one epoch from ``done``: ``(how far the epoch got, stopped mid-epoch)``.

    The loader's sampler must already skip the ``done.steps`` batches trained before. The running
    loss and the NaN check stay on the device and are read only every ``log_every`` steps (and at
    the end), so steps are never serialised on the host. Raises :class:`NonFiniteLossError` when
    a loss was NaN or infinite.
    """
    model.train()
    epoch = done.epoch
    # The part done before a cut is added on rank 0, in the order the uncut epoch adds it.
    loss_sum = torch.tensor(done.loss_sum if runtime.is_main else 0.0, dtype=torch.float64,
                            device=runtime.device)
    bad = torch.zeros((), dtype=torch.bool, device=runtime.device)
    seen, partial, step = 0, False, done.steps
    last_step = done.steps + len(loader)
    bar = progress_bar(len(loader.sampler), f"epoch {epoch}", "slice", leave=False, disable=not runtime.is_main)
    for step, batch in enumerate(loader, start=done.steps + 1):
        image, mask, annotated = _to_device(batch, runtime)
        with runtime.precision.autocast(runtime.device):
            logits = model(image)
        loss = multi_organ_loss(logits, mask, annotated, class_weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        batch_size = image.shape[0]
        loss_sum += loss.detach().double() * batch_size
        bad |= ~torch.isfinite(loss.detach())
        seen += batch_size
        limits.steps_done += 1
        bar.update(batch_size)
        at_end = step == last_step
        if step % log_every == 0 or at_end:
            if _agree(bad, runtime):  # the only host syncs of the loop: every N steps
                _raise_non_finite("training", epoch, step, last_good)
            bar.set_postfix(loss=f"{loss_sum.item() / (seen + done.slices):.4f}")
            want_stop = _agree(limits.reached(), runtime)
        elif runtime.distributed:  # the clock may differ between ranks: only agreed on above
            want_stop = limits.max_steps is not None and limits.steps_done >= limits.max_steps
        else:
            want_stop = limits.reached()
        if want_stop and not at_end:
            partial = True
            break
    bar.close()
    totals = _all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64,
                                                             device=runtime.device)]), runtime)
    if _agree(bad, runtime):  # a bad step after the last check (all ranks stop together)
        _raise_non_finite("training", epoch, step, last_good)
    slices = int(totals[1]) + done.slices
    return EpochPart(epoch, done.lr, step, slices, float(totals[0]), done.seconds), partial


@torch.no_grad()
def validate(
    model: torch.nn.Module, loader: DataLoader, class_weights: torch.Tensor, runtime: Runtime
) -> tuple[float, list[float]]:
    """``(validation loss, Dice per label 0-7)`` over the whole validation split (all ranks).

    The Dice of a class is pooled over every validation slice whose patient annotates it
    (NaN when no such slice holds or predicts it). The loss is the slice-weighted mean of the
    batch losses.
    """
    model.eval()
    n_classes = organs.NUM_CLASSES
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss * slices, slices
    counts = torch.zeros((3, n_classes), dtype=torch.float64, device=runtime.device)
    for batch in loader:
        image, mask, annotated = _to_device(batch, runtime)
        with runtime.precision.autocast(runtime.device):
            logits = model(image)
        loss = multi_organ_loss(logits, mask, annotated, class_weights)
        sums[0] += loss.double() * image.shape[0]
        sums[1] += image.shape[0]
        counts += dice_counts(logits.argmax(dim=1), mask, annotated, n_classes)
    _all_reduce(sums, runtime)
    _all_reduce(counts, runtime)
    return float(sums[0] / sums[1].clamp(min=1)), dice_from_counts(counts)


# --------------------------------------------------------------------------------------------
# Outputs: history, curves, checkpoints
# --------------------------------------------------------------------------------------------
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


def _save(checkpoint: dict[str, Any], path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()}


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run produced (rank 0 paths; other ranks get the same values)."""

    output_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: list[dict[str, Any]]
    best_val_loss: float
    best_epoch: int
    stop_reason: str
    model: torch.nn.Module = field(repr=False)


def default_output_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _load_resume(path: Path) -> dict[str, Any]:
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


#: Settings a resumed run must share with the run it continues (``--epochs`` may be raised).
RESUME_MUST_MATCH = ("batch_size", "lr", "lr_schedule", "augment", "tumour_oversampling", "context_slices")


def run(
    *,
    data_root: Path | str = DEFAULT_DATA_ROOT,
    splits_dir: Path | str = DEFAULT_SPLITS_DIR,
    output_dir: Path | str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    lr_schedule: str = "constant",
    base_channels: int | None = None,
    workers: int | None = None,
    augment: bool = False,
    tumour_oversampling: float | None = None,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
    compile: bool = False,
    max_steps: int | None = None,
    time_limit: float | None = None,
    patience: int = DEFAULT_PATIENCE,
    resume: Path | str | None = None,
    amp: bool | None = None,
    log_every: int = DEFAULT_LOG_EVERY,
    context_slices: int = 0,
) -> TrainResult:
    """Train (or resume training) and write the run folder; see the module docstring.

    ``base_channels`` None means 64, or the resumed checkpoint's. ``workers`` None means 0 on
    CPU (the cores are busy computing) and min(8, cores per process) on CUDA. ``time_limit`` is
    in seconds of the whole run (a resumed run continues the clock its checkpoint carries);
    training stops at the first step past it (``max_steps``, steps of the whole run, likewise),
    validates and saves as after a full epoch, and records how far the epoch got so that
    ``resume`` finishes it with the same lr, slices and augmentations. Raises :class:`NonFiniteLossError`, ``FileNotFoundError``
    (missing split/cache) or ``ValueError`` (bad arguments, checkpoint mismatch).
    """
    config = {k: v for k, v in locals().items()}
    for name in ("epochs", "batch_size", "patience", "log_every"):
        if int(config[name]) < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    learning_rate(lr, 0.0, lr_schedule)  # rejects an unknown schedule before any work
    config["context_slices"] = check_context_slices(context_slices)
    if tumour_oversampling is not None and not 0 < tumour_oversampling < 1:
        raise ValueError(f"tumour_oversampling must be a fraction in (0, 1), got {tumour_oversampling}")
    started = clock()
    resumed = _load_resume(Path(resume)) if resume is not None else None
    if resumed is not None:
        saved_channels = resumed["model_config"]["base_channels"]
        if base_channels not in (None, saved_channels):
            raise ValueError(f"--base-channels {base_channels} differs from the resumed checkpoint's "
                             f"{saved_channels} ({resumed['_path']})")
        if int(resumed["seed"]) != seed:
            raise ValueError(f"--seed {seed} differs from the resumed run's {resumed['seed']} "
                             f"({resumed['_path']}): the data order would not continue")
        saved = resumed.get("train_config") or {}
        for name in RESUME_MUST_MATCH:  # what decides the data order and the optimisation
            if name in saved and saved[name] != _jsonable({name: config[name]})[name]:
                raise ValueError(f"--{name.replace('_', '-')} {config[name]} differs from the resumed "
                                 f"run's {saved[name]} ({resumed['_path']}): it would not continue exactly")
        base_channels = saved_channels
        output_dir = output_dir or Path(resumed["_path"]).parent
    base_channels = base_channels or DEFAULT_BASE_CHANNELS
    output_dir = Path(output_dir or default_output_dir())
    if resumed is None and (output_dir / LAST_CHECKPOINT).exists():
        raise ValueError(f"{output_dir} already holds a training run: continue it with --resume "
                         f"{output_dir / LAST_CHECKPOINT}, or choose another --output-dir")
    config.update(base_channels=base_channels, output_dir=output_dir)

    runtime = setup_runtime(device, amp)
    log_handler = None
    try:
        if runtime.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            log_handler = logging.FileHandler(output_dir / LOG_FILE, encoding="utf-8")
            log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(log_handler)
            if logging.getLogger().getEffectiveLevel() > logging.INFO:
                logging.getLogger().setLevel(logging.INFO)  # the log file records the run
        return _train(config, runtime, resumed, started)
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


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


def _make_loaders(config: dict[str, Any], runtime: Runtime, train_set: MultiOrganDataset,
                  val_set: MultiOrganDataset | None) -> tuple[DataLoader, DataLoader | None, EpochSampler, int]:
    """Training loader (seeded per epoch, shared between ranks) and validation loader (each rank
    a disjoint strided share, no padding, so no slice is counted twice)."""
    sample_weights = None
    if config["tumour_oversampling"] is not None:
        sample_weights = make_tumour_oversampling_sampler(
            train_set, tumour_fraction=float(config["tumour_oversampling"])).weights
    train_data: Dataset = train_set
    if config["augment"]:
        train_data = SeededAugmentation(train_set, SliceAugmentation())
    sampler = EpochSampler(train_data, num_replicas=runtime.world_size, rank=runtime.rank,
                           seed=int(config["seed"]), weights=sample_weights,
                           with_seeds=bool(config["augment"]))
    workers = config["workers"]
    if workers is None:  # on CPU the cores are busy computing; on CUDA they feed the GPU
        per_process = (os.cpu_count() or 1) // runtime.world_size
        workers = 0 if runtime.device.type == "cpu" else min(8, max(1, per_process))
    options = dict(num_workers=workers, pin_memory=runtime.device.type == "cuda",
                   persistent_workers=workers > 0)
    batch_size = int(config["batch_size"])
    train_loader = DataLoader(train_data, batch_size=batch_size, sampler=sampler,
                              drop_last=len(sampler) >= 2 * batch_size, **options)
    if val_set is None:
        return train_loader, None, sampler, workers
    val_share = Subset(val_set, range(runtime.rank, len(val_set), runtime.world_size))
    val_loader = DataLoader(val_share, batch_size=batch_size, shuffle=False, **options)
    return train_loader, val_loader, sampler, workers


def _restore(resumed: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> Progress:
    model.load_state_dict(resumed["model_state"])
    optimizer.load_state_dict(resumed["optimizer_state"])  # the lr is set at each epoch start
    if resumed.get("scaler_state"):
        scaler.load_state_dict(resumed["scaler_state"])
    set_rng_state(resumed["rng_state"])
    spent = dict(steps_done=int(resumed.get("steps_done", 0)),
                 seconds=float(resumed.get("training_seconds", 0.0)))
    progress = Progress(int(resumed["epoch"]) + 1, float(resumed["best_val_loss"]),
                        int(resumed["best_epoch"]), int(resumed["epochs_without_improvement"]),
                        list(resumed["history"]), **spent)
    cut = resumed.get("cut_epoch")
    if cut is not None:  # a limit cut the epoch: it is finished first
        progress.next_epoch = int(cut["part"]["epoch"])
        progress.cut = dict(cut, part=EpochPart(**cut["part"]))
    return progress


def _forget_cut_snapshot(progress: Progress, best_path: Path, runtime: Runtime) -> EpochPart:
    """Before finishing a cut epoch, undo what validating its snapshot decided (its history row,
    best score, patience, best checkpoint), as a run never cut has none of it; returns where the
    epoch stopped."""
    cut, progress.cut = progress.cut or {}, None
    before = cut["progress_before"]
    progress.best_val_loss, progress.best_epoch = float(before["best_val_loss"]), int(before["best_epoch"])
    progress.epochs_without_improvement = int(before["epochs_without_improvement"])
    progress.history.pop()
    if cut.get("best_before") is not None and runtime.is_main:
        _save(cut["best_before"], best_path)
    return cut["part"]


def _epoch_row(epoch: int, train_loss: float, val_loss: float, dice: list[float], improved: bool,
               seen: int, lr: float, train_seconds: float, epoch_seconds: float,
               partial: bool) -> dict[str, Any]:
    """One line of the history: losses, validation Dice per organ (NaN: nothing to score)."""
    fg = [dice[label] for label in organs.FOREGROUND_LABELS]
    scored = [d for d in fg if not math.isnan(d)]
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            **{f"dice_{key}": d for key, d in zip(FOREGROUND_KEYS, fg)},
            "mean_dice": float(np.mean(scored)) if scored else math.nan,
            "lr": lr, "train_slices": seen, "train_seconds": round(train_seconds, 3),
            "slices_per_second": round(seen / max(train_seconds, 1e-9), 2),
            "epoch_seconds": round(epoch_seconds, 3), "partial_epoch": partial, "best": improved}


def _write_epoch_outputs(plain_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         scaler: torch.amp.GradScaler, progress: Progress, config: dict[str, Any],
                         preprocessing: dict[str, Any], ptv: dict[str, Any], training_seconds: float,
                         cut: dict[str, Any] | None) -> None:
    """Rank 0, after each epoch: best checkpoint (when improved), last checkpoint, history, curves.

    ``cut`` (an epoch a limit cut: how far it got, the progress before its snapshot was validated)
    goes into the last checkpoint; when the snapshot replaces an earlier best checkpoint, that one
    goes with it, so ``--resume`` can put it back before finishing the epoch.
    """
    output_dir: Path = config["output_dir"]
    best_path = output_dir / BEST_CHECKPOINT
    row = progress.history[-1]
    val_dice = {key: row[f"dice_{key}"] for key in FOREGROUND_KEYS}
    common = dict(preprocessing=preprocessing, ptv=ptv, context_slices=int(config["context_slices"]),
                  epoch=row["epoch"], val_loss=row["val_loss"],
                  val_dice=val_dice)
    if row["best"]:
        if cut is not None and cut["progress_before"]["best_epoch"] > 0 and best_path.is_file():
            cut["best_before"] = torch.load(best_path, map_location="cpu", weights_only=True)
        _save(build_checkpoint(plain_model, **common), best_path)
    _save(build_checkpoint(plain_model, **common, extra={
        "optimizer_state": optimizer.state_dict(),
        "scaler_state": scaler.state_dict() if scaler.is_enabled() else {},
        "rng_state": get_rng_state(), "seed": int(config["seed"]),
        "best_val_loss": progress.best_val_loss, "best_epoch": progress.best_epoch,
        "epochs_without_improvement": progress.epochs_without_improvement,
        "history": progress.history, "train_config": _jsonable(config),
        "steps_done": progress.steps_done, "training_seconds": float(training_seconds),
        **({"cut_epoch": cut} if cut is not None else {})}), output_dir / LAST_CHECKPOINT)
    write_history(progress.history, output_dir)
    save_figure(training_curves_figure(progress.history, f"Training curves, run {output_dir.name}"),
                output_dir / CURVES_PNG)


def _train(config: dict[str, Any], runtime: Runtime, resumed: dict[str, Any] | None,
           started: float) -> TrainResult:
    data_root, splits_dir = Path(config["data_root"]), Path(config["splits_dir"])
    output_dir: Path = config["output_dir"]
    seed_everything(int(config["seed"]))

    k = int(config["context_slices"])
    train_set = MultiOrganDataset("train", data_root=data_root, splits_dir=splits_dir, compact=True,
                                  context_slices=k)
    val_set = None
    if load_split(splits_dir, "val"):
        val_set = MultiOrganDataset("val", data_root=data_root, splits_dir=splits_dir, compact=True,
                                    context_slices=k)
    elif runtime.is_main:  # e.g. two sample patients: one train, one test
        log.warning("%s lists no patient: the best checkpoint and early stopping use the training "
                    "loss, validation columns are NaN", Path(splits_dir) / "val.txt")
    preprocessing = preprocessing_from_cache(DataLayout(data_root).training_cache)
    ptv = ptv_of_patients(data_root, train_set.patients)
    weights, reused = load_or_compute_class_weights(data_root, splits_dir, train_set.patients,
                                                    write=runtime.is_main)
    class_weights = torch.tensor(weights, dtype=torch.float32, device=runtime.device)
    train_loader, val_loader, sampler, workers = _make_loaders(config, runtime, train_set, val_set)

    model = UNetMultiOrgan(2 * k + 1, organs.NUM_CLASSES, config["base_channels"]).to(runtime.device)
    if runtime.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.grad_scaler)
    progress = Progress()
    if resumed is not None:
        progress = _restore(resumed, model, optimizer, scaler)
    plain_model = model
    if runtime.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    train_model = torch.compile(model) if config["compile"] else model

    if runtime.is_main:
        shown = _jsonable(config) | {
            "device": str(runtime.device), "world_size": runtime.world_size,
            "global_batch_size": int(config["batch_size"]) * runtime.world_size, "workers": workers,
            "amp": runtime.precision.name if runtime.precision.autocast_dtype else "off",
            "grad_scaler": runtime.precision.grad_scaler, "channels_last": runtime.precision.channels_last,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "parameters": count_parameters(plain_model), "train_patients": len(train_set.patients),
            "train_slices": len(train_set), "val_patients": len(val_set.patients) if val_set else 0,
            "val_slices": len(val_set) if val_set else 0, "class_weights": weights, "class_weights_reused": reused,
            "preprocessing": preprocessing, "ptv": ptv, "start_epoch": progress.next_epoch,
            "start_step_of_epoch": progress.cut["part"].steps if progress.cut else 0,
            "steps_before": progress.steps_done, "training_seconds_before": round(progress.seconds, 3),
        }
        log.info("training configuration:\n%s", json.dumps(shown, indent=2))

    # --time-limit and the time-based schedule count the training time of the whole run: the
    # earlier invocations of a resumed run (progress.seconds) and this one.
    spent_before, time_limit = progress.seconds, config["time_limit"]

    def elapsed() -> float:
        return spent_before + clock() - started

    deadline = started - spent_before + float(time_limit) if time_limit else None
    limits = StepLimits(config["max_steps"], deadline, progress.steps_done)
    last_path, best_path = output_dir / LAST_CHECKPOINT, output_dir / BEST_CHECKPOINT
    stop_reason = "epochs"
    for epoch in range(progress.next_epoch, int(config["epochs"]) + 1):
        if _agree(limits.reached(), runtime):
            stop_reason = limits.reason()
            break
        epoch_start = clock()
        if progress.cut is not None:  # finish the epoch a limit cut, at its lr, from where it stopped
            part = _forget_cut_snapshot(progress, best_path, runtime)
        else:
            done = training_progress(epoch, int(config["epochs"]), elapsed(), time_limit,
                                     limits.steps_done, config["max_steps"])
            part = EpochPart(epoch, learning_rate(float(config["lr"]), done, config["lr_schedule"]))
        sampler.set_epoch(epoch, skip=part.steps * int(config["batch_size"]))
        for group in optimizer.param_groups:
            group["lr"] = part.lr
        last_good = (f"The last good checkpoint is {last_path} (epoch {progress.history[-1]['epoch']})."
                     if progress.history else "No checkpoint was written yet.")
        part, partial = train_one_epoch(
            train_model, train_loader, optimizer, scaler, class_weights, runtime, done=part,
            limits=limits, log_every=int(config["log_every"]), last_good=last_good)
        part.seconds += clock() - epoch_start
        progress.steps_done = limits.steps_done
        train_loss, validation_start = part.train_loss, clock()
        if runtime.distributed:  # BatchNorm statistics of rank 0: what the checkpoint will hold
            for buffer in plain_model.buffers():
                dist.broadcast(buffer, src=0)
        if val_loader is not None:
            val_loss, dice = validate(plain_model, val_loader, class_weights, runtime)
            if not math.isfinite(val_loss):
                _raise_non_finite("validation", epoch, limits.steps_done, last_good)
            monitored = val_loss
        else:
            val_loss, dice, monitored = math.nan, [math.nan] * organs.NUM_CLASSES, train_loss
        cut = None
        if partial:  # what --resume needs to finish the epoch as if it had never been cut
            cut = {"part": asdict(part), "progress_before": {
                "best_val_loss": progress.best_val_loss, "best_epoch": progress.best_epoch,
                "epochs_without_improvement": progress.epochs_without_improvement}}
        improved = monitored < progress.best_val_loss
        if improved:
            progress.best_val_loss, progress.best_epoch = monitored, epoch
            progress.epochs_without_improvement = 0
        else:
            progress.epochs_without_improvement += 1
        row = _epoch_row(epoch, train_loss, val_loss, dice, improved, part.slices, part.lr, part.seconds,
                         part.seconds + clock() - validation_start, partial)
        progress.history.append(row)
        if runtime.is_main:
            _write_epoch_outputs(plain_model, optimizer, scaler, progress, config, preprocessing, ptv,
                                 elapsed(), cut)
            log.info("epoch %d: train loss %.4f, val loss %.4f%s, Dice %s, %.1f slices/s, %.0f s",
                     epoch, train_loss, val_loss, " (best)" if improved else "",
                     ", ".join(f"{k} {row[f'dice_{k}']:.3f}" for k in FOREGROUND_KEYS),
                     row["slices_per_second"], row["epoch_seconds"])
        if progress.epochs_without_improvement >= int(config["patience"]):
            stop_reason = f"early stopping (no improvement for {progress.epochs_without_improvement} epochs)"
            break
        if partial:
            stop_reason = limits.reason()
            break
    if runtime.is_main:
        log.info("Phase 5: %d epochs done, stopped by %s; best val loss %.4f at epoch %d -> %s "
                 "(%.0f s)", len(progress.history), stop_reason, progress.best_val_loss,
                 progress.best_epoch, best_path, clock() - started)
    return TrainResult(output_dir, best_path, last_path, progress.history, progress.best_val_loss,
                       progress.best_epoch, stop_reason, plain_model)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _seconds(text: str) -> float:
    """``90``, ``90s``, ``5m`` or ``1.5h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or a duration like 5m or 1.5h, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 5: train the multi-organ U-Net (runs under torchrun for several GPUs).")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding processed/training_cache (default: %(default)s)")
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR,
                        help="folder of train.txt/val.txt; class_weights.json is cached there (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="run folder (default: runs/<timestamp>, or the resumed run's folder)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help="slices per step and per process (default: %(default)s)")
    parser.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help=f"constant, or cosine decay to {COSINE_FINAL_FRACTION:g} x --lr by the last "
                             "epoch, the --time-limit or --max-steps, whichever comes first (default: %(default)s)")
    parser.add_argument("--base-channels", type=positive_int, default=None,
                        help=f"U-Net width (default: {DEFAULT_BASE_CHANNELS}; 16 for CPU demos)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader worker processes (default: 0 on CPU, min(8, cores) on CUDA)")
    parser.add_argument("--augment", action="store_true", help="random rotation/zoom/intensity of training slices")
    parser.add_argument("--context-slices", type=int, default=0, metavar="K",
                        help="slice context (2.5D): each slice with K neighbours per side as 2K + 1 input "
                             "channels, clamped at the volume's ends; 0 = one slice: slice context was not a "
                             "consistent win on real patients (README) (default: %(default)s)")
    parser.add_argument("--tumour-oversampling", type=_fraction, nargs="?", const=DEFAULT_TUMOUR_FRACTION,
                        default=None, metavar="FRACTION",
                        help=f"draw GTV slices this fraction of the time (flag alone: {DEFAULT_TUMOUR_FRACTION})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="(default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first epoch)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps of the whole run (resumed runs included)")
    parser.add_argument("--time-limit", type=_seconds, default=None, metavar="DURATION",
                        help="stop training after this long (seconds, or 5m, 1.5h), counting the time of the "
                             "whole run (resumed runs included); the cut epoch is validated and saved, and "
                             "--resume finishes it")
    parser.add_argument("--patience", type=positive_int, default=DEFAULT_PATIENCE,
                        help="early stopping: epochs without a better validation loss (default: %(default)s)")
    parser.add_argument("--resume", type=Path, default=None, metavar="CHECKPOINT",
                        help=f"continue a run from its {LAST_CHECKPOINT} (or its folder)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on - bfloat16 on recent GPUs, float16 + gradient "
                             "scaler on older ones such as the T4, bfloat16 on CPUs with native bfloat16, "
                             "else off)")
    parser.add_argument("--log-every", type=positive_int, default=DEFAULT_LOG_EVERY,
                        help="steps between loss read-outs / NaN checks (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    setup_logging(args.verbose)
    if distributed_env()[0] != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank talks
    options = {k: v for k, v in vars(args).items() if k != "verbose"}
    try:
        result = run(**options)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0 if result.history else 1


if __name__ == "__main__":
    raise SystemExit(main())
