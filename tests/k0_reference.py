"""A small fixed-step run of the whole pipeline (synthetic cohort -> phases 2, 2.5, 3 -> training
-> 3D evaluation) whose numbers ``test_k0_reference.py`` compares, bit for bit, with those the
repository gave before slice context and the body crop existed (issue 14: ``K = 0`` without crop
is today's network exactly).

The reference (``tests/data/k0_reference.json``) was written by running this file against the
code of commit 4568e3c (the last one without ``--context-slices``), from a checkout of it::

    cd <checkout of 4568e3c> && .venv/bin/python /path/to/tests/k0_reference.py OUT.json

It uses only arguments that version has, with their defaults for everything else (so ``K = 0``
and no crop now), a constant learning rate (the cosine schedule's step-based end came later, on
purpose) and a fixed number of optimizer steps.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

#: What the run does; recorded in the reference so a changed recipe cannot pass silently.
RECIPE = {"patients": 4, "px": 64, "slices": 16, "size": 32, "base_channels": 4, "batch_size": 4,
          "epochs": 3, "max_steps": 12, "lr": 1e-3, "augment": True, "seed": 0}


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


def run_reference(work: Path) -> dict[str, Any]:
    """Run the recipe in ``work``; the training history, the metrics and the predictions' hashes."""
    import numpy as np
    import SimpleITK as sitk

    import convert_dicom_to_nifti
    import evaluate_multi_organ
    import extract_multi_organ_masks
    import normalize_ct_and_masks
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
    for name, ids in (("train", ["SYN-001", "SYN-002"]), ("val", ["SYN-003"]), ("test", ["SYN-004"])):
        (splits / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    result = train_multi_organ.run(
        data_root=work, splits_dir=splits, output_dir=work / "run", epochs=r["epochs"],
        batch_size=r["batch_size"], lr=r["lr"], lr_schedule="constant", base_channels=r["base_channels"],
        augment=r["augment"], seed=r["seed"], device="cpu", max_steps=r["max_steps"], patience=r["epochs"])
    checkpoint = result.last_checkpoint
    out = work / "evaluation"
    evaluate_multi_organ.run(checkpoint=checkpoint, data_root=work, splits_dir=splits, output_dir=out,
                             device="cpu")
    predictions = {
        path.name: hashlib.sha256(np.ascontiguousarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
                                  .tobytes()).hexdigest()
        for path in sorted((out / "predictions").glob("*.nii.gz"))}
    history = [{k: row[k] for k in ("epoch", "train_loss", "val_loss", "lr") if k in row}
               for row in result.history]
    return {"recipe": RECIPE, "machine": machine(), "history": history,
            "metrics_csv": (out / "metrics.csv").read_text(encoding="utf-8"), "predictions": predictions}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: k0_reference.py OUT.json  (run from the repository checkout to measure)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path.cwd()))
    with tempfile.TemporaryDirectory() as tmp:
        report = run_reference(Path(tmp))
    Path(argv[0]).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
