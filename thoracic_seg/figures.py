"""One function per figure of the pipeline (matplotlib's object API, no global state), and the
readers of what they draw (training history, metrics, label maps on the CT grid).

``visualize_all_phases.py`` draws them all from the processed folders; training and evaluation call
:func:`training_curves_figure` and :func:`dice_boxplot_figure` to write their PNGs.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from thoracic_seg import organs
from thoracic_seg.batch import atomic_output, read_nifti
from thoracic_seg.layout import DataLayout

log = logging.getLogger(__name__)
DEFAULT_DPI = 100
OVERLAY_ALPHA = 0.7
#: Phase 4 and test-prediction figures show slices holding at least this many structures.
MIN_STRUCTURES = 5
N_EXAMPLES = 4
SPLIT_COLOURS = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
FIGURES = {
    "phase2": "phase2_dicom_to_nifti.png",
    "phase2_5": "phase2_5_multi_organ.png",
    "phase3": "phase3_normalization.png",
    "phase4": "phase4_dataset_pytorch.png",
    "statistics": "dataset_statistics.png",
    "curves": "training_curves.png",
    "predictions": "test_predictions.png",
    "dice": "dice_boxplot.png",
}


def label_colormap(transparent_background: bool = False) -> ListedColormap:
    """Colour map with colour k = ``organs`` colour of label k (use with :func:`show_labels`).

    With ``transparent_background`` label 0 is fully transparent, for overlays on the CT.
    """
    colours = [(*rgb, 1.0) for rgb in organs.color_table(1 / 255)]
    if transparent_background:
        colours[organs.BACKGROUND] = (0.0, 0.0, 0.0, 0.0)
    return ListedColormap(colours, name="organs_overlay" if transparent_background else "organs")


def present_labels(labels: np.ndarray) -> list[int]:
    """Foreground labels (1-7) occurring anywhere in an integer label array, ascending."""
    found = np.unique(np.asarray(labels))
    return [int(v) for v in found if v in organs.FOREGROUND_LABELS]


def structures_per_slice(labels_zyx: np.ndarray) -> np.ndarray:
    """int (Z,): number of distinct foreground structures on each axial slice of a (Z, Y, X) label map."""
    labels_zyx = np.asarray(labels_zyx)
    return sum((labels_zyx == label).any(axis=(1, 2)).astype(int) for label in organs.FOREGROUND_LABELS)


def best_slice(labels_zyx: np.ndarray) -> int:
    """Index of the axial slice with the most structures; ties go to the most labelled voxels."""
    counts = structures_per_slice(labels_zyx)
    voxels = np.count_nonzero(np.asarray(labels_zyx), axis=(1, 2))
    return int(np.lexsort((-voxels, -counts))[0])


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced through ``items`` (all of them when there are at most ``n``)."""
    if len(items) <= n:
        return list(items)
    return [items[int(round(i))] for i in np.linspace(0, len(items) - 1, n)]


def pick_examples(candidates: Sequence[tuple[Any, Any]], n: int = N_EXAMPLES) -> list[tuple[Any, Any]]:
    """``n`` (group, item) pairs from ``candidates`` (ordered by group, then by item).

    Up to ``n`` groups (patients) spread over all of them share the ``n`` picks as evenly as
    their sizes allow; within a group, ``q`` picks sit at the centres of ``q`` equal parts, so one
    pick is the middle item (a mid-thorax slice rather than the apex).
    """
    groups: dict[Any, list[Any]] = {}
    for group, item in candidates:
        groups.setdefault(group, []).append(item)
    keys = spread(list(groups), n)
    quota = dict.fromkeys(keys, 0)
    total = 0
    while total < n and any(quota[k] < len(groups[k]) for k in keys):
        for k in keys:
            if total < n and quota[k] < len(groups[k]):
                quota[k] += 1
                total += 1
    return [(k, groups[k][int((i + 0.5) * len(groups[k]) / quota[k])]) for k in keys for i in range(quota[k])]


def _axis_off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def show_image(ax, image: np.ndarray, title: str = "", vmin: float | None = None,
               vmax: float | None = None, colorbar_label: str | None = None):
    """Grey-scale image without axes; a colour bar when ``colorbar_label`` is given."""
    shown = ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="antialiased")
    ax.set_title(title, fontsize=10)
    _axis_off(ax)
    if colorbar_label is not None:
        bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.set_label(colorbar_label, fontsize=9)
        bar.ax.tick_params(labelsize=8)
    return shown


