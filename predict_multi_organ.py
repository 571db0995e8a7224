"""Phase 6: segment new patients: CT (DICOM or NIfTI) in, label map + RTSTRUCT + volumes + overlay out.

``--input`` (a patient's DICOM folder at any nesting, a folder of patient folders, or a CT NIfTI
file) -> ``--output DIR``: ``<PatientID>_labels.nii.gz`` (uint8 labels 0-7 on the CT's own grid),
``_PTV.nii.gz`` (uint8 0/1, overlapping the organs), ``_RTSTRUCT.dcm`` (DICOM input only; the PTV its
own ROI, overlapping the lungs as real contours do), ``_volumes.csv`` (ml) and ``_overlay.png``.

    python predict_multi_organ.py --input DICOM_DIR --checkpoint best_unet_multi_organ.pth --output OUT

DICOM is read as phase 2 reads it (``thoracic_seg/dicom_ct.py``); each CT is segmented by the one
inference path evaluation also uses (``image_grid.segment_image``: orientation, the checkpoint's
preprocessing, back to the stored grid), and the PTV is made as the checkpoint says
(:meth:`Predictor.ptv_mask`). float32 by default; ``--precision auto`` is faster, and
``thoracic_seg/precision.py`` says why it is not the default.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

from thoracic_seg import organs
from thoracic_seg.batch import (
    DONE, SKIPPED, PatientError, PatientResult, atomic_output, check_same_geometry, check_writable,
    exit_status, file_sha256, nifti_stem, positive_int, run_batch, run_from_command_line, safe_patient_id,
    setup_logging, summary_line, write_nifti, write_text_atomic,
)
from thoracic_seg.dicom_ct import PatientDicom, choose_ct_series, find_dicom_series, read_ct_series
from thoracic_seg.grid import NETWORK_ORIENTATION, orientation_code, to_network_array
from thoracic_seg.image_grid import segment_image
from thoracic_seg.inference import Predictor, stage_timer
from thoracic_seg.postprocess import describe_postprocess
from thoracic_seg.precision import DEFAULT_PREDICTION_PRECISION, PREDICTION_PRECISIONS
from thoracic_seg.rtstruct_write import ROI_MEMBERS, CTReference, build_rtstruct, roi_summary, write_rtstruct

log = logging.getLogger(__name__)

PHASE = "Predict"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIXES = {
    "labels": "_labels.nii.gz",
    "ptv": "_PTV.nii.gz",
    "rtstruct": "_RTSTRUCT.dcm",
    "volumes": "_volumes.csv",
    "overlay": "_overlay.png",
    "provenance": "_provenance.json",  # written last: what made the others (prediction_provenance)
}
#: Bumped when the outputs of the same inputs and settings change: outputs of another format are redone.
PREDICTION_FORMAT = 1
VOLUME_COLUMNS = ("patient_id", "label", "structure", "rtstruct_name", "labels", "voxels", "volume_ml")
#: Stages of one patient, timed in ``PatientResult.info["seconds"]`` (and by the benchmark).
STAGES = ("read", "preprocess", "predict", "map_back", "postprocess", "rtstruct", "write")
_MONTAGE_TILES = 12


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One patient to segment: a phase-2 DICOM patient or a CT NIfTI file."""

    patient_id: str
    dicom: PatientDicom | None = None
    nifti: Path | None = None


