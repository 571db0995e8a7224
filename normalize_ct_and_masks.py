"""Phase 3: window, z-score and resize every CT and label map to SIZE x SIZE slices, and write a
memory-mappable training cache.

``processed/ct_nifti/`` + ``processed/masks_multi_organ/`` (+ each patient's ``<PatientID>.json``) ->
``processed/normalized_ct/`` (float32 NIfTI + ``normalization.json``),
``processed/normalized_masks/`` (uint8 NIfTI) and ``processed/training_cache/<PatientID>/``
(``ct.npy`` float16 (Z, S, S), ``mask.npy`` uint8 (Z, S, S), ``meta.json``).

    python normalize_ct_and_masks.py --data-root DATA [--window -1000 400] [--size 256] [--crop-body [--fov-mm]]

The network grid (orientation to LPS, window and z-score, crop, in-plane resize; z never
changes) is ``thoracic_seg/grid.py``; :func:`normalize_patient` applies it and records each step
and phase 2's grid in ``meta.json`` / ``normalization.json`` so labels can go back to the CT.
Orientation and fingerprints: docs/reliability.md; the crop: docs/training.md.
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
import torch

from thoracic_seg import organs
from thoracic_seg.batch import (
    DONE, SKIPPED, PatientError, PatientResult, add_common_arguments, atomic_output, check_same_geometry,
    exit_status, file_sha256, fingerprint, list_patients, read_nifti, remove_stale_partials, run_batch,
    run_from_command_line, setup_logging, summary_line, write_nifti, write_text_atomic,
)
from thoracic_seg.grid import (
    AIR_HU, CACHE_CT_DTYPE, DEFAULT_CROP_MARGIN_MM, DEFAULT_CROP_THRESHOLD_HU, DEFAULT_FOV_MM, DEFAULT_SIZE,
    DEFAULT_WINDOW, FOV_CROP_METHOD, NETWORK_ORIENTATION, apply_zscore, box_for_crop, check_size, check_window,
    crop_settings, crop_settings_of, crop_to_box, describe_crop, plain_number, resize_ct_slices,
    resize_mask_slices, window_and_zscore,
)
from thoracic_seg.image_grid import image_on_resized_grid, to_network_orientation
from thoracic_seg.layout import (
    CACHE_CT, CACHE_MASK, CACHE_META, DEFAULT_DATA_ROOT, NORMALIZATION_JSON, PROCESSED_FORMAT, DataLayout,
    read_mask_record, slice_label_bits,
)

log = logging.getLogger(__name__)


# ---- Training cache --------------------------------------------------------------------------


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _write_json(data: dict[str, Any], path: Path) -> None:
    """One top-level key per line, each value compact: readable, and diffs stay small."""
    lines = ",\n".join(f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in data.items())
    write_text_atomic(path, "{\n" + lines + "\n}\n")


# ---- One patient -----------------------------------------------------------------------------
def _outputs(layout: DataLayout, patient_id: str) -> dict[str, Path]:
    cache = layout.training_cache / patient_id
    return {
        "ct_nifti": layout.normalized_ct / f"{patient_id}.nii.gz",
        "mask_nifti": layout.normalized_masks / f"{patient_id}.nii.gz",
        "ct_npy": cache / CACHE_CT,
        "mask_npy": cache / CACHE_MASK,
        "meta": cache / CACHE_META,  # written last: its presence means the patient is complete
    }


def _normalization_record(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("window", "mean", "std", "size", "crop", "orientation", "original_shape_zyx", "original_spacing_xyz",
            "original_origin_xyz", "original_direction")
    return {k: meta.get(k) for k in keys}  # "crop" None: no crop (or a cache written before the option)


def _inputs_fingerprint(ct_path: Path, mask_path: Path, record: dict[str, Any]) -> str:
    """What phase 3 reads for a patient: the CT and label-map bytes and phase 2.5's decisions."""
    return fingerprint({"format": PROCESSED_FORMAT, "ct_nifti": file_sha256(ct_path),
                        "mask": file_sha256(mask_path), "annotated": record.get("annotated"),
                        "ptv": record.get("ptv")})


