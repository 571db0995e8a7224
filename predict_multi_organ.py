"""Phase 6: segment new patients: CT (DICOM or NIfTI) in, label map + RTSTRUCT + volumes + overlay out.

``--input`` (a patient's DICOM folder at any nesting, a folder of patient folders, or a CT NIfTI
file) -> ``--output DIR``: ``<PatientID>_labels.nii.gz`` (uint8 labels 0-7 on the CT's own grid),
``_PTV.nii.gz`` (uint8 0/1, overlapping the organs), ``_RTSTRUCT.dcm`` (DICOM input only; the ``--structures``
chosen, marked automatic (``zGTV^Auto``...: docs/review.md); the PTV its own ROI, overlapping the lungs as
real contours do; each ROI's description holds its quality check's verdict), ``_volumes.csv`` (ml, ``qa``),
``_qa.csv`` (the quality check of each structure, ``thoracic_seg/qa.py``), ``_overlay.png`` and ``_provenance.json``.

    python predict_multi_organ.py --input DICOM_DIR --checkpoint best_unet_multi_organ.pth --output OUT

DICOM is read as phase 2 reads it (``thoracic_seg/dicom_ct.py``); each CT is segmented by the one
inference path evaluation also uses (``image_grid.segment_image``: orientation, the checkpoint's
preprocessing, back to the stored grid), and the PTV is made as the checkpoint says
(:meth:`Predictor.ptv_mask`). float32 by default; ``--precision auto`` is faster, and
``thoracic_seg/precision.py`` says why it is not the default.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from thoracic_seg import organs
from thoracic_seg.batch import (
    DONE, SKIPPED, PatientError, PatientResult, check_writable, exit_status, positive_int, run_batch,
    run_from_command_line, setup_logging, summary_line, write_text_atomic,
)
from thoracic_seg.cases import (
    STAGES, Case, find_cases, model_description, output_paths, prediction_provenance, read_case, read_provenance,
    write_outputs,
)
from thoracic_seg.image_grid import segment_image
from thoracic_seg.inference import Predictor, stage_timer
from thoracic_seg.postprocess import describe_postprocess
from thoracic_seg.precision import DEFAULT_PREDICTION_PRECISION, PREDICTION_PRECISIONS
from thoracic_seg.qa import summary as qa_summary

log = logging.getLogger(__name__)

PHASE = "Predict"


# ---- Inputs ----------------------------------------------------------------------------------


# ---- Outputs ---------------------------------------------------------------------------------


# ---- One patient -----------------------------------------------------------------------------


def predict_case(case: Case, predictor: Predictor, output_dir: Path, overwrite: bool = False,
                 provenance: dict[str, Any] | None = None,
                 structures: Sequence[int] = organs.FOREGROUND_LABELS) -> PatientResult:
    """Segment one patient and write its outputs, the RTSTRUCT with the labels ``structures``; the batch
    task. Outputs that exist are kept when their provenance record equals ``provenance``
    (:func:`prediction_provenance` of the same ``structures``), else redone.

    ``info["seconds"]`` holds the time of each stage of :data:`STAGES`, ``info["outputs"]`` the
    paths, ``info["volumes"]`` the rows of the volumes CSV, ``info["rois"]`` the contours per
    ROI and ``info["qa"]`` the quality check per label (``qa.StructureQA``; one log line names the
    flagged structures). Raises :class:`PatientError` for a CT that phase 2 rejects.
    """
    outputs = output_paths(output_dir, case.patient_id, dicom=case.dicom is not None)
    redone = ""
    if not overwrite and all(p.is_file() for p in outputs.values()):
        if read_provenance(outputs["provenance"]) == provenance:
            return PatientResult(case.patient_id, SKIPPED, "outputs exist (use --overwrite to redo)",
                                 {"outputs": outputs})
        redone = "redone: the outputs there were made with another checkpoint or settings"
    seconds: dict[str, float] = {}
    with stage_timer(seconds, "read"):
        ct = read_case(case)
        hu = sitk.GetArrayFromImage(ct.image)
    # for the quality check: class probabilities (float16: 16 bytes a voxel) and the labels before post-processing
    probabilities = np.empty((hu.shape[0], organs.NUM_CLASSES, *hu.shape[1:]), np.float16)
    before = np.empty(hu.shape, np.uint8)
    try:
        labels = segment_image(predictor, ct.image, seconds, probabilities, before)
    except ValueError as exc:  # e.g. a constant volume cannot be z-scored
        raise PatientError(f"{case.patient_id}: {exc}") from None
    model = model_description(predictor, (provenance or {}).get("checkpoints_sha256", ()))
    written = write_outputs(ct, hu, labels, outputs, predictor, seconds, structures=structures, model=model,
                            labels_before=before if predictor.postprocess else None, probabilities=probabilities)
    del probabilities
    if any(r.flagged for r in written["qa"].values()):
        log.warning("%s", qa_summary(case.patient_id, written["qa"]))
    else:
        log.info("%s", qa_summary(case.patient_id, written["qa"]))
    write_text_atomic(outputs["provenance"], json.dumps(provenance, indent=2) + "\n")
    found = [f"{r['structure']} {r['volume_ml']:.1f} ml" for r in written["volumes"] if r["voxels"]]
    message = "; ".join([redone] * bool(redone) + ct.notes + [", ".join(found) or "no structure found"])
    return PatientResult(case.patient_id, DONE, message, {"seconds": seconds, "outputs": outputs, **written})


# ---- Batch -----------------------------------------------------------------------------------
def run(
    *, input_path: Path | str, checkpoint: Path | str | Sequence[Path | str], output_dir: Path | str,
    device: str = "auto", precision: str = DEFAULT_PREDICTION_PRECISION, batch_size: int | None = None,
    postprocess: bool = False, overwrite: bool = False, ptv_margin_mm: float | None = None,
    context_slices: int | None = None, structures: Sequence[str] | None = None,
) -> list[PatientResult]:
    """Segment every patient under ``input_path`` with ``checkpoint`` (several: an averaging ensemble) into
    ``output_dir``; ``ptv_margin_mm`` overrides the run's PTV margin (:meth:`Predictor.load`); ``structures``
    (keys or names, ``organs.select_structures``; None: all seven) go into the RTSTRUCT. One patient
    after another (one tqdm bar); a rejected CT is reported as failed and the others go on.

    Raises:
        FileNotFoundError: missing input or checkpoint.
        CheckpointError: a checkpoint that is not ours or does not fit (see :meth:`Predictor.load`).
        ValueError: an input without any CT series, an unknown device, precision or structure.
        PermissionError: an output folder that cannot be written.
    """
    chosen = organs.select_structures(structures)
    cases = find_cases(input_path)
    predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size,
                               postprocess=postprocess, ptv_margin_mm=ptv_margin_mm, context_slices=context_slices)
    output_dir = Path(output_dir)
    check_writable(output_dir)
    log.info("%s: %d patient(s) from %s with %s; RTSTRUCT ROIs: %s", PHASE, len(cases), input_path,
             predictor.describe(), ", ".join(map(organs.automatic_roi_name, chosen)))
    task = functools.partial(predict_case, predictor=predictor, output_dir=output_dir, overwrite=overwrite,
                             provenance=prediction_provenance(predictor, chosen), structures=chosen)
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
    parser.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                        help="structures to write into the RTSTRUCT, by key or name (default: all): "
                             f"{', '.join(s.key for s in organs.STRUCTURES[1:])}; the label map keeps all")
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
        ptv_margin_mm=args.ptv_margin_mm, context_slices=args.context_slices, structures=args.structures)
    for result in results:
        if result.status == DONE:
            stages = ", ".join(f"{s} {result.info['seconds'][s]:.1f}" for s in STAGES if s in result.info["seconds"])
            log.info("%s: %.1f s (%s)", result.patient_id, sum(result.info["seconds"].values()), stages)
    log.info("%s", summary_line(PHASE, results, done_word="segmented"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