@dataclass
class LoadedCT:
    """A CT ready to segment: int16/float HU image on its own stored grid (phase 2's for DICOM, the
    file's for NIfTI) and, for DICOM, what the RTSTRUCT references. ``orientation`` is its stored
    orientation code (``RPI`` for a feet-first supine series): the network sees it in
    ``NETWORK_ORIENTATION`` and the outputs are written back on the stored grid."""

    patient_id: str
    image: sitk.Image
    reference: CTReference | None = None
    notes: list[str] = field(default_factory=list)
    orientation: str = NETWORK_ORIENTATION


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_cases(input_path: Path | str) -> list[Case]:
    """The patients under ``input_path``: one NIfTI file, or every patient of a DICOM folder tree.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a file that is not NIfTI, or a folder holding no CT image series at all
            (the message lists what was found instead).
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} not found")
    if path.is_file():
        if not is_nifti(path):
            raise ValueError(f"input file {path} is not a NIfTI CT (.nii/.nii.gz); give a DICOM folder instead")
        return [Case(safe_patient_id(nifti_stem(path), "patient"), nifti=path)]
    patients = find_dicom_series(path)
    if not any(p.ct_series for p in patients):
        found = sum((p.ignored for p in patients), start=Counter())
        what = ", ".join(f"{n} {m}" for m, n in sorted(found.items())) or "no DICOM files"
        raise ValueError(f"no CT image series under {path} (found: {what})")
    ids = [p.patient_id for p in patients]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"several patients under {path} would share the output name(s) {duplicated}; "
                         "give them distinct PatientIDs or segment them separately")
    return [Case(p.patient_id, dicom=p) for p in patients]


def read_case(case: Case) -> LoadedCT:
    """Read one case's CT on its own stored grid (phase 2 for DICOM: gantry tilt, gaps... raise
    :class:`PatientError`; an oblique NIfTI too) and note its orientation when it is not the network's."""
    if case.nifti is not None:
        image = sitk.ReadImage(str(case.nifti))
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise PatientError(f"{case.patient_id}: {case.nifti} is not a 3D single-channel CT "
                               f"({image.GetDimension()}D, {image.GetNumberOfComponentsPerPixel()} components)")
        loaded, where = LoadedCT(case.patient_id, image), case.nifti
    elif case.dicom is not None:
        loaded, where = _read_dicom_case(case), case.patient_id
    else:
        raise ValueError(f"{case.patient_id}: a case needs a DICOM patient or a NIfTI file")
    try:
        loaded.orientation = orientation_code(loaded.image)
    except ValueError as exc:
        raise PatientError(f"{case.patient_id}: {where}: {exc}") from None
    if loaded.orientation != NETWORK_ORIENTATION:
        loaded.notes.append(f"stored {loaded.orientation}, predicted in {NETWORK_ORIENTATION}")
    return loaded


def _read_dicom_case(case: Case) -> LoadedCT:
    series, choice = choose_ct_series(case.dicom)
    try:
        ct = read_ct_series(series.files)
    except PatientError as exc:
        hint = ("; to segment it anyway, convert it with convert_dicom_to_nifti.py --fill-gaps and give the "
                "NIfTI as --input (no RTSTRUCT then: it can only reference slices that exist)"
                if "fill-gaps" in str(exc) else "")
        raise PatientError(f"{case.patient_id}: CT rejected: {exc}{hint}") from None
    first = next(s.path for s in ct.slices if s.path is not None)
    header = pydicom.dcmread(first, stop_before_pixels=True)
    try:
        reference = CTReference.from_image(
            ct.image, header, [s.sop_instance_uid for s in ct.slices], [s.position_lps for s in ct.slices]
        )
    except ValueError as exc:
        raise PatientError(f"{case.patient_id}: {series.folder}: {exc}") from None
    return LoadedCT(case.patient_id, ct.image, reference, [n for n in [choice, *ct.notes] if n])


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def output_paths(output_dir: Path, patient_id: str, dicom: bool) -> dict[str, Path]:
    """The files written for one patient (no RTSTRUCT for a NIfTI input)."""
    return {kind: Path(output_dir) / f"{patient_id}{suffix}" for kind, suffix in OUTPUT_SUFFIXES.items()
            if dicom or kind != "rtstruct"}