def show_labels(ax, labels: np.ndarray, title: str = "") -> None:
    """A label map in the ``organs`` colours (background black), no axes."""
    ax.imshow(labels, cmap=label_colormap(), vmin=-0.5, vmax=organs.NUM_CLASSES - 0.5, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    _axis_off(ax)


def show_overlay(ax, image: np.ndarray, labels: np.ndarray, title: str = "",
                 vmin: float | None = None, vmax: float | None = None,
                 outline: np.ndarray | None = None, ptv: np.ndarray | None = None) -> None:
    """CT in grey with the label map on top at :data:`OVERLAY_ALPHA` (background transparent);
    optional white outlines of a second label map (e.g. the truth under a prediction) and the
    outline of a PTV that overlaps the organs (bool, drawn in the PTV colour)."""
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
    ax.imshow(labels, cmap=label_colormap(transparent_background=True), vmin=-0.5,
              vmax=organs.NUM_CLASSES - 0.5, alpha=OVERLAY_ALPHA, interpolation="nearest")
    if outline is not None:
        for label in present_labels(outline):
            ax.contour(outline == label, levels=[0.5], colors="white", linewidths=0.8)
    if ptv is not None and ptv.any():
        ax.contour(ptv, levels=[0.5], colors=[organs.structure(organs.PTV).color_float], linewidths=1.2)
    ax.set_title(title, fontsize=10)
    _axis_off(ax)


def structure_legend(fig: Figure, labels: Sequence[int], not_annotated: Sequence[int] = (),
                     derived: Sequence[int] = (), **kwargs: Any) -> None:
    """A figure legend with one colour patch per structure in ``labels`` (in label order; a
    structure phase 2.5 derived, the PTV grown from the GTV, is an outline) and a note naming the
    structures that were not annotated."""
    handles = [Patch(facecolor="none" if k in derived else organs.structure(k).color_float,
                     edgecolor=organs.structure(k).color_float if k in derived else "black",
                     linewidth=1.5 if k in derived else 0.5,
                     label=organs.structure(k).name + (" (derived, outline)" if k in derived else ""))
               for k in sorted(set(labels))]
    if not_annotated:
        names = ", ".join(organs.structure(k).name for k in sorted(not_annotated))
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"not annotated: {names}"))
    if not handles:
        handles = [Patch(facecolor="none", edgecolor="none", label="no structure on these slices")]
    options = {"loc": "lower center", "ncol": min(len(handles), 8), "fontsize": 9, "frameon": False}
    options.update(kwargs)
    fig.legend(handles=handles, **options)


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure on the Agg canvas (no pyplot, no global backend) with constrained layout."""
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path | str, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as a PNG atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    return path


def _range(values: np.ndarray, unit: str = "") -> str:
    lo, hi = float(np.min(values)), float(np.max(values))
    fmt = "{:.0f}" if max(abs(lo), abs(hi)) >= 100 else "{:.2f}"
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]{(' ' + unit) if unit else ''}"


def _not_annotated(annotated: Sequence[bool] | None) -> list[int]:
    if annotated is None:
        return []
    return [k for k in organs.FOREGROUND_LABELS if not annotated[k]]


def levels_around(labels_zyx: np.ndarray, z: int, n: int = 3) -> list[int]:
    """``z`` and ``n - 1`` other slices spread through the labelled extent, in ascending order."""
    labelled = np.flatnonzero(np.asarray(labels_zyx).any(axis=(1, 2)))
    if labelled.size == 0:
        labelled = np.arange(len(labels_zyx))
    lo, hi = int(labelled[0]), int(labelled[-1])
    others = [int(round(lo + f * (hi - lo))) for f in np.linspace(0.2, 0.8, n - 1)]
    chosen = {int(z)}
    for other in sorted(others, key=lambda o: abs(o - z), reverse=True):
        if len(chosen) < n and all(abs(other - c) >= 2 for c in chosen):
            chosen.add(other)
    return sorted(chosen)


def volume_histogram(volume: np.ndarray, bins: int = 100, clip: tuple[float, float] | None = None,
                     chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, edges)`` of all voxels of a (Z, Y, X) volume (optionally clipped to ``clip``),
    ``chunk`` slices at a time, so a 512 x 512 x 300 CT never needs a float copy in memory."""
    if clip is not None:
        low, high = clip
    else:
        low, high = float(np.min(volume)), float(np.max(volume))
    high = high if high > low else low + 1.0
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, volume.shape[0], chunk):
        block = np.asarray(volume[start:start + chunk], dtype=np.float32)
        if clip is not None:
            block = np.clip(block, low, high)
        counts += np.histogram(block, bins=bins, range=(low, high))[0]
    return counts, np.linspace(low, high, bins + 1)


