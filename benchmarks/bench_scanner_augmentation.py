"""Benchmark of the other-scanner augmentation (``--augment-scanner``): CPU time per training item
(compact, as training reads them) without augmentation, with ``--augment``, with ``--augment-scanner``
(half the slices re-rendered, and every slice), and with both, for K = 0 and K = 1 context slices.

    .venv/bin/python benchmarks/bench_scanner_augmentation.py [--size 128 --items 2000]

One thread (a DataLoader worker's), a synthetic cache in a temporary folder (in the page cache); the
median over rounds of the wall and CPU time per item (CPU time is what other jobs on a shared machine
disturb least). Prints a table and writes benchmarks/bench_scanner_augmentation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_dataset import synthetic_patient, write_cache_patient  # noqa: E402
from dataset_multi_organ import MultiOrganDataset, SliceAugmentation  # noqa: E402
from thoracic_seg.layout import CACHE_META, DataLayout  # noqa: E402
from thoracic_seg.scanner import ScannerAugmentation  # noqa: E402

#: What the synthetic patient's meta.json says (a 512 x 512 CT of 0.98 mm pixels, 3 mm slices).
NORMALISATION = {"window": [-1000, 400], "mean": -450.0, "std": 480.0, "original_spacing_xyz": [0.98, 0.98, 3.0]}
SETTINGS = {
    "plain": dict(),
    "--augment": dict(augment=SliceAugmentation()),
    "--augment-scanner (p 0.5)": dict(scanner=ScannerAugmentation()),
    "scanner, every slice (p 1)": dict(scanner=ScannerAugmentation(p=1.0)),
    "--augment + --augment-scanner": dict(augment=SliceAugmentation(), scanner=ScannerAugmentation()),
}


def time_per_item(dataset: MultiOrganDataset, items: int, rounds: int) -> tuple[float, float]:
    """Medians over ``rounds`` of the wall and CPU seconds per item of ``items`` seeded items in
    random order."""
    order = np.random.default_rng(0).integers(0, len(dataset), size=items)
    for i in order[:50]:
        dataset[(int(i), int(i))]  # open the memory maps, warm the caches
    wall, cpu = [], []
    for r in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for n, i in enumerate(order):
            dataset[(int(i), r * items + n)]
        wall.append((time.perf_counter() - start) / items)
        cpu.append((time.process_time() - start_cpu) / items)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--items", type=int, default=2000, help="items per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bench_scanner_augmentation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scanner_") as tmp:
        root = Path(tmp)
        ct, mask = synthetic_patient(args.slices, args.size, np.random.default_rng(0))
        write_cache_patient(root, "BENCH", ct, mask)
        meta_path = DataLayout(root).training_cache / "BENCH" / CACHE_META
        meta = json.loads(meta_path.read_text()) | NORMALISATION
        meta |= {"size": args.size, "original_shape_zyx": [args.slices, 512, 512]}
        meta_path.write_text(json.dumps(meta))
        for k in (0, 1):
            for name, options in SETTINGS.items():
                dataset = MultiOrganDataset(["BENCH"], data_root=root, compact=True, context_slices=k, **options)
                wall, cpu = time_per_item(dataset, args.items, args.rounds)
                rows.append({"setting": name, "context_slices": k, "us_per_item": round(wall * 1e6, 1),
                             "cpu_us_per_item": round(cpu * 1e6, 1)})
    for row in rows:
        plain = next(r for r in rows if r["setting"] == "plain" and r["context_slices"] == row["context_slices"])
        row["cpu_us_added"] = round(row["cpu_us_per_item"] - plain["cpu_us_per_item"], 1)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPU cores (load average {load[0]:.1f} at the end), 1 thread, torch "
          f"{torch.__version__}, {args.size} x {args.size} slices, median of {args.rounds} rounds "
          f"of {args.items} items")
    print(f"{'setting':<32}{'K':>3}{'wall us/item':>13}{'CPU us/item':>12}{'CPU added':>10}")
    for row in rows:
        print(f"{row['setting']:<32}{row['context_slices']:>3}{row['us_per_item']:>13.1f}"
              f"{row['cpu_us_per_item']:>12.1f}{row['cpu_us_added']:>10.1f}")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average_at_end": load},
              "config": vars(args) | {"out": str(args.out)}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
