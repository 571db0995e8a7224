"""Benchmark of phase 2 (DICOM -> NIfTI) and phase 2.5 (RTSTRUCT -> label map) on the two real
NSCLC-Radiomics patients: seconds per patient and peak memory.

    .venv/bin/python benchmarks/bench_conversion.py [--repeats 3] [--sample-root DIR]

Unpacks ../shared/data/nsclc-radiomics-sample.tar.xz into a temporary folder (or uses an unpacked
``--sample-root``) and runs each (phase, patient) in a fresh Python process (:func:`measure_child`);
phase 2 reads the patient's own folder as a one-patient collection. Prints a table and writes
benchmarks/bench_conversion.json. Targets on a 2-core machine, per 100-slice 512x512 patient (these
have 91 slices; the table scales seconds to 100): phase 2 <= 2.3 s including the .nii.gz write
(dcm2niix), phase 2.5 <= 0.5 s for all structures (rt-utils ~2.2 s, plastimatch ~2.0 s), peak
memory <= 3x the CT volume's size (int16).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"
ARCHIVE = SHARED_DATA / "nsclc-radiomics-sample.tar.xz"
PATIENTS = ("LUNG1-005", "LUNG1-010")
PHASES = {"2": "convert_dicom_to_nifti", "2.5": "extract_multi_organ_masks"}
TARGET_SECONDS_PER_100_SLICES = {"2": 2.3, "2.5": 0.5}
TARGET_MEMORY_FACTOR = 3.0
OUTPUT_JSON = REPO / "benchmarks" / "bench_conversion.json"


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_child(phase: str, patient: str, data_root: Path, sample_root: Path, repeats: int) -> dict:
    """Runs in the fresh process (peak memory is this run's alone): ``repeats`` timed runs of the
    phase's ``run()`` (``workers=1``, ``overwrite``; imports excluded), then one traced run.

    ``cpu_seconds`` beside ``seconds``: on a shared machine wall time also counts waiting.
    ``peak_rss_bytes``: ``ru_maxrss`` over the timed runs minus the resident size after the imports
    (what the phase itself needed, C++ buffers included); ``traced_peak_bytes``: the ``tracemalloc``
    peak of the extra run (Python and numpy allocations only).
    """
    import importlib

    import numpy  # noqa: F401  (imports are not part of the measurement)
    import pydicom  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import SimpleITK  # noqa: F401

    module = importlib.import_module(PHASES[phase])
    dicom_root = sample_root / patient if phase == "2" else sample_root
    kwargs = dict(data_root=data_root, dicom_root=dicom_root, patients=[patient], workers=1, overwrite=True)
    baseline = _rss_bytes()
    seconds, cpu_seconds, statuses = [], [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        results = module.run(**kwargs)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        statuses.append(results[0].status)
    peak_rss = _maxrss_bytes() - baseline
    tracemalloc.start()
    module.run(**kwargs)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"phase": phase, "patient": patient, "status": statuses[0], "seconds": seconds,
            "cpu_seconds": cpu_seconds, "peak_rss_bytes": peak_rss, "traced_peak_bytes": traced_peak}


def run_child(phase: str, patient: str, data_root: Path, sample_root: Path, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", phase, patient, "--data-root", str(data_root),
               "--sample-root", str(sample_root), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"phase {phase} on {patient} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ct_facts(data_root: Path, patient: str) -> dict:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(data_root / "processed" / "ct_nifti" / f"{patient}.nii.gz"))
    reader.ReadImageInformation()
    nx, ny, nz = reader.GetSize()
    return {"shape_zyx": [nz, ny, nx], "ct_bytes": nx * ny * nz * 2}  # int16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase and patient (default 3)")
    parser.add_argument("--sample-root", type=Path, default=None,
                        help="folder holding LUNG1-005/ and LUNG1-010/ (default: unpack the shared archive)")
    parser.add_argument("--data-root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "PATIENT"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.child:
        print(json.dumps(measure_child(*args.child, args.data_root, args.sample_root, args.repeats)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_conversion_") as tmp:
        sample_root = args.sample_root
        if sample_root is None:
            if not ARCHIVE.is_file():
                parser.error(f"real sample data not found at {ARCHIVE}")
            with tarfile.open(ARCHIVE, "r:xz") as tar:
                tar.extractall(tmp, filter="data")
            sample_root = Path(tmp) / "nsclc-radiomics-sample"
        data_root = Path(tmp) / "DATA"
        rows = []
        for phase in PHASES:  # phase 2.5 reads what phase 2 wrote
            for patient in PATIENTS:
                row = run_child(phase, patient, data_root, sample_root, args.repeats)
                row.update(ct_facts(data_root, patient))
                rows.append(row)

    header = (f"{'phase':>5} {'patient':<10} {'slices':>6} {'s (median)':>10} {'s first':>8} {'cpu s':>6} "
              f"{'s/100 sl':>8} {'target':>6} {'peak RSS MB':>11} {'traced MB':>9} {'x CT':>5} {'ok':>3}")
    print(header)
    print("-" * len(header))
    for row in rows:
        slices = row["shape_zyx"][0]
        median = statistics.median(row["seconds"])
        per_100 = median * 100 / slices
        factor = max(row["peak_rss_bytes"], row["traced_peak_bytes"]) / row["ct_bytes"]
        row.update(seconds_median=median, cpu_seconds_median=statistics.median(row["cpu_seconds"]),
                   seconds_per_100_slices=per_100, memory_factor=factor,
                   target_seconds_per_100_slices=TARGET_SECONDS_PER_100_SLICES[row["phase"]],
                   target_memory_factor=TARGET_MEMORY_FACTOR)
        row["meets_targets"] = bool(row["status"] == "done" and per_100 <= row["target_seconds_per_100_slices"]
                                    and factor <= TARGET_MEMORY_FACTOR)
        print(f"{row['phase']:>5} {row['patient']:<10} {slices:>6} {median:>10.3f} {row['seconds'][0]:>8.3f} "
              f"{row['cpu_seconds_median']:>6.3f} {per_100:>8.3f} {row['target_seconds_per_100_slices']:>6.1f} "
              f"{row['peak_rss_bytes'] / 1e6:>11.1f} {row['traced_peak_bytes'] / 1e6:>9.1f} {factor:>5.2f} "
              f"{'yes' if row['meets_targets'] else 'NO':>3}")
    print(f"CT volume: {rows[0]['ct_bytes'] / 1e6:.1f} MB (int16); memory factor = max(peak RSS, traced) / CT size")
    report = {"benchmark": "bench_conversion", "machine": {"python": platform.python_version(),
              "platform": platform.platform(), "cpus": os.cpu_count()}, "repeats": args.repeats, "results": rows}
    OUTPUT_JSON.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {OUTPUT_JSON}")
    return 0 if all(r["meets_targets"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