def _number(text: Any) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_history(run_dir: Path | str) -> list[dict[str, Any]]:
    """Per-epoch records of a training run: ``history.json`` (a list of dicts, or a dict holding
    one under ``"epochs"``/``"history"``) or ``history.csv``. Raises ``FileNotFoundError``."""
    from thoracic_seg.layout import HISTORY_CSV, HISTORY_JSON

    run_dir = Path(run_dir)
    json_path, csv_path = run_dir / HISTORY_JSON, run_dir / HISTORY_CSV
    if json_path.is_file():
        data = json.loads(json_path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("epochs", data.get("history", []))
        if not isinstance(data, list):
            raise ValueError(f"{json_path}: expected a list of per-epoch records")
        return [dict(row) for row in data]
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as handle:
            return [{k: (_number(v) if _number(v) is not None else v) for k, v in row.items()}
                    for row in csv.DictReader(handle)]
    raise FileNotFoundError(f"no {HISTORY_JSON} or {HISTORY_CSV} in run folder {run_dir}; "
                            "train_multi_organ.py writes it")


def _dice_series(history: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-structure validation Dice series (structure key -> values per epoch), from records
    holding ``dice_<key>`` columns (``train_multi_organ.py``), ``val_dice_<key>`` or a
    ``val_dice`` dict."""
    out: dict[str, list[float]] = {}
    for label in organs.FOREGROUND_LABELS:
        key = organs.structure(label).key
        values = []
        for row in history:
            nested = row.get("val_dice")
            value = (nested.get(key) if isinstance(nested, dict)
                     else row.get(f"dice_{key}", row.get(f"val_dice_{key}")))
            values.append(_number(value) if _number(value) is not None else math.nan)
        if any(math.isfinite(v) for v in values):
            out[key] = values
    return out


def training_curves_figure(history: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Loss curves (train/val) and per-structure validation Dice against the epoch."""
    epochs = [_number(r.get("epoch")) if _number(r.get("epoch")) is not None else i + 1 for i, r in enumerate(history)]
    fig = new_figure(13, 4.6)
    ax_loss, ax_dice = fig.subplots(1, 2)
    for key, colour in (("train_loss", "#4c72b0"), ("val_loss", "#dd8452")):
        values = [_number(r.get(key)) for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, [math.nan if v is None else v for v in values], "o-", ms=3,
                         color=colour, label=key.replace("_", " "))
    best = [i for i, r in enumerate(history)  # NaN: an epoch without validation (train_multi_organ)
            if _number(r.get("val_loss")) is not None and math.isfinite(_number(r.get("val_loss")))]
    if best:
        i = min(best, key=lambda j: _number(history[j]["val_loss"]))
        ax_loss.axvline(epochs[i], color="gray", linestyle=":", linewidth=1,
                        label=f"best val loss (epoch {epochs[i]:g})")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss (0.5 cross-entropy + 0.5 Dice)")
    ax_loss.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=9)
    series = _dice_series(history)
    for key, values in series.items():
        structure = organs.BY_KEY[key]
        ax_dice.plot(epochs, values, "o-", ms=4, color=[c * 0.85 for c in structure.color_float],
                     label=structure.name, markeredgecolor="black", markeredgewidth=0.4)
    mean = [_number(r.get("mean_dice", r.get("val_dice_mean"))) for r in history]
    if any(v is not None for v in mean):
        ax_dice.plot(epochs, [math.nan if v is None else v for v in mean], "k--", linewidth=1.5, label="mean")
    ax_dice.set(xlabel="epoch", ylabel="Dice (2D, validation slices)", ylim=(-0.02, 1.02),
                title="Validation Dice per structure")
    ax_dice.grid(alpha=0.3)
    if ax_dice.get_legend_handles_labels()[0]:
        ax_dice.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax_dice.text(0.5, 0.5, "no validation Dice in the history", ha="center", va="center",
                     transform=ax_dice.transAxes)
    for ax in (ax_loss, ax_dice):
        ax.tick_params(labelsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "Training curves", fontsize=12)
    return fig


@dataclass
class PredictionSample:
    """One slice to show: z-scored or HU image, truth and prediction label maps (same shape)."""

    title: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    vmin: float | None = None
    vmax: float | None = None


def slice_dice(prediction: np.ndarray, truth: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """Mean 2-D Dice over ``labels`` (default: structures in either map); NaN when there are none."""
    labels = list(labels) if labels is not None else sorted(set(present_labels(prediction)) | set(present_labels(truth)))
    values = []
    for label in labels:
        p, t = prediction == label, truth == label
        total = np.count_nonzero(p) + np.count_nonzero(t)
        if total:
            values.append(2.0 * np.count_nonzero(p & t) / total)
    return float(np.mean(values)) if values else math.nan


def predictions_figure(samples: Sequence[PredictionSample], title: str = "") -> Figure:
    """One row per sample: image | ground truth | prediction | overlay (prediction filled, truth
    outlined in white)."""
    rows = max(len(samples), 1)
    fig = new_figure(12.6, 3.15 * rows + 1.1)
    axes = fig.subplots(rows, 4, squeeze=False)
    shown: set[int] = set()
    for row, sample in enumerate(samples):
        dice = slice_dice(sample.prediction, sample.truth)
        dice_text = f"slice Dice {dice:.2f}" if math.isfinite(dice) else "empty"
        show_image(axes[row, 0], sample.image, sample.title, vmin=sample.vmin, vmax=sample.vmax)
        show_labels(axes[row, 1], sample.truth, "ground truth")
        show_labels(axes[row, 2], sample.prediction, f"prediction ({dice_text})")
        show_overlay(axes[row, 3], sample.image, sample.prediction, "overlay (truth outlined)",
                     vmin=sample.vmin, vmax=sample.vmax, outline=sample.truth)
        shown.update(present_labels(sample.truth))
        shown.update(present_labels(sample.prediction))
    structure_legend(fig, sorted(shown), ncol=7, loc="outside lower center")
    fig.suptitle(title or "Predictions", fontsize=12)
    return fig


def choose_samples(volumes: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], n: int = N_EXAMPLES,
                   vmin: float | None = None, vmax: float | None = None) -> list[PredictionSample]:
    """``n`` slices to show from ``{patient id: (image, truth, prediction)}`` (three (Z, Y, X) arrays
    of one grid): among the slices whose truth holds :data:`MIN_STRUCTURES` or more structures
    (fewer available: the most), one mid slice per patient first (see :func:`pick_examples`)."""
    candidates = [(pid, z, int(c)) for pid, (_, truth, _) in volumes.items()
                  for z, c in enumerate(structures_per_slice(truth))]
    if not candidates:
        return []
    threshold = min(MIN_STRUCTURES, max(c for _, _, c in candidates))
    chosen = pick_examples([(p, z) for p, z, c in candidates if c >= threshold], n)
    return [PredictionSample(f"{p}, slice {z}", np.asarray(volumes[p][0][z]), np.asarray(volumes[p][1][z]),
                             np.asarray(volumes[p][2][z]), vmin=vmin, vmax=vmax) for p, z in chosen]


def read_metrics_csv(path: Path | str) -> list[dict[str, Any]]:
    """``metrics.csv`` of ``evaluate_multi_organ.py`` as rows with ``dice`` float or None and
    ``annotated`` bool."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [{**row, "dice": _number(row.get("dice")), "annotated": row.get("annotated") == "yes"} for row in rows]


def dice_boxplot_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Box plot of per-patient 3D Dice per structure with every patient as a dot, in the
    ``organs`` colours; ``n`` under each box."""
    fig = new_figure(9, 4.8)
    ax = fig.subplots()
    data, names, colours = [], [], []
    for label in organs.FOREGROUND_LABELS:
        structure = organs.structure(label)
        values = [r["dice"] for r in rows if r["structure"] == structure.key and r["annotated"]
                  and r["dice"] is not None and math.isfinite(r["dice"])]
        if values:
            data.append(values)
            names.append(f"{structure.name}\nn={len(values)}")
            colours.append(structure.color_float)
    if data:
        boxes = ax.boxplot(data, patch_artist=True, widths=0.6, medianprops={"color": "black"}, showfliers=False)
        for patch, colour in zip(boxes["boxes"], colours):
            patch.set(facecolor=colour, alpha=0.6, edgecolor="black")
        jitter = np.random.default_rng(0)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + jitter.uniform(-0.12, 0.12, len(values)), values, s=14, color="black", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names, fontsize=9)
        for tick, colour in zip(ax.get_xticklabels(), colours):
            tick.set_bbox({"facecolor": colour, "alpha": 0.35, "edgecolor": "none", "boxstyle": "round,pad=0.2"})
    else:
        ax.text(0.5, 0.5, "no scored structure", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set(ylim=(-0.02, 1.02), ylabel="3D Dice (original CT grid)")
    ax.set_title(title or "3D Dice per structure", fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    return fig


def structure_flags(layout: DataLayout, patient_id: str) -> tuple[list[bool] | None, dict[str, Any]]:
    """``(annotated flags (8,) or None, how the PTV is made)`` of a patient from phase 2.5's record
    ``<PatientID>.json`` (None and {} when it is missing or of an earlier version)."""
    from thoracic_seg.layout import truth_record

    try:
        return truth_record(layout, patient_id)
    except (FileNotFoundError, ValueError) as exc:
        log.warning("no structure flags (%s)", exc)
        return None, {}


def _read_volume(path: Path, what: str) -> tuple[sitk.Image, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run {what}")
    image = read_nifti(path)
    return image, sitk.GetArrayFromImage(image)


def load_patient(layout: DataLayout, patient_id: str) -> dict[str, Any]:
    """CT image + HU array (Z, Y, X) int16 of phase 2 and the label map (Z, Y, X) uint8 of phase 2.5."""
    ct_image, hu = _read_volume(layout.ct_nifti / f"{patient_id}.nii.gz", "convert_dicom_to_nifti.py")
    _, labels = _read_volume(layout.masks / f"{patient_id}.nii.gz", "extract_multi_organ_masks.py")
    if labels.shape != hu.shape:
        raise ValueError(f"{patient_id}: label map {labels.shape} and CT {hu.shape} differ in shape; "
                         "rerun extract_multi_organ_masks.py --overwrite")
    annotated, ptv = structure_flags(layout, patient_id)
    from thoracic_seg.ptv import PTV_DERIVED, ptv_from_gtv

    ptv_mask = None
    if ptv.get("source") == PTV_DERIVED:
        ptv_mask = ptv_from_gtv(labels == organs.GTV, ct_image.GetSpacing()[::-1], float(ptv["margin_mm"]))
    return {"ct_image": ct_image, "hu": hu, "labels": labels, "annotated": annotated, "ptv": ptv_mask}


def prediction_samples(layout: DataLayout, predictions_dir: Path, patients: Sequence[str],
                       n: int = N_EXAMPLES) -> list[PredictionSample]:
    """``n`` slices of the patients with a saved prediction (``<PatientID>.nii.gz`` on the CT grid),
    shown with the phase-2 CT and the phase-2.5 truth (see :func:`choose_samples`)."""
    volumes = {}
    for patient_id in patients:
        path = predictions_dir / f"{patient_id}.nii.gz"
        if path.is_file():
            data = load_patient(layout, patient_id)
            volumes[patient_id] = (data["hu"], data["labels"], _read_volume(path, "evaluate_multi_organ.py")[1])
    if not volumes:
        raise FileNotFoundError(f"no prediction of {', '.join(patients) or 'any patient'} in {predictions_dir}")
    return choose_samples(volumes, n, vmin=-1000, vmax=400)


@dataclass
class RawSlice:
    """The raw DICOM slice at the position of a NIfTI slice."""

    path: Path
    stored: np.ndarray  # (rows, cols) as stored in the file
    hu: np.ndarray  # float64 (rows, cols), stored x RescaleSlope + RescaleIntercept
    slope: float
    intercept: float
    distance_mm: float  # along the slice normal, from the NIfTI slice centre


def phase2_figure(patient_id: str, z: int, nifti_slice: np.ndarray, raw: RawSlice | None,
                  raw_problem: str = "", spacing_z: float = 1.0) -> Figure:
    """Stored DICOM values | HU | saved NIfTI of one slice, each with a colour bar and its range."""
    fig = new_figure(13, 4.6)
    axes = fig.subplots(1, 3)
    if raw is not None and raw.distance_mm <= spacing_z / 2:
        show_image(axes[0], raw.stored,
                   f"Stored DICOM values ({raw.stored.dtype})\n{_range(raw.stored)}",
                   colorbar_label="stored value")
        show_image(axes[1], raw.hu,
                   f"Hounsfield units = stored × {raw.slope:g} + ({raw.intercept:g})\n{_range(raw.hu, 'HU')}",
                   colorbar_label="HU")
        same_shape = raw.hu.shape == nifti_slice.shape
        difference = (f"max |NIfTI - DICOM HU| = {np.max(np.abs(raw.hu - nifti_slice)):.0f} HU"
                      if same_shape else "DICOM and NIfTI slices differ in shape")
        footer = f"DICOM file {raw.path.name}; {difference}"
    else:
        reason = raw_problem or (f"no DICOM slice within {spacing_z / 2:.2f} mm: slice {z} was "
                                 "interpolated (--fill-gaps)")
        for ax, title in zip(axes[:2], ("Stored DICOM values", "Hounsfield units")):
            ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
            ax.set_title(title, fontsize=10)
            _axis_off(ax)
        footer = reason
    show_image(axes[2], nifti_slice,
               f"Saved NIfTI read back ({nifti_slice.dtype})\n{_range(nifti_slice, 'HU')}",
               colorbar_label="HU")
    fig.suptitle(f"Phase 2, DICOM to NIfTI: {patient_id}, slice {z}", fontsize=12)
    fig.text(0.5, 0.005, footer, ha="center", va="bottom", fontsize=9, color="dimgray")
    fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return fig


def multi_organ_figure(patient_id: str, ct_zyx: np.ndarray, labels_zyx: np.ndarray, z: int,
                       annotated: Sequence[bool] | None = None, ptv_zyx: np.ndarray | None = None) -> Figure:
    """Three rows (CT, label map, overlay at :data:`OVERLAY_ALPHA`) at slice ``z`` and two other
    levels; ``annotated`` (8 flags) comes from phase 2.5's record; ``ptv_zyx`` (bool), a derived
    PTV, is drawn as an outline over the organs in the overlay row (it is not in the label map)."""
    levels = levels_around(labels_zyx, z)
    fig = new_figure(3.3 * len(levels) + 0.4, 10.6)
    axes = fig.subplots(3, len(levels), squeeze=False)
    for col, level in enumerate(levels):
        ct, labels = ct_zyx[level], labels_zyx[level]
        mark = " (selected)" if level == z else ""
        show_image(axes[0, col], ct, f"CT, slice {level}{mark}", vmin=-1000, vmax=400)
        show_labels(axes[1, col], labels, f"label map: {len(present_labels(labels))} structures")
        show_overlay(axes[2, col], ct, labels, f"overlay (alpha {OVERLAY_ALPHA})", vmin=-1000, vmax=400,
                     ptv=None if ptv_zyx is None else ptv_zyx[level])
    shown = present_labels(labels_zyx[levels])
    derived = [organs.PTV] if ptv_zyx is not None and ptv_zyx[levels].any() else []
    not_annotated = [k for k in _not_annotated(annotated) if k not in derived]
    structure_legend(fig, shown + derived, not_annotated, derived, ncol=4, loc="outside lower center")
    fig.suptitle(f"Phase 2.5, RTSTRUCT to label map: {patient_id} (CT window [-1000, 400] HU)", fontsize=12)
    return fig


def normalization_figure(patient_id: str, z: int, hu_zyx: np.ndarray, zscored_zyx: np.ndarray,
                         record: dict[str, Any]) -> Figure:
    """Original HU | windowed HU | z-scored slice, with the whole volume's histogram under each.

    ``hu_zyx`` is the phase-2 CT (Z, Y, X) in HU, ``zscored_zyx`` the phase-3 network input
    (Z, S, S) (a memory map is fine), ``record`` the patient's phase-3 record (``window``,
    ``mean``, ``std``). The windowed panel clips the stored HU to the recorded window: the one
    intermediate phase 3 does not save.
    """
    low, high = (float(v) for v in record["window"])
    mean, std = float(record["mean"]), float(record["std"])
    hu_slice = hu_zyx[z]
    windowed_slice = np.clip(hu_slice, low, high)
    z_slice = np.asarray(zscored_zyx[z], dtype=np.float32)
    sign = "+" if mean < 0 else "-"
    fig = new_figure(14, 6.9)
    grid = fig.add_gridspec(2, 3, height_ratios=(2.1, 1))
    panels = [
        (hu_slice, f"Original (phase 2), {hu_zyx.shape[2]}x{hu_zyx.shape[1]}\n{_range(hu_slice, 'HU')} on this slice",
         "HU", None, None, volume_histogram(hu_zyx), (low, high)),
        (windowed_slice, f"Windowed to [{low:g}, {high:g}] HU\n{_range(windowed_slice, 'HU')} on this slice",
         "HU", low, high, volume_histogram(hu_zyx, clip=(low, high)), (low, high)),
        (z_slice, f"Z-scored: (HU {sign} {abs(mean):.1f}) / {std:.1f}, {zscored_zyx.shape[2]}x{zscored_zyx.shape[1]}\n"
                  f"{_range(z_slice)} on this slice (network input)", "z-score", None, None,
         volume_histogram(zscored_zyx), ((low - mean) / std, (high - mean) / std)),
    ]
    for col, (image, title, unit, vmin, vmax, (counts, edges), limits) in enumerate(panels):
        show_image(fig.add_subplot(grid[0, col]), image, title, vmin=vmin, vmax=vmax, colorbar_label=unit)
        ax = fig.add_subplot(grid[1, col])
        ax.stairs(counts, edges, fill=True, color="#4c72b0")
        ax.set_yscale("log")
        ax.set_xlabel(f"{unit} (all voxels of the volume)", fontsize=9)
        ax.set_ylabel("voxels", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        for edge in limits:
            ax.axvline(edge, color="#c44e52", linestyle="--", linewidth=1)
    fig.suptitle(f"Phase 3, normalization: {patient_id}, slice {z} (dashed: window limits)", fontsize=12)
    return fig


def dataset_examples(dataset: Any, n: int = N_EXAMPLES, min_structures: int = MIN_STRUCTURES) -> list[int]:
    """Indices of ``n`` items of a ``MultiOrganDataset`` spread over its slices holding at least
    ``min_structures`` structures (fewer available: those with the most), read from meta.json."""
    bits = np.asarray(dataset.slice_labels, dtype=np.int64)
    counts = sum(((bits >> k) & 1) for k in organs.FOREGROUND_LABELS)
    threshold = min(min_structures, int(counts.max()) if counts.size else 0)
    candidates = [(int(dataset.index[i, 0]), int(i)) for i in np.flatnonzero(counts >= threshold)]
    return [i for _, i in pick_examples(candidates, n)]


def dataset_figure(dataset: Any, indices: Sequence[int], split: str = "train") -> Figure:
    """CT, mask and overlay of the items ``indices`` of a ``MultiOrganDataset`` (one column each)."""
    items = [dataset[int(i)] for i in indices]
    fig = new_figure(3.2 * max(len(items), 1) + 0.4, 10.8)
    axes = fig.subplots(3, max(len(items), 1), squeeze=False)
    shown: set[int] = set()
    for col, item in enumerate(items):
        channels = item["image"].numpy()
        image = channels[len(channels) // 2]  # the slice itself (the middle channel with slice context)
        mask = item["mask"].numpy()
        missing = [organs.structure(k).name for k in organs.FOREGROUND_LABELS if not bool(item["annotated"][k])]
        note = ("\nnot annotated: " + ", ".join(missing)) if missing else "\n"
        show_image(axes[0, col], image, f"{item['patient_id']}, slice {item['slice_index']}\n{_range(image)}")
        show_labels(axes[1, col], mask, f"mask: {len(present_labels(mask))} structures{note}")
        show_overlay(axes[2, col], image, mask, f"overlay (alpha {OVERLAY_ALPHA})")
        shown.update(present_labels(mask))
    if items:
        first = items[0]
        shapes = (f"image {str(first['image'].dtype).replace('torch.', '')} {tuple(first['image'].shape)}, "
                  f"mask {str(first['mask'].dtype).replace('torch.', '')} {tuple(first['mask'].shape)}")
    else:
        shapes = "no item"
    structure_legend(fig, sorted(shown), ncol=4, loc="outside lower center")
    n_patients = len(dataset.patients)
    fig.suptitle(f"Phase 4, MultiOrganDataset('{split}'): {n_patients} patient{'s' if n_patients != 1 else ''}, "
                 f"{len(dataset)} slices\nitems: {shapes}", fontsize=12)
    return fig


def statistics_figure(summary: dict[str, Any]) -> Figure:
    """Patients per split (pie), slices per split (bars), patients with each structure annotated.

    ``summary`` is the ``summary.json`` of ``prepare_train_val_test_splits.py``
    (``{split: {"patients", "slices", "annotated": {structure key: n}}}``).
    """
    splits = [s for s in SPLIT_COLOURS if s in summary]
    colours = [SPLIT_COLOURS[s] for s in splits]
    fig = new_figure(15, 4.8)
    grid = fig.add_gridspec(1, 3, width_ratios=(1, 0.9, 2.4))
    ax = fig.add_subplot(grid[0])
    patients = [summary[s]["patients"] for s in splits]
    total = max(sum(patients), 1)
    ax.pie(patients, colors=colours, startangle=90, counterclock=False,
           labels=[f"{s}\n{n} ({100 * n / total:.0f}%)" for s, n in zip(splits, patients)],
           wedgeprops={"edgecolor": "white"}, textprops={"fontsize": 10})
    ax.set_title(f"Patients per split ({sum(patients)})", fontsize=11)

    ax = fig.add_subplot(grid[1])
    slices = [summary[s]["slices"] for s in splits]
    bars = ax.bar(splits, slices, color=colours)
    ax.bar_label(bars, fontsize=9)
    ax.set_title("Axial slices per split", fontsize=11)
    ax.set_ylabel("slices")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)

    ax = fig.add_subplot(grid[2])
    keys = [organs.structure(k).key for k in organs.FOREGROUND_LABELS]
    x = np.arange(len(keys))
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        counts = [summary[split]["annotated"].get(key, 0) for key in keys]
        bars = ax.bar(x + (i - (len(splits) - 1) / 2) * width, counts, width, color=SPLIT_COLOURS[split], label=split)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, [organs.BY_KEY[k].name for k in keys], fontsize=9)
    for tick, key in zip(ax.get_xticklabels(), keys):  # a colour chip under each structure name
        tick.set_bbox({"facecolor": organs.BY_KEY[key].color_float, "alpha": 0.35, "edgecolor": "none",
                       "boxstyle": "round,pad=0.2"})
    ax.set_ylabel("patients")
    ax.set_title("Patients with each structure annotated", fontsize=11)
    ax.legend(fontsize=9)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Phase 4, patient-level splits", fontsize=12)
    return fig


_MONTAGE_TILES = 12


def montage_slices(labels_zyx: np.ndarray, count: int = _MONTAGE_TILES) -> list[int]:
    """``count`` slice indices spread evenly over the slices holding any structure (all slices if none)."""
    occupied = np.flatnonzero(labels_zyx.reshape(len(labels_zyx), -1).any(axis=1))
    lo, hi = (occupied[0], occupied[-1]) if len(occupied) else (0, len(labels_zyx) - 1)
    return sorted(set(np.linspace(lo, hi, min(count, hi - lo + 1)).round().astype(int).tolist()))


def write_overlay_png(hu_zyx: np.ndarray, labels_zyx: np.ndarray, path: Path, title: str,
                      window: Sequence[float] = (-1000, 400), ptv_zyx: np.ndarray | None = None,
                      flagged: Mapping[int, Sequence[str]] | None = None) -> None:
    """:func:`overlay_figure` written to ``path`` (PNG, atomically, 100 dpi)."""
    fig = overlay_figure(hu_zyx, labels_zyx, title, window, ptv_zyx, flagged)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def overlay_figure(hu_zyx: np.ndarray, labels_zyx: np.ndarray, title: str, window: Sequence[float] = (-1000, 400),
                   ptv_zyx: np.ndarray | None = None, flagged: Mapping[int, Sequence[str]] | None = None) -> Figure:
    """A montage of axial slices: CT in grey (``window`` HU), structures filled in their ``organs``
    colours; ``ptv_zyx`` (bool, overlapping the organs) drawn as a 1-pixel outline in the PTV colour.
    ``flagged`` (label -> the quality check's flag codes, ``thoracic_seg.qa``): named under the title
    and in the legend (``Heart: QA volume, cut``); given empty, the title says no structure was flagged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from scipy import ndimage

    indices = montage_slices(labels_zyx if ptv_zyx is None else np.where(ptv_zyx, organs.PTV, labels_zyx))
    cols = min(4, len(indices))
    rows = int(np.ceil(len(indices) / cols))
    fig = Figure(figsize=(3 * cols, 3 * rows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    colours = np.array(organs.color_table(1 / 255.0), dtype=np.float32)
    low, high = float(window[0]), float(window[1])
    for n, k in enumerate(indices):
        grey = np.clip((hu_zyx[k].astype(np.float32) - low) / (high - low), 0, 1)[..., None]
        rgb = np.repeat(grey, 3, axis=2)
        inside = labels_zyx[k] > 0
        rgb[inside] = 0.55 * rgb[inside] + 0.45 * colours[labels_zyx[k][inside]]
        if ptv_zyx is not None and ptv_zyx[k].any():
            rgb[ptv_zyx[k] & ~ndimage.binary_erosion(ptv_zyx[k])] = colours[organs.PTV]
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"slice {k}", fontsize=8)
        ax.axis("off")
    present = sorted(set(np.unique(labels_zyx).tolist()) - {0}
                     | ({organs.PTV} if ptv_zyx is not None and ptv_zyx.any() else set()))
    outlined = {organs.PTV} if ptv_zyx is not None else set()
    flagged = None if flagged is None else {lb: list(codes) for lb, codes in flagged.items() if codes}
    ncol = 4 if flagged else 7  # the legend's names grow with their flags
    handles = [Patch(facecolor="none" if lb in outlined else organs.structure(lb).color_float,
                     edgecolor=organs.structure(lb).color_float, linewidth=1.5,
                     label=organs.structure(lb).name + (" (outline)" if lb in outlined else "")
                     + (f": QA {', '.join(flagged[lb])}" if flagged and lb in flagged else ""))
               for lb in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), ncol), fontsize=8, frameon=False)
    if flagged:
        title += "\n" + textwrap.shorten("QA flagged: " + "; ".join(
            f"{organs.structure(lb).name} ({', '.join(codes)})" for lb, codes in sorted(flagged.items())), 160)
    elif flagged is not None:
        title += "\nQA: no structure flagged"
    fig.suptitle(title, fontsize=10, color="firebrick" if flagged else "black")
    legend_rows = math.ceil(len(handles) / ncol)
    fig.tight_layout(rect=(0, 0.05 * legend_rows, 1, 0.97 if flagged is None else 0.93))
    return fig