def _skip_or_why(out: dict[str, Path], fingerprint_now: str, window: tuple[float, float],
                 size: int, patient_id: str, crop: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str]:
    """(meta of up-to-date outputs, or None and why they are redone) when all outputs exist."""
    meta = json.loads(out["meta"].read_text(encoding="utf-8"))
    if meta.get("format") != PROCESSED_FORMAT:
        return None, "redone: its training cache was written by an earlier version"
    if not isinstance(meta.get("orientation"), dict):
        return None, "redone: its training cache was written by an earlier version (no orientation record)"
    if meta.get("inputs_fingerprint") != fingerprint_now:
        return None, "redone: its CT, label map or phase 2.5 record changed since it was normalised"
    wanted = {"window": [plain_number(v) for v in window], "size": size}
    if any(meta.get(key) != value for key, value in wanted.items()):
        raise PatientError(  # a cohort must never mix two preprocessings
            f"{patient_id}: outputs exist with window {meta.get('window')} and size "
            f"{meta.get('size')}, this run asks for window {wanted['window']} and size "
            f"{size}; pass --overwrite to redo them"
        )
    try:
        existing_crop = crop_settings_of(meta, f"{patient_id}: {out['meta']}")
    except ValueError as exc:
        return None, f"redone: {exc}"
    if existing_crop != crop:
        raise PatientError(
            f"{patient_id}: outputs exist with {describe_crop(existing_crop)}, this run asks for "
            f"{describe_crop(crop)}; pass --overwrite to redo them"
        )
    return meta, ""


