"""Phase 5 model: a 2D U-Net that segments the seven structures of ``thoracic_seg.organs`` on CT slices.

Input ``(N, in_channels, H, W)`` float32 z-scored CT slices (2K + 1 channels with slice context K;
H and W divisible by 16); output ``(N, out_channels, H, W)`` logits (no softmax), one per label 0-7.

The classic U-Net (Ronneberger et al. 2015, with BatchNorm): four max-pool levels (64 -> 512
channels, bottleneck 1024) of double 3x3 conv + BatchNorm + ReLU, transposed-convolution upsampling,
skips by concatenation, a 1x1 convolution to logits: 31,036,936 parameters at the defaults (118.4 MiB
of float32). ``base_channels`` scales every width (16: 1/16 of the parameters, for CPU demos and tests).

Checkpoints (``thoracic_seg.training`` through :func:`build_checkpoint`) are plain dicts of tensors
and built-in types, loadable with ``torch.load(weights_only=True)``:

    model, checkpoint = load_checkpoint_model("runs/x/best_unet_multi_organ.pth", "cpu")
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from thoracic_seg import organs

CHECKPOINT_FORMAT = "unet_multi_organ"
CHECKPOINT_FORMAT_VERSION = 1
#: Four 2x2 max-pools: H and W must be multiples of 2**4.
SIZE_MULTIPLE = 16


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2; spatial size kept. Convs have no bias (BN follows)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then :class:`DoubleConv`: halves H and W."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed convolution (doubles H and W, halves channels), concatenation with the
    skip connection, then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNetMultiOrgan(nn.Module):
    """2D U-Net: ``(N, in_channels, H, W)`` float -> ``(N, out_channels, H, W)`` logits.

    Args:
        in_channels: image channels: 2K + 1 CT slices (1 without slice context).
        out_channels: classes, label values 0..out_channels-1 (8: background + 7 structures).
        base_channels: width of the first level; levels are 1, 2, 4, 8 and 16 times it.

    Raises ``ValueError`` in ``forward`` when H or W is not divisible by 16.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 8, base_channels: int = 64) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        c = base_channels
        self.inc = DoubleConv(in_channels, c)
        self.down1 = Down(c, 2 * c)
        self.down2 = Down(2 * c, 4 * c)
        self.down3 = Down(4 * c, 8 * c)
        self.down4 = Down(8 * c, 16 * c)
        self.up1 = Up(16 * c, 8 * c)
        self.up2 = Up(8 * c, 4 * c)
        self.up3 = Up(4 * c, 2 * c)
        self.up4 = Up(2 * c, c)
        self.outc = nn.Conv2d(c, out_channels, kernel_size=1)

    @property
    def config(self) -> dict[str, int]:
        """The constructor arguments, as stored in checkpoints (``model_config``)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "base_channels": self.base_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(
                f"input size {height}x{width} is not divisible by {SIZE_MULTIPLE} "
                f"(the U-Net pools 4 times); resize or pad the slices, e.g. to "
                f"{_round_up(height)}x{_round_up(width)}"
            )
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def _round_up(n: int) -> int:
    return int(math.ceil(n / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- Checkpoints -----------------------------------------------------------------------------
def label_table() -> dict[str, str]:
    """``{"0": "background", "1": "gtv", ...}`` from ``organs.STRUCTURES`` (string keys for JSON)."""
    return {str(s.label): s.key for s in organs.STRUCTURES}


def preprocessing_from_cache(cache_dir: Path | str) -> dict[str, Any]:
    """The normalisation settings a model was trained with, read from the phase-3 outputs.

    ``cache_dir``: the training cache (``<root>/processed/training_cache``), every patient's ``meta.json``.
    Returns ``{"window": [lo, hi] (HU), "size": int (pixels), "zscore": "per_patient", "crop": None,
    {"method": "body", "threshold_hu": -500, "margin_mm": 10} or {"method": "fov", "threshold_hu": -500,
    "fov_mm": 380}}`` (``grid.crop_settings``; each patient's box stays in its own ``meta.json``).
    ``ValueError`` naming the folder when no ``meta.json`` is found, or two patients when the cache
    mixes preprocessings.
    """
    from thoracic_seg.grid import (
        crop_settings_of,  # the network grid's reader (numpy and torch only)
    )

    cache_dir = Path(cache_dir)
    metas = sorted(cache_dir.glob("*/meta.json"))
    if not metas:
        raise ValueError(f"no <patient>/meta.json in training cache {cache_dir}; run phase 3 first")
    first: dict[str, Any] | None = None
    for path in metas:
        meta = json.loads(path.read_text(encoding="utf-8"))
        try:
            settings = {"window": [float(v) for v in meta["window"]], "size": int(meta["size"]),
                        "zscore": "per_patient"}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: missing or invalid 'window'/'size' ({exc})") from None
        settings["crop"] = crop_settings_of(meta, str(path))  # ValueError naming the file
        if first is None:
            first, first_path = settings, path
        elif settings != first:
            raise ValueError(
                f"training cache {cache_dir} mixes preprocessings: {first_path.parent.name} has "
                f"{_preprocessing_text(first)}, {path.parent.name} has {_preprocessing_text(settings)}; "
                "re-run normalize_ct_and_masks.py --overwrite with one setting for every patient"
            )
    return first  # type: ignore[return-value]


def _preprocessing_text(settings: Mapping[str, Any]) -> str:
    from thoracic_seg.grid import describe_crop

    return f"window {settings['window']}, size {settings['size']}, {describe_crop(settings['crop'])}"


def save_untrained_checkpoint(path: Path | str, settings: Mapping[str, Any], *, base_channels: int,
                              seed: int, **extra: Any) -> Path:
    """A checkpoint of this U-Net with random weights (``seed``) and zero biases, for benchmarks and
    tests: with PyTorch's default initialisation the output bias outweighs the image and every voxel
    gets the same label; without it the labels vary with the CT. ``settings``: phase 3's
    preprocessing; ``extra`` keys override the record's."""
    torch.manual_seed(seed)
    model = UNetMultiOrgan(base_channels=base_channels)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
                module.bias.zero_()
    torch.save({**build_checkpoint(model, preprocessing=dict(settings), epoch=0, val_loss=float("nan")), **extra}, path)
    return Path(path)


def build_checkpoint(
    model: nn.Module, *, preprocessing: Mapping[str, Any], ptv: Mapping[str, Any] | None = None,
    context_slices: int = 0, epoch: int, val_loss: float, val_dice: Mapping[str, float] | None = None,
    training_volumes: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of the Phase 5 contract (only tensors and built-in types).

    ``model`` may be wrapped (DDP, ``torch.compile``); the plain module's state is stored on CPU, so the
    file loads anywhere. ``val_dice``: structure key -> Dice (NaN allowed). ``context_slices`` K: 2K + 1
    input channels (:func:`checkpoint_context_slices`). ``ptv``: how the PTV is made, ``{"source":
    "derived", "margin_mm": 10.0}`` or ``{"source": "contoured"}`` (:func:`checkpoint_ptv`).
    ``training_volumes``: the training patients' structure volumes (``thoracic_seg.training.training_volumes``;
    absent from checkpoints of earlier versions: prediction's volume check is then not available). ``extra``
    entries (e.g. optimizer state for the last checkpoint) are added as they are.
    """
    plain = unwrap_model(model)
    if not isinstance(plain, UNetMultiOrgan):
        raise TypeError(f"expected a UNetMultiOrgan, got {type(plain).__name__}")
    checkpoint: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_state": {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()},
        "model_config": dict(plain.config),
        "labels": label_table(),
        "preprocessing": dict(preprocessing),
        "ptv": dict(ptv) if ptv is not None else {"source": "contoured"},
        "context_slices": int(context_slices),
        "epoch": int(epoch),
        "val_loss": float(val_loss),
        "val_dice": {str(k): float(v) for k, v in (val_dice or {}).items()},
    }
    if training_volumes is not None:
        checkpoint["training_volumes"] = json.loads(json.dumps(training_volumes))  # plain built-in types
    if plain.config.get("in_channels") != 2 * int(context_slices) + 1:
        raise ValueError(f"a model of {plain.config.get('in_channels')} input channels cannot see "
                         f"{context_slices} neighbours per side (2K + 1 = {2 * int(context_slices) + 1} channels)")
    checkpoint.update(extra or {})
    return checkpoint


def checkpoint_context_slices(checkpoint: Mapping[str, Any], expected: int | None = None,
                              path: Path | str = "checkpoint") -> int:
    """K, the neighbours per side the checkpoint's model sees (0 for checkpoints of earlier
    versions: one CT channel). ``expected`` (a reader's ``--context-slices``) must match: a reader
    that would feed another number of channels is refused with a ``ValueError`` naming both."""
    k = int(checkpoint.get("context_slices", 0))
    channels = (checkpoint.get("model_config") or {}).get("in_channels", 2 * k + 1)
    if channels != 2 * k + 1:
        raise ValueError(f"{path}: context_slices {k} but {channels} input channels (expected {2 * k + 1})")
    if expected is not None and int(expected) != k:
        raise ValueError(f"{path}: the network was trained with {k} context slice(s) per side ({2 * k + 1} "
                         f"input channels); this run asks for {expected} ({2 * int(expected) + 1} channels). "
                         f"Use --context-slices {k} (or leave it out to take the checkpoint's)")
    return k


def checkpoint_ptv(checkpoint: Mapping[str, Any], margin_mm: float | None = None) -> dict[str, Any]:
    """How a checkpoint's PTV is made: ``{"source": "derived", "margin_mm": m}`` (grow the predicted
    GTV by ``m`` mm) or ``{"source": "contoured"}`` (the network predicts label 2; the PTV is
    labels GTV + PTV). ``margin_mm`` (prediction's ``--ptv-margin-mm``) overrides the margin and asks
    for a derived PTV. Raises ``ValueError`` for a negative or non-finite margin, and for a checkpoint
    that does not say how its PTV is made (an earlier version's, which may have learnt a PTV shell
    painted over the lungs) unless ``margin_mm`` is given.
    """
    if margin_mm is not None:
        if not (margin_mm >= 0 and math.isfinite(margin_mm)):
            raise ValueError(f"PTV margin must be a finite number >= 0 mm, got {margin_mm}")
        return {"source": "derived", "margin_mm": float(margin_mm)}
    ptv = checkpoint.get("ptv")
    if not isinstance(ptv, Mapping) or ptv.get("source") not in ("derived", "contoured", "none"):
        raise ValueError(f"the checkpoint does not say how its PTV is made (ptv {ptv!r}: written by an earlier "
                         "version, whose network may have learnt a PTV painted over the lungs); give "
                         "--ptv-margin-mm MM to grow the predicted GTV into the PTV, or train again with this version")
    return dict(ptv)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under ``DistributedDataParallel`` and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        else:
            return model


def load_checkpoint_model(
    path: Path | str, device: torch.device | str = "cpu"
) -> tuple[UNetMultiOrgan, dict[str, Any]]:
    """Load a checkpoint written by ``train_multi_organ.py``: ``(model in eval mode, checkpoint)``.

    Loads with ``weights_only=True`` (no code from the file is executed). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it is not
    a ``unet_multi_organ`` checkpoint, has a newer format version, or its weights do not match
    the stored model configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (torch.load failed: {exc})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (format {found!r}; expected a file "
            f"written by train_multi_organ.py)"
        )
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this code reads versions <= {CHECKPOINT_FORMAT_VERSION})"
        )
    config = checkpoint.get("model_config")
    if not isinstance(config, dict) or "model_state" not in checkpoint:
        raise ValueError(f"{path}: checkpoint lacks 'model_config' or 'model_state'")
    try:
        model = UNetMultiOrgan(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid model_config {config}: {exc}") from None
    try:
        model.load_state_dict(checkpoint["model_state"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"{path}: weights do not match model_config {config}: "
            f"{' '.join(line.strip() for line in first[:3])}"
        ) from None
    model.to(device).eval()
    return model, checkpoint
