"""Benchmark: segmentation quality on real patients, cross-validated by patient, for several
training configurations side by side (issue 14).

    .venv/bin/python benchmarks/bench_quality.py                      # CPU: the built-in set, seeds 0 1
    .venv/bin/python benchmarks/bench_quality.py --configs 2d 2.5d-k1 --seeds 0 1 2 --synthetic 10
    python benchmarks/bench_quality.py --device cuda                  # full network on a GPU
    .venv/bin/python benchmarks/bench_quality.py --markdown benchmarks/bench_quality.md

The two real sample patients (``../shared/data``) plus any ``--extra-root`` go through phases 2 and
2.5; every configuration (:func:`parse_config`) x fold (:func:`make_folds`, by patient) x seed trains
for ``--steps`` and scores its held-out patients in 3D, without and with each post-processing rule
(:func:`train_and_evaluate`, :func:`choose_postprocessing`). Prints Markdown tables (``--markdown``:
for benchmarks/RESULTS.md) and writes every row to JSON (``--output``). The defaults and what they
cost: :data:`SIZING` (the measured run and its machine: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import logging
import math
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_quality.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

log = logging.getLogger("bench_quality")

ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "nsclc-radiomics-sample.tar.xz"
SAMPLE_FOLDER = "nsclc-radiomics-sample"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "bench_quality.json"
BUILTIN_CONFIGS = ("2d", "2.5d-k1", "2.5d-k2", "crop")
DEFAULT_SEEDS = (0, 1)
#: Defaults per device type. CPU, the small network: ~0.2 s a step of batch 8 on 2 quiet cores (network
#: ~0.09 s, augmentation ~0.08 s, checkpoint and curves ~0.03 s), ~100 s a training, ~10 s an evaluation:
#: 16 x 120 s + 20 s ~= 32 min (measured 33.9); another job on the cores (load 4-5) makes steps 4-7x
#: slower. CUDA, the full network: 48,000 slices a training, estimated 1-2.5 min from RESULTS.md's
#: 330-850 slices/s at 256 px (not measured here). ``--synthetic N`` adds slices per epoch, not steps.
SIZING = {
    "cpu": {"size": 128, "base_channels": 16, "batch_size": 8, "steps": 500},
    "cuda": {"size": 256, "base_channels": 64, "batch_size": 16, "steps": 3000},
}
DEFAULT_LR = 1e-3  # the demo's recipe (make demo): short budgets need more than train's 1e-4
CHECKPOINTS = ("last", "best")
SYNTHETIC_SEED = 0
#: Post-processing rows of every held-out patient: none, the pipeline's ``--postprocess``
#: (``thoracic_seg.postprocess.POSTPROCESS_MIN_FRACTION``), then each candidate rule of
#: ``thoracic_seg.postprocess.POSTPROCESS_CANDIDATES`` applied to every organ alike.
NO_POSTPROCESS, DEFAULT_POSTPROCESS = "none", "--postprocess"
#: "Never worse": no measured Dice lower than without post-processing by more than this (the
#: table's precision; removing a few voxels of a lung changes its Dice in the fifth decimal).
DICE_TOLERANCE = 0.001
TABLE_HEADER = ("| structure | configuration | post-processing | n | Dice mean ± std | Dice seed std "
                "| HD95 mean ± std (mm) | HD95 inf |")
TABLE_RULE = "|---|---|---|---:|---:|---:|---:|---:|"
RUNS_HEADER = ("| configuration | trainings | steps | train s mean | train slices/s mean "
               "| evaluation s mean |")
RUNS_RULE = "|---|---:|---:|---:|---:|---:|"
CANDIDATES_HEADER = ("| structure | post-processing | n | Dice mean | Dice change mean | Dice change worst "
                     "| HD95 change mean (mm) | chosen |")
CANDIDATES_RULE = "|---|---|---:|---:|---:|---:|---:|---|"


# ---- Configurations and folds (pure) ---------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One training configuration: its name, the slice context K and whether phase 3 crops to the body."""

    name: str
    context_slices: int
    crop_body: bool


