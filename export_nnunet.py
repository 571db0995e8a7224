"""Export for nnU-Net v2: our CTs, label maps and splits as an nnU-Net raw dataset.

processed/ct_nifti + processed/masks_multi_organ (+ <PatientID>.json) + splits/{train,val,test}.txt ->
<nnUNet_raw>/Dataset<ID>_<name>/: imagesTr, labelsTr (train + val), imagesTs (test), dataset.json,
splits_final.json, label_mapping.json, label_map_to_ours.json (for evaluate_multi_organ.py --label-map)

    python export_nnunet.py --nnunet-raw "$nnUNet_raw" [--dataset-id 501] [--missing ignore|exclude]

A case is named by its PatientID: its image our CT copied byte for byte (same affine), its labels our label
map renumbered consecutively (a derived PTV is not a label). A structure a patient lacks is not taught as
background: ``--missing ignore`` makes its background nnU-Net's "ignore" label, ``exclude`` leaves it out
(why and at what cost: docs/nnunet.md).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from thoracic_seg import organs
from thoracic_seg.batch import (DONE, SKIPPED, PatientError, PatientResult, add_common_arguments, atomic_output,
                                check_same_geometry, check_writable, exit_status, list_patients, read_nifti, run_batch,
                                run_from_command_line, setup_logging, summary_line, write_nifti, write_text_atomic)
from thoracic_seg.layout import DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR, DataLayout, truth_record
from thoracic_seg.splits import read_splits

log = logging.getLogger(__name__)

DEFAULT_DATASET_ID = 501
DEFAULT_DATASET_NAME = "NSCLCRadiomics"
MISSING_MODES = ("ignore", "exclude")
IGNORE = "ignore"  # nnU-Net v2's name for the label whose voxels no loss sees
FILE_ENDING = ".nii.gz"
CHANNEL = "_0000"  # one input channel, the CT in HU
DATASET_JSON = "dataset.json"
SPLITS_FINAL_JSON = "splits_final.json"
LABEL_MAPPING_JSON = "label_mapping.json"
LABEL_MAP_TO_OURS_JSON = "label_map_to_ours.json"  # {"<exported value>": "<our structure key>"}, for --label-map


# ---- Pure rules: which labels, their numbers, the ignore label ----
def exported_labels(flags: Iterable[Sequence[bool]]) -> list[int]:
    """Our foreground labels (1-7) annotated in at least one patient (``flags``: per patient, 8 annotated
    flags indexed by label), in label order. A derived PTV is never annotated, so it is not a label; nor is
    a structure no training patient has (nothing could teach it)."""
    flags = [list(f) for f in flags]
    return [label for label in organs.FOREGROUND_LABELS if any(f[label] for f in flags)]


def missing_structures(annotated: Sequence[bool], exported: Sequence[int]) -> list[int]:
    """The exported labels this patient's map does not annotate (its ``annotated`` flag is False)."""
    return [label for label in exported if not annotated[label]]


def label_mapping(exported: Sequence[int], missing: str, with_ignore: bool) -> dict[str, Any]:
    """The record of :data:`LABEL_MAPPING_JSON`: ``ours_to_exported`` ({our label: exported value}, string
    keys, 0 -> 0 then 1, 2, ... in our label order), ``labels`` (dataset.json's {structure key: value},
    "ignore" the highest when ``with_ignore``) and the ``missing`` mode.

    >>> label_mapping([1, 3], "ignore", True)["labels"]
    {'background': 0, 'gtv': 1, 'lung_right': 2, 'ignore': 3}
    """
    ours = [organs.BACKGROUND, *exported]
    names = {organs.structure(label).key: value for value, label in enumerate(ours)}
    if with_ignore:
        names[IGNORE] = len(ours)
    return {"ours_to_exported": {str(label): value for value, label in enumerate(ours)},
            "labels": names, "missing": missing}


