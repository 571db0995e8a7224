"""Benchmark of the phase 4 slice dataset: random-access slices per second through a DataLoader
(batch 16, shuffled, 0 and 2 workers) for the memory-mapped training cache and for a seed-style
loader that opens the patient's .nii.gz for every item, and the dataset's own memory for a
60,000-slice index.

    .venv/bin/python benchmarks/bench_dataset.py [--patients 20 --slices 130 --size 256]

Builds its own synthetic cache in a temporary folder (random data, no other phase needed),
prints a table and writes benchmarks/bench_dataset.json. Targets on a 2-core machine: >= 3,000
slices/s with 2 workers, >= 100x the seed-style loader, <= 50 MB for a 60,000-slice index.
The cache files were just written, so they are read from the page cache, as they are in
training after the first epoch.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset_multi_organ import MultiOrganDataset, batch_to_device  # noqa: E402
from thoracic_seg import organs  # noqa: E402  # noqa: E402
from thoracic_seg.layout import (  # noqa: E402  # noqa: E402
    CACHE_CT,
    CACHE_MASK,
    CACHE_META,
    PROCESSED_FORMAT,
    DataLayout,
    slice_label_bits,
)

BATCH_SIZE = 16
TARGET_SLICES_PER_S = 3000
TARGET_SPEEDUP = 100
TARGET_INDEX_MB = 50


# ---- Synthetic inputs ------------------------------------------------------------------------
def synthetic_patient(slices: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(z-scored CT float32 (Z, S, S), labels uint8 (Z, S, S)): noise on a body, lungs, a tumour."""
    yy, xx = np.mgrid[:size, :size] / size
    body = ((yy - 0.5) ** 2 / 0.16 + (xx - 0.5) ** 2 / 0.2) < 1
    mask2d = np.zeros((size, size), np.uint8)
    mask2d[body & ((xx - 0.3) ** 2 + (yy - 0.45) ** 2 < 0.02)] = organs.RIGHT_LUNG
    mask2d[body & ((xx - 0.7) ** 2 + (yy - 0.45) ** 2 < 0.02)] = organs.LEFT_LUNG
    mask = np.repeat(mask2d[None], slices, axis=0)
    mask[slices // 3: slices // 3 + 8, size // 3: size // 3 + 10, size // 4: size // 4 + 10] = organs.GTV
    ct = np.where(body, 0.5, -1.0)[None] + 0.2 * rng.standard_normal((slices, size, size))
    ct[np.isin(mask, (organs.RIGHT_LUNG, organs.LEFT_LUNG))] -= 1.0
    return ct.astype(np.float32), mask


def write_cache_patient(root: Path, pid: str, ct: np.ndarray, mask: np.ndarray) -> None:
    folder = DataLayout(root).training_cache / pid
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / CACHE_CT, ct.astype(np.float16))
    np.save(folder / CACHE_MASK, mask)
    meta = {"format": PROCESSED_FORMAT, "patient_id": pid, "shape_zyx": list(ct.shape), "annotated": [True] * 8,
            "slice_labels": slice_label_bits(mask), "orientation": {"stored": "LPS", "network": "LPS"}}
    (folder / CACHE_META).write_text(json.dumps(meta))


def write_seed_patient(root: Path, pid: str, ct: np.ndarray, mask: np.ndarray) -> None:
    """What the seed trained from: compressed NIfTI volumes, one per patient."""
    layout = DataLayout(root)
    for folder, array in ((layout.normalized_ct, ct), (layout.normalized_masks, mask)):
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / f"{pid}.nii.gz"), True)