def normalize_patient(
    patient_id: str, *, data_root: Path, window: tuple[float, float], size: int, overwrite: bool,
    torch_threads: int | None = None, crop: dict[str, Any] | None = None,
) -> PatientResult:
    """Phase 3 for one patient; returns its :class:`PatientResult` (``info["normalization"]``).

    ``crop`` (:func:`crop_settings`, None: off): after the z-score (whole windowed volume's statistics),
    slices are cropped to the square box of the settings (:func:`box_for_crop` on network-orientation HU:
    the body's box, or a fixed field of view centred on the body; air / background padding), then resized;
    the box is recorded as ``crop.box_yx`` and the NIfTIs carry its geometry.
    Annotated flags and the PTV's making come from phase 2.5's ``<PatientID>.json``. Without ``overwrite``,
    outputs are kept only when ``meta.json`` holds the current inputs' fingerprint (else redone, saying why).
    Inputs are checked before any write; ``meta.json`` is written last, so a patient is complete or redone.
    """
    if torch_threads:
        torch.set_num_threads(torch_threads)  # worker processes: one thread each, no oversubscription
    layout = DataLayout(Path(data_root))
    out = _outputs(layout, patient_id)
    ct_path = layout.ct_nifti / f"{patient_id}.nii.gz"
    mask_path = layout.masks / f"{patient_id}.nii.gz"
    if not ct_path.is_file():
        raise PatientError(f"{patient_id}: no CT NIfTI at {ct_path}; run convert_dicom_to_nifti.py")
    try:
        record = read_mask_record(mask_path)
    except (FileNotFoundError, ValueError) as exc:
        raise PatientError(f"{patient_id}: {exc}") from None
    annotated = record.get("annotated")
    if not isinstance(annotated, list) or len(annotated) != organs.NUM_CLASSES:
        raise PatientError(
            f"{patient_id}: {mask_path.name[:-7]}.json has annotated flags {annotated!r}, expected "
            f"{organs.NUM_CLASSES}; re-run extract_multi_organ_masks.py --overwrite for this patient"
        )
    fingerprint_now = _inputs_fingerprint(ct_path, mask_path, record)
    redo_reason = ""
    # A skipped patient writes nothing, so nothing else would clean what a killed run left here.
    for folder in {p.parent for p in out.values()}:
        remove_stale_partials(folder)
    if not overwrite and all(p.is_file() for p in out.values()):
        meta, redo_reason = _skip_or_why(out, fingerprint_now, window, size, patient_id, crop)
        if meta is not None:
            return PatientResult(patient_id, SKIPPED, "", {"normalization": _normalization_record(meta)})

    ct = read_nifti(ct_path)
    mask = read_nifti(mask_path)
    if ct.GetDimension() != 3:
        raise PatientError(f"{patient_id}: {ct_path} is {ct.GetDimension()}-D, expected a 3-D CT")
    check_same_geometry(ct, mask, f"{patient_id}: label map {mask_path} vs CT {ct_path}")
    try:
        ct_network, stored_orientation = to_network_orientation(ct)
    except ValueError as exc:
        raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
    mask_network, _ = to_network_orientation(mask)
    hu = sitk.GetArrayFromImage(ct_network)
    labels = sitk.GetArrayFromImage(mask_network)
    found = np.unique(labels)
    if found.min() < 0 or found.max() >= organs.NUM_CLASSES:
        raise PatientError(
            f"{patient_id}: {mask_path} holds label values {found.tolist()}, "
            f"expected 0-{organs.NUM_CLASSES - 1}"
        )
    box = crop_record = None
    if crop is not None:
        spacing_x, spacing_y = ct_network.GetSpacing()[:2]
        try:
            box = box_for_crop(hu, (spacing_y, spacing_x), crop)
        except ValueError as exc:
            raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
        crop_record = {**crop, "box_yx": list(box)}
    try:
        normalized, mean, std = window_and_zscore(hu, window)
    except ValueError as exc:
        raise PatientError(f"{patient_id}: {ct_path}: {exc}") from None
    del hu
    if box is not None:  # statistics above are of the whole volume; the crop comes after them
        air = float(apply_zscore(np.array([AIR_HU]), window, mean, std)[0])
        normalized = crop_to_box(normalized, box, fill=air)
        labels_in = crop_to_box(labels, box, fill=organs.BACKGROUND)
    else:
        labels_in = labels
    ct_small = resize_ct_slices(normalized, size)
    del normalized
    mask_small = resize_mask_slices(labels_in, size)

    ct_image = image_on_resized_grid(ct_small, ct_network, box)
    mask_image = image_on_resized_grid(mask_small, ct_network, box)
    check_same_geometry(ct_image, mask_image, f"{patient_id}: normalized label map vs CT")
    meta = {
        "format": PROCESSED_FORMAT,
        "patient_id": patient_id,
        "shape_zyx": list(ct_small.shape),
        "annotated": [bool(a) for a in annotated],
        "ptv": record.get("ptv", {}),
        "inputs_fingerprint": fingerprint_now,
        "window": [plain_number(v) for v in window],
        "mean": mean,
        "std": std,
        "size": size,
        "crop": crop_record,
        "orientation": {"stored": stored_orientation, "network": NETWORK_ORIENTATION},
        "original_shape_zyx": list(ct.GetSize()[::-1]),
        "original_spacing_xyz": list(ct.GetSpacing()),
        "original_origin_xyz": list(ct.GetOrigin()),
        "original_direction": list(ct.GetDirection()),
        "slice_labels": slice_label_bits(mask_small),
    }

    out["meta"].unlink(missing_ok=True)  # an interrupted overwrite must not look complete
    for folder in {p.parent for p in out.values()}:
        folder.mkdir(parents=True, exist_ok=True)
    write_nifti(ct_image, out["ct_nifti"])
    write_nifti(mask_image, out["mask_nifti"])
    _save_npy(ct_small.astype(CACHE_CT_DTYPE), out["ct_npy"])
    _save_npy(mask_small, out["mask_npy"])
    _write_json(meta, out["meta"])
    message = f"{labels.shape} -> {ct_small.shape}, mean {mean:.1f} HU, std {std:.1f} HU"
    if box is not None:
        kind = "field-of-view" if crop["method"] == FOV_CROP_METHOD else "body"
        message += f", {kind} box (y0, x0, side) {box}"
    if stored_orientation != NETWORK_ORIENTATION:
        message += f", stored {stored_orientation} -> {NETWORK_ORIENTATION}"
    if redo_reason:
        message = f"{redo_reason}; {message}"
    return PatientResult(patient_id, DONE, message, {"normalization": _normalization_record(meta)})