def parse_config(name: str) -> Config:
    """``2d`` (one slice), ``2.5d-kK`` (K neighbours per side), ``crop`` (phase 3 crops each slice to
    the body first) or ``+``-joined combinations (``crop+2.5d-k1``).

    ``crop`` alone means ``crop+2d``. Raises ``ValueError`` naming the part not understood.
    """
    parts = [p for p in name.strip().lower().split("+")]
    context: int | None = None
    crop = False
    for part in parts:
        if part == "crop" and not crop:
            crop = True
        elif part == "2d" and context is None:
            context = 0
        elif part.startswith("2.5d-k") and part[6:].isdigit() and context is None:
            context = int(part[6:])
            if context < 1:
                raise ValueError(f"configuration {name!r}: 2.5d needs K >= 1 (2.5d-k1), got {part!r}")
        else:
            raise ValueError(f"configuration {name!r}: cannot read {part!r} (or it is given twice); "
                             f"expected 2d, 2.5d-kK, crop or a '+' combination such as crop+2.5d-k1")
    from thoracic_seg.grid import check_context_slices

    return Config(name=name, context_slices=check_context_slices(context or 0), crop_body=crop)


def make_folds(patients: Sequence[str], n_folds: int | None = None) -> list[list[str]]:
    """Patient-level folds: the sorted ids dealt round-robin into ``n_folds`` test sets
    (None: one patient per fold). ``ValueError`` unless 2 <= n_folds <= number of patients."""
    ids = sorted(dict.fromkeys(patients))
    n = len(ids) if n_folds is None else n_folds
    if len(ids) < 2:
        raise ValueError(f"cross-validation needs at least 2 patients, got {len(ids)}: {ids}")
    if not 2 <= n <= len(ids):
        raise ValueError(f"folds must be 2-{len(ids)} for {len(ids)} patients, got {n}")
    return [ids[i::n] for i in range(n)]


def steps_per_epoch(n_slices: int, batch_size: int) -> int:
    """Optimizer steps of one epoch as train_multi_organ.py draws it (the last short batch is
    dropped when the epoch holds at least two batches)."""
    return n_slices // batch_size if n_slices >= 2 * batch_size else math.ceil(n_slices / batch_size)


def epochs_for(steps: int, n_slices: int, batch_size: int) -> int:
    """Epochs that hold ``steps`` steps, so the epoch-wise cosine schedule spans the step budget."""
    return max(1, math.ceil(steps / steps_per_epoch(n_slices, batch_size)))


def crop_supported() -> bool:
    """Whether the installed phase 3 (``normalize_ct_and_masks.run``) has the ``crop_body`` option
    (without it the crop configurations are reported as skipped and the others run)."""
    import normalize_ct_and_masks

    return "crop_body" in inspect.signature(normalize_ct_and_masks.run).parameters


# ---- Results (pure) --------------------------------------------------------------------------
def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """evaluate_multi_organ's ``metrics.csv`` as dicts; metric cells as float or None (not annotated);
    ``surface_dice`` and ``apl_mm`` where the file has them."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append({"patient_id": row["patient_id"], "structure": row["structure"],
                         "annotated": row["annotated"] == "yes",
                         **{k: _number(row[k]) for k in ("dice", "hd95_mm", "truth_ml", "predicted_ml",
                                                          "volume_diff_pct")},
                         **{k: _number(row[k]) for k in ("surface_dice", "apl_mm") if k in row}})
    return rows


def _jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN Dice (truth and prediction empty) -> None; infinite HD95 -> None with ``hd95_inf`` true."""
    out = dict(row)
    hd95 = out.get("hd95_mm")
    out["hd95_inf"] = hd95 is not None and math.isinf(hd95)
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
    return out


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample standard deviation (n - 1; None below 2 values) and n."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def summarize(rows: Sequence[dict[str, Any]], configs: Sequence[str],
              postprocessing: Sequence[str] = (NO_POSTPROCESS, DEFAULT_POSTPROCESS)) -> list[dict[str, Any]]:
    """One entry per (structure, configuration, post-processing) in table order, over the scored rows
    (annotated, Dice defined): ``dice`` and ``hd95_mm`` (finite values) mean/std/n, ``hd95_inf``, and
    ``dice_seed_std``: the spread due to the seed alone, the Dice's sample std over the seeds of
    one held-out patient, averaged over patients (None with one seed)."""
    from thoracic_seg import organs

    out = []
    for label in organs.FOREGROUND_LABELS:
        key = organs.structure(label).key
        for config in configs:
            for postprocess in postprocessing:
                scored = [r for r in rows if r["structure"] == key and r["config"] == config
                          and r["postprocess"] == postprocess and r["annotated"] and r["dice"] is not None]
                hd95 = [r["hd95_mm"] for r in scored if r["hd95_mm"] is not None]
                by_patient: dict[tuple, list[float]] = {}
                for r in scored:
                    by_patient.setdefault((r["fold"], r["patient_id"]), []).append(r["dice"])
                seed_stds = [mean_std(v)["std"] for v in by_patient.values() if len(v) > 1]
                out.append({"structure": key, "config": config, "postprocess": postprocess,
                            "n": len(scored), "dice": mean_std([r["dice"] for r in scored]),
                            "dice_seed_std": mean_std(seed_stds)["mean"],
                            "hd95_mm": mean_std(hd95), "hd95_inf": sum(r["hd95_inf"] for r in scored)})
    return out


