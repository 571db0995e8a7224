"""Where everything lives: the ``DATA/`` tree, the file names each phase and a training run write, and
the readers of the records phases leave beside their outputs (conversion report, phase 2.5's
``<PatientID>.json`` and ``structures.csv``, phase 3's ``meta.json``), which refuse records of an
earlier version with the phases to re-run.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thoracic_seg import organs
from thoracic_seg.grid import stored_orientation_of


DEFAULT_DATA_ROOT = Path("DATA")
DEFAULT_SPLITS_DIR = Path("splits")


@dataclass(frozen=True)
class DataLayout:
    """Where each phase reads and writes, below one data root (default ``DATA``)."""

    root: Path = DEFAULT_DATA_ROOT

    @property
    def raw(self) -> Path:
        """Raw DICOM collection (any nesting); ``--dicom-root`` overrides it."""
        return self.root / "raw"

    @property
    def synthetic_raw(self) -> Path:
        """Where ``make_synthetic_cohort.py`` writes its DICOM cohort by default."""
        return self.raw / "synthetic"

    @property
    def synthetic_truth(self) -> Path:
        """True label maps of the synthetic cohort (outside ``raw/`` so phase 2 never sees them)."""
        return self.root / "synthetic_truth"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def ct_nifti(self) -> Path:
        """Phase 2 output: ``<PatientID>.nii.gz``, int16 HU, + ``conversion_report.csv``."""
        return self.processed / "ct_nifti"

    @property
    def masks(self) -> Path:
        """Phase 2.5 output: ``<PatientID>.nii.gz`` uint8 labels 0-7, + ``structures.csv``."""
        return self.processed / "masks_multi_organ"

    @property
    def normalized_ct(self) -> Path:
        """Phase 3 output: z-scored CT at ``--size`` (256) px, + ``normalization.json``."""
        return self.processed / "normalized_ct"

    @property
    def normalized_masks(self) -> Path:
        return self.processed / "normalized_masks"

    @property
    def training_cache(self) -> Path:
        """Phase 3 output: memory-mappable ``.npy`` arrays per patient for the dataset."""
        return self.processed / "training_cache"


#: Format of the per-patient records that phases 2.5 and 3 write beside their outputs. Version 2:
#: a derived PTV is no longer painted into the label map (issue 12); older outputs are refused.
PROCESSED_FORMAT = 2
NORMALIZATION_JSON = "normalization.json"
CACHE_CT = "ct.npy"
CACHE_MASK = "mask.npy"
CACHE_META = "meta.json"


def cache_dir(data_root: Path | str, patient_id: str) -> Path:
    """``<data_root>/processed/training_cache/<patient_id>``."""
    return DataLayout(Path(data_root)).training_cache / patient_id


def read_cache_meta(data_root: Path | str, patient_id: str) -> dict[str, Any]:
    """The ``meta.json`` of a patient's training cache. ``FileNotFoundError`` (run phase 3) when missing,
    ``ValueError`` naming the phases to re-run when an earlier version wrote it (format 1 painted a
    synthetic PTV into the label map; without an ``orientation`` record, feet-first or prone patients
    reached the network mirrored).
    """
    path = cache_dir(data_root, patient_id) / CACHE_META
    if not path.is_file():
        raise FileNotFoundError(f"{patient_id}: no training cache ({path} is missing); run normalize_ct_and_masks.py")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != PROCESSED_FORMAT:
        raise ValueError(
            f"{patient_id}: {path} was written by an earlier version of this pipeline (format "
            f"{meta.get('format', 1)}, this version reads {PROCESSED_FORMAT}: the PTV was painted into the "
            "label map); re-run extract_multi_organ_masks.py --overwrite, then normalize_ct_and_masks.py "
            "--overwrite"
        )
    stored_orientation_of(meta, f"{patient_id}: {path}")
    return meta


def slice_label_bits(mask_zyx: np.ndarray) -> list[int]:
    """Per slice, an integer whose bit k is set when label k occurs on that slice (labels 0-7).

    Stored in ``meta.json`` as ``slice_labels`` so the dataset can find the tumour slices
    without reading any mask.
    """
    bits = np.zeros(mask_zyx.shape[0], dtype=np.int64)
    for label in range(organs.NUM_CLASSES):
        present = (mask_zyx == label).any(axis=(1, 2))
        bits |= present.astype(np.int64) << label
    return bits.tolist()


CONVERSION_REPORT = "conversion_report.csv"
STRUCTURES_CSV = "structures.csv"
UNMATCHED_CSV = "unmatched_roi_names.csv"
STRUCTURES_COLUMNS = ("patient_id", "label", "structure", "annotated", "source_rois", "derived",
                      "voxels", "volume_ml", "voxels_lost")
RECORD_SUFFIX = ".json"  # <PatientID>.json beside <PatientID>.nii.gz: what phase 2.5 decided and read


def record_path(mask_path: Path) -> Path:
    """``<PatientID>.json`` beside the label map ``<PatientID>.nii.gz``."""
    return mask_path.with_name(mask_path.name[: -len(".nii.gz")] + RECORD_SUFFIX)


def read_mask_record(mask_path: Path | str) -> dict[str, Any]:
    """The record phase 2.5 wrote beside a label map (flags, PTV, fingerprints).

    Raises ``FileNotFoundError`` when the label map or its record is missing and ``ValueError`` for
    a record of another format; both messages name the file and say to re-run phase 2.5.
    """
    mask_path = Path(mask_path)
    path = record_path(mask_path)
    again = "re-run extract_multi_organ_masks.py --overwrite for this patient"
    if not path.is_file():
        if mask_path.is_file():
            raise ValueError(f"{mask_path} was written by an earlier version of extract_multi_organ_masks.py "
                             f"(no {path.name}: its PTV may be painted into the label map); {again}")
        raise FileNotFoundError(f"no label map {mask_path}; run extract_multi_organ_masks.py")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); {again}") from None
    if not isinstance(record, dict) or record.get("format") != PROCESSED_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ValueError(f"{path} has format {found!r}, this version reads format {PROCESSED_FORMAT}; {again}")
    return record


def read_structures_csv(path: Path | str) -> dict[str, list[bool]]:
    """``structures.csv`` -> {patient id: annotated flags indexed by label 0..7} (label 0 always True).

    Labels without a row are not annotated (a derived PTV is not). ``ValueError`` naming the file for missing
    columns, an earlier version's table (a ``synthetic`` column: its PTV was painted into the label maps), a
    value not yes/no or a label outside 1-7.
    """
    path = Path(path)
    rows = read_csv_rows(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (written by extract_multi_organ_masks.py)")
    columns = set(rows[0] if rows else _header(path))
    if "synthetic" in columns and "derived" not in columns:
        raise ValueError(f"{path} was written by an earlier version of extract_multi_organ_masks.py (its PTV is "
                         "painted into the label maps); re-run extract_multi_organ_masks.py --overwrite")
    missing = {"patient_id", "label", "annotated"} - columns
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}; expected {', '.join(STRUCTURES_COLUMNS)}")
    flags: dict[str, list[bool]] = {}
    for line, row in enumerate(rows, start=2):
        label, value = row["label"], row["annotated"].strip().lower()
        if value not in ("yes", "no") or not label.isdigit() or not 1 <= int(label) < organs.NUM_CLASSES:
            raise ValueError(f"{path} line {line}: label {label!r}, annotated {row['annotated']!r}; "
                             f"expected label 1-{organs.NUM_CLASSES - 1} and yes/no")
        patient = flags.setdefault(row["patient_id"], [True] + [False] * (organs.NUM_CLASSES - 1))
        patient[int(label)] = value == "yes"
    return flags


REPORT_NAME = "conversion_report.csv"
#: Columns of ``conversion_report.csv``. Phase 2.5 relies on ``patient_id``, ``patient_folder``,
#: ``series_uid`` and ``frame_of_reference_uid``. Folders are absolute paths; vectors are
#: space-separated (x y z / z y x); ``slices`` counts the distinct DICOM slices used (the chosen
#: series' files when the patient was not converted), ``filled_slices`` those interpolated;
#: ``status`` is done / skipped / failed.
REPORT_COLUMNS = (
    "patient_id", "dicom_patient_id", "patient_folder", "series_folder", "series_uid", "study_uid",
    "frame_of_reference_uid", "slices", "shape_zyx", "spacing_xyz", "origin_xyz", "filled_slices",
    "status", "message",
)


def read_report(path: Path) -> dict[str, dict[str, str]]:
    """``conversion_report.csv`` as {patient_id: row}; empty when the file does not exist."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["patient_id"]: row for row in csv.DictReader(handle)}


