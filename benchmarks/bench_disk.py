"""Disk use of every processed folder, measured on the two real NSCLC-Radiomics patients and
scaled to a collection: bytes per CT slice of phases 2, 2.5 and 3 at the default settings.

    .venv/bin/python benchmarks/bench_disk.py [--slices 40000 60000] [--size 256]

Unpacks ../shared/data/nsclc-radiomics-sample.tar.xz into a temporary folder, runs phases 2, 2.5
and 3 on both patients (512x512, 91 slices each), and measures the bytes of each output folder
(``ct_nifti``, ``masks_multi_organ``, ``normalized_ct``, ``normalized_masks``, ``training_cache``).
The training cache is uncompressed (memory-mapped ``.npy``), so its bytes per slice are exact for
any patient at that ``--size``; the compressed NIfTI folders vary a little with the anatomy. Prints
a table (bytes per slice, GB per 1,000 slices, GB for each ``--slices`` total) and writes
benchmarks/bench_disk.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from thoracic_seg.layout import (
    DataLayout,  # noqa: E402
    read_cache_meta,
)

ARCHIVE = REPO.parent / "shared" / "data" / "nsclc-radiomics-sample.tar.xz"
OUTPUT_JSON = REPO / "benchmarks" / "bench_disk.json"
FOLDERS = ("ct_nifti", "masks_multi_organ", "normalized_ct", "normalized_masks", "training_cache")
#: What a Colab user needs on Drive to train (the loader reads only the cache) and to evaluate
#: (the CTs, segmented from HU as prediction does, and the truth label maps).
TRAIN_FOLDERS = ("training_cache",)
EVALUATE_FOLDERS = ("ct_nifti", "masks_multi_organ")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(sample_root: Path, work: Path, size: int) -> dict:
    import convert_dicom_to_nifti
    import extract_multi_organ_masks
    import normalize_ct_and_masks

    data_root = work / "DATA"
    for phase in (convert_dicom_to_nifti, extract_multi_organ_masks):
        results = phase.run(data_root=data_root, dicom_root=sample_root, workers=1)
        if any(r.status != "done" for r in results):
            raise RuntimeError(f"{phase.__name__}: {[(r.patient_id, r.message) for r in results]}")
    normalize_ct_and_masks.run(data_root=data_root, workers=1, size=size)
    layout = DataLayout(data_root)
    slices = sum(read_cache_meta(data_root, pid)["shape_zyx"][0] for pid in ("LUNG1-005", "LUNG1-010"))
    measured = {name: folder_bytes(getattr(layout, "masks" if name == "masks_multi_organ" else name))
                for name in FOLDERS}
    return {"slices": slices, "size": size, "bytes": measured,
            "bytes_per_slice": {k: v / slices for k, v in measured.items()}}


def table(result: dict, totals: list[int]) -> str:
    per = result["bytes_per_slice"]
    head = f"{'folder':<22}{'bytes/slice':>14}{'GB/1000 slices':>16}" + "".join(f"{f'GB at {n}':>14}" for n in totals)
    lines = [head, "-" * len(head)]
    rows = [(k, per[k]) for k in FOLDERS] + [
        ("all of processed/", sum(per.values())),
        ("train (cache only)", sum(per[k] for k in TRAIN_FOLDERS)),
        ("evaluate", sum(per[k] for k in EVALUATE_FOLDERS)),
    ]
    for name, value in rows:
        lines.append(f"{name:<22}{value:>14,.0f}{value * 1000 / 1e9:>16.3f}"
                     + "".join(f"{value * n / 1e9:>14.1f}" for n in totals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[40000, 60000],
                        help="collection sizes (CT slices) to scale to (default: 40000 60000)")
    parser.add_argument("--size", type=int, default=256, help="phase 3 slice size (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=OUTPUT_JSON)
    args = parser.parse_args(argv)
    if not ARCHIVE.is_file():
        print(f"real sample data not found at {ARCHIVE}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(ARCHIVE, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        result = measure(Path(tmp) / "nsclc-radiomics-sample", Path(tmp), args.size)
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    result["scaled_gb"] = {str(n): {k: v * n / 1e9 for k, v in result["bytes_per_slice"].items()} for n in args.slices}
    print(f"Disk use measured on {result['slices']} slices of 2 real patients (512x512, phase 3 at "
          f"{args.size} px):\n")
    print(table(result, args.slices))
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