def _num(value: float | None, digits: int, sign: bool = False) -> str:
    """A table cell: ``-`` for None, else ``digits`` decimals (with ``sign``: always signed)."""
    return "-" if value is None else f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _pm(stats: dict[str, Any], digits: int) -> str:
    """``mean ± std`` of :func:`mean_std`'s result (``-`` for what is missing)."""
    return "-" if stats["mean"] is None else f"{_num(stats['mean'], digits)} ± {_num(stats['std'], digits)}"


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """The quality table in Markdown: Dice with 3 decimals, HD95 in mm with 1."""
    from thoracic_seg import organs

    lines = [TABLE_HEADER, TABLE_RULE]
    for s in summary:
        lines.append(f"| {organs.BY_KEY[s['structure']].name} | {s['config']} | {s['postprocess']} "
                     f"| {s['n']} | {_pm(s['dice'], 3)} "
                     f"| {_num(s.get('dice_seed_std'), 3)} "
                     f"| {_pm(s['hd95_mm'], 1)} | {s['hd95_inf']} |")
    return "\n".join(lines)


def format_runs_table(runs: Sequence[dict[str, Any]], configs: Sequence[str]) -> str:
    """Training cost per configuration: trainings done, steps, seconds and slices/s (means)."""
    lines = [RUNS_HEADER, RUNS_RULE]
    for config in configs:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue

        def mean(key: str) -> float:
            return sum(r[key] for r in mine) / len(mine)

        lines.append(f"| {config} | {len(mine)} | {mine[0]['steps']} | {mean('train_seconds'):.1f} "
                     f"| {mean('train_slices_per_s'):.1f} | {mean('evaluation_seconds'):.1f} |")
    return "\n".join(lines)


def _paired(rows: Sequence[dict[str, Any]], structure: str, postprocess: str) -> list[tuple[dict, dict]]:
    """(without, with ``postprocess``) row pairs of one structure, per scored (config, fold, seed, patient)."""
    def key(r: dict[str, Any]) -> tuple:
        return r["config"], r["fold"], r["seed"], r["patient_id"]

    plain = {key(r): r for r in rows if r["structure"] == structure and r["postprocess"] == NO_POSTPROCESS
             and r["annotated"] and r["dice"] is not None}
    return [(plain[key(r)], r) for r in rows
            if r["structure"] == structure and r["postprocess"] == postprocess and key(r) in plain]


def compare_postprocessing(rows: Sequence[dict[str, Any]], postprocessing: Sequence[str],
                           structures: Sequence[str]) -> list[dict[str, Any]]:
    """Per structure x post-processing, paired with no post-processing over every configuration,
    fold, seed and held-out patient: n, mean Dice, mean and worst Dice change, mean HD95 change
    (pairs with both HD95 finite)."""
    out = []
    for structure in structures:
        for postprocess in postprocessing:
            pairs = _paired(rows, structure, postprocess)
            changes = [after["dice"] - before["dice"] for before, after in pairs]
            hd95 = [after["hd95_mm"] - before["hd95_mm"] for before, after in pairs
                    if after["hd95_mm"] is not None and before["hd95_mm"] is not None]
            out.append({"structure": structure, "postprocess": postprocess, "n": len(pairs),
                        "dice": mean_std([after["dice"] for _, after in pairs])["mean"],
                        "dice_change_mean": mean_std(changes)["mean"],
                        "dice_change_worst": min(changes) if changes else None,
                        "hd95_change_mean": mean_std(hd95)["mean"]})
    return out


def choose_postprocessing(comparison: Sequence[dict[str, Any]], candidates: Sequence[str]) -> dict[str, str]:
    """Per structure, the candidate whose Dice is never below no post-processing on any measured
    pair (by more than :data:`DICE_TOLERANCE`) and best on average (a positive mean change; the
    first listed of equal ones); ``none`` when no candidate qualifies."""
    chosen: dict[str, str] = {}
    for structure in dict.fromkeys(e["structure"] for e in comparison):
        qualified = [e for e in comparison if e["structure"] == structure and e["postprocess"] in candidates
                     and e["n"] and e["dice_change_worst"] >= -DICE_TOLERANCE and e["dice_change_mean"] > 0]
        chosen[structure] = (max(qualified, key=lambda e: e["dice_change_mean"])["postprocess"]
                             if qualified else NO_POSTPROCESS)
    return chosen


