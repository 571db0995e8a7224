"""Figures of every phase: one PNG per phase showing, for one patient and slice, that it did the right thing.

``<data-root>/processed/`` (+ the raw DICOM slice, the split files and optionally a training run)
-> ``<output>/*.png``. No phase is recomputed: every panel shows what a phase wrote.

    python visualize_all_phases.py --data-root DATA --splits-dir DATA/splits [--patient ID] [--slice Z] [--run runs/demo]

Default patient: the first test patient; default slice: the one with the most structures. The files
are ``thoracic_seg.figures.FIGURES``, each drawn by one function of ``thoracic_seg/figures.py`` (the
README shows them); ``--run DIR`` adds the training curves, test predictions and 3D Dice box plot.
Phases 2 and 2.5 are shown in the stored array order (the radiological view for a head-first supine
series), phases 3 and 4 in the network's LPS orientation. Matplotlib's object API on the Agg canvas:
no global backend, safe to import in a notebook.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure

from thoracic_seg.batch import list_patients, setup_logging
from thoracic_seg.figures import (
    DEFAULT_DPI, FIGURES, RawSlice, best_slice, dataset_examples, dataset_figure, dice_boxplot_figure,
    load_patient, multi_organ_figure, normalization_figure, phase2_figure, prediction_samples,
    predictions_figure, read_history, read_metrics_csv, save_figure, statistics_figure,
    training_curves_figure,
)
from thoracic_seg.layout import DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, DataLayout
from thoracic_seg.batch import run_from_command_line

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("figures")
PHASE_FIGURES = ("phase2", "phase2_5", "phase3", "phase4", "statistics")
RUN_FIGURES = ("curves", "predictions", "dice")


# ---- Phase 2: stored DICOM values -> HU -> NIfTI ---------------------------------------------


def slice_normal_position(image: sitk.Image, z: int) -> tuple[np.ndarray, float]:
    """(unit slice normal in LPS, position in mm of slice ``z`` along it) of a 3-D SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    normal = direction[:, 2]
    point = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, int(z))), dtype=float)
    return normal, float(point @ normal)