def exported_to_ours(mapping: Mapping[str, Any]) -> dict[str, str]:
    """``{"<exported value>": "<our structure key>"}`` for the foreground of a :func:`label_mapping`
    (nnU-Net predicts neither background nor "ignore" as a structure)."""
    return {str(value): organs.structure(int(label)).key
            for label, value in mapping["ours_to_exported"].items() if int(label) != organs.BACKGROUND}


def export_label_array(ours: np.ndarray, ours_to_exported: Mapping[int, int],
                       ignore_value: int | None = None) -> np.ndarray:
    """Our (Z, Y, X) label map (integers 0-7) -> the exported uint8 map, value by value; with ``ignore_value``
    every background voxel becomes it (the patient lacks a structure, so any of them could belong to it).
    ``ValueError`` naming the values found that have no exported value."""
    found = {int(v) for v in np.unique(ours)}
    unexpected = sorted(found - set(ours_to_exported))
    if unexpected:
        raise ValueError(f"label values {unexpected} are not exported labels (exported: {sorted(ours_to_exported)})")
    table = np.zeros(max(found | set(ours_to_exported)) + 1, dtype=np.uint8)
    for label, value in ours_to_exported.items():
        table[label] = value
    out = table[ours]
    if ignore_value is not None:
        out[ours == organs.BACKGROUND] = ignore_value
    return out


