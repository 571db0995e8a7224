"""Benchmark: one real patient from DICOM in to RTSTRUCT out, in float32 and in the fast path.

Runs ``predict_multi_organ.py``'s functions (read the CT, segment through ``thoracic_seg.inference``,
write the RTSTRUCT and files) once per precision and times every stage; the fast path is bfloat16
autocast + channels-last, what ``--precision auto`` picks where bfloat16 is native. Input: ``--input``,
by default LUNG1-005 (91 x 512 x 512) from the shared sample archive; network: ``--checkpoint``, by
default the full-size U-Net with random weights (see :func:`run`); ``--dice-checkpoint`` (trained)
compares its float32 and bfloat16 labels.

    python benchmarks/bench_inference.py                          # LUNG1-005, float32 vs bfloat16
    python benchmarks/bench_inference.py --dice-checkpoint runs/x/best_unet_multi_organ.pth
    python benchmarks/bench_inference.py --input DIR --checkpoint best_unet_multi_organ.pth --device cuda

Prints a table and writes JSON (``--output``, default ``benchmarks/bench_inference.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_inference.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import predict_multi_organ as pm  # noqa: E402
from thoracic_seg import organs  # noqa: E402
from thoracic_seg.cases import STAGES, find_cases, output_paths, read_case, write_outputs
from thoracic_seg.grid import DEFAULT_SIZE, DEFAULT_WINDOW  # noqa: E402
from thoracic_seg.image_grid import segment_image
from thoracic_seg.inference import Predictor
from thoracic_seg.precision import (
    cpu_has_native_bfloat16,  # noqa: E402
    resolve_device,
)
from unet_multi_organ import count_parameters, save_untrained_checkpoint  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "bench_inference.json"
SAMPLE_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "nsclc-radiomics-sample.tar.xz"
REFERENCE_MASKS = REPO_ROOT.parent / "shared" / "data" / "reference-masks"
DEFAULT_PATIENT = "LUNG1-005"
TARGET_SECONDS = {"cpu": 60.0, "cuda": 5.0}
#: precision name -> what Predictor.load gets; the fast path is bfloat16 + channels-last.
SETTINGS = {"float32": "float32", "bfloat16": "bfloat16"}
BENCH_STAGES = ("load_model", "find_series", *STAGES)
#: Dice between precisions is reported for structures with at least this many voxels in float32
#: (a Dice of a few voxels says nothing), as in the round-trip criterion.
MIN_VOXELS = 1000


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, threads, bfloat16 support, load average; GPU name when on CUDA."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_fast_bfloat16": cpu_has_native_bfloat16(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def random_checkpoint(path: Path, base_channels: int, seed: int, size: int = DEFAULT_SIZE) -> Path:
    """The U-Net with random weights and zero biases, saved as a training checkpoint."""
    preprocessing = {"window": list(DEFAULT_WINDOW), "size": size, "zscore": "per_patient"}
    return save_untrained_checkpoint(path, preprocessing, base_channels=base_channels, seed=seed)


def unpack_sample(patient: str, dest: Path) -> Path:
    """Unpack ``patient``'s folder from the shared sample archive into ``dest``; returns it."""
    if not SAMPLE_ARCHIVE.is_file():
        raise FileNotFoundError(f"sample data {SAMPLE_ARCHIVE} not found; give --input DICOM_DIR")
    prefix = f"nsclc-radiomics-sample/{patient}/"
    with tarfile.open(SAMPLE_ARCHIVE, "r:xz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise ValueError(f"{patient} is not in {SAMPLE_ARCHIVE}")
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def dice_per_structure(a: np.ndarray, b: np.ndarray, min_voxels: int = 0) -> dict[str, float]:
    """Dice of each label 1-7 with at least ``min_voxels`` voxels in ``a`` (and any voxel in either)."""
    out = {}
    for label in organs.FOREGROUND_LABELS:
        x, y = a == label, b == label
        total = int(x.sum()) + int(y.sum())
        if total and int(x.sum()) >= min_voxels:
            out[organs.structure(label).key] = 2.0 * int(np.logical_and(x, y).sum()) / total
    return out


def voxel_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=organs.NUM_CLASSES)
    return {organs.structure(label).key: int(counts[label]) for label in organs.FOREGROUND_LABELS if counts[label]}