def format_candidates_table(comparison: Sequence[dict[str, Any]], chosen: dict[str, str]) -> str:
    """The post-processing comparison in Markdown (changes are with minus without)."""
    from thoracic_seg import organs

    lines = [CANDIDATES_HEADER, CANDIDATES_RULE]
    for e in comparison:
        lines.append(f"| {organs.BY_KEY[e['structure']].name} | {e['postprocess']} | {e['n']} "
                     f"| {_num(e['dice'], 3)} | {_num(e['dice_change_mean'], 4, sign=True)} "
                     f"| {_num(e['dice_change_worst'], 4, sign=True)} | {_num(e['hd95_change_mean'], 1, sign=True)} "
                     f"| {'yes' if chosen.get(e['structure']) == e['postprocess'] else ''} |")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """Both tables and the skipped configurations, in Markdown."""
    parts = [format_table(report["summary"]), "", format_runs_table(report["runs"], report["configs"])]
    if report.get("postprocess_comparison"):
        parts += ["", "Post-processing, paired with none over every configuration, fold, seed and held-out "
                      f"patient (`chosen`: never below none by more than {DICE_TOLERANCE:g} Dice, best mean; "
                      "`--postprocess` is the pipeline's rule: "
                      f"{report['postprocess_rule']}):", "",
                  format_candidates_table(report["postprocess_comparison"], report["postprocess_chosen"])]
    for name, reason in report["skipped"].items():
        parts.append(f"\nSkipped: {name}: {reason}")
    return "\n".join(parts)


def format_markdown(report: dict[str, Any]) -> str:
    """A RESULTS.md section: what was run, on what, with which budget, then the tables."""
    b, m = report["budget"], report["machine"]
    folds = "; ".join(", ".join(f["test"]) for f in report["folds"])
    return "\n".join([
        "## Quality on real patients (`bench_quality.py`)", "",
        f"`{report['command']}`", "",
        f"{len(report['folds'])} folds by patient (held out: {folds}), seeds "
        f"{', '.join(map(str, report['seeds']))}, {b['synthetic']} synthetic training patients; "
        f"{b['steps']} steps of batch {b['batch_size']} at {b['size']} px, base channels "
        f"{b['base_channels']}, lr {b['lr']:g} cosine, augmentation, {b['checkpoint']} checkpoint; "
        f"{m.get('device')}, {m.get('cpu_model')}, {m.get('cpu_count')} cores, torch {m.get('torch')}; "
        f"wall {report['wall_seconds'] / 60:.1f} min.", "",
        format_report(report), "",
    ])


# ---- Data preparation ------------------------------------------------------------------------
def _check_results(results: Sequence[Any], what: str) -> list[str]:
    """Patient ids done or skipped; failed ones are logged and left out."""
    from thoracic_seg.batch import FAILED

    for r in results:
        if r.status == FAILED:
            log.error("%s: %s failed, left out of the benchmark: %s", what, r.patient_id, r.message)
    return [r.patient_id for r in results if r.status != FAILED]


def convert_roots(data_root: Path, dicom_roots: Sequence[Path], workers: int) -> list[list[str]]:
    """Phases 2 and 2.5 of each DICOM root into ``data_root``; the patient ids of each root.
    Raises ``ValueError`` when two roots hold the same PatientID."""
    import convert_dicom_to_nifti
    import extract_multi_organ_masks

    per_root: list[list[str]] = []
    seen: dict[str, Path] = {}
    for root in dicom_roots:
        converted = _check_results(convert_dicom_to_nifti.run(data_root=data_root, dicom_root=root,
                                                              workers=workers), f"phase 2 of {root}")
        for pid in converted:
            if pid in seen:
                raise ValueError(f"patient {pid} is in both {seen[pid]} and {root}: give each patient once")
            seen[pid] = root
        extracted = _check_results(extract_multi_organ_masks.run(data_root=data_root, dicom_root=root,
                                                                 patients=converted, workers=workers),
                                   f"phase 2.5 of {root}") if converted else []
        per_root.append(extracted)
    return per_root


def synthetic_cohort(work: Path, n: int, size: int, slices: int) -> Path:
    """``n`` synthetic patients (SYN-001...) in ``work/synthetic/raw``; reused when already there."""
    from make_synthetic_cohort import generate_cohort

    raw, truth = work / "synthetic" / "raw", work / "synthetic" / "truth"
    cohort_json = truth / "cohort.json"
    if cohort_json.is_file() and len(json.loads(cohort_json.read_text(encoding="utf-8"))) == n:
        return raw
    generate_cohort(raw, truth, n_patients=n, seed=SYNTHETIC_SEED, size=size, slices=slices, overwrite=True)
    return raw


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target.resolve(), target_is_directory=True)
    except OSError:  # no symbolic links (some Windows set-ups): copy
        shutil.copytree(target, link)