BEST_CHECKPOINT = "best_unet_multi_organ.pth"
LAST_CHECKPOINT = "last_checkpoint.pth"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
LOG_FILE = "train.log"
CLASS_WEIGHTS_JSON = "class_weights.json"


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh), [])


def truth_record(layout: DataLayout, patient_id: str) -> tuple[list[bool], dict[str, Any]]:
    """(8 annotated flags indexed by label, how the PTV is made) from phase 2.5's record of a
    patient's truth label map. ``FileNotFoundError``/``ValueError`` naming the patient for a
    missing record, one of an earlier version (PTV painted in) or flags of another length."""
    try:
        record = read_mask_record(layout.masks / f"{patient_id}.nii.gz")
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{patient_id}: {exc}") from None
    flags = record.get("annotated")
    if not isinstance(flags, list) or len(flags) != organs.NUM_CLASSES:
        raise ValueError(f"{patient_id}: phase 2.5's record has annotated flags {flags!r}; "
                         "re-run extract_multi_organ_masks.py --overwrite for this patient")
    return [bool(f) for f in flags], dict(record.get("ptv") or {})


def evaluation_output_dir(checkpoint: Path | str, postprocess: bool) -> Path:
    """Where evaluation writes by default: ``evaluation/`` or ``evaluation_postprocessed/`` beside
    the checkpoint."""
    return Path(checkpoint).parent / ("evaluation_postprocessed" if postprocess else "evaluation")