def write_header_only_patient(root: Path, pid: str, slices: int, size: int) -> None:
    """A valid cache entry whose .npy files are sparse (no disk used): for the index memory."""
    folder = DataLayout(root).training_cache / pid
    folder.mkdir(parents=True, exist_ok=True)
    shape = (slices, size, size)
    for name, dtype in ((CACHE_CT, np.float16), (CACHE_MASK, np.uint8)):
        with open(folder / name, "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                         "fortran_order": False, "shape": shape})
            handle.truncate(handle.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    bits = [0b11001] * slices
    (folder / CACHE_META).write_text(json.dumps(
        {"format": PROCESSED_FORMAT, "patient_id": pid, "shape_zyx": list(shape), "annotated": [True] * 8,
         "slice_labels": bits, "orientation": {"stored": "LPS", "network": "LPS"}}))


class SeedStyleDataset(Dataset):
    """The seed's loader: every item decompresses the patient's whole CT and mask .nii.gz."""

    def __init__(self, root: Path, patients: list[str], slices: int) -> None:
        self.layout = DataLayout(root)
        self.items = [(pid, z) for pid in patients for z in range(slices)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        pid, z = self.items[i]
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(self.layout.normalized_ct / f"{pid}.nii.gz")))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(self.layout.normalized_masks / f"{pid}.nii.gz")))
        return {"image": torch.from_numpy(ct[z])[None], "mask": torch.from_numpy(mask[z].astype(np.int64))}


class TransportCeiling(Dataset):
    """Items of the same sizes made at no cost: what the DataLoader itself (collate, worker
    shared memory, queues) can deliver on this machine, an upper bound for any dataset."""

    def __init__(self, n: int, size: int) -> None:
        self.n = n
        self.item = {"image": torch.zeros((1, size, size)),
                     "mask": torch.zeros((size, size), dtype=torch.int64),
                     "annotated": torch.ones(8, dtype=torch.bool), "patient_id": "P", "slice_index": 0}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.item


# ---- Measurements ----------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_throughput(dataset: Dataset, items: int, workers: int, widen: bool = False,
                      steady: bool = True, seed: int = 0) -> dict:
    """Slices/s through DataLoader(batch 16, shuffled) over ``items`` random items.

    ``slices_per_s`` excludes the first batch (worker start-up) when ``steady``, else it is
    ``with_startup`` (for slow loaders measured on a few batches, where start-up is negligible
    and dropping a batch made in parallel would flatter them). ``cpu_ms_per_slice`` (all
    processes) hardly depends on what else runs on the machine; ``idle_estimate`` is what it
    allows on ``max(workers, 1)`` idle cores. ``widen``: convert compact batches to float32 /
    int64 in the main process, as training would.
    """
    sampler = RandomSampler(dataset, num_samples=items, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler, num_workers=workers)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    first = None
    count = 0
    for batch in loader:
        if widen:
            batch = batch_to_device(batch, "cpu")
        if first is None:
            first = time.perf_counter()
        else:
            count += len(batch["image"])
    end = time.perf_counter()
    del loader  # joins the workers so that their CPU time is counted
    gc.collect()
    cpu_ms = (cpu_seconds() - cpu_start) / items * 1000
    return {"workers": workers, "items": items,
            "slices_per_s": count / (end - first) if steady else items / (end - start),
            "with_startup": items / (end - start), "seconds": end - start,
            "cpu_ms_per_slice": cpu_ms, "idle_estimate": max(workers, 1) * 1000 / cpu_ms}


