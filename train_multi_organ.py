"""Phase 5: train the multi-organ U-Net on the phase 3 training cache, respecting missing annotations.

<data-root>/processed/training_cache + <splits-dir>/{train,val}.txt
    -> <output-dir>/ best_unet_multi_organ.pth, last_checkpoint.pth, history.csv, history.json,
       training_curves.png, train.log        (and <splits-dir>/class_weights.json)

    python train_multi_organ.py --data-root DATA --splits-dir splits --output-dir runs/demo

Loss: 0.5 x class-weighted marginal cross-entropy + 0.5 x soft Dice over the foreground classes
(``thoracic_seg/losses.py``): a structure a patient lacks is never taught as background. Adam, early
stopping on the validation loss, best and last checkpoints; ``--resume`` continues exactly. Runs
data-parallel under ``torchrun`` (only rank 0 writes). The configuration and the resume, distributed
and step-limit machinery are in ``thoracic_seg/training.py``; docs/training.md and docs/reliability.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from dataset_multi_organ import (
    DEFAULT_TUMOUR_FRACTION, MultiOrganDataset, SliceAugmentation, batch_to_device, make_tumour_oversampling_sampler,
)
from thoracic_seg import organs, training
from thoracic_seg.batch import positive_int, progress_bar, setup_logging
from thoracic_seg.figures import FIGURES, save_figure, training_curves_figure
from thoracic_seg.layout import BEST_CHECKPOINT, DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, LAST_CHECKPOINT, DataLayout
from thoracic_seg.losses import dice_counts, dice_from_counts, multi_organ_loss
from thoracic_seg.scanner import ScannerAugmentation
from thoracic_seg.splits import load_split
from thoracic_seg.training import (
    COSINE_FINAL_FRACTION, DEFAULT_BASE_CHANNELS, FOREGROUND_KEYS, LR_SCHEDULES, EpochPart, EpochSampler,
    NonFiniteLossError, Progress, Runtime, StepLimits, TrainConfig, agree, all_reduce,
    distributed_env, epoch_row, load_or_compute_class_weights, load_resume, ptv_of_patients, restore, run_log,
    seed_everything, setup_runtime, training_volumes, write_epoch_outputs,
)
from unet_multi_organ import UNetMultiOrgan, count_parameters, preprocessing_from_cache

log = logging.getLogger(__name__)


# ---- One epoch -------------------------------------------------------------------------------
def _to_device(batch: dict[str, Any], runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image float32 (B,1,S,S), mask int64 (B,S,S), annotated bool (B,8) on the device. Batches
    travel from the loader workers in the cache's compact dtypes (float16 / uint8, 4x fewer
    bytes than float32 / int64) and are widened on the device."""
    batch = batch_to_device(batch, runtime.device)
    image = batch["image"]
    if runtime.precision.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, batch["mask"], batch["annotated"]


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, class_weights: torch.Tensor, runtime: Runtime, *,
                    done: EpochPart, limits: StepLimits, log_every: int, last_good: str) -> tuple[EpochPart, bool]:
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
            if agree(bad, runtime):  # the only host syncs of the loop: every N steps
                raise NonFiniteLossError.at("training", epoch, step, last_good)
            bar.set_postfix(loss=f"{loss_sum.item() / (seen + done.slices):.4f}")
            want_stop = agree(limits.reached(), runtime)
        elif runtime.distributed:  # the clock may differ between ranks: only agreed on above
            want_stop = limits.max_steps is not None and limits.steps_done >= limits.max_steps
        else:
            want_stop = limits.reached()
        if want_stop and not at_end:
            partial = True
            break
    bar.close()
    totals = all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64,
                                                            device=runtime.device)]), runtime)
    if agree(bad, runtime):  # a bad step after the last check (all ranks stop together)
        raise NonFiniteLossError.at("training", epoch, step, last_good)
    slices = int(totals[1]) + done.slices
    return EpochPart(epoch, done.lr, step, slices, float(totals[0]), done.seconds), partial


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, class_weights: torch.Tensor,
             runtime: Runtime) -> tuple[float, list[float]]:
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
    all_reduce(sums, runtime)
    all_reduce(counts, runtime)
    return float(sums[0] / sums[1].clamp(min=1)), dice_from_counts(counts)