def structure_volumes(labels_zyx: np.ndarray, spacing_zyx: Sequence[float], ptv_zyx: np.ndarray | None = None,
                      ptv_text: str = "") -> list[dict[str, Any]]:
    """One row per structure 1-7 as written to the RTSTRUCT: voxels, ml.

    The PTV row counts ``ptv_zyx`` (bool, the overlapping PTV mask; ``labels`` column ``ptv_text``,
    e.g. ``GTV + 10 mm``); without it, labels GTV + PTV, and a GTV alone makes no PTV.
    """
    counts = np.bincount(np.asarray(labels_zyx).ravel(), minlength=organs.NUM_CLASSES)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    rows = []
    for label in organs.FOREGROUND_LABELS:
        members = ROI_MEMBERS[label]
        described = "+".join(map(str, members))
        if label == organs.PTV and ptv_zyx is not None:
            voxels, described = int(np.count_nonzero(ptv_zyx)), ptv_text or described
        else:
            voxels = int(sum(counts[m] for m in members)) if counts[label] else 0  # no PTV without PTV voxels
        struct = organs.structure(label)
        rows.append({"label": label, "structure": struct.key, "rtstruct_name": struct.rtstruct_name,
                     "labels": described, "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3)})
    return rows


def volumes_csv_text(patient_id: str, rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"patient_id": patient_id, **row})
    return buffer.getvalue()


def montage_slices(labels_zyx: np.ndarray, count: int = _MONTAGE_TILES) -> list[int]:
    """``count`` slice indices spread evenly over the slices holding any structure (all slices if none)."""
    occupied = np.flatnonzero(labels_zyx.reshape(len(labels_zyx), -1).any(axis=1))
    lo, hi = (occupied[0], occupied[-1]) if len(occupied) else (0, len(labels_zyx) - 1)
    return sorted(set(np.linspace(lo, hi, min(count, hi - lo + 1)).round().astype(int).tolist()))


def write_overlay_png(hu_zyx: np.ndarray, labels_zyx: np.ndarray, path: Path, title: str,
                      window: Sequence[float] = (-1000, 400), ptv_zyx: np.ndarray | None = None) -> None:
    """A montage of axial slices: CT in grey (``window`` HU), structures filled in their ``organs``
    colours; ``ptv_zyx`` (bool, overlapping the organs) drawn as a 1-pixel outline in the PTV colour."""
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
    handles = [Patch(facecolor="none" if lb in outlined else organs.structure(lb).color_float,
                     edgecolor=organs.structure(lb).color_float, linewidth=1.5,
                     label=organs.structure(lb).name + (" (outline)" if lb in outlined else ""))
               for lb in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 0.97))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def labels_image(labels_zyx: np.ndarray, ct: sitk.Image) -> sitk.Image:
    """The label map as a SimpleITK uint8 image carrying the CT's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels_zyx, dtype=np.uint8))
    image.CopyInformation(ct)
    return image


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------
def write_outputs(ct: LoadedCT, hu_zyx: np.ndarray, labels_zyx: np.ndarray, outputs: dict[str, Path],
                  predictor: Predictor, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Write one patient's outputs for HU and a label map (Z, Y, X) on ``ct``'s own stored grid.

    Makes the PTV (:meth:`Predictor.ptv_mask`), builds the RTSTRUCT when ``ct`` came from DICOM
    (timed as ``rtstruct``; the PTV an overlapping ROI), then writes the label map and the PTV mask
    (on the CT's stored grid and geometry), RTSTRUCT, volumes CSV and overlay (drawn in the
    network's orientation, patient right on image left, whatever the stored order; timed as
    ``write``). Returns ``{"volumes": rows, "rois": {ROI name: contours}}``.
    """
    seconds = seconds if seconds is not None else {}
    rtstruct = None
    spacing_zyx = ct.image.GetSpacing()[::-1]
    with stage_timer(seconds, "rtstruct"):
        ptv = predictor.ptv_mask(labels_zyx, spacing_zyx)
        if ct.reference is not None:
            rtstruct = build_rtstruct(labels_zyx, ct.reference, overlapping={organs.PTV: ptv},
                                      algorithm_name=f"U-Net {predictor.checkpoint_path.name}")
    with stage_timer(seconds, "write"):
        for key, array in (("labels", labels_zyx), ("ptv", ptv.astype(np.uint8))):
            image = labels_image(array, ct.image)
            check_same_geometry(image, ct.image, f"{ct.patient_id}: {key} vs CT")
            write_nifti(image, outputs[key])
        if rtstruct is not None:
            write_rtstruct(rtstruct, outputs["rtstruct"])
        volumes = structure_volumes(labels_zyx, spacing_zyx, ptv, predictor.ptv_text)
        write_text_atomic(outputs["volumes"], volumes_csv_text(ct.patient_id, volumes))
        write_overlay_png(*(to_network_array(a, ct.orientation) for a in (hu_zyx, labels_zyx)), outputs["overlay"],
                          f"{ct.patient_id}: {predictor.checkpoint_path.name}", predictor.window,
                          to_network_array(ptv, ct.orientation))
    return {"volumes": volumes, "rois": roi_summary(rtstruct) if rtstruct is not None else {}}