def index_memory(root: Path, n_slices: int, slices: int, size: int) -> dict:
    n_patients = -(-n_slices // slices)
    patients = [f"IDX-{i:04d}" for i in range(n_patients)]
    for pid in patients:
        write_header_only_patient(root, pid, slices, size)
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    dataset = MultiOrganDataset(patients, data_root=root)
    seconds = time.perf_counter() - start
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    arrays = sum(a.nbytes for a in (dataset.index, dataset.annotated, dataset.slice_labels, dataset.shapes))
    return {"slices": len(dataset), "patients": n_patients, "build_s": seconds,
            "dataset_mb": current / 2**20, "peak_build_mb": peak / 2**20,
            "index_arrays_mb": arrays / 2**20, "pickled_mb": len(pickle.dumps(dataset)) / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--items", type=int, default=4000, help="items per cache measurement")
    parser.add_argument("--seed-patients", type=int, default=3)
    parser.add_argument("--seed-items", type=int, default=48, help="items per seed-style measurement")
    parser.add_argument("--index-slices", type=int, default=60_000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bench_dataset.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        print(f"writing a synthetic cache: {args.patients} patients x {args.slices} slices "
              f"at {args.size}x{args.size} ...", flush=True)
        patients = [f"BENCH-{i:03d}" for i in range(args.patients)]
        for i, pid in enumerate(patients):
            ct, mask = synthetic_patient(args.slices, args.size, rng)
            write_cache_patient(root, pid, ct, mask)
            if i < args.seed_patients:
                write_seed_patient(root, pid, ct, mask)

        cache = MultiOrganDataset(patients, data_root=root)
        compact = MultiOrganDataset(patients, data_root=root, compact=True)
        seed_style = SeedStyleDataset(root, patients[: args.seed_patients], args.slices)
        ceiling = TransportCeiling(len(cache), args.size)
        rows = {}
        for workers in (0, 2):
            rows[f"ceiling_w{workers}"] = loader_throughput(ceiling, args.items, workers)
            rows[f"cache_w{workers}"] = loader_throughput(cache, args.items, workers)
            rows[f"compact_w{workers}"] = loader_throughput(compact, args.items, workers, widen=True)
            rows[f"seed_w{workers}"] = loader_throughput(seed_style, args.seed_items, workers, steady=False)
        augmented = MultiOrganDataset(patients, data_root=root, augment=True)
        rows["cache_augment_w2"] = loader_throughput(augmented, args.items // 2, 2)
        memory = index_memory(root / "index", args.index_slices, args.slices, args.size)

    speedup = rows["compact_w2"]["slices_per_s"] / rows["seed_w2"]["slices_per_s"]
    speedup_contract = rows["cache_w2"]["slices_per_s"] / rows["seed_w2"]["slices_per_s"]
    speedup_cpu = rows["seed_w2"]["cpu_ms_per_slice"] / rows["cache_w2"]["cpu_ms_per_slice"]
    print(f"\nCPU: {os.cpu_count()} cores shared with other jobs (load average "
          f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, batch {BATCH_SIZE}, "
          f"{args.size}x{args.size} slices, cache in the page cache")
    print(f"{'loader':<30}{'workers':>8}{'items':>7}{'slices/s':>10}{'incl. start':>12}"
          f"{'CPU ms/slice':>13}{'idle est.':>10}")
    names = {"ceiling": "DataLoader alone (ceiling)", "cache": "memory-mapped cache",
             "compact": "cache, compact=True", "seed": "seed-style .nii.gz per item",
             "cache_augment": "cache + augmentation"}
    for key, row in rows.items():
        print(f"{names[key.rsplit('_w', 1)[0]]:<30}{row['workers']:>8}{row['items']:>7}"
              f"{row['slices_per_s']:>10.1f}{row['with_startup']:>12.1f}"
              f"{row['cpu_ms_per_slice']:>13.3f}{row['idle_estimate']:>10.0f}")
    print(f"speed-up over the seed-style loader, 2 workers: {speedup:.0f}x (compact), "
          f"{speedup_contract:.0f}x (float32/int64 items), {speedup_cpu:.0f}x in CPU time per slice")
    print(f"index of {memory['slices']} slices ({memory['patients']} patients): "
          f"{memory['dataset_mb']:.2f} MB held (tracemalloc), {memory['peak_build_mb']:.2f} MB peak "
          f"while building, {memory['index_arrays_mb']:.2f} MB of index arrays, "
          f"{memory['pickled_mb']:.2f} MB pickled per worker, built in {memory['build_s']:.2f} s")
    met = {
        "slices_per_s_2_workers_compact": rows["compact_w2"]["slices_per_s"] >= TARGET_SLICES_PER_S,
        "slices_per_s_2_workers_float32_int64": rows["cache_w2"]["slices_per_s"] >= TARGET_SLICES_PER_S,
        "speedup_vs_seed": speedup >= TARGET_SPEEDUP,
        "index_memory": memory["dataset_mb"] <= TARGET_INDEX_MB,
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "config": vars(args) | {"out": str(args.out), "batch_size": BATCH_SIZE},
        "loaders": rows, "speedup_vs_seed_2_workers_compact": speedup,
        "speedup_vs_seed_2_workers_float32_int64": speedup_contract,
        "speedup_vs_seed_cpu_time": speedup_cpu,
        "index_memory": memory,
        "targets": {"slices_per_s_2_workers": TARGET_SLICES_PER_S, "speedup_vs_seed": TARGET_SPEEDUP,
                    "index_mb": TARGET_INDEX_MB},
        "met": met,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