# ---- Batch -----------------------------------------------------------------------------------
def run(
    *, data_root: Path | str = DEFAULT_DATA_ROOT, patients: Sequence[str] | None = None, workers: int = 1,
    overwrite: bool = False, window: Sequence[float] = DEFAULT_WINDOW, size: int = DEFAULT_SIZE,
    crop_body: bool = False, crop_margin_mm: float = DEFAULT_CROP_MARGIN_MM, fov_mm: float | None = None,
) -> list[PatientResult]:
    """Normalize every patient of ``processed/ct_nifti`` (or ``patients``); update
    ``normalization.json`` with the records of the patients done or skipped.

    ``crop_body``: crop every slice before the resize to the body's square box widened by
    ``crop_margin_mm`` (mm) (``grid.body_box``), or with ``fov_mm`` to a square field of view of
    ``fov_mm`` mm centred on the body (``grid.fov_box``: the same mm per pixel for every patient,
    ``crop_margin_mm`` unused); off by default. ``ValueError``: ``fov_mm`` without ``crop_body``, or
    invalid crop settings."""
    window = check_window(window)
    size = check_size(size)
    if fov_mm is not None and not crop_body:
        raise ValueError(f"fov_mm={fov_mm!r} crops to a field of view on the body: it needs crop_body=True")
    crop = crop_settings(crop_margin_mm, fov_mm=fov_mm) if crop_body else None
    layout = DataLayout(Path(data_root))
    patient_ids = list(patients) if patients else list_patients(layout.ct_nifti)
    if not patient_ids:
        raise FileNotFoundError(f"no CT NIfTI (<PatientID>.nii.gz) in {layout.ct_nifti.resolve()}; "
                                "run convert_dicom_to_nifti.py first")
    task = functools.partial(
        normalize_patient, data_root=layout.root, window=window, size=size, overwrite=overwrite,
        torch_threads=1 if workers > 1 else None, crop=crop,
    )
    results = run_batch(patient_ids, task, workers=workers, desc="Phase 3 normalize", patient_id_of=lambda pid: pid)
    _update_normalization_json(layout.normalized_ct / NORMALIZATION_JSON, results)
    return results


def _update_normalization_json(path: Path, results: Sequence[PatientResult]) -> None:
    records = {r.patient_id: r.info["normalization"] for r in results if "normalization" in r.info}
    if not records:
        return
    existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    existing.update(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(dict(sorted(existing.items())), path)


# ---- Command line ----------------------------------------------------------------------------
def _size_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    try:
        return check_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 3: window, z-score and resize CT and label maps; write the training cache."
    )
    add_common_arguments(parser)
    parser.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        default=list(DEFAULT_WINDOW),
                        help="HU window clipped before the z-score (default: %(default)s)")
    parser.add_argument("--size", type=_size_argument, default=DEFAULT_SIZE,
                        help="in-plane size of every slice, a multiple of 16 >= 32 "
                             "(default: %(default)s)")
    parser.add_argument("--crop-body", action="store_true",
                        help=f"crop every slice to the square box of the body (> {DEFAULT_CROP_THRESHOLD_HU} HU, "
                             "largest 3D component) before the resize: finer pixels; measured better on real "
                             "patients and recommended for them (docs/decisions.md), off by default so earlier caches stay valid")
    parser.add_argument("--crop-margin-mm", type=float, default=None, metavar="MM",
                        help=f"margin around the body box with --crop-body (default: {DEFAULT_CROP_MARGIN_MM})")
    parser.add_argument("--fov-mm", type=float, nargs="?", const=DEFAULT_FOV_MM, default=None, metavar="MM",
                        help="with --crop-body: crop instead to a square field of view of MM mm centred on the "
                             "body's centroid (padded with air past the image), so every patient reaches the "
                             f"network at MM / SIZE mm per pixel (MM default: {DEFAULT_FOV_MM}, measured on the "
                             "real patients: docs/training.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        window = check_window(args.window)
    except ValueError as exc:
        parser.error(f"argument --window: {exc}")
    margin = DEFAULT_CROP_MARGIN_MM if args.crop_margin_mm is None else args.crop_margin_mm
    if args.crop_margin_mm is not None and not args.crop_body:
        parser.error("argument --crop-margin-mm: only with --crop-body")
    if args.fov_mm is not None and not args.crop_body:
        parser.error("argument --fov-mm: only with --crop-body")
    if args.fov_mm is not None and args.crop_margin_mm is not None:
        parser.error("argument --crop-margin-mm: not with --fov-mm (a field of view has no margin)")
    try:
        crop_settings(margin)
    except ValueError as exc:
        parser.error(f"argument --crop-margin-mm: {exc}")
    try:
        crop_settings(fov_mm=args.fov_mm)
    except ValueError as exc:
        parser.error(f"argument --fov-mm: {exc}")
    setup_logging(args.verbose)
    results = run_from_command_line(  # FileNotFoundError: no patient at all
        parser, run, usage_error=False, data_root=args.data_root, patients=args.patients, workers=args.workers,
        overwrite=args.overwrite, window=window, size=args.size, crop_body=args.crop_body, crop_margin_mm=margin,
        fov_mm=args.fov_mm)
    if results is None:
        return 1
    print(summary_line("Phase 3", results, done_word="normalized"))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