def dataset_folder(nnunet_raw: Path | str, dataset_id: int, name: str) -> Path:
    """``<nnunet_raw>/Dataset<ID, 3 digits>_<name>``; ``ValueError`` for an id outside 1-999 or a bad name."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be 1-999 (nnU-Net pads it to 3 digits), got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise ValueError(f"dataset name must be letters, digits, '_' and '-', got {name!r}")
    return Path(nnunet_raw) / f"Dataset{dataset_id:03d}_{name}"


# ---- One patient ----
def export_case(patient_id: str, *, layout: DataLayout, dataset_dir: Path, split_of: Mapping[str, str],
                mapping: Mapping[str, Any], overwrite: bool = False) -> PatientResult:
    """Copy one patient's CT to ``imagesTr`` (train, val) or ``imagesTs`` (test) as ``<PatientID>_0000.nii.gz``;
    for train and val write its exported label map, same grid, to ``labelsTr``. With ``mapping["missing"] ==
    "exclude"`` a patient lacking an exported structure is skipped (an earlier export's files removed)."""
    split, lacking = split_of.get(patient_id), []
    if split is None:
        raise PatientError(f"{patient_id}: not in train.txt, val.txt or test.txt")
    ct_path = layout.ct_nifti / f"{patient_id}{FILE_ENDING}"
    if not ct_path.is_file():
        raise PatientError(f"{patient_id}: no CT {ct_path}; run convert_dicom_to_nifti.py")
    image_path = dataset_dir / ("imagesTs" if split == "test" else "imagesTr") / f"{patient_id}{CHANNEL}{FILE_ENDING}"
    outputs = [image_path]
    if split != "test":
        label_path = dataset_dir / "labelsTr" / f"{patient_id}{FILE_ENDING}"
        outputs.append(label_path)
        try:
            annotated, _ = truth_record(layout, patient_id)
        except (FileNotFoundError, ValueError) as exc:
            raise PatientError(str(exc)) from None
        ours_to_exported = {int(k): v for k, v in mapping["ours_to_exported"].items()}
        exported = [label for label in ours_to_exported if label != organs.BACKGROUND]
        lacking = [organs.structure(label).key for label in missing_structures(annotated, exported)]
        if lacking and mapping["missing"] == "exclude":
            for path in outputs:
                path.unlink(missing_ok=True)  # written by an earlier export with --missing ignore
            return PatientResult(patient_id, SKIPPED, f"excluded: {', '.join(lacking)} not contoured",
                                 {"excluded": lacking})
    if all(p.is_file() for p in outputs) and not overwrite:
        return PatientResult(patient_id, SKIPPED, "", {})
    if split != "test":
        mask_path = layout.masks / f"{patient_id}{FILE_ENDING}"
        mask = read_nifti(mask_path)
        ct_header = sitk.ImageFileReader()  # the CT's grid without reading its voxels
        ct_header.SetFileName(str(ct_path))
        ct_header.ReadImageInformation()
        check_same_geometry(ct_header, mask, f"{patient_id}: {mask_path} vs {ct_path}")
        ignore_value = mapping["labels"].get(IGNORE) if lacking else None
        try:
            values = export_label_array(sitk.GetArrayViewFromImage(mask), ours_to_exported, ignore_value)
        except ValueError as exc:
            raise PatientError(f"{patient_id}: {mask_path}: {exc}; re-run extract_multi_organ_masks.py "
                               "--overwrite for this patient") from None
        labels = sitk.GetImageFromArray(values)
        labels.CopyInformation(mask)
        write_nifti(labels, label_path)
    with atomic_output(image_path) as tmp:
        shutil.copyfile(ct_path, tmp)
    message = f"background is '{IGNORE}' ({', '.join(lacking)} not contoured)" if lacking else ""
    return PatientResult(patient_id, DONE, message, {})


# ---- The dataset ----
def _cases_not_in_splits(dataset_dir: Path, split_of: Mapping[str, str]) -> list[Path]:
    """Files of ``imagesTr``/``labelsTr`` (``imagesTs``) whose patient is not in train or val (test)."""
    folders = {"imagesTr": (CHANNEL, ("train", "val")), "labelsTr": ("", ("train", "val")),
               "imagesTs": (CHANNEL, ("test",))}
    return [dataset_dir / folder / f"{pid}{channel}{FILE_ENDING}" for folder, (channel, splits) in folders.items()
            for pid in list_patients(dataset_dir / folder, channel + FILE_ENDING) if split_of.get(pid) not in splits]


def run(*, nnunet_raw: Path | str, data_root: Path | str = DEFAULT_DATA_ROOT,
        splits_dir: Path | str = DEFAULT_SPLITS_DIR, dataset_id: int = DEFAULT_DATASET_ID,
        dataset_name: str = DEFAULT_DATASET_NAME, missing: str = "ignore", preprocessed: Path | str | None = None,
        patients: Sequence[str] | None = None, workers: int = 1, overwrite: bool = False) -> list[PatientResult]:
    """Export the patients of our splits (or ``patients``) and write the dataset's JSON files. The exported
    labels come from the records of all train and val patients, so ``patients`` does not change them.
    ``ValueError`` for a bad option, a patient in two splits, no annotated structure, a dataset exported
    before with another mapping (``overwrite`` without ``patients`` redoes it) or holding patients that are
    not in the split of their folder."""
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be one of {', '.join(MISSING_MODES)}, got {missing!r}")
    layout, dataset_dir = DataLayout(Path(data_root)), dataset_folder(nnunet_raw, dataset_id, dataset_name)
    splits = read_splits(splits_dir)
    split_of = {pid: name for name, ids in splits.items() for pid in ids}
    flags = {}
    for pid in splits["train"] + splits["val"]:
        try:
            flags[pid] = truth_record(layout, pid)[0]
        except (FileNotFoundError, ValueError):
            continue  # that patient's own task reports it
    exported = exported_labels(flags.values())
    if not exported:
        raise ValueError(f"no train or val patient of {splits_dir} has an annotated structure in {layout.masks}; "
                         "run extract_multi_organ_masks.py")
    with_ignore = missing == "ignore" and any(missing_structures(f, exported) for f in flags.values())
    mapping = label_mapping(exported, missing, with_ignore)
    mapping_path = dataset_dir / LABEL_MAPPING_JSON
    if mapping_path.is_file() and json.loads(mapping_path.read_text(encoding="utf-8")) != mapping and (
            not overwrite or patients):
        raise ValueError(f"{mapping_path} holds another label mapping than this export's {mapping}; re-run "
                         "with --overwrite and without --patients so that no case keeps the old numbering")
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        check_writable(dataset_dir / folder)
    stale = _cases_not_in_splits(dataset_dir, split_of)
    if stale:
        raise ValueError(f"{len(stale)} file(s) of {dataset_dir} belong to no patient of that split in "
                         f"{splits_dir} (an export with other splits?): {', '.join(map(str, stale[:5]))}; "
                         "remove them or export to another --dataset-id")
    task = functools.partial(export_case, layout=layout, dataset_dir=dataset_dir, split_of=split_of,
                             mapping=mapping, overwrite=overwrite)
    results = run_batch(list(patients) if patients else list(split_of), task, workers=workers, desc="nnU-Net export")
    cases = set(list_patients(dataset_dir / "imagesTr", CHANNEL + FILE_ENDING))  # what nnU-Net counts
    dataset = {"channel_names": {"0": "CT"}, "labels": mapping["labels"], "numTraining": len(cases),
               "file_ending": FILE_ENDING, "overwrite_image_reader_writer": "SimpleITKIO", "name": dataset_name,
               "reference": "NSCLC-Radiomics, doi:10.7937/K9/TCIA.2015.PF0M9REI", "licence": "CC BY-NC 3.0"}
    folds = [{"train": [p for p in splits["train"] if p in cases], "val": [p for p in splits["val"] if p in cases]}]
    write_text_atomic(dataset_dir / DATASET_JSON, json.dumps(dataset, indent=2) + "\n")
    write_text_atomic(mapping_path, json.dumps(mapping, indent=2) + "\n")
    write_text_atomic(dataset_dir / LABEL_MAP_TO_OURS_JSON, json.dumps(exported_to_ours(mapping), indent=2) + "\n")
    split_files = [dataset_dir] + ([Path(preprocessed) / dataset_dir.name] if preprocessed is not None else [])
    for folder in split_files:  # nnU-Net copies the raw one to its preprocessed folder when none is there
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / SPLITS_FINAL_JSON, json.dumps(folds, indent=2) + "\n")
    return results