def preprocessed_root(base: Path, work: Path, size: int, crop_body: bool, workers: int) -> Path:
    """Phase 3 at ``size`` (cropped to the body or not) into its own data root, whose phase 2/2.5
    folders link ``base``'s; done once per (size, crop) and skipped when already there."""
    import normalize_ct_and_masks
    from thoracic_seg.layout import DataLayout

    root = work / f"data-{size}px{'-crop' if crop_body else ''}"
    src, dst = DataLayout(base), DataLayout(root)
    _link(src.ct_nifti, dst.ct_nifti)
    _link(src.masks, dst.masks)
    options: dict[str, Any] = {"crop_body": crop_body} if crop_supported() else {}
    if crop_body and not options:
        raise ValueError("normalize_ct_and_masks.run has no crop_body option")
    results = normalize_ct_and_masks.run(data_root=root, size=size, workers=workers, overwrite=False, **options)
    _check_results(results, f"phase 3 ({size} px{', crop' if crop_body else ''})")
    return root


def write_fold_splits(folder: Path, train: Sequence[str], test: Sequence[str]) -> Path:
    """``train.txt``, an empty ``val.txt`` (training follows the training loss) and ``test.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", ()), ("test", test)):
        (folder / f"{name}.txt").write_text("".join(f"{pid}\n" for pid in ids), encoding="utf-8")
    return folder


# ---- One training and its evaluation ---------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What every training gets: steps of ``batch_size`` slices at ``size`` px, the network width,
    Adam's lr (cosine), the device, which checkpoint is scored, and the synthetic patients added."""

    steps: int
    batch_size: int
    size: int
    base_channels: int
    lr: float
    device: str
    checkpoint: str
    synthetic: int


RUN_RECORD = "bench_run.json"


def check_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run_dir/bench_run.json`` (what the run trains), or refuse a folder whose record
    differs: resuming it would continue another experiment."""
    path = run_dir / RUN_RECORD
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != record:
            raise ValueError(f"{run_dir} holds a run of other settings ({path}: {saved}, now {record}); "
                             "use another --work-dir")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _as_in_metrics_csv(value: Any) -> Any:
    """A metric rounded as ``evaluate_multi_organ.write_metrics_csv`` writes it."""
    from thoracic_seg.metrics import METRIC_SIGNIFICANT_DIGITS

    return (float(f"{value:.{METRIC_SIGNIFICANT_DIGITS}g}") if isinstance(value, float) and math.isfinite(value)
            else value)


def postprocess_variants() -> dict[str, dict[int, float]]:
    """Name -> per-label fraction rule: the pipeline's ``--postprocess``, then each candidate
    applied to every single-body organ."""
    from thoracic_seg.postprocess import POSTPROCESS_CANDIDATES, POSTPROCESS_MIN_FRACTION, SINGLE_COMPONENT_LABELS

    return {DEFAULT_POSTPROCESS: dict(POSTPROCESS_MIN_FRACTION),
            **{name: {label: fraction for label in SINGLE_COMPONENT_LABELS}
               for name, fraction in POSTPROCESS_CANDIDATES.items()}}


def postprocessed_rows(plain: Sequence[dict[str, Any]], *, data_root: Path, predictions_dir: Path,
                       variants: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    """The rows of each post-processing variant, from the saved predictions (without
    post-processing) of the patients in ``plain``: each variant is applied with
    ``thoracic_seg.postprocess.remove_small_components`` and the structures it changed are scored again
    with ``score_structures``; the others keep ``plain``'s metrics."""
    import numpy as np
    import SimpleITK as sitk

    from thoracic_seg.batch import read_nifti
    from thoracic_seg.layout import DataLayout, truth_record
    from thoracic_seg.metrics import score_structures
    from thoracic_seg.postprocess import remove_small_components

    layout = DataLayout(data_root)
    out: list[dict[str, Any]] = []
    for pid in dict.fromkeys(r["patient_id"] for r in plain):
        mine = [r for r in plain if r["patient_id"] == pid]
        predicted = sitk.GetArrayFromImage(read_nifti(predictions_dir / f"{pid}.nii.gz"))
        truth_image = read_nifti(layout.masks / f"{pid}.nii.gz")
        truth = sitk.GetArrayViewFromImage(truth_image)
        spacing_zyx = tuple(reversed(truth_image.GetSpacing()))
        annotated, ptv = truth_record(layout, pid)
        for name, rules in variants.items():
            processed = remove_small_components(predicted, rules)
            changed = sorted(int(v) for v in np.unique(predicted[processed != predicted]))
            rescored = {r["structure"]: r for r in
                        (score_structures(processed, truth, spacing_zyx, annotated, ptv, only=changed)
                         if changed else [])}
            for row in mine:
                new = {**row, "postprocess": name}
                if row["structure"] in rescored:  # at metrics.csv's precision, as the rows they sit beside
                    new.update({k: _as_in_metrics_csv(rescored[row["structure"]][k])
                                for k in ("dice", "hd95_mm", "truth_ml", "predicted_ml", "volume_diff_pct",
                                          "surface_dice", "apl_mm") if k in row})
                out.append(new)
    return out