def reference_label_map(patient_id: str, ct: sitk.Image) -> np.ndarray | None:
    """The clinical label map of a sample patient: its plastimatch reference masks (one per ROI of
    the clinical RTSTRUCT) combined with ``organs.PRIORITY``; None when there are none."""
    folder = REFERENCE_MASKS / patient_id
    masks = sorted(folder.glob("*.nii.gz")) if folder.is_dir() else []
    if not masks:
        return None
    by_label: dict[int, np.ndarray] = {}
    for path in masks:
        label = organs.match_roi_name(path.name[: -len(".nii.gz")])
        if label in organs.FOREGROUND_LABELS:
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
            by_label[label] = by_label[label] | mask if label in by_label else mask
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    for label in reversed(organs.PRIORITY):
        if label in by_label:
            labels[by_label[label]] = label
    return labels


def run_once(input_dir: Path, checkpoint: Path, output_dir: Path, *, device: str, precision: str,
             batch_size: int | None, clinical_outputs: bool) -> dict[str, Any]:
    """Segment the patient once with ``predict_multi_organ``'s functions; seconds per stage.

    With ``clinical_outputs`` the RTSTRUCT and files are made from the patient's clinical label
    map instead of the prediction (see :func:`run`); the prediction is still returned.
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size)
    seconds["load_model"] = time.perf_counter() - start
    start = time.perf_counter()
    (case,) = find_cases(input_dir)
    seconds["find_series"] = time.perf_counter() - start
    start = time.perf_counter()
    ct = read_case(case)
    hu = sitk.GetArrayFromImage(ct.image)
    seconds["read"] = time.perf_counter() - start
    labels = segment_image(predictor, ct.image, seconds)
    clinical = reference_label_map(case.patient_id, ct.image) if clinical_outputs else None
    outputs = output_paths(output_dir, case.patient_id, dicom=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = write_outputs(ct, hu, labels if clinical is None else clinical, outputs, predictor, seconds)
    return {
        "precision": predictor.precision.name,
        "channels_last": predictor.channels_last,
        "device": str(predictor.device),
        "batch_size": predictor.batch_size,
        "patient_id": case.patient_id,
        "shape_zyx": list(labels.shape),
        "outputs_from": "clinical label map" if clinical is not None else "prediction",
        "seconds": {stage: round(seconds.get(stage, 0.0), 3) for stage in BENCH_STAGES},
        "total_s": round(sum(seconds.values()), 3),
        "seconds_per_slice_predict": round(seconds["predict"] / labels.shape[0], 4),
        "rois": written["rois"],
        "labels": labels,
        "hu": hu,
        "ct": ct,
    }


def precision_dice(checkpoint: Path, image: sitk.Image, device: str, batch_size: int | None,
                   clinical: np.ndarray | None) -> dict[str, Any]:
    """Labels of ``checkpoint`` in float32 and in bfloat16 on the same HU: Dice per structure between
    them, and of each against the clinical label map (how good the network is at all)."""
    labels = {}
    for precision in ("float32", "bfloat16"):
        predictor = Predictor.load(checkpoint, device=device, precision=precision, batch_size=batch_size)
        labels[precision] = segment_image(predictor, image)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dice_bfloat16_vs_float32": dice_per_structure(labels["float32"], labels["bfloat16"], MIN_VOXELS),
        "voxels_float32": voxel_counts(labels["float32"]),
        "voxels_bfloat16": voxel_counts(labels["bfloat16"]),
        "voxel_agreement": float((labels["float32"] == labels["bfloat16"]).mean()),
    }
    if clinical is not None:
        report["dice_vs_clinical"] = {p: dice_per_structure(labels[p], clinical) for p in labels}
    return report


def format_table(runs: Sequence[dict[str, Any]], dice: dict[str, float], target: float) -> str:
    """Stages down, one column per run; then the bfloat16-vs-float32 Dice line."""
    names = [f"{r['precision']}{'+CL' if r['channels_last'] else ''} (bs {r['batch_size']})" for r in runs]
    width = max(14, *(len(n) for n in names))
    lines = [f"{'stage (s)':<16}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for stage in BENCH_STAGES:
        lines.append(f"{stage:<16}" + "".join(f"{r['seconds'][stage]:>{width + 2}.2f}" for r in runs))
    lines.append(f"{'total':<16}" + "".join(f"{r['total_s']:>{width + 2}.2f}" for r in runs))
    lines.append(f"{'target':<16}" + "".join(f"{target:>{width + 2}.0f}" for _ in runs))
    if dice:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in dice.items())
        lines.append(f"Dice bfloat16 vs float32 labels of this network (>= {MIN_VOXELS} voxels): "
                     f"min {min(dice.values()):.4f} ({shown})")
    return "\n".join(lines)


def run(*, input_dir: Path | None, checkpoint: Path | None, device: str, precisions: Sequence[str],
        batch_size: int | None, base_channels: int, seed: int, patient: str, output: Path,
        dice_checkpoint: Path | None = None, size: int = DEFAULT_SIZE) -> dict[str, Any]:
    """Run the benchmark; returns the JSON report (also written to ``output``).

    With the default random network the RTSTRUCT and output files are made from the patient's
    clinical label map when the shared reference masks have it: an untrained network labels the
    CT in speckles (10^5 tiny contours), which is not the work a planner's RTSTRUCT takes. The
    network stages do not depend on the weights; its own bfloat16-vs-float32 Dice is a worst case
    (small margins between class scores). ``dice_checkpoint`` (a trained network) measures how much
    bfloat16 changes the labels on the same CT, and the Dice of each against the clinical labels.
    """
    torch_device = resolve_device(device)
    clinical_outputs = checkpoint is None
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        tmp_path = Path(tmp)
        source = str(input_dir)
        if input_dir is None:
            input_dir = unpack_sample(patient, tmp_path / "dicom")
            source = f"{patient} from {SAMPLE_ARCHIVE.name}"
        network = f"checkpoint {checkpoint}"
        if checkpoint is None:
            checkpoint = random_checkpoint(tmp_path / "random.pth", base_channels, seed, size)
            network = f"random weights (seed {seed}), zero biases, base_channels {base_channels}, {size} px slices"
        parameters = count_parameters(Predictor.load(checkpoint, device="cpu", precision="float32").model)
        runs = []
        for precision in precisions:
            print(f"running {precision} ...", file=sys.stderr, flush=True)
            runs.append(run_once(Path(input_dir), checkpoint, tmp_path / precision, device=device,
                                 precision=SETTINGS[precision], batch_size=batch_size,
                                 clinical_outputs=clinical_outputs))
        clinical = reference_label_map(runs[0]["patient_id"], runs[0]["ct"].image)
        trained = None
        if dice_checkpoint is not None:
            print("measuring bfloat16 vs float32 labels of the trained network ...", file=sys.stderr, flush=True)
            trained = precision_dice(dice_checkpoint, runs[0]["ct"].image, device, batch_size, clinical)
    by_precision = {r["precision"]: r for r in runs}
    dice = {}
    if {"float32", "bfloat16"} <= set(by_precision):
        dice = dice_per_structure(by_precision["float32"]["labels"], by_precision["bfloat16"]["labels"], MIN_VOXELS)
    target = TARGET_SECONDS.get(torch_device.type, 60.0)
    report = {
        "benchmark": "DICOM in -> label map + RTSTRUCT + volumes + overlay out (predict_multi_organ.py)",
        "input": source, "network": network, "parameters": parameters,
        "machine": machine_description(torch_device), "target_s": target,
        "runs": [{k: v for k, v in r.items() if k not in ("labels", "hu", "ct")} for r in runs],
        "dice_bfloat16_vs_float32_benchmarked_network": {k: round(v, 5) for k, v in dice.items()},
        "trained_network_precision_check": trained,
    }
    first = report["runs"][0]
    print(f"{first['patient_id']} {first['shape_zyx']} on {torch_device}, {parameters:,} parameters ({network}); "
          f"outputs from the {first['outputs_from']}; load average {report['machine']['load_average_1min']:.1f}")
    print(format_table(runs, dice, target))
    if trained is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in trained["dice_bfloat16_vs_float32"].items())
        print(f"trained network {dice_checkpoint.name}: Dice bfloat16 vs float32 (>= {MIN_VOXELS} voxels) {shown}; "
              f"voxels agreeing {100 * trained['voxel_agreement']:.3f}%")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=None,
                        help=f"one patient's DICOM folder (default: {DEFAULT_PATIENT} from {SAMPLE_ARCHIVE})")
    parser.add_argument("--patient", default=DEFAULT_PATIENT, help="patient of the sample archive (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained checkpoint (default: the full-size U-Net with random weights)")
    parser.add_argument("--dice-checkpoint", type=Path, default=None,
                        help="a trained checkpoint whose float32 and bfloat16 labels are compared on the same CT")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precisions", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--batch-size", type=pm.positive_int, default=None, help="default: chosen from free memory")
    parser.add_argument("--base-channels", type=pm.positive_int, default=64, help="random network width (default: 64)")
    parser.add_argument("--size", type=pm.positive_int, default=DEFAULT_SIZE,
                        help="random network's slice size (default: %(default)s, phase 3's)")
    parser.add_argument("--threads", type=pm.positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(input_dir=args.input, checkpoint=args.checkpoint, device=args.device, precisions=args.precisions,
            batch_size=args.batch_size, base_channels=args.base_channels, seed=args.seed, patient=args.patient,
            output=args.output, dice_checkpoint=args.dice_checkpoint, size=args.size)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