# ---- Command line ----
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export CTs, label maps and splits as an nnU-Net v2 raw dataset.")
    add_common_arguments(parser)
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR,
                        help="folder of train.txt, val.txt, test.txt (default: %(default)s)")
    parser.add_argument("--nnunet-raw", type=Path, default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net's raw data folder (default: $nnUNet_raw = %(default)s)")
    parser.add_argument("--preprocessed", type=Path, default=None, metavar="DIR",
                        help="also write splits_final.json to DIR/Dataset<ID>_<name>/ (nnU-Net's $nnUNet_preprocessed)")
    parser.add_argument("--dataset-id", type=int, default=DEFAULT_DATASET_ID, help="1-999 (default: %(default)s)")
    parser.add_argument("--dataset-name", default=DEFAULT_DATASET_NAME, help="(default: %(default)s)")
    parser.add_argument("--missing", choices=MISSING_MODES, default="ignore",
                        help="a patient lacking a structure: its background becomes nnU-Net's ignore label, "
                             "or the patient is left out (default: %(default)s; docs/nnunet.md)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nnunet_raw is None:
        parser.error("no nnU-Net raw folder: pass --nnunet-raw DIR or set the environment variable nnUNet_raw")
    setup_logging(args.verbose)
    results = run_from_command_line(
        parser, run, usage_error=False, nnunet_raw=args.nnunet_raw, data_root=args.data_root,
        splits_dir=args.splits_dir, dataset_id=args.dataset_id, dataset_name=args.dataset_name, missing=args.missing,
        preprocessed=args.preprocessed, patients=args.patients, workers=args.workers, overwrite=args.overwrite)
    if results is None:
        return 1
    excluded = sum("excluded" in r.info for r in results)
    print(summary_line("nnU-Net export", results, done_word="exported")
          + (f"; {excluded} of the skipped excluded (a structure not contoured)" if excluded else ""))
    return exit_status(results)


if __name__ == "__main__":
    raise SystemExit(main())