# ---- Data, model, optimiser and the epoch loop -----------------------------------------------
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


def _make_loaders(config: TrainConfig, runtime: Runtime, train_set: MultiOrganDataset,
                  val_set: MultiOrganDataset | None) -> tuple[DataLoader, DataLoader | None, EpochSampler, int]:
    """Training loader (seeded per epoch, shared between ranks) and validation loader (each rank
    a disjoint strided share, no padding, so no slice is counted twice)."""
    sample_weights = None if config.tumour_oversampling is None else make_tumour_oversampling_sampler(
        train_set, tumour_fraction=float(config.tumour_oversampling)).weights
    seeded = train_set.augment is not None or train_set.scanner is not None  # items augmented by their seed
    sampler = EpochSampler(train_set, num_replicas=runtime.world_size, rank=runtime.rank, seed=config.seed,
                           weights=sample_weights, with_seeds=seeded)
    workers = config.workers
    if workers is None:  # on CPU the cores are busy computing; on CUDA they feed the GPU
        per_process = (os.cpu_count() or 1) // runtime.world_size
        workers = 0 if runtime.device.type == "cpu" else min(8, max(1, per_process))
    options = dict(num_workers=workers, pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                              drop_last=len(sampler) >= 2 * config.batch_size, **options)
    if val_set is None:
        return train_loader, None, sampler, workers
    val_share = Subset(val_set, range(runtime.rank, len(val_set), runtime.world_size))
    val_loader = DataLoader(val_share, batch_size=config.batch_size, shuffle=False, **options)
    return train_loader, val_loader, sampler, workers