def train_and_evaluate(config: Config, *, data_root: Path, splits_dir: Path, run_dir: Path, fold: int,
                       seed: int, budget: Budget, n_train_slices: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one (configuration, fold, seed) on ``splits_dir``'s train.txt and score its test.txt
    patients without and with post-processing. Training: ``budget.steps`` Adam steps, cosine over
    the budget, augmentation on, no validation patient (it follows the training loss); synthetic
    patients, when any, are in every training set and never tested. Scoring: ``evaluate_multi_organ.run``
    (saved predictions reused), then :func:`postprocessed_rows`. Returns the run record and the metric
    rows (one per patient x structure x post-processing). A run folder holding a last checkpoint
    of the same settings is resumed (a finished one trains no further), so a killed benchmark
    restarted with the same ``--work-dir`` goes on."""
    import evaluate_multi_organ
    import train_multi_organ
    from thoracic_seg.batch import DONE
    from thoracic_seg.layout import LAST_CHECKPOINT, evaluation_output_dir
    from thoracic_seg.splits import load_split

    check_run_record(run_dir, {"config": asdict(config), "seed": seed, "budget": asdict(budget),
                               "data_root": data_root.name, "train": load_split(splits_dir, "train"),
                               "test": load_split(splits_dir, "test")})
    last = run_dir / LAST_CHECKPOINT
    epochs = epochs_for(budget.steps, n_train_slices, budget.batch_size)
    start = time.perf_counter()
    result = train_multi_organ.run(
        data_root=data_root, splits_dir=splits_dir, output_dir=run_dir, epochs=epochs,
        max_steps=budget.steps, patience=epochs, seed=seed, context_slices=config.context_slices,
        base_channels=budget.base_channels, batch_size=budget.batch_size, lr=budget.lr,
        lr_schedule="cosine", augment=True, device=budget.device,
        resume=last if last.is_file() else None)
    train_wall = time.perf_counter() - start
    checkpoint = result.last_checkpoint if budget.checkpoint == "last" else result.best_checkpoint
    train_seconds = sum(row["train_seconds"] for row in result.history)
    record = {"config": config.name, "fold": fold, "seed": seed, "steps": budget.steps, "epochs": epochs,
              "train_slices_per_epoch": n_train_slices, "stop_reason": result.stop_reason,
              "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
              "train_seconds": round(train_seconds, 2), "train_wall_seconds": round(train_wall, 2),
              "train_slices_per_s": round(sum(row["train_slices"] for row in result.history)
                                          / max(train_seconds, 1e-9), 2),
              "checkpoint": budget.checkpoint, "run_dir": str(run_dir), "failed": []}
    start = time.perf_counter()
    output_dir = evaluation_output_dir(checkpoint, False)
    results = evaluate_multi_organ.run(checkpoint=checkpoint, data_root=data_root, split="test",
                                       splits_dir=splits_dir, output_dir=output_dir, device=budget.device)
    record["failed"] = [r.patient_id for r in results if r.status != DONE]
    plain = [{"config": config.name, "context_slices": config.context_slices, "crop_body": config.crop_body,
              "fold": fold, "seed": seed, "postprocess": NO_POSTPROCESS, **row}
             for row in read_metrics(output_dir / "metrics.csv")]
    rows = [_jsonable_row(row) for row in
            plain + postprocessed_rows(plain, data_root=data_root, predictions_dir=output_dir / "predictions",
                                       variants=postprocess_variants())]
    record["evaluation_seconds"] = round(time.perf_counter() - start, 2)
    return record, rows


# ---- Run -------------------------------------------------------------------------------------
def machine(device: str) -> dict[str, Any]:
    """CPU model, cores, torch version, device (and GPU) as bench_training.py records them."""
    benchmarks = str(Path(__file__).resolve().parent)
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import torch
    from bench_training import machine_description

    return machine_description(torch.device(device))


def run(*, configs: Sequence[str] = BUILTIN_CONFIGS, seeds: Sequence[int] = DEFAULT_SEEDS,
        work_dir: Path, budget: Budget, sample_root: Path | None, extra_roots: Sequence[Path] = (),
        n_folds: int | None = None, synthetic_px: int = 256, synthetic_slices: int = 60,
        workers: int = 1) -> dict[str, Any]:
    """The whole benchmark in ``work_dir``; returns the report (JSON-able; ``command`` and
    ``wall_seconds`` are added by :func:`main`). ``sample_root``: the folder of the unpacked real
    sample (None: only ``extra_roots``). Raises ``ValueError`` for a bad configuration name or too
    few patients."""
    parsed = [parse_config(name) for name in configs]
    if len({c.name for c in parsed}) != len(parsed):
        raise ValueError(f"a configuration is listed twice: {list(configs)}")
    skipped: dict[str, str] = {}
    if any(c.crop_body for c in parsed) and not crop_supported():
        reason = ("the installed normalize_ct_and_masks.run has no crop_body option (body crop not "
                  "merged yet); rerun with it to measure the crop configurations")
        skipped = {c.name: reason for c in parsed if c.crop_body}
        for name in skipped:
            log.warning("configuration %s skipped: %s", name, reason)
        parsed = [c for c in parsed if not c.crop_body]

    base = work_dir / "data"
    roots = ([sample_root] if sample_root is not None else []) + [Path(r) for r in extra_roots]
    if not roots:
        raise ValueError("no real patients: give the sample archive or --extra-root")
    cv_patients = [pid for ids in convert_roots(base, roots, workers) for pid in ids]
    synthetic: list[str] = []
    if budget.synthetic:
        raw = synthetic_cohort(work_dir, budget.synthetic, synthetic_px, synthetic_slices)
        synthetic = convert_roots(base, [raw], workers)[0]
        clash = sorted(set(synthetic) & set(cv_patients))
        if clash:
            raise ValueError(f"synthetic patient ids {clash} are also real patients' ids")
    folds = make_folds(cv_patients, n_folds)
    fold_records = [{"fold": i, "test": test, "train": sorted(set(cv_patients) - set(test)) + synthetic}
                    for i, test in enumerate(folds)]
    print(f"{len(cv_patients)} patients in {len(folds)} folds, {len(synthetic)} synthetic training patients; "
          f"{len(parsed)} configurations x {len(folds)} folds x {len(seeds)} seeds = "
          f"{len(parsed) * len(folds) * len(seeds)} trainings of {budget.steps} steps", flush=True)

    from thoracic_seg.layout import read_cache_meta

    data_roots: dict[bool, Path] = {}
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for config in parsed:
        if config.crop_body not in data_roots:
            data_roots[config.crop_body] = preprocessed_root(base, work_dir, budget.size, config.crop_body, workers)
        data_root = data_roots[config.crop_body]
        for fold in fold_records:
            # Per data root: class_weights.json cached beside the splits depends on the cache's masks.
            splits_dir = write_fold_splits(work_dir / "splits" / data_root.name / f"fold-{fold['fold']}",
                                           fold["train"], fold["test"])
            n_slices = sum(read_cache_meta(data_root, pid)["shape_zyx"][0] for pid in fold["train"])
            for seed in seeds:
                print(f"{config.name}, fold {fold['fold']} (test {', '.join(fold['test'])}), seed {seed}: "
                      f"training {budget.steps} steps on {len(fold['train'])} patients ({n_slices} slices)",
                      flush=True)
                record, new_rows = train_and_evaluate(
                    config, data_root=data_root, splits_dir=splits_dir, fold=fold["fold"], seed=seed,
                    run_dir=work_dir / "runs" / config.name / f"fold-{fold['fold']}-seed-{seed}",
                    budget=budget, n_train_slices=n_slices)
                runs.append(record)
                rows += new_rows
                print(f"  trained {record['train_seconds']:.0f} s ({record['train_slices_per_s']:.1f} slices/s), "
                      f"evaluated {record['evaluation_seconds']:.0f} s", flush=True)
    names = [c.name for c in parsed]
    from thoracic_seg import organs
    from thoracic_seg.postprocess import POSTPROCESS_CANDIDATES, SINGLE_COMPONENT_LABELS, describe_postprocess

    candidates = list(POSTPROCESS_CANDIDATES)
    comparison = compare_postprocessing(rows, [DEFAULT_POSTPROCESS, *candidates],
                                        [organs.structure(label).key for label in SINGLE_COMPONENT_LABELS])
    return {"benchmark": "bench_quality", "machine": machine(budget.device), "budget": asdict(budget),
            "configs": names, "skipped": skipped, "seeds": list(seeds), "folds": fold_records,
            "runs": runs, "rows": rows, "summary": summarize(rows, names),
            "postprocess_rule": describe_postprocess(), "postprocess_comparison": comparison,
            "postprocess_chosen": choose_postprocessing(comparison, candidates)}


# ---- Command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(BUILTIN_CONFIGS), metavar="NAME",
                        help="2d, 2.5d-kK, crop, or '+' combinations (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="(default: %(default)s)")
    parser.add_argument("--folds", type=int, default=None, help="patient folds (default: one patient per fold)")
    parser.add_argument("--extra-root", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder of further real DICOM patients (any nesting); repeatable")
    parser.add_argument("--no-sample", action="store_true",
                        help="leave out the two sample patients of ../shared/data (then --extra-root gives all)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="add N synthetic patients to every training set (default: %(default)s)")
    parser.add_argument("--synthetic-px", type=int, default=256, help="their in-plane size (default: %(default)s)")
    parser.add_argument("--synthetic-slices", type=int, default=60, help="their slices (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="as train_multi_organ.py takes it; pick a GPU with CUDA_VISIBLE_DEVICES "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per training (default: {SIZING['cpu']['steps']} on CPU, "
                             f"{SIZING['cuda']['steps']} on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"(default: {SIZING['cpu']['batch_size']} on CPU, {SIZING['cuda']['batch_size']} on CUDA)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"phase 3 slice size (default: {SIZING['cpu']['size']} on CPU, {SIZING['cuda']['size']} on CUDA)")
    parser.add_argument("--base-channels", type=int, default=None,
                        help=f"U-Net width (default: {SIZING['cpu']['base_channels']} on CPU, "
                             f"{SIZING['cuda']['base_channels']} on CUDA)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam lr, cosine to 1%% (default: %(default)s)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="last",
                        help="which checkpoint is scored: the end of the budget or the lowest training "
                             "loss (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="processes for phases 2, 2.5, 3 (default: 1)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep data, runs and evaluations here; a rerun reuses and resumes them "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                        help="also write the tables as a Markdown section for benchmarks/RESULTS.md")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "size", "base_channels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.synthetic < 0 or args.workers < 1 or not args.lr > 0:
        parser.error("--synthetic must be >= 0, --workers >= 1 and --lr > 0")
    if args.size is not None and (args.size % 16 or args.size < 32):
        parser.error(f"--size must be a multiple of 16 >= 32 (four 2x poolings), got {args.size}")
    try:
        for name in args.configs:
            parse_config(name)
    except ValueError as exc:
        parser.error(str(exc))
    if args.no_sample and not args.extra_root:
        parser.error("--no-sample needs --extra-root DIR (no patients otherwise)")
    if not args.no_sample and not ARCHIVE.is_file():
        print(f"real sample data not found at {ARCHIVE} (give --no-sample --extra-root DIR)", file=sys.stderr)
        return 2
    from thoracic_seg.batch import setup_logging
    from thoracic_seg.precision import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    sizing = SIZING[device.type]
    budget = Budget(steps=args.steps or sizing["steps"], batch_size=args.batch_size or sizing["batch_size"],
                    size=args.size or sizing["size"], base_channels=args.base_channels or sizing["base_channels"],
                    lr=args.lr, device=device.type, checkpoint=args.checkpoint, synthetic=args.synthetic)
    setup_logging(args.verbose)
    command = "python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"bench_quality on {device}: {budget}", flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        sample_root = None
        if not args.no_sample:
            sample_root = work / SAMPLE_FOLDER
            if not sample_root.is_dir():
                with tarfile.open(ARCHIVE, "r:xz") as tar:
                    tar.extractall(work, filter="data")
        try:
            report = run(configs=args.configs, seeds=args.seeds, work_dir=work, budget=budget,
                         sample_root=sample_root, extra_roots=args.extra_root, n_folds=args.folds,
                         synthetic_px=args.synthetic_px, synthetic_slices=args.synthetic_slices,
                         workers=args.workers)
        except (ValueError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 1
    report["command"] = command.strip()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print()
    print(format_report(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    print(f"\nwrote {args.output}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(report), encoding="utf-8")
        print(f"wrote {args.markdown}")
    failed = sorted({pid for r in report["runs"] for pid in r["failed"]})
    if failed:
        log.error("evaluation failed for %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
