"""A small fixed-step run of the whole pipeline that really segments, for ``test_pipeline_reference.py``.

Synthetic cohort -> phases 2, 2.5, 3 -> splits -> training (the demo's cosine schedule ending with
the step budget; no augmentation, so that 700 steps learn every structure but the cord) -> 3D
evaluation -> prediction of one test patient from its DICOM folder. The outputs (label maps, ``metrics.csv``, the RTSTRUCT's contours) are compared
with ``tests/data/pipeline_reference.*``, written right after evaluation and prediction were made
to share one input and precision (issue 19), so that moving code around changes no output.

Regenerate the reference only in a commit of its own that says what changed and why::

    .venv/bin/python tests/pipeline_reference.py
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).parent / "data"
REFERENCE_JSON = REFERENCE_DIR / "pipeline_reference.json"
REFERENCE_LABELS = REFERENCE_DIR / "pipeline_reference_labels.npz"
#: What the run does; recorded in the reference so a changed recipe cannot pass silently.
RECIPE = {"patients": 8, "px": 64, "slices": 20, "size": 64, "base_channels": 8, "batch_size": 8,
          "epochs": 60, "max_steps": 700, "lr": 3e-3, "lr_schedule": "cosine", "augment": False, "seed": 0,
          "train": ["SYN-001", "SYN-002", "SYN-003", "SYN-004", "SYN-005"], "val": ["SYN-006"],
          "test": ["SYN-007", "SYN-008"]}


def machine() -> dict[str, str]:
    """Where the numbers were made: float results are only bit-identical on the same CPU and torch."""
    import torch

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version()}


def _array(path: Path):
    import numpy as np
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def rtstruct_contours(path: Path) -> dict[str, list[str]]:
    """ROI name -> the sha256 of each of its contours' ContourData, in file order (UIDs and dates,
    new in every file, are left out)."""
    import pydicom

    dataset = pydicom.dcmread(path)
    names = {roi.ROINumber: roi.ROIName for roi in dataset.StructureSetROISequence}
    return {names[roi.ReferencedROINumber]: [
        hashlib.sha256("\\".join(str(v) for v in contour.ContourData).encode()).hexdigest()
        for contour in getattr(roi, "ContourSequence", [])] for roi in dataset.ROIContourSequence}


def run_reference(work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run :data:`RECIPE` in ``work``: (a JSON-able report, {name: label map (Z, Y, X) uint8})."""
    import convert_dicom_to_nifti
    import evaluate_multi_organ
    import extract_multi_organ_masks
    import normalize_ct_and_masks
    import predict_multi_organ
    import train_multi_organ
    from make_synthetic_cohort import generate_cohort

    r = RECIPE
    raw = work / "raw" / "synthetic"
    generate_cohort(raw, work / "truth", n_patients=r["patients"], seed=0, size=r["px"], slices=r["slices"])
    convert_dicom_to_nifti.run(data_root=work, dicom_root=work / "raw")
    extract_multi_organ_masks.run(data_root=work, dicom_root=work / "raw")
    normalize_ct_and_masks.run(data_root=work, size=r["size"])
    splits = work / "splits"
    splits.mkdir()
    for name in ("train", "val", "test"):
        (splits / f"{name}.txt").write_text("".join(f"{i}\n" for i in r[name]), encoding="utf-8")
    result = train_multi_organ.run(
        data_root=work, splits_dir=splits, output_dir=work / "run", epochs=r["epochs"],
        batch_size=r["batch_size"], lr=r["lr"], lr_schedule=r["lr_schedule"], base_channels=r["base_channels"],
        augment=r["augment"], seed=r["seed"], device="cpu", max_steps=r["max_steps"], patience=r["epochs"])
    checkpoint = result.last_checkpoint
    out = work / "evaluation"
    evaluate_multi_organ.run(checkpoint=checkpoint, data_root=work, splits_dir=splits, output_dir=out,
                             device="cpu", postprocess=True)
    predicted = r["test"][0]
    predict_multi_organ.run(input_path=raw / predicted, checkpoint=checkpoint, output_dir=work / "predictions",
                            device="cpu", postprocess=True)
    labels = {f"evaluation/{p}": _array(out / "predictions" / f"{p}.nii.gz") for p in r["test"]}
    for suffix in ("labels", "PTV"):
        labels[f"prediction/{predicted}_{suffix}"] = _array(work / "predictions" / f"{predicted}_{suffix}.nii.gz")
    history = [{k: row[k] for k in ("epoch", "train_loss", "val_loss", "lr") if k in row}
               for row in result.history]
    report = {"recipe": RECIPE, "machine": machine(), "history": history,
              "metrics_csv": (out / "metrics.csv").read_text(encoding="utf-8"),
              "labels_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in labels.items()},
              "rtstruct_contours": rtstruct_contours(work / "predictions" / f"{predicted}_RTSTRUCT.dcm")}
    return report, labels


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    argv = sys.argv[1:] if argv is None else argv
    if argv:
        print("usage: tests/pipeline_reference.py  (writes tests/data/pipeline_reference.*)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        report, labels = run_reference(Path(tmp))
    REFERENCE_JSON.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    np.savez_compressed(REFERENCE_LABELS, **labels)
    print(f"wrote {REFERENCE_JSON} and {REFERENCE_LABELS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