def _train(config: TrainConfig, runtime: Runtime, resumed: dict[str, Any] | None, started: float) -> TrainResult:
    """Data, class-weighted loss, model and optimiser, then the epoch loop (rank 0 writes); ``resumed``:
    the last checkpoint to continue from; ``started``: ``training.clock()`` at the run's start."""
    data_root, splits_dir, output_dir = Path(config.data_root), Path(config.splits_dir), Path(config.output_dir)
    seed_everything(config.seed)

    k = config.context_slices
    where = dict(data_root=data_root, splits_dir=splits_dir, compact=True, context_slices=k)
    train_set = MultiOrganDataset("train", augment=SliceAugmentation() if config.augment else False,
                                  scanner=ScannerAugmentation() if config.augment_scanner else None, **where)
    val_set = MultiOrganDataset("val", **where) if load_split(splits_dir, "val") else None
    if val_set is None and runtime.is_main:  # e.g. two sample patients: one train, one test
        log.warning("%s lists no patient: the best checkpoint and early stopping use the training "
                    "loss, validation columns are NaN", splits_dir / "val.txt")
    preprocessing = preprocessing_from_cache(DataLayout(data_root).training_cache)
    ptv = ptv_of_patients(data_root, train_set.patients)
    volumes = training_volumes(data_root, train_set.patients)  # for prediction's quality check
    weights, reused = load_or_compute_class_weights(data_root, splits_dir, train_set.patients, write=runtime.is_main)
    class_weights = torch.tensor(weights, dtype=torch.float32, device=runtime.device)
    train_loader, val_loader, sampler, workers = _make_loaders(config, runtime, train_set, val_set)

    model = UNetMultiOrgan(2 * k + 1, organs.NUM_CLASSES, config.base_channels).to(runtime.device)
    if runtime.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.grad_scaler)
    progress = restore(resumed, model, optimizer, scaler) if resumed is not None else Progress()
    train_model = runtime.parallel(model)  # `model` stays the plain module: validated and saved
    if config.compile:
        train_model = torch.compile(train_model)

    if runtime.is_main:  # the whole configuration, before the first step
        shown = config.jsonable() | {
            "device": str(runtime.device), "world_size": runtime.world_size,
            "global_batch_size": config.batch_size * runtime.world_size, "workers": workers,
            "amp": runtime.precision.name if runtime.precision.autocast_dtype else "off",
            "grad_scaler": runtime.precision.grad_scaler, "channels_last": runtime.precision.channels_last,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "augmentations": [repr(a) for a in (train_set.scanner, train_set.augment) if a is not None],
            "parameters": count_parameters(model), "train_patients": len(train_set.patients),
            "train_slices": len(train_set), "val_patients": len(val_set.patients) if val_set else 0,
            "val_slices": len(val_set) if val_set else 0, "class_weights": weights, "class_weights_reused": reused,
            "preprocessing": preprocessing, "ptv": ptv, "start_epoch": progress.next_epoch,
            "start_step_of_epoch": progress.cut["part"].steps if progress.cut else 0,
            "steps_before": progress.steps_done, "training_seconds_before": round(progress.seconds, 3),
        }
        log.info("training configuration:\n%s", json.dumps(shown, indent=2))

    # --max-steps, --time-limit and the schedule count the whole run: a resumed run's earlier
    # invocations (the steps and seconds its checkpoint carries) and this one.
    limits = StepLimits(config.max_steps, config.time_limit, progress.steps_done, progress.seconds, started)
    last_path, best_path = output_dir / LAST_CHECKPOINT, output_dir / BEST_CHECKPOINT
    stop_reason = "epochs"
    for epoch in range(progress.next_epoch, config.epochs + 1):
        if agree(limits.reached(), runtime):
            stop_reason = limits.reason()
            break
        epoch_start = training.clock()
        part = progress.start_epoch(epoch, config, limits, best_path, runtime)  # its lr; a cut one's rest
        sampler.set_epoch(epoch, skip=part.steps * config.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = part.lr
        last_good = progress.last_good(last_path)
        part, partial = train_one_epoch(
            train_model, train_loader, optimizer, scaler, class_weights, runtime, done=part,
            limits=limits, log_every=config.log_every, last_good=last_good)
        part.seconds += training.clock() - epoch_start
        progress.steps_done = limits.steps_done
        train_loss, validation_start = part.train_loss, training.clock()
        runtime.share_buffers(model)
        if val_loader is not None:
            val_loss, dice = validate(model, val_loader, class_weights, runtime)
            if not math.isfinite(val_loss):
                raise NonFiniteLossError.at("validation", epoch, limits.steps_done, last_good)
            monitored = val_loss
        else:
            val_loss, dice, monitored = math.nan, [math.nan] * organs.NUM_CLASSES, train_loss
        improved, cut = progress.score(epoch, monitored, part, partial)
        row = epoch_row(epoch, train_loss, val_loss, dice, improved, part.slices, part.lr, part.seconds,
                        part.seconds + training.clock() - validation_start, partial)
        progress.history.append(row)
        if runtime.is_main:
            write_epoch_outputs(model, optimizer, scaler, progress, config, preprocessing, ptv, limits.elapsed(), cut,
                                volumes)
            save_figure(training_curves_figure(progress.history, f"Training curves, run {output_dir.name}"),
                        output_dir / FIGURES["curves"])
            log.info("epoch %d: train loss %.4f, val loss %.4f%s, Dice %s, %.1f slices/s, %.0f s",
                     epoch, train_loss, val_loss, " (best)" if improved else "",
                     ", ".join(f"{k} {row[f'dice_{k}']:.3f}" for k in FOREGROUND_KEYS),
                     row["slices_per_second"], row["epoch_seconds"])
        if progress.epochs_without_improvement >= config.patience:
            stop_reason = f"early stopping (no improvement for {progress.epochs_without_improvement} epochs)"
            break
        if partial:
            stop_reason = limits.reason()
            break
    if runtime.is_main:
        log.info("Phase 5: %d epochs done, stopped by %s; best val loss %.4f at epoch %d -> %s "
                 "(%.0f s)", len(progress.history), stop_reason, progress.best_val_loss,
                 progress.best_epoch, best_path, training.clock() - started)
    return TrainResult(output_dir, best_path, last_path, progress.history, progress.best_val_loss,
                       progress.best_epoch, stop_reason, model)


def run(**options: Any) -> TrainResult:
    """Train (or resume training) and write the run folder; ``options``: the fields of :class:`TrainConfig`.
    Raises :class:`NonFiniteLossError`, ``FileNotFoundError`` (missing split, cache or checkpoint) or
    ``ValueError`` (a bad option, a checkpoint the options would not continue exactly)."""
    config = TrainConfig(**options)
    started = training.clock()
    resumed = load_resume(config.resume) if config.resume is not None else None
    config = config.resolved(resumed)
    runtime = setup_runtime(config.device, config.amp)
    try:
        with run_log(Path(config.output_dir), runtime):
            return _train(config, runtime, resumed, started)
    finally:
        runtime.close()


# ---- Command line ----------------------------------------------------------------------------
def _seconds(text: str) -> float:
    """``90``, ``90s``, ``5m`` or ``1.5h`` -> seconds (:class:`TrainConfig` checks the range)."""
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), None)
    try:
        return float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or a duration like 5m or 1.5h, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 5: train the multi-organ U-Net (runs under torchrun for several GPUs).")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding processed/training_cache (default: %(default)s)")
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR,
                        help="folder of train.txt/val.txt; class_weights.json is cached there (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="run folder (default: runs/<timestamp>, or the resumed run's folder)")
    parser.add_argument("--epochs", type=positive_int, default=TrainConfig.epochs, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size,
                        help="slices per step and per process (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help=f"constant, or cosine decay to {COSINE_FINAL_FRACTION:g} x --lr by the last "
                             "epoch, the --time-limit or --max-steps, whichever comes first (default: %(default)s)")
    parser.add_argument("--base-channels", type=positive_int, default=None,
                        help=f"U-Net width (default: {DEFAULT_BASE_CHANNELS}; 16 for CPU demos)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader worker processes (default: 0 on CPU, min(8, cores) on CUDA)")
    parser.add_argument("--augment", action="store_true", help="random rotation/zoom/intensity of training slices")
    parser.add_argument("--augment-scanner", action="store_true",
                        help="training slices re-rendered as other scanners would show them, half of them: "
                             "noise, reconstruction kernel, HU calibration, slice thickness "
                             "(thoracic_seg/scanner.py; docs/training.md)")
    parser.add_argument("--context-slices", type=int, default=0, metavar="K",
                        help="slice context (2.5D): each slice with K neighbours per side as 2K + 1 input "
                             "channels, clamped at the volume's ends; 0 = one slice: slice context was not a "
                             "consistent win on real patients (docs/decisions.md) (default: %(default)s)")
    parser.add_argument("--tumour-oversampling", type=float, nargs="?", const=DEFAULT_TUMOUR_FRACTION,
                        default=None, metavar="FRACTION",
                        help=f"draw GTV slices this fraction of the time (flag alone: {DEFAULT_TUMOUR_FRACTION})")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="(default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first epoch)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps of the whole run (resumed runs included)")
    parser.add_argument("--time-limit", type=_seconds, default=None, metavar="DURATION",
                        help="stop training after this long (seconds, or 5m, 1.5h), counting the time of the "
                             "whole run (resumed runs included); the cut epoch is validated and saved, and "
                             "--resume finishes it")
    parser.add_argument("--patience", type=positive_int, default=TrainConfig.patience,
                        help="early stopping: epochs without a better validation loss (default: %(default)s)")
    parser.add_argument("--resume", type=Path, default=None, metavar="CHECKPOINT",
                        help=f"continue a run from its {LAST_CHECKPOINT} (or its folder)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on - bfloat16 on recent GPUs, float16 + gradient "
                             "scaler on older ones such as the T4, bfloat16 on CPUs with native bfloat16, "
                             "else off)")
    parser.add_argument("--log-every", type=positive_int, default=TrainConfig.log_every,
                        help="steps between loss read-outs / NaN checks (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def recipe_options(args: Sequence[str]) -> dict[str, Any]:
    """The :func:`run` options that command-line words (the Makefile's REAL_TRAIN_ARGS, say) change from
    the defaults: ``["--augment", "--context-slices", "1"]`` -> ``{"augment": True, "context_slices": 1}``."""
    parser = build_parser()
    defaults, given = vars(parser.parse_args([])), vars(parser.parse_args(list(args)))
    return {key: value for key, value in given.items() if value != defaults[key]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "verbose"}
    try:
        TrainConfig(**options)  # a value out of range is a usage error, before any work
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.verbose)
    if distributed_env()[0] != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one rank talks
    try:
        result = run(**options)
    except (NonFiniteLossError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0 if result.history else 1


if __name__ == "__main__":
    raise SystemExit(main())