def prediction_provenance(predictor: Predictor) -> dict[str, Any]:
    """What decides a patient's outputs besides its CT: the checkpoints' bytes (sha256), their
    preprocessing, slice context and PTV, post-processing, precision and the output format."""
    paths = predictor.checkpoint_paths or (predictor.checkpoint_path,)
    return {"format": PREDICTION_FORMAT, "checkpoints_sha256": [file_sha256(p) for p in paths],
            "window": list(predictor.window), "size": predictor.size, "crop": predictor.crop,
            "context_slices": predictor.context_slices, "ptv": predictor.ptv,
            "postprocess_rule": describe_postprocess() if predictor.postprocess else None,
            "precision": predictor.precision.name}


def _read_provenance(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def predict_case(case: Case, predictor: Predictor, output_dir: Path, overwrite: bool = False,
                 provenance: dict[str, Any] | None = None) -> PatientResult:
    """Segment one patient and write its outputs; the batch task. Outputs that exist are kept
    when their provenance record equals ``provenance`` (:func:`prediction_provenance`), else redone.

    ``info["seconds"]`` holds the time of each stage of :data:`STAGES`, ``info["outputs"]`` the
    paths, ``info["volumes"]`` the rows of the volumes CSV and ``info["rois"]`` the contours per
    ROI. Raises :class:`PatientError` for a CT that phase 2 rejects.
    """
    outputs = output_paths(output_dir, case.patient_id, dicom=case.dicom is not None)
    redone = ""
    if not overwrite and all(p.is_file() for p in outputs.values()):
        if _read_provenance(outputs["provenance"]) == provenance:
            return PatientResult(case.patient_id, SKIPPED, "outputs exist (use --overwrite to redo)",
                                 {"outputs": outputs})
        redone = "redone: the outputs there were made with another checkpoint or settings"
    seconds: dict[str, float] = {}
    with stage_timer(seconds, "read"):
        ct = read_case(case)
        hu = sitk.GetArrayFromImage(ct.image)
    try:
        labels = segment_image(predictor, ct.image, seconds)
    except ValueError as exc:  # e.g. a constant volume cannot be z-scored
        raise PatientError(f"{case.patient_id}: {exc}") from None
    written = write_outputs(ct, hu, labels, outputs, predictor, seconds)
    write_text_atomic(outputs["provenance"], json.dumps(provenance, indent=2) + "\n")
    found = [f"{r['rtstruct_name']} {r['volume_ml']:.1f} ml" for r in written["volumes"] if r["voxels"]]
    message = "; ".join([redone] * bool(redone) + ct.notes + [", ".join(found) or "no structure found"])
    return PatientResult(case.patient_id, DONE, message, {"seconds": seconds, "outputs": outputs, **written})


# --------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------
def run(
    *,
    input_path: Path | str,
    checkpoint: Path | str | Sequence[Path | str],
    output_dir: Path | str,
    device: str = "auto",
    precision: str = DEFAULT_PREDICTION_PRECISION,
    batch_size: int | None = None,
    postprocess: bool = False,
    overwrite: bool = False,
    ptv_margin_mm: float | None = None,
    context_slices: int | None = None,
) -> list[PatientResult]:
    """Segment every patient under ``input_path`` with ``checkpoint`` (several: an ensemble, their
    probabilities averaged); write into ``output_dir``.
    ``ptv_margin_mm`` overrides the run's PTV margin (see :meth:`Predictor.load`).

    Patients are processed one after another (one tqdm bar); a patient whose CT is rejected is
    reported as failed and the others go on.

    Raises:
        FileNotFoundError: missing input or checkpoint.
        CheckpointError: a checkpoint that is not ours or does not fit (see :meth:`Predictor.load`).
        ValueError: an input without any CT series, an unknown device or precision.
        PermissionError: an output folder that cannot be written.
    """
    cases = find_cases(input_path)
    predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size,
                               postprocess=postprocess, ptv_margin_mm=ptv_margin_mm, context_slices=context_slices)
    output_dir = Path(output_dir)
    check_writable(output_dir)
    log.info("%s: %d patient(s) from %s with %s", PHASE, len(cases), input_path, predictor.describe())
    task = functools.partial(predict_case, predictor=predictor, output_dir=output_dir, overwrite=overwrite,
                             provenance=prediction_provenance(predictor))
    return run_batch(cases, task, workers=1, desc=PHASE, patient_id_of=lambda c: c.patient_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True,
                        help="a patient's DICOM folder (any nesting), a folder of patient folders, or a CT NIfTI file")
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True, metavar="PTH",
                        help="best_unet_multi_organ.pth of train_multi_organ.py; several: an ensemble "
                             "(probabilities averaged; same preprocessing required)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the per-patient outputs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when available (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="slices per forward pass (default: chosen from free memory)")
    parser.add_argument("--precision", choices=PREDICTION_PRECISIONS, default=DEFAULT_PREDICTION_PRECISION,
                        help="auto = bfloat16 + channels-last where the CPU/GPU runs it natively, "
                             "2.6x faster on CPU, labels not always identical (default: %(default)s)")
    parser.add_argument("--postprocess", action="store_true",
                        help="remove small components per structure, as the evaluation's --postprocess "
                             f"({describe_postprocess().replace('%', '%%')})")
    parser.add_argument("--ptv-margin-mm", type=float, default=None, metavar="MM",
                        help="grow the predicted GTV by MM mm into the PTV (default: the training run's "
                             "margin, stored in the checkpoint)")
    parser.add_argument("--context-slices", type=int, default=None, metavar="K",
                        help="neighbours per side the network sees (default: the checkpoint's; another value is refused)")
    parser.add_argument("--overwrite", action="store_true", help="redo patients whose outputs exist")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    results = run_from_command_line(
        parser, run, errors=(FileNotFoundError, PermissionError, ValueError), input_path=args.input,
        checkpoint=args.checkpoint, output_dir=args.output, device=args.device, precision=args.precision,
        batch_size=args.batch_size, postprocess=args.postprocess, overwrite=args.overwrite,
        ptv_margin_mm=args.ptv_margin_mm, context_slices=args.context_slices)
    for result in results:
        if result.status == DONE:
            stages = ", ".join(f"{s} {result.info['seconds'][s]:.1f}" for s in STAGES if s in result.info["seconds"])
            log.info("%s: %.1f s (%s)", result.patient_id, sum(result.info["seconds"].values()), stages)
    log.info("%s", summary_line(PHASE, results, done_word="segmented"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
