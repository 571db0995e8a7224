"""The patients prediction segments: finding them under an input path (a DICOM tree or a CT NIfTI),
reading each CT on its own stored grid (with what an RTSTRUCT must reference), and writing its
outputs (label map, PTV, RTSTRUCT, volumes, quality check, overlay, provenance) atomically beside each other.
"""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk

from thoracic_seg import organs, qa
from thoracic_seg.batch import (
    PatientError, check_same_geometry, file_sha256, nifti_stem, safe_patient_id, write_nifti,
    write_text_atomic,
)
from thoracic_seg.dicom_ct import PatientDicom, choose_ct_series, find_dicom_series, read_ct_series
from thoracic_seg.figures import write_overlay_png
from thoracic_seg.grid import NETWORK_ORIENTATION, orientation_code, to_network_array
from thoracic_seg.inference import Predictor, stage_timer
from thoracic_seg.postprocess import describe_postprocess
from thoracic_seg.rtstruct_write import ROI_MEMBERS, CTReference, build_rtstruct, roi_summary, write_rtstruct

NIFTI_SUFFIXES = (".nii.gz", ".nii")


OUTPUT_SUFFIXES = {
    "labels": "_labels.nii.gz",
    "ptv": "_PTV.nii.gz",
    "rtstruct": "_RTSTRUCT.dcm",
    "volumes": "_volumes.csv",
    "qa": "_qa.csv",  # the quality check of each structure (thoracic_seg/qa.py)
    "overlay": "_overlay.png",
    "provenance": "_provenance.json",  # written last: what made the others (prediction_provenance)
}


#: Bumped when the outputs of the same inputs and settings change: outputs of another format are redone.
PREDICTION_FORMAT = 1
#: Bumped when the RTSTRUCT of the same inputs and settings changes (recorded by prediction only, not by
#: evaluation, which writes none). 2: ROIs marked as automatic (``zGTV^Auto``..., a description each).
RTSTRUCT_FORMAT = 2
#: Hex digits of a checkpoint's SHA-256 named in each ROI's description (the provenance has them all).
SHA256_SHOWN = 12


#: ``qa``: ``ok`` or the quality check's flag codes (``qa.volumes_qa_column``; the reasons are in ``_qa.csv``).
VOLUME_COLUMNS = ("patient_id", "label", "structure", "rtstruct_name", "labels", "voxels", "volume_ml", "qa")


#: Stages of one patient, timed in ``PatientResult.info["seconds"]`` (and by the benchmark).
STAGES = ("read", "preprocess", "predict", "map_back", "postprocess", "qa", "rtstruct", "write")


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

    ``FileNotFoundError``: no such path. ``ValueError``: a file that is not NIfTI, or a folder without
    any CT image series (the message lists what was found instead).
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


def output_paths(output_dir: Path, patient_id: str, dicom: bool) -> dict[str, Path]:
    """The files written for one patient (no RTSTRUCT for a NIfTI input)."""
    return {kind: Path(output_dir) / f"{patient_id}{suffix}" for kind, suffix in OUTPUT_SUFFIXES.items()
            if dicom or kind != "rtstruct"}


def structure_volumes(labels_zyx: np.ndarray, spacing_zyx: Sequence[float], ptv_zyx: np.ndarray | None = None,
                      ptv_text: str = "", rtstruct_labels: Sequence[int] = organs.FOREGROUND_LABELS,
                      ) -> list[dict[str, Any]]:
    """One row per structure 1-7 as written to the RTSTRUCT: its ROI name (empty for a structure not in
    ``rtstruct_labels``, the ``--structures`` chosen), voxels, ml.

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
        name = organs.automatic_roi_name(label) if label in rtstruct_labels else ""
        rows.append({"label": label, "structure": organs.structure(label).key, "rtstruct_name": name,
                     "labels": described, "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3)})
    return rows


def volumes_csv_text(patient_id: str, rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({"patient_id": patient_id, **row})
    return buffer.getvalue()


def labels_image(labels_zyx: np.ndarray, ct: sitk.Image) -> sitk.Image:
    """The label map as a SimpleITK uint8 image carrying the CT's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels_zyx, dtype=np.uint8))
    image.CopyInformation(ct)
    return image


def model_description(predictor: Predictor, checkpoints_sha256: Sequence[str] = ()) -> str:
    """What made the automatic contours, for each ROI's description: ``U-Net best.pth (sha256
    1a2b3c4d5e6f)``, ``+ 2 more (ensemble)`` for several checkpoints; the hash (its first
    :data:`SHA256_SHOWN` hex digits, as in the provenance record) only when given."""
    digest = f" (sha256 {checkpoints_sha256[0][:SHA256_SHOWN]})" if checkpoints_sha256 else ""
    more = len(predictor.checkpoint_paths) - 1
    return f"U-Net {predictor.checkpoint_path.name}{digest}" + (f" + {more} more (ensemble)" if more > 0 else "")


