"""The one inference path: a CT volume and one or several checkpoints in (several: their softmax
probabilities averaged), labels and, when asked, the probabilities on the CT grid out.

:class:`Predictor` applies the checkpoint's preprocessing (window, z-score, body crop, resize) to HU,
runs the network batch by batch under ``torch.inference_mode`` in the precision of
``precision.prediction_precision`` and maps the probabilities back (``grid.probabilities_to_ct_labels``).
Evaluation, prediction, the notebook and the benchmarks call it (``image_grid.segment_image`` for an
image). Streamed per batch of slices; PyTorch and numpy only: no SimpleITK or pydicom.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from thoracic_seg import organs
from thoracic_seg.grid import (
    AIR_HU, NETWORK_ORIENTATION, apply_zscore, box_for_crop, check_size, check_window, context_stack,
    crop_settings_of, crop_to_box, describe_crop, from_network_orientation, network_shape_zyx,
    probabilities_to_ct_labels, resize_ct_slices, to_network_array, window_and_zscore,
)
from thoracic_seg.postprocess import describe_postprocess, postprocess_labels
from thoracic_seg.precision import (
    DEFAULT_PREDICTION_PRECISION, Precision, exact_float32, prediction_precision, resolve_device,
)
from thoracic_seg.ptv import PTV_DERIVED, fold_derived_ptv, ptv_description, ptv_from_gtv
from unet_multi_organ import checkpoint_context_slices, checkpoint_ptv, label_table, load_checkpoint_model


#: Peak activations of one slice in inference, in first-level feature maps (base channels x S x S).
#: 8 maps = 134 MB in float32 and 67 MB in bfloat16 for the default network at 256 px; measured
#: (growth of the peak RSS from batch 1 to 4, per slice): 120 MB and 52 MB.
_FEATURE_MAPS_PER_SLICE = 8
MAX_BATCH_SIZE = {"cpu": 8, "cuda": 64}  # beyond these, larger batches are no faster


class CheckpointError(ValueError):
    """The checkpoint is not a ``unet_multi_organ`` checkpoint usable for prediction."""


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3  # unknown: assume a modest machine


def auto_batch_size(device: torch.device, size: int, base_channels: int, dtype: torch.dtype) -> int:
    """Slices per forward pass: a quarter of the free (GPU or system) memory over the activation
    memory of one slice, between 1 and :data:`MAX_BATCH_SIZE` for the device type."""
    element_bytes = 2 if dtype == torch.bfloat16 else 4
    per_slice = _FEATURE_MAPS_PER_SLICE * element_bytes * base_channels * size * size
    fit = _available_memory_bytes(device) // 4 // max(per_slice, 1)
    return int(max(1, min(MAX_BATCH_SIZE.get(device.type, 8), fit)))


@dataclass
class Predictor:
    """A loaded checkpoint with everything needed to segment a CT the way it was trained.

    Build it with :meth:`load`; :meth:`segment` turns HU (Z, Y, X) into labels (Z, Y, X).
    """

    model: torch.nn.Module
    checkpoint_path: Path
    device: torch.device
    precision: Precision
    batch_size: int
    window: tuple[float, float]
    size: int
    postprocess: bool = False
    #: How the PTV is made: ``{"source": "derived", "margin_mm": m}`` or ``{"source": "contoured"}``
    #: (``unet_multi_organ.checkpoint_ptv``).
    ptv: dict[str, Any] = field(default_factory=lambda: {"source": "contoured"})
    #: Neighbours per side each slice goes in with (``grid.context_stack``).
    context_slices: int = 0
    #: Phase 3's crop the network was trained with (``grid.crop_settings``: the body's box, method
    #: "body", threshold HU, margin mm; or a field of view on the body, method "fov", threshold HU,
    #: fov_mm), or None: whole slices, as checkpoints of earlier versions.
    crop: dict[str, Any] | None = None
    #: Every checkpoint of an ensemble (``checkpoint_path`` is the first); empty: ``checkpoint_path`` alone.
    checkpoint_paths: tuple[Path, ...] = ()
    #: The training patients' structure volumes (the first checkpoint's ``training_volumes``,
    #: ``qa.training_volume_record``), None for a checkpoint of an earlier version: the quality check's
    #: volume ranges.
    training_volumes: dict[str, Any] | None = None

    @classmethod
    def load(
        cls, checkpoint: Path | str | Sequence[Path | str], *, device: str = "auto",
        precision: str = DEFAULT_PREDICTION_PRECISION, batch_size: int | None = None, postprocess: bool = False,
        ptv_margin_mm: float | None = None, context_slices: int | None = None,
    ) -> "Predictor":
        """Load ``checkpoint`` (one path, or several: an ensemble averaging softmax probabilities,
        :class:`ProbabilityAverage`) onto ``device`` (``auto``/``cpu``/``cuda``) in ``precision``
        (float32, bfloat16 or auto). ``ptv_margin_mm`` overrides the run's PTV margin (and derives the PTV
        from the GTV whatever the run did). ``context_slices`` None takes the checkpoint's K; another is refused.

        Raises:
            FileNotFoundError: no such checkpoint file.
            CheckpointError: not our checkpoint, weights that do not fit its configuration, a model not
                predicting ``thoracic_seg.organs`` labels from CT channels, missing/invalid preprocessing,
                or ensemble members with different preprocessing, slice context or PTV.
            ValueError: an unknown device/precision, CUDA asked for but absent, or a negative margin.
        """
        paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(c) for c in checkpoint]
        if not paths:
            raise CheckpointError("no checkpoint given")
        torch_device = resolve_device(device)
        policy = prediction_precision(precision, torch_device)
        members = [_load_member(path, torch_device, ptv_margin_mm, context_slices) for path in paths]
        model, settings = members[0]
        for path, (_, other) in zip(paths[1:], members[1:]):
            if _shared(other) != _shared(settings):
                raise CheckpointError(f"{path} was trained with {_shared(other)}, {paths[0]} with {_shared(settings)}: "
                                      "only networks trained on the same preprocessing, slice context and PTV can be "
                                      "ensembled")
        if len(members) > 1:
            model = ProbabilityAverage([m for m, _ in members])
        if policy.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if batch_size is None:
            base_channels = sum(s["base_channels"] for _, s in members)  # every member runs on each batch
            batch_size = auto_batch_size(torch_device, settings["size"], base_channels, policy.dtype)
        return cls(model.eval(), paths[0], torch_device, policy, int(batch_size), settings["window"],
                   settings["size"], postprocess, settings["ptv"], settings["context_slices"], settings["crop"],
                   tuple(paths), settings["training_volumes"])

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: ``torch.float32`` or ``torch.bfloat16``."""
        return self.precision.dtype

    @property
    def channels_last(self) -> bool:
        return self.precision.channels_last

    def describe(self) -> str:
        """One line for the log: device, precision, batch size, preprocessing."""
        layout = " + channels-last" if self.channels_last else ""
        members = f" + {len(self.checkpoint_paths) - 1} more (probabilities averaged)" \
            if len(self.checkpoint_paths) > 1 else ""
        return (f"{self.checkpoint_path.name}{members} on {self.device} ({self.precision.name}{layout}), "
                f"batch {self.batch_size}, window {list(self.window)} HU, {self.size}x{self.size} slices, "
                f"{describe_crop(self.crop)}, PTV = {self.ptv_text}" + (f", post-processing: {describe_postprocess()}" if self.postprocess else ""))

    @property
    def ptv_margin_mm(self) -> float | None:
        """The margin (mm) the PTV is grown from the GTV by; None for a network that learnt the PTV."""
        return float(self.ptv["margin_mm"]) if self.ptv.get("source") == PTV_DERIVED else None

    @property
    def ptv_text(self) -> str:
        """``GTV + 10 mm`` (derived) or ``labels GTV + PTV`` (a network that learnt the PTV)."""
        if self.ptv_margin_mm is not None:
            return ptv_description(self.ptv_margin_mm)
        return "labels GTV + PTV"

    def ptv_mask(self, labels_zyx: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
        """bool (Z, Y, X): the PTV of a predicted label map on its grid (``spacing_zyx`` mm)."""
        if self.ptv_margin_mm is not None:
            return ptv_from_gtv(labels_zyx == organs.GTV, spacing_zyx, self.ptv_margin_mm)
        return np.isin(labels_zyx, organs.STRUCTURE_MEMBERS[organs.PTV]) & (labels_zyx == organs.PTV).any()

    def crop_box(self, hu_zyx: np.ndarray, spacing_yx: Sequence[float] | None) -> tuple[int, int, int] | None:
        """The crop box ``(y0, x0, side)`` of a CT (HU (Z, Y, X) in the network's orientation, pixel
        spacing ``spacing_yx`` mm) by ``grid.box_for_crop``, as phase 3, with the checkpoint's settings; None
        for a network trained on whole slices. ``ValueError`` without a spacing or a body."""
        if self.crop is None:
            return None
        if spacing_yx is None:
            raise ValueError(f"{self.checkpoint_path.name} crops to the body ({describe_crop(self.crop)}): "
                             "the pixel spacing (mm) is needed")
        return box_for_crop(hu_zyx, spacing_yx, self.crop)

    def _check_box(self, box_yx: Sequence[int] | None) -> None:
        if (box_yx is None) != (self.crop is None):
            raise ValueError(
                f"{self.checkpoint_path.name} was trained with {describe_crop(self.crop)}, got box_yx {box_yx!r}: "
                "pass Predictor.crop_box(hu, spacing_yx), which is None exactly when the network crops nothing"
            )

    def preprocess(self, hu_zyx: np.ndarray, box_yx: Sequence[int] | None = None) -> np.ndarray:
        """HU (Z, Y, X) -> network input (Z, S, S) float32 as phase 3 makes it: window, per-patient
        z-score (statistics of the whole volume), crop to ``box_yx`` (:meth:`crop_box`, padded with
        air; required exactly when the checkpoint crops), resize."""
        self._check_box(box_yx)
        normalized, mean, std = window_and_zscore(hu_zyx, self.window)
        if box_yx is not None:
            air = float(apply_zscore(np.array([AIR_HU]), self.window, mean, std)[0])
            normalized = crop_to_box(normalized, box_yx, fill=air)
        return resize_ct_slices(normalized, self.size)

    def predict(self, ct_normalized: np.ndarray, output_shape_yx: Sequence[int],
                seconds: dict[str, float] | None = None, box_yx: Sequence[int] | None = None,
                probabilities: np.ndarray | None = None) -> np.ndarray:
        """Network input (Z, S, S) -> uint8 labels (Z, H, W) on the CT's in-plane grid.

        ``batch_size`` slices per forward pass; per-class probabilities are resized bilinearly to
        ``output_shape_yx`` before the argmax (``grid.probabilities_to_ct_labels``); with ``box_yx``
        (the crop box of :meth:`preprocess`) to the box, background outside it.
        ``seconds`` (optional) accumulates ``predict`` (network) and ``map_back`` (resize + argmax).
        ``probabilities`` (Z, 8, H, W), optional: filled batch by batch with the probabilities on
        the CT grid (``grid.probabilities_to_ct_labels``); without it no more than a batch of them exists.
        """
        if ct_normalized.ndim != 3 or ct_normalized.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected a (Z, {self.size}, {self.size}) input, got {ct_normalized.shape}")
        self._check_box(box_yx)
        seconds = seconds if seconds is not None else {}
        shape = tuple(int(n) for n in output_shape_yx)
        labels = np.empty((len(ct_normalized), *shape), dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, len(ct_normalized), self.batch_size):
                with stage_timer(seconds, "predict", self.device):
                    batch = torch.from_numpy(np.ascontiguousarray(
                        context_stack(ct_normalized, start, start + self.batch_size, self.context_slices)))
                    batch = batch.to(self.device)
                    if self.channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    exact = exact_float32(self.device) if self.dtype == torch.float32 else contextlib.nullcontext()
                    with self.precision.autocast(self.device), exact:
                        logits = self.model(batch)
                with stage_timer(seconds, "map_back", self.device):
                    batch_probabilities = fold_derived_ptv(torch.softmax(logits.float(), dim=1), self.ptv)
                    out = probabilities[start:start + len(batch)] if probabilities is not None else None
                    labels[start:start + len(batch)] = probabilities_to_ct_labels(
                        batch_probabilities, shape, box_yx=box_yx, probabilities_out=out)
        return labels

    def segment_stored(self, hu_zyx: np.ndarray, stored_code: str, spacing_zyx: Sequence[float],
                       seconds: dict[str, float] | None = None, probabilities: np.ndarray | None = None,
                       before_postprocess: np.ndarray | None = None) -> np.ndarray:
        """HU (Z, Y, X) in the array order of a CT stored in ``stored_code`` (``grid.orientation_code``,
        e.g. ``RPI`` feet first), voxel spacing ``spacing_zyx`` mm in that order -> uint8 labels (Z, Y, X)
        in the same order: brought to the network's orientation by exact flips and transposes
        (``grid.to_network_array``), segmented (:meth:`segment`) and put back
        (``grid.from_network_orientation``). ``image_grid.segment_image`` calls it with an image.
        A CT whose slices do not run S/I (sagittal, coronal) is refused (``ValueError``).
        ``probabilities`` (Z, 8, Y, X) in the stored order, optional: filled with the class
        probabilities (before post-processing; a CT stored in another orientation than the network's holds
        a second copy while it is filled). ``before_postprocess`` (Z, Y, X) uint8, optional: filled with
        the labels before post-processing (the quality check measures what it removed)."""
        seconds = seconds if seconds is not None else {}
        if str(stored_code)[2:3] not in ("S", "I"):
            raise ValueError(f"not an axial CT: its slices run along {str(stored_code)[2:3] or '?'} (stored "
                             f"{stored_code}; axial slices run S/I); resample it to axial slices first")
        with stage_timer(seconds, "preprocess"):
            hu = np.ascontiguousarray(to_network_array(hu_zyx, stored_code))
        axes = network_shape_zyx(range(3), stored_code)  # network array axis -> stored array axis
        spacing_yx = (float(spacing_zyx[axes[1]]), float(spacing_zyx[axes[2]]))
        network = None
        if probabilities is not None:  # (Z, 8, Y, X) in the stored order: filled from the network's
            network = probabilities if stored_code == NETWORK_ORIENTATION else \
                np.empty((hu.shape[0], probabilities.shape[1], *hu.shape[1:]), probabilities.dtype)
        unprocessed = None if before_postprocess is None else np.empty(hu.shape, np.uint8)
        labels = from_network_orientation(self.segment(hu, seconds, spacing_yx, network, unprocessed), stored_code)
        if probabilities is not None and network is not probabilities:
            for label in range(probabilities.shape[1]):
                probabilities[:, label] = from_network_orientation(network[:, label], stored_code)
        if before_postprocess is not None:
            before_postprocess[...] = from_network_orientation(unprocessed, stored_code)
        return labels

    def segment(self, hu_zyx: np.ndarray, seconds: dict[str, float] | None = None,
                spacing_yx: Sequence[float] | None = None, probabilities: np.ndarray | None = None,
                before_postprocess: np.ndarray | None = None) -> np.ndarray:
        """HU (Z, Y, X) in the network's orientation (LPS) -> uint8 labels (Z, Y, X) on the same grid
        (with ``postprocess`` applied). ``spacing_yx`` (mm) is needed when the checkpoint crops to
        the body (:meth:`crop_box`). :meth:`segment_stored` takes a CT stored in any orientation.
        ``probabilities`` (Z, 8, Y, X), ``before_postprocess`` (Z, Y, X) uint8, optional: filled with the
        class probabilities and the labels before post-processing."""
        seconds = seconds if seconds is not None else {}
        with stage_timer(seconds, "preprocess"):
            box = self.crop_box(hu_zyx, spacing_yx)
            ct_small = self.preprocess(hu_zyx, box)
        labels = self.predict(ct_small, hu_zyx.shape[1:], seconds, box, probabilities)
        if before_postprocess is not None:
            before_postprocess[...] = labels
        if self.postprocess:
            with stage_timer(seconds, "postprocess"):
                labels = postprocess_labels(labels)
        return labels


class ProbabilityAverage(torch.nn.Module):
    """An ensemble as one network: the log of its members' mean softmax probabilities, so that the
    softmax the predictor takes of it gives that mean. Members see the same input."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


#: Settings ensemble members may differ in: their width, and their training volumes (the first member's are used).
_PER_MEMBER = ("base_channels", "training_volumes")


def _shared(settings: dict[str, Any]) -> dict[str, Any]:
    """What every member of an ensemble must share: :func:`_load_member`'s settings but :data:`_PER_MEMBER`."""
    return {k: v for k, v in settings.items() if k not in _PER_MEMBER}


def _load_member(checkpoint: Path, device: torch.device, ptv_margin_mm: float | None,
                 context_slices: int | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One checkpoint's network and what it needs (window, size, crop, PTV, context, width);
    :class:`CheckpointError` for a checkpoint prediction cannot use."""
    try:
        model, record = load_checkpoint_model(checkpoint, device)
        k = checkpoint_context_slices(record, context_slices, checkpoint)
        ptv = checkpoint_ptv(record, ptv_margin_mm)
    except ValueError as exc:
        raise CheckpointError(str(exc) if str(checkpoint) in str(exc) else f"{checkpoint}: {exc}") from None
    window, size, crop = preprocessing_of(record, checkpoint)
    config = record.get("model_config", {})
    if config.get("in_channels") != 2 * k + 1 or config.get("out_channels") != organs.NUM_CLASSES:
        raise CheckpointError(
            f"{checkpoint}: the model maps {config.get('in_channels')} channel(s) to "
            f"{config.get('out_channels')} classes; expected {2 * k + 1} CT channel(s) -> {organs.NUM_CLASSES} labels"
        )
    labels = {str(k): str(v) for k, v in (record.get("labels") or {}).items()}
    if labels and labels != label_table():
        raise CheckpointError(f"{checkpoint}: its labels {labels} differ from thoracic_seg/organs.py {label_table()}; "
                              "the label values would be misread")
    volumes = record.get("training_volumes")
    return model, {"window": window, "size": size, "crop": crop, "ptv": ptv,
                   "context_slices": k, "base_channels": int(config.get("base_channels", 64)),
                   "training_volumes": volumes if isinstance(volumes, dict) else None}


def preprocessing_of(
    record: dict[str, Any], checkpoint: Path | str,
) -> tuple[tuple[float, float], int, dict[str, Any] | None]:
    """``(window HU, slice size, crop settings or None)`` from a checkpoint's ``preprocessing``
    (no ``crop``: whole slices, as checkpoints of earlier versions); :class:`CheckpointError` if unusable."""
    settings = record.get("preprocessing")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{checkpoint}: no 'preprocessing' settings in the checkpoint")
    if settings.get("zscore", "per_patient") != "per_patient":
        raise CheckpointError(
            f"{checkpoint}: preprocessing zscore={settings.get('zscore')!r}; only 'per_patient' is implemented"
        )
    try:
        return (check_window(settings["window"]), check_size(settings["size"]),
                crop_settings_of(settings, f"{checkpoint}: preprocessing"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint}: invalid preprocessing {settings}: {exc}") from None


@contextlib.contextmanager
def stage_timer(seconds: dict[str, float], stage: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[stage]`` (waiting for the GPU to finish)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