def find_raw_slice(series_folder: Path, series_uid: str, image: sitk.Image, z: int) -> RawSlice:
    """Read the DICOM file of series ``series_uid`` in ``series_folder`` nearest to NIfTI slice ``z``.

    Files are matched by ImagePositionPatient projected on the slice normal, never by file name.
    Raises ``FileNotFoundError`` when the folder holds no file of the series.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    normal, target = slice_normal_position(image, z)
    best: tuple[float, Path] | None = None
    folder = Path(series_folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "ImagePositionPatient"])
        except Exception:  # not DICOM (a README, a thumbnail): not part of the series
            continue
        if str(ds.get("SeriesInstanceUID", "")) != series_uid or "ImagePositionPatient" not in ds:
            continue
        distance = abs(float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal) - target)
        if best is None or distance < best[0]:
            best = (distance, path)
    if best is None:
        raise FileNotFoundError(f"no DICOM file of series {series_uid} in {folder}")
    ds = pydicom.dcmread(best[1])
    stored = ds.pixel_array
    return RawSlice(best[1], stored, np.asarray(apply_modality_lut(stored, ds), dtype=float),
                    float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0),
                    best[0])


# ---- Reading the phase outputs ---------------------------------------------------------------
def read_split_ids(splits_dir: Path | str, name: str) -> list[str]:
    """Patient ids of split ``name``; empty when the split file does not exist."""
    from thoracic_seg.splits import read_split_file, split_path

    if not split_path(splits_dir, name).is_file():
        return []
    return read_split_file(splits_dir, name)


def default_patient(layout: DataLayout, splits_dir: Path | str) -> str:
    """The first test patient, else the first patient with a label map; ``FileNotFoundError`` if none."""
    for patient_id in read_split_ids(splits_dir, "test"):
        if (layout.masks / f"{patient_id}.nii.gz").is_file():
            return patient_id
    patients = list_patients(layout.masks)
    if not patients:
        raise FileNotFoundError(f"no label map in {layout.masks}; run extract_multi_organ_masks.py")
    return patients[0]


def _phase2(layout: DataLayout, patient_id: str, z: int, data: dict[str, Any]) -> Figure:
    from thoracic_seg.layout import REPORT_NAME, read_report

    image = data["ct_image"]
    row = read_report(layout.ct_nifti / REPORT_NAME).get(patient_id)
    raw, problem = None, ""
    if row is None:
        problem = f"{patient_id} not in {REPORT_NAME}"
    else:
        folder = Path(row.get("series_folder") or row.get("patient_folder") or "")
        try:
            raw = find_raw_slice(folder, row.get("series_uid", ""), image, z)
        except FileNotFoundError as exc:
            problem = f"raw DICOM not available: {exc}"
    return phase2_figure(patient_id, z, data["hu"][z], raw, problem, spacing_z=image.GetSpacing()[2])


def _phase3(layout: DataLayout, patient_id: str, z: int, data: dict[str, Any]) -> Figure:
    """The phase-2 CT and the cache side by side, both in the network's orientation (phase 3 brings
    a feet-first or prone series to LPS): slice ``z`` of phase 2's stored order is shown as the
    network slice at the same patient position."""
    from thoracic_seg.image_grid import to_network_orientation
    from thoracic_seg.layout import CACHE_CT, cache_dir, read_cache_meta

    meta = read_cache_meta(layout.root, patient_id)
    zscored = np.load(cache_dir(layout.root, patient_id) / CACHE_CT, mmap_mode="r")
    network_image, _ = to_network_orientation(data["ct_image"])
    hu = sitk.GetArrayFromImage(network_image)
    if zscored.shape[0] != hu.shape[0]:
        raise ValueError(f"{patient_id}: training cache has {zscored.shape[0]} slices, the CT "
                         f"{hu.shape[0]}; rerun normalize_ct_and_masks.py --overwrite")
    point = data["ct_image"].TransformIndexToPhysicalPoint((0, 0, int(z)))
    network_z = network_image.TransformPhysicalPointToIndex(point)[2]
    return normalization_figure(patient_id, network_z, hu, zscored, meta)


def _phase4(layout: DataLayout, splits_dir: Path) -> Figure:
    from dataset_multi_organ import MultiOrganDataset

    for split in ("train", "val", "test"):
        if read_split_ids(splits_dir, split):
            dataset = MultiOrganDataset(split, data_root=layout.root, splits_dir=splits_dir)
            return dataset_figure(dataset, dataset_examples(dataset), split)
    raise FileNotFoundError(f"no split files in {splits_dir}; run prepare_train_val_test_splits.py")


def _statistics(layout: DataLayout, splits_dir: Path) -> Figure:
    from thoracic_seg.splits import SPLIT_NAMES, SUMMARY_JSON, read_cohort, split_summary

    path = Path(splits_dir) / SUMMARY_JSON
    if path.is_file():
        summary = json.loads(path.read_text(encoding="utf-8"))
    else:  # split files made by hand: describe them from the training cache
        splits = {name: read_split_ids(splits_dir, name) for name in SPLIT_NAMES}
        ids = [p for ids in splits.values() for p in ids]
        if not ids:
            raise FileNotFoundError(f"no split files in {splits_dir}; run prepare_train_val_test_splits.py")
        slices, annotated = read_cohort(layout.root, ids)
        summary = split_summary(splits, slices, annotated)
    return statistics_figure(summary)


def evaluation_dir(run_dir: Path) -> Path:
    """``<run>/evaluation`` (or ``evaluation_postprocessed`` when only that exists)."""
    from thoracic_seg.layout import BEST_CHECKPOINT

    for name in ("evaluation", "evaluation_postprocessed"):
        if (run_dir / name).is_dir():
            return run_dir / name
    raise FileNotFoundError(f"no evaluation/ in run folder {run_dir}; run evaluate_multi_organ.py "
                            f"--checkpoint {run_dir}/{BEST_CHECKPOINT}")


# ---- Run -------------------------------------------------------------------------------------
@dataclass
class FigureResult:
    """One figure: where it was written, or why not."""

    name: str
    path: Path | None
    error: str = ""


def run(
    *, data_root: Path | str = DEFAULT_DATA_ROOT, splits_dir: Path | str = DEFAULT_SPLITS_DIR,
    output: Path | str = DEFAULT_OUTPUT, patient: str | None = None, slice_index: int | None = None,
    run_dir: Path | str | None = None, dpi: int = DEFAULT_DPI,
) -> list[FigureResult]:
    """Write the phase figures (and, with ``run_dir``, the training/evaluation figures) to ``output``.

    A figure whose inputs are missing is reported (``FigureResult.error``) and the others are
    still written. Raises ``FileNotFoundError``/``ValueError`` when the patient or slice cannot be
    shown at all (no label map, slice out of range).
    """
    layout = DataLayout(Path(data_root))
    splits_dir, output = Path(splits_dir), Path(output)
    patient_id = patient or default_patient(layout, splits_dir)
    data = load_patient(layout, patient_id)
    depth = data["labels"].shape[0]
    z = best_slice(data["labels"]) if slice_index is None else int(slice_index)
    if not 0 <= z < depth:
        raise ValueError(f"--slice {z} is outside {patient_id}'s {depth} slices (0-{depth - 1})")
    log.info("figures of %s, slice %d -> %s", patient_id, z, output)

    makers: dict[str, Callable[[], Figure]] = {
        "phase2": lambda: _phase2(layout, patient_id, z, data),
        "phase2_5": lambda: multi_organ_figure(patient_id, data["hu"], data["labels"], z, data["annotated"],
                                               data["ptv"]),
        "phase3": lambda: _phase3(layout, patient_id, z, data),
        "phase4": lambda: _phase4(layout, splits_dir),
        "statistics": lambda: _statistics(layout, splits_dir),
    }
    if run_dir is not None:
        run_dir = Path(run_dir)
        name = run_dir.name

        def predictions() -> Figure:
            evaluation = evaluation_dir(run_dir)
            patients = read_split_ids(splits_dir, "test") or list_patients(evaluation / "predictions")
            return predictions_figure(prediction_samples(layout, evaluation / "predictions", patients),
                                      f"Test predictions of run {name} (original CT grid)")

        def dice() -> Figure:
            evaluation = evaluation_dir(run_dir)
            rows = read_metrics_csv(evaluation / "metrics.csv")
            n_patients = len({r["patient_id"] for r in rows})
            return dice_boxplot_figure(rows, f"3D Dice per structure, run {name} "
                                             f"({n_patients} test patient{'s' if n_patients != 1 else ''})")

        makers.update({
            "curves": lambda: training_curves_figure(read_history(run_dir), f"Training curves, run {name}"),
            "predictions": predictions,
            "dice": dice,
        })

    results = []
    for key, make in makers.items():
        path = output / FIGURES[key]
        try:
            save_figure(make(), path, dpi)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            message = str(exc) if not isinstance(exc, KeyError) else f"missing entry {exc}"
            log.error("%s: not written: %s", FIGURES[key], message)
            results.append(FigureResult(key, None, message))
            continue
        log.info("wrote %s", path)
        results.append(FigureResult(key, path))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding processed/ (default: %(default)s)")
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR,
                        help="folder of train/val/test.txt (default: %(default)s)")
    parser.add_argument("--patient", default=None, metavar="ID", help="patient id (default: the first test patient)")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index", metavar="Z",
                        help="axial slice index z (default: the slice with the most structures)")
    parser.add_argument("--run", type=Path, default=None, dest="run_dir", metavar="DIR",
                        help="training run folder (history + evaluation/) for the training figures")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="figure folder (default: %(default)s)")
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI, help="resolution (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not 20 <= args.dpi <= 600:
        parser.error(f"--dpi must be in 20-600, got {args.dpi}")
    if args.run_dir is not None and not args.run_dir.is_dir():
        parser.error(f"--run {args.run_dir}: no such folder")
    results = run_from_command_line(parser, run, data_root=args.data_root, splits_dir=args.splits_dir,
                                    output=args.output, patient=args.patient, slice_index=args.slice_index,
                                    run_dir=args.run_dir, dpi=args.dpi)
    written = [r for r in results if r.path is not None]
    failed = [r.name for r in results if r.path is None]
    print(f"Figures: {len(written)} written to {args.output}, {len(failed)} not written"
          + (f" ({', '.join(FIGURES[n] for n in failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