def write_outputs(ct: LoadedCT, hu_zyx: np.ndarray, labels_zyx: np.ndarray, outputs: dict[str, Path],
                  predictor: Predictor, seconds: dict[str, float] | None = None, *,
                  structures: Sequence[int] = organs.FOREGROUND_LABELS, model: str | None = None,
                  labels_before: np.ndarray | None = None, probabilities: np.ndarray | None = None) -> dict[str, Any]:
    """Write one patient's outputs for HU and a label map (Z, Y, X) on ``ct``'s own stored grid.

    Makes the PTV (:meth:`Predictor.ptv_mask`), checks every structure (``qa.check``, timed as ``qa``:
    ``labels_before`` post-processing (uint8 (Z, Y, X); None: none ran) and the class ``probabilities``
    (Z, 8, Y, X) on the same grid, None: no confidence check; the checkpoint's training volumes), builds
    the RTSTRUCT of ``structures`` (labels) for a DICOM ``ct`` (timed as ``rtstruct``; the PTV an
    overlapping ROI; every ROI marked automatic, described with ``model`` (default :func:`model_description`
    without hash) and its QA verdict), then writes label map and PTV mask (all structures; stored grid and
    geometry), RTSTRUCT, volumes CSV (with the ``qa`` column), QA CSV and overlay (network orientation, the
    flagged structures named; timed as ``write``).
    Returns ``{"volumes": rows, "rois": {ROI name: contours}, "qa": {label: qa.StructureQA}}``.
    """
    seconds = seconds if seconds is not None else {}
    rtstruct = None
    spacing_zyx = ct.image.GetSpacing()[::-1]
    with stage_timer(seconds, "rtstruct"):
        ptv = predictor.ptv_mask(labels_zyx, spacing_zyx)
    with stage_timer(seconds, "qa"):
        checked = qa.check(labels_zyx, spacing_zyx, orientation=ct.orientation, labels_before=labels_before,
                           probabilities=probabilities, training_volumes=predictor.training_volumes,
                           ptv_mask=ptv if predictor.ptv_margin_mm is not None else None)
    with stage_timer(seconds, "rtstruct"):
        if ct.reference is not None:
            rtstruct = build_rtstruct(labels_zyx, ct.reference, labels=structures, overlapping={organs.PTV: ptv},
                                      model=model if model is not None else model_description(predictor),
                                      verdicts={label: r.verdict for label, r in checked.items()},
                                      ptv_margin_mm=predictor.ptv_margin_mm)
    with stage_timer(seconds, "write"):
        for key, array in (("labels", labels_zyx), ("ptv", ptv.astype(np.uint8))):
            image = labels_image(array, ct.image)
            check_same_geometry(image, ct.image, f"{ct.patient_id}: {key} vs CT")
            write_nifti(image, outputs[key])
        if rtstruct is not None:
            write_rtstruct(rtstruct, outputs["rtstruct"])
        volumes = [{**row, "qa": qa.volumes_qa_column(checked[row["label"]])}
                   for row in structure_volumes(labels_zyx, spacing_zyx, ptv, predictor.ptv_text, structures)]
        write_text_atomic(outputs["volumes"], volumes_csv_text(ct.patient_id, volumes))
        write_text_atomic(outputs["qa"], qa.qa_csv_text(ct.patient_id, checked))
        write_overlay_png(*(to_network_array(a, ct.orientation) for a in (hu_zyx, labels_zyx)), outputs["overlay"],
                          f"{ct.patient_id}: {predictor.checkpoint_path.name}", predictor.window,
                          to_network_array(ptv, ct.orientation),
                          flagged={label: r.codes for label, r in checked.items() if r.flagged})
    return {"volumes": volumes, "rois": roi_summary(rtstruct) if rtstruct is not None else {}, "qa": checked}


def read_provenance(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def prediction_provenance(predictor: Predictor, structures: Sequence[int] | None = None) -> dict[str, Any]:
    """What decides a patient's outputs besides its CT: the checkpoints' bytes (sha256), their
    preprocessing, slice context and PTV, post-processing, precision and the output format; with
    ``structures`` (labels: prediction's ``--structures``), the RTSTRUCT's format, structures and ROI
    names under ``"rtstruct"`` and the quality check's format and thresholds under ``"qa"``. Evaluation
    records it without them (its label maps are the same)."""
    paths = predictor.checkpoint_paths or (predictor.checkpoint_path,)
    return {"format": PREDICTION_FORMAT, "checkpoints_sha256": [file_sha256(p) for p in paths],
            "window": list(predictor.window), "size": predictor.size, "crop": predictor.crop,
            "context_slices": predictor.context_slices, "ptv": predictor.ptv,
            "postprocess_rule": describe_postprocess() if predictor.postprocess else None,
            "precision": predictor.precision.name,
            **({} if structures is None else {"rtstruct": {
                "format": RTSTRUCT_FORMAT, "structures": [organs.structure(label).key for label in structures],
                "roi_names": [organs.automatic_roi_name(label) for label in structures]},
                "qa": {"format": qa.QA_FORMAT, "thresholds": dict(qa.QA_THRESHOLDS)}})}
