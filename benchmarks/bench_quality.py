"""Benchmark: the training recipe against candidates on six real patients, cross-validated by patient.

    .venv/bin/python benchmarks/bench_quality.py --work-dir bench-work        # CPU, the default candidates
    .venv/bin/python benchmarks/bench_quality.py --work-dir bench-work --learning-curve 1000 2000 4000
    .venv/bin/python benchmarks/bench_quality.py --smoke                      # the mechanics, ~45 s
    python benchmarks/bench_quality.py --device cuda --work-dir bench-work    # the full network

The six NSCLC-Radiomics patients of ``../shared/data`` go through phases 2 and 2.5 once; each
candidate (:data:`CANDIDATES`: the Makefile recipe, ``thoracic_seg.recipe``, with some options
changed) x fold (:func:`balanced_folds`) x seed trains on the other folds and scores its held-out
patients in 3D (Dice, surface Dice, HD95, APL; every post-processing rule), also on the held-out CT
re-rendered as another scanner would have made it. Each (candidate, fold, seed) is a cell cached in
``--work-dir/cells`` under a key of its settings, the code it ran and the data, with its checkpoint and
held-out probabilities; a killed run resumes where it stopped (a half-trained cell from its last
checkpoint). Statistics and the decision rule: ``quality_stats.py``. Tables: ``--markdown``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # `python benchmarks/bench_quality.py` from anywhere
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import quality_stats as stats  # noqa: E402  (benchmarks/, pure)

log = logging.getLogger("bench_quality")

SHARED = REPO_ROOT.parent / "shared" / "data"
ARCHIVES = (SHARED / "nsclc-radiomics-sample.tar.xz", SHARED / "nsclc-radiomics-dev.tar.xz")
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "bench_quality.json"
#: Bump when a cell's computation changes in this file (the code fingerprint covers the modules it imports).
CELL_FORMAT = 2
N_FOLDS = 3
DEFAULT_SEEDS = (0, 1)
#: Per device: steps of each training (CPU: from the learning curve in docs/quality.md; CUDA: not measured).
STEPS = {"cpu": 2000, "cuda": 6000}
#: A held-out CT as a harsher scanner would show it (``thoracic_seg.scanner.rerender``'s options, at the edge
#: of the ranges ``--augment-scanner`` trains on, docs/training.md): 5 mm slices, the sharpest kernel, 60 HU
#: more noise on the scan's grid (the 128 px network grid averages most of it away: 30 HU barely changed
#: a Dice in the learning curve), calibration 20 HU off. Fixed, so every candidate meets the same CTs.
RERENDER = {"slice_mm": 5.0, "kernel": 1.0, "kernel_sigma_mm": 1.0, "noise_hu": 60.0, "gain": 1.0,
            "shift_hu": 20.0, "seed": 0}
ORIGINAL, RERENDERED = "original", "rerendered"
#: ``--smoke``: enough steps of a 4-channel network at 32 px for the tables to hold some non-zero Dice.
SMOKE_STEPS = 40


@dataclass(frozen=True)
class Candidate:
    """The recipe with some options changed: ``phase3_args`` replaces REAL_PHASE3_ARGS (None: keep),
    ``train_args`` go after REAL_TRAIN_ARGS + the profile's (a later option wins); ``ensemble_of``: no
    training, the named candidate's networks of the fold (all seeds) average their probabilities.
    ``aims_at``: the structures the decision rule pools; ``cost``: what it adds to a baseline cell."""

    name: str
    phase3_args: tuple[str, ...] | None = None
    train_args: tuple[str, ...] = ()
    ensemble_of: str | None = None
    aims_at: tuple[str, ...] = ("lung_right", "lung_left", "heart", "esophagus", "spinal_cord")
    cost: str = "1x"
    decided_on: str = "original"  # which CTs' verdict decides (the other's is reported beside it)


BASELINE = "baseline"
CANDIDATES = {c.name: c for c in (
    Candidate(BASELINE),
    Candidate("fov-crop", phase3_args=("--crop-body", "--fov-mm", "380"), aims_at=("heart", "esophagus", "spinal_cord"),
              cost="1x (phase 3 once more)"),
    Candidate("scanner-aug", train_args=("--augment-scanner",), cost="~1.1x (augmentation per slice)",
              decided_on="rerendered"),
    Candidate("ensemble", ensemble_of=BASELINE, cost="no training; inference x number of seeds"),
    Candidate("no-crop", phase3_args=(), cost="1x (phase 3 once more)"),
    Candidate("2.5d-k1", train_args=("--context-slices", "1"), cost="~1.1x"),
    Candidate("2.5d-k2", train_args=("--context-slices", "2"), cost="~1.2x"),
    Candidate("no-oversampling", train_args=("--tumour-oversampling", "0.0001"), aims_at=("gtv",), cost="1x"),
    Candidate("width-32", train_args=("--base-channels", "32"), cost="~3x on CPU (network 4x larger)"),
)}
DEFAULT_CANDIDATES = (BASELINE, "fov-crop", "scanner-aug", "ensemble")


# ---- Folds (pure) ---------------------------------------------------------------------------
def balanced_folds(has: Mapping[str, set[str]], n_folds: int, balance: Sequence[str]) -> list[list[str]]:
    """Patients -> ``n_folds`` held-out sets of near-equal size, each holding every structure of
    ``balance`` that at least ``n_folds`` patients have (so each fold scores a heart and an esophagus).

    ``has``: patient id -> its annotated structure keys. Greedy and deterministic: patients with the
    fewest of the balanced structures go first (the scarce ones decide), each to the smallest fold that
    lacks most of its balanced structures (ties: lower index). ``ValueError`` for fewer patients than folds."""
    ids = sorted(has)
    if not 2 <= n_folds <= len(ids):
        raise ValueError(f"folds must be 2-{len(ids)} for {len(ids)} patients, got {n_folds}")
    scarce = [s for s in balance if sum(s in has[p] for p in ids) >= n_folds]
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    capacity = math.ceil(len(ids) / n_folds)
    order = sorted(ids, key=lambda p: (sum(s in has[p] for s in scarce), p))
    for pid in order:
        def need(i: int) -> tuple:
            covered = {s for q in folds[i] for s in has[q]}
            return (-len([s for s in scarce if s in has[pid] and s not in covered]), len(folds[i]), i)

        target = min((i for i in range(n_folds) if len(folds[i]) < capacity), key=need)
        folds[target].append(pid)
    return [sorted(f) for f in folds]


def steps_per_epoch(n_slices: int, batch_size: int) -> int:
    """Optimizer steps of one epoch as train_multi_organ.py draws it (the last short batch is dropped
    when the epoch holds at least two batches)."""
    return n_slices // batch_size if n_slices >= 2 * batch_size else math.ceil(n_slices / batch_size)


def epochs_for(steps: int, n_slices: int, batch_size: int) -> int:
    """Epochs that hold ``steps`` steps, so the epoch-wise cosine schedule spans the step budget."""
    return max(1, math.ceil(steps / steps_per_epoch(n_slices, batch_size)))


# ---- Fingerprints ---------------------------------------------------------------------------
def data_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of the input archives (or folders' files, sorted), 16 hex digits."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


#: What a cell's training runs, and what its scoring runs; :func:`code_files` adds every repository module
#: they import. A change to scoring code re-scores the kept checkpoints; only training code retrains.
TRAIN_ENTRY_MODULES = ("normalize_ct_and_masks", "train_multi_organ")
SCORE_ENTRY_MODULES = ("thoracic_seg.inference", "thoracic_seg.image_grid", "thoracic_seg.metrics",
                       "thoracic_seg.postprocess", "thoracic_seg.scanner")


def code_files(entry_modules: Sequence[str]) -> list[Path]:
    """The repository's files behind ``entry_modules``: them and every repository module they import, found
    in a fresh interpreter (what this one has imported depends on what ran before). benchmarks/ is left
    out: this file's cell logic is versioned by :data:`CELL_FORMAT`."""
    import subprocess

    code = ("import sys, importlib\n"
            f"for name in {tuple(entry_modules)!r}: importlib.import_module(name)\n"
            "print('\\n'.join(getattr(m, '__file__', None) or '' for m in list(sys.modules.values())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    files = set()
    for line in out.stdout.splitlines():
        path = Path(line) if line else None
        if path is None or not path.is_absolute() or not path.resolve().is_relative_to(REPO_ROOT):
            continue
        parts = path.resolve().relative_to(REPO_ROOT).parts  # our package and top-level scripts, not .venv
        if (len(parts) == 1 or parts[0] == "thoracic_seg") and path.suffix == ".py":
            files.add(path.resolve())
    return sorted(files)


def code_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over (path relative to the repository, content) of ``files``, 16 hex digits."""
    digest = hashlib.sha256(f"cell format {CELL_FORMAT}".encode())
    for file in files:
        digest.update(str(Path(file).relative_to(REPO_ROOT)).encode())
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """The repository's HEAD commit (recorded beside the results), None outside git."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- Data ------------------------------------------------------------------------------------
def _failed(results: Sequence[Any], what: str, failed: list[str]) -> list[str]:
    """Patient ids done or skipped; failed ones are logged, added to ``failed`` (the report lists them and the
    exit status is 1) and left out."""
    from thoracic_seg.batch import FAILED

    for r in results:
        if r.status == FAILED:
            log.error("%s: %s failed, left out of the benchmark: %s", what, r.patient_id, r.message)
            failed.append(f"{r.patient_id} ({what}: {r.message})")
    return [r.patient_id for r in results if r.status != FAILED]


def convert(base: Path, dicom_root: Path, workers: int, failed: list[str]) -> list[str]:
    """Phases 2 and 2.5 of ``dicom_root`` into ``base`` (skipped where done); the patient ids."""
    import convert_dicom_to_nifti
    import extract_multi_organ_masks

    done = _failed(convert_dicom_to_nifti.run(data_root=base, dicom_root=dicom_root, workers=workers), "phase 2",
                   failed)
    return _failed(extract_multi_organ_masks.run(data_root=base, dicom_root=dicom_root, patients=done,
                                                 workers=workers), "phase 2.5", failed) if done else []


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)


def phase3_root(base: Path, work: Path, size: int, phase3_args: Sequence[str], workers: int) -> Path:
    """Phase 3 of ``base``'s patients with ``phase3_args`` at ``size`` into its own data root (phase 2/2.5
    folders linked), through the phase's own command line; done once per (size, options)."""
    import normalize_ct_and_masks
    from thoracic_seg.layout import DataLayout

    slug = "-".join(a.lstrip("-") for a in phase3_args) or "plain"
    root = work / f"data-{size}px-{slug}"
    src, dst = DataLayout(base), DataLayout(root)
    _link(src.ct_nifti, dst.ct_nifti)
    _link(src.masks, dst.masks)
    status = normalize_ct_and_masks.main(["--data-root", str(root), "--size", str(size), "--workers", str(workers),
                                          *phase3_args])
    if status != 0:
        raise ValueError(f"phase 3 with {' '.join(phase3_args)} failed for a patient (exit {status}); see the log")
    return root


def rerendered_root(base: Path, work: Path, patients: Sequence[str]) -> Path | None:
    """``base``'s CTs re-rendered as another scanner (:data:`RERENDER`, ``thoracic_seg.scanner.rerender``)
    in their own data root, masks linked; None when this checkout has no re-rendering."""
    try:
        from thoracic_seg.scanner import rerender
    except ImportError:
        log.warning("thoracic_seg.scanner.rerender is missing: no re-rendered scores")
        return None
    import SimpleITK as sitk

    from thoracic_seg.batch import read_nifti, write_nifti
    from thoracic_seg.layout import DataLayout

    import thoracic_seg.scanner

    tag = hashlib.sha256(json.dumps(RERENDER, sort_keys=True).encode()
                         + Path(thoracic_seg.scanner.__file__).read_bytes()).hexdigest()[:12]
    src, dst = DataLayout(base), DataLayout(work / f"data-rerendered-{tag}")  # other settings: other CTs
    _link(src.masks, dst.masks)  # phase 2.5's records sit beside the masks
    dst.ct_nifti.mkdir(parents=True, exist_ok=True)
    for pid in patients:
        out = dst.ct_nifti / f"{pid}.nii.gz"
        if out.is_file():
            continue
        image = read_nifti(src.ct_nifti / f"{pid}.nii.gz")
        new = sitk.GetImageFromArray(rerender(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1], **RERENDER))
        new.CopyInformation(image)
        write_nifti(new, out)
    return dst.root


def patient_fingerprints(base: Path, patients: Sequence[str]) -> dict[str, str]:
    """Patient -> sha256 (16 hex) of its phase 2 CT and phase 2.5 label map: a cell's key holds those of its
    patients, so a changed conversion or truth redoes exactly the cells that used it."""
    from thoracic_seg.batch import file_sha256
    from thoracic_seg.layout import DataLayout

    layout = DataLayout(base)
    return {pid: hashlib.sha256((file_sha256(layout.ct_nifti / f"{pid}.nii.gz")
                                 + file_sha256(layout.masks / f"{pid}.nii.gz")).encode()).hexdigest()[:16]
            for pid in patients}


def annotated_structures(base: Path, patients: Sequence[str]) -> dict[str, set[str]]:
    """Patient -> the structure keys its RTSTRUCT really contoured (phase 2.5's record)."""
    from thoracic_seg import organs
    from thoracic_seg.layout import DataLayout, truth_record

    layout = DataLayout(base)
    return {pid: {organs.structure(label).key for label, flag in enumerate(truth_record(layout, pid)[0])
                  if flag and label != organs.BACKGROUND} for pid in patients}


def unavailable(candidate: Candidate, budget: Budget) -> str | None:
    """Why this checkout cannot run ``candidate`` (an option its phase scripts do not have), or None."""
    import contextlib
    import io

    import normalize_ct_and_masks
    import train_multi_organ

    checks = [("train_multi_organ.py", train_multi_organ.build_parser(), [*budget.train_args, *candidate.train_args])]
    if candidate.phase3_args is not None:
        checks.append(("normalize_ct_and_masks.py", normalize_ct_and_masks.build_parser(), list(candidate.phase3_args)))
    for script, parser, args in checks:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(args)
        except SystemExit:
            return f"{script}: {stderr.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]}"
    return None


# ---- Cells -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What every training gets: steps at ``size`` px on ``device``; ``train_args`` the recipe's
    REAL_TRAIN_ARGS + the profile's (CPU_TRAIN_ARGS, or none on CUDA: the script's defaults)."""

    steps: int
    size: int
    device: str
    phase3_args: tuple[str, ...]
    train_args: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One training (or ensemble) of a candidate on a fold, and its held-out scores."""

    candidate: Candidate
    fold: int
    seed: int | None  # None: an ensemble of the fold's seeds
    train: tuple[str, ...]
    test: tuple[str, ...]
    steps: int

    @property
    def folder(self) -> str:
        seed = "ensemble" if self.seed is None else f"seed-{self.seed}"
        return f"{self.candidate.name}/fold-{self.fold}-{seed}-steps-{self.steps}"


def cell_key(cell: Cell, budget: Budget, code: Mapping[str, str], data: Mapping[str, str],
             seeds: Sequence[int]) -> dict[str, Any]:
    """Everything a cell's result depends on, in two parts: ``training`` (what the network learns from:
    candidate, fold, seed, steps, the recipe, the training code, the training patients' data) and
    ``scoring`` (the held-out patients' data, the scoring code, the re-rendering). A result is reused only
    under an equal key; a kept network is re-scored when only ``scoring`` differs. ``code``: {"train": ...,
    "score": ...} fingerprints; ``data``: patient -> fingerprint (:func:`patient_fingerprints`)."""
    budget_part = {k: v for k, v in asdict(budget).items() if k != "steps"}  # the cell's own steps count
    key = {"training": {"candidate": asdict(cell.candidate), "fold": cell.fold, "seed": cell.seed,
                        "steps": cell.steps, "budget": budget_part, "code": code["train"],
                        "ensemble_seeds": list(seeds) if cell.seed is None else None,
                        "train": {p: data[p] for p in cell.train}},
           "scoring": {"test": {p: data[p] for p in cell.test}, "code": code["score"], "rerender": RERENDER,
                       "cell_format": CELL_FORMAT}}
    return json.loads(json.dumps(key))  # as it reads back from cell.json (tuples become lists)


def train_cell(cell: Cell, *, data_root: Path, splits_dir: Path, run_dir: Path, budget: Budget) -> dict[str, Any]:
    """Train one cell through ``train_multi_organ``'s own command line (the recipe's options, then the
    candidate's, then the budget's), resuming a last checkpoint in ``run_dir``; the run record."""
    import train_multi_organ
    from thoracic_seg.layout import LAST_CHECKPOINT, read_cache_meta

    n_slices = sum(read_cache_meta(data_root, pid)["shape_zyx"][0] for pid in cell.train)
    parser = train_multi_organ.build_parser()
    args = [*budget.train_args, *cell.candidate.train_args, "--data-root", str(data_root), "--splits-dir",
            str(splits_dir), "--output-dir", str(run_dir), "--seed", str(cell.seed), "--device", budget.device,
            "--max-steps", str(cell.steps)]
    batch_size = parser.parse_args(args).batch_size
    epochs = epochs_for(cell.steps, n_slices, batch_size)
    args += ["--epochs", str(epochs), "--patience", str(epochs)]  # no validation patient: the budget decides
    last = run_dir / LAST_CHECKPOINT
    if last.is_file():
        args += ["--resume", str(last)]
    options = {k: v for k, v in vars(parser.parse_args(args)).items() if k != "verbose"}
    started = time.perf_counter()
    result = train_multi_organ.run(**options)
    seconds = sum(row["train_seconds"] for row in result.history)
    seen = sum(row["train_slices"] for row in result.history)
    if seen < (cell.steps - epochs) * batch_size:  # an epoch's last batch may be short, never more
        raise ValueError(f"{cell.folder}: training saw {seen} slices, fewer than {cell.steps} steps of "
                         f"{batch_size} ({result.stop_reason}); not cached")
    return {"train_args": args, "epochs": epochs, "train_slices_per_epoch": n_slices,
            "stop_reason": result.stop_reason, "slices_seen": sum(row["train_slices"] for row in result.history),
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
            "train_seconds": round(seconds, 1), "train_wall_seconds": round(time.perf_counter() - started, 1),
            "checkpoint": str(Path(result.last_checkpoint).resolve())}


def score_patients(predictor: Any, data_root: Path, patients: Sequence[str], out_dir: Path | None,
                   variants: Mapping[str, Mapping[int, float]]) -> list[dict[str, Any]]:
    """Segment each patient's CT of ``data_root`` as evaluation does (``image_grid.segment_image``) and
    score it (``metrics.score_structures``) without and with each post-processing variant; ``out_dir``:
    keep the labels and the class probabilities (uint8, 255 = 1) there for the quality checks."""
    import numpy as np
    import SimpleITK as sitk

    from thoracic_seg import organs
    from thoracic_seg.batch import read_nifti, write_nifti
    from thoracic_seg.image_grid import segment_image
    from thoracic_seg.layout import DataLayout, truth_record
    from thoracic_seg.metrics import score_structures
    from thoracic_seg.postprocess import remove_small_components

    layout = DataLayout(data_root)
    rows: list[dict[str, Any]] = []
    for pid in patients:
        image = read_nifti(layout.ct_nifti / f"{pid}.nii.gz")
        truth_image = read_nifti(layout.masks / f"{pid}.nii.gz")
        truth = sitk.GetArrayViewFromImage(truth_image)
        spacing_zyx = tuple(reversed(truth_image.GetSpacing()))
        diagonal = float(np.linalg.norm(np.array(truth.shape) * np.array(spacing_zyx)))
        annotated, ptv = truth_record(layout, pid)
        probabilities = (np.zeros((truth.shape[0], organs.NUM_CLASSES, *truth.shape[1:]), np.float16)
                         if out_dir else None)
        labels = segment_image(predictor, image, probabilities=probabilities)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            predicted = sitk.GetImageFromArray(labels)
            predicted.CopyInformation(image)
            write_nifti(predicted, out_dir / f"{pid}.nii.gz")
            quantised = np.rint(probabilities.astype(np.float32) * 255).astype(np.uint8)
            np.savez_compressed(out_dir / f"{pid}_probabilities.npz", probabilities=quantised, scale=255)
            del probabilities, quantised
        for name, rules in {stats.NO_POSTPROCESS: {}, **variants}.items():
            processed = remove_small_components(labels, rules) if rules else labels
            for row in score_structures(processed, truth, spacing_zyx, annotated, ptv):
                rows.append({**row, "patient_id": pid, "postprocess": name, "diagonal_mm": diagonal})
    return rows


def postprocess_variants() -> dict[str, dict[int, float]]:
    """Name -> per-label fraction rule: the pipeline's ``--postprocess``, then each candidate rule applied
    to every single-body organ."""
    from thoracic_seg.postprocess import POSTPROCESS_CANDIDATES, POSTPROCESS_MIN_FRACTION, SINGLE_COMPONENT_LABELS

    return {"--postprocess": dict(POSTPROCESS_MIN_FRACTION),
            **{name: {label: fraction for label in SINGLE_COMPONENT_LABELS}
               for name, fraction in POSTPROCESS_CANDIDATES.items()}}


def jsonable_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """inf -> "inf", NaN -> None, so the JSON is strict and inf survives."""
    out = {}
    for key, value in row.items():
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        elif isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


def from_json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`jsonable_row` for a row read from ``cell.json`` or the report."""
    return {k: (math.inf if v == "inf" else v) for k, v in row.items()}


#: Stand-in hooks for the tests: (cell, data_root, splits_dir, run_dir, budget) -> run record.
Trainer = Callable[..., dict[str, Any]]


def run_cell(cell: Cell, *, work: Path, data_root: Path, rerendered: Path | None, budget: Budget,
             key: dict[str, Any], member_checkpoints: Sequence[Path] = (), trainer: Trainer = train_cell,
             ) -> dict[str, Any]:
    """One cell, from its cache when ``cell.json`` holds an equal key; else trained (resumed when its
    folder was started under the same key, started afresh otherwise) and scored, and ``cell.json`` written
    last (atomically), so a killed cell is never taken as done."""
    from thoracic_seg.batch import write_text_atomic
    from thoracic_seg.inference import Predictor

    folder = work / "cells" / cell.folder
    done = folder / "cell.json"
    if done.is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return {**saved, "rows": [from_json_row(r) for r in saved["rows"]], "cached": True}
    started_key = folder / "key.json"
    if folder.exists() and (not started_key.is_file()
                            or json.loads(started_key.read_text()).get("training") != key["training"]):
        stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        log.info("%s: its training settings, code or data changed; kept as %s, started afresh", cell.folder, stale.name)
        folder.rename(stale)  # never delete a network: an edit that changed nothing can be undone
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(started_key, json.dumps(key, indent=1) + "\n")
    started = time.perf_counter()
    if cell.candidate.ensemble_of is None:
        splits_dir = folder / "splits"
        splits_dir.mkdir(exist_ok=True)
        for name, ids in (("train", cell.train), ("val", ()), ("test", cell.test)):
            (splits_dir / f"{name}.txt").write_text("".join(f"{pid}\n" for pid in ids), encoding="utf-8")
        record = trainer(cell, data_root=data_root, splits_dir=splits_dir, run_dir=folder / "run", budget=budget)
        checkpoints = [Path(record["checkpoint"])]
    else:
        record, checkpoints = {"members": [str(p) for p in member_checkpoints]}, list(member_checkpoints)
    scoring = time.perf_counter()
    predictor = Predictor.load(checkpoints, device=budget.device)
    rows = [{**r, "rendering": ORIGINAL} for r in
            score_patients(predictor, data_root, cell.test, folder / "held_out", postprocess_variants())]
    if rerendered is not None:
        rows += [{**r, "rendering": RERENDERED} for r in
                 score_patients(predictor, rerendered, cell.test, None, postprocess_variants())]
    base = {"candidate": cell.candidate.name, "fold": cell.fold, "seed": cell.seed, "steps": cell.steps}
    rows = [{**base, **row} for row in rows]
    record.update(base, scoring_seconds=round(time.perf_counter() - scoring, 1),
                  cell_seconds=round(time.perf_counter() - started, 1), checkpoints=[str(p) for p in checkpoints])
    write_text_atomic(done, json.dumps({"key": key, "record": record, "rows": [jsonable_row(r) for r in rows]},
                                       allow_nan=False) + "\n")
    return {"key": key, "record": record, "rows": rows, "cached": False}


# ---- Run -------------------------------------------------------------------------------------
def unpack(archives: Sequence[Path], work: Path) -> list[Path]:
    """Each archive unpacked once into ``work/dicom``; the folders it holds (one per archive)."""
    roots = []
    for archive in archives:
        target = work / "dicom"
        stamp = target / f".{archive.name}.unpacked"  # written last: a killed unpack is done again
        with tarfile.open(archive, "r:xz") as tar:
            top = sorted({m.name.split("/")[0] for m in tar.getmembers()})
            if not stamp.is_file():
                tar.extractall(target, filter="data")
                stamp.write_text("\n".join(top) + "\n", encoding="utf-8")
        roots += [target / t for t in top]
    return roots


def smoke_roots(work: Path) -> list[Path]:
    """Six synthetic patients (64 px, 24 slices) standing in for the real ones in ``--smoke``."""
    from make_synthetic_cohort import generate_cohort

    raw = work / "synthetic" / "raw"
    if not (work / "synthetic" / "truth" / "cohort.json").is_file():
        generate_cohort(raw, work / "synthetic" / "truth", n_patients=6, seed=0, size=64, slices=24, overwrite=True)
    return [raw]


def run(*, candidates: Sequence[str] = DEFAULT_CANDIDATES, seeds: Sequence[int] = DEFAULT_SEEDS, work: Path,
        budget: Budget, dicom_roots: Sequence[Path], data_id: str, n_folds: int = N_FOLDS,
        curve: Sequence[int] = (), workers: int = 1, trainer: Trainer = train_cell,
        progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The benchmark in ``work``; the report (JSON-able after :func:`_jsonable` of its rows). ``curve``:
    instead of the candidates, the baseline's first fold and seed at each step budget (the learning curve).
    ``ValueError`` for an unknown candidate or an ensemble whose members are not run."""
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; known: {', '.join(CANDIDATES)}")
    chosen = [CANDIDATES[c] for c in ([BASELINE] if curve else dict.fromkeys([BASELINE, *candidates]))]
    for c in chosen:
        if c.ensemble_of and c.ensemble_of not in [d.name for d in chosen]:
            raise ValueError(f"candidate {c.name} averages {c.ensemble_of}'s networks: list {c.ensemble_of} too")
    from thoracic_seg.batch import file_sha256
    from thoracic_seg.layout import LAST_CHECKPOINT

    skipped = {c.name: why for c in chosen if (why := unavailable(c, budget))}
    for name, why in skipped.items():
        progress(f"candidate {name} skipped: {why}")
    chosen = [c for c in chosen if c.name not in skipped and c.ensemble_of not in skipped]
    base = work / "data"
    failed: list[str] = []
    patients = [pid for root in dicom_roots for pid in convert(base, root, workers, failed)]
    has = annotated_structures(base, patients)
    folds = balanced_folds(has, n_folds, ("heart", "esophagus"))
    progress(f"{len(patients)} patients, folds: " + "; ".join(", ".join(f) for f in folds))
    code = {"train": code_fingerprint(code_files(TRAIN_ENTRY_MODULES)),
            "score": code_fingerprint(code_files(SCORE_ENTRY_MODULES))}
    data = patient_fingerprints(base, patients)
    rerendered = rerendered_root(base, work, patients)
    roots: dict[tuple[str, ...], Path] = {}
    cells: list[dict[str, Any]] = []
    plan = [(c, f, s, st) for c in chosen for f in (range(1) if curve else range(len(folds)))
            for s in ((seeds[0],) if curve else seeds) for st in (curve or (budget.steps,))]
    def phase3_of(candidate: Candidate) -> tuple[str, ...]:
        source = CANDIDATES[candidate.ensemble_of] if candidate.ensemble_of else candidate
        return budget.phase3_args if source.phase3_args is None else source.phase3_args

    for candidate, fold, seed, steps in plan:
        args = phase3_of(candidate)
        if args not in roots:
            roots[args] = phase3_root(base, work, budget.size, args, workers)
        test = tuple(folds[fold])
        train = tuple(sorted(set(patients) - set(test)))
        is_ensemble = candidate.ensemble_of is not None
        if is_ensemble and seed != seeds[0]:
            continue
        cell = Cell(candidate, fold, None if is_ensemble else seed, train, test, steps)
        members = [work / "cells" / replace(cell, candidate=CANDIDATES[candidate.ensemble_of], seed=s).folder / "run"
                   / LAST_CHECKPOINT for s in seeds] if is_ensemble else []
        data_root = roots[args]
        key = cell_key(cell, budget, code, {**data, "archives": data_id}, seeds)
        if is_ensemble:  # retrained members make another ensemble
            key["members"] = [file_sha256(m) for m in members]
        progress(f"{cell.folder}: held out {', '.join(test)}")
        result = run_cell(cell, work=work, data_root=data_root, rerendered=rerendered, budget=budget, key=key,
                          member_checkpoints=members, trainer=trainer)
        record = result["record"]
        progress(f"  {'cached' if result['cached'] else 'done'}: train {record.get('train_seconds', 0):.0f} s, "
                 f"scoring {record['scoring_seconds']:.0f} s")
        cells.append(result)
    rows = [r for c in cells for r in c["rows"]]
    return {"benchmark": "bench_quality", "candidates": [c.name for c in chosen], "seeds": list(seeds),
            "folds": folds, "annotated": {p: sorted(s) for p, s in has.items()}, "budget": asdict(budget),
            "code": code, "data": data_id, "curve": list(curve), "records": [c["record"] for c in cells],
            "rows": rows, "cells_cached": sum(c["cached"] for c in cells),
            "skipped": skipped, "failed_patients": failed}


# ---- Tables ----------------------------------------------------------------------------------
def _f(value: Any, digits: int, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(interval: Sequence[float] | None, digits: int = 3) -> str:
    return "-" if interval is None else f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def structure_keys() -> list[str]:
    from thoracic_seg import organs

    return [organs.structure(label).key for label in organs.FOREGROUND_LABELS]


def quality_table(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str], rendering: str = ORIGINAL) -> str:
    """Per structure x candidate (no post-processing): n, Dice, surface Dice, HD95 median / inf count /
    penalised mean (mm), APL (mm)."""
    lines = ["| structure | candidate | n | Dice | surface Dice | HD95 median | HD95 inf | HD95 penalised mean "
             "| APL (mm) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for structure in structure_keys():
        for candidate in candidates:
            d = stats.describe([r for r in rows if r["structure"] == structure and r["candidate"] == candidate
                                and r["rendering"] == rendering and r["postprocess"] == stats.NO_POSTPROCESS])
            if d["n"]:
                lines.append(f"| {structure} | {candidate} | {d['n']} | {_f(d['dice'], 3)} | {_f(d['surface_dice'], 3)} "
                             f"| {_f(d['hd95_median'], 1)} | {d['hd95_inf']} | {_f(d['hd95_penalised_mean'], 1)} "
                             f"| {_f(d['apl_mm'], 0)} |")
    return "\n".join(lines)


def comparison_table(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str], rendering: str = ORIGINAL) -> str:
    """Per candidate x structure: paired Dice and surface Dice differences with the baseline, their 95%
    bootstrap intervals over patients and the pairs up / down."""
    lines = ["| candidate | structure | pairs (patients) | Dice diff | 95% interval | up / down "
             "| surface Dice diff | 95% interval |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for candidate in candidates:
        if candidate == BASELINE:
            continue
        dice = stats.compare(rows, candidate, BASELINE, structure_keys(), "dice", rendering)
        surface = stats.compare(rows, candidate, BASELINE, structure_keys(), "surface_dice", rendering)
        for d, s in zip(dice, surface):
            if d["n"]:
                lines.append(f"| {candidate} | {d['structure']} | {d['n']} ({d['patients']}) | {_f(d['mean'], 3, True)} "
                             f"| {_interval(d['interval'])} | {d['up']} / {d['down']} | {_f(s['mean'], 3, True)} "
                             f"| {_interval(s['interval'])} |")
    return "\n".join(lines)


def decision_table(rows: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> str:
    """The decision rule (``quality_stats`` docstring) per candidate, on original and re-rendered CTs."""
    lines = ["| candidate | CTs | aims at | pairs | pooled Dice diff | 95% interval | harmed | verdict | decides |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for candidate in candidates:
        if candidate == BASELINE:
            continue
        for rendering in (ORIGINAL, RERENDERED):
            d = stats.decide(rows, candidate, BASELINE, CANDIDATES[candidate].aims_at, structure_keys(), rendering)
            if d["n"]:
                lines.append(f"| {candidate} | {rendering} | {', '.join(d['aims_at'])} | {d['n']} "
                             f"| {_f(d['mean'], 3, True)} | {_interval(d['interval'])} "
                             f"| {', '.join(d['harmed']) or '-'} | {d['verdict']} "
                             f"| {'yes' if rendering == CANDIDATES[candidate].decided_on else ''} |")
    return "\n".join(lines)


def postprocess_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Post-processing chosen on the other folds and its effect on the held-out fold (baseline)."""
    from thoracic_seg.postprocess import SINGLE_COMPONENT_LABELS
    from thoracic_seg import organs

    structures = [organs.structure(label).key for label in SINGLE_COMPONENT_LABELS]
    held = stats.held_out_postprocessing(rows, BASELINE, structures, list(postprocess_variants()))
    lines = ["| fold | structure | rule chosen on the other folds | pairs | Dice change mean | worst |",
             "|---:|---|---|---:|---:|---:|"]
    for h in held:
        lines.append(f"| {h['fold']} | {h['structure']} | {h['rule']} | {h['n']} | {_f(h['change_mean'], 4, True)} "
                     f"| {_f(h['change_worst'], 4, True)} |")
    return "\n".join(lines)


def curve_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Mean Dice per structure at each step budget (the learning curve)."""
    budgets = sorted({r["steps"] for r in rows})
    lines = ["| structure | " + " | ".join(f"{s} steps" for s in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for structure in structure_keys():
        cells = [stats.describe([r for r in rows if r["structure"] == structure and r["steps"] == s
                                 and r["rendering"] == ORIGINAL and r["postprocess"] == stats.NO_POSTPROCESS])
                 for s in budgets]
        if any(c["n"] for c in cells):
            lines.append(f"| {structure} | " + " | ".join(_f(c["dice"], 3) for c in cells) + " |")
    return "\n".join(lines)


def format_report(report: Mapping[str, Any]) -> str:
    """Every table in Markdown, with what was run."""
    rows, names = report["rows"], report["candidates"]
    b = report["budget"]
    head = [f"`{report.get('command', '')}`", "",
            f"Folds (held out): {'; '.join(', '.join(f) for f in report['folds'])}; seeds "
            f"{', '.join(map(str, report['seeds']))}; "
            f"{'/'.join(map(str, report['curve'])) if report['curve'] else b['steps']} steps at {b['size']} px on {b['device']}; "
            f"recipe: phase 3 `{' '.join(b['phase3_args'])}`, training `{' '.join(b['train_args'])}`; "
            f"code {report['code']}, data {report['data']}, commit {report.get('commit')}; "
            f"{report.get('machine', '')}; wall {report.get('wall_seconds', 0) / 60:.1f} min "
            f"({report['cells_cached']} of {len(report['records'])} cells from the cache).", ""]
    if report["curve"]:
        return "\n".join(head + ["Learning curve (baseline, fold 0, first seed; Dice, no post-processing):", "",
                                 curve_table(rows)])
    parts = head + ["Held-out patients, no post-processing:", "", quality_table(rows, names), "",
                    "Paired with the baseline per (patient, seed); intervals resample patients:", "",
                    comparison_table(rows, names), "", "Decision rule (quality_stats.py):", "",
                    decision_table(rows, names), "", "Post-processing chosen out of sample (baseline):", "",
                    postprocess_table(rows)]
    parts += [f"\nSkipped: {name}: {why}" for name, why in report["skipped"].items()]
    parts += [f"\nLeft out (failed): {what}" for what in report.get("failed_patients", [])]
    if any(r["rendering"] == RERENDERED for r in rows):
        parts += ["", f"Held-out CTs re-rendered as another scanner ({RERENDER}):", "",
                  quality_table(rows, names, RERENDERED), "", comparison_table(rows, names, RERENDERED)]
    return "\n".join(parts)


# ---- Command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", "--configs", nargs="+", default=list(DEFAULT_CANDIDATES), metavar="NAME",
                        help="; ".join(f"{c.name} ({c.cost})" for c in CANDIDATES.values())
                        + " (default: %(default)s; the baseline always runs)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="(default: %(default)s)")
    parser.add_argument("--folds", type=int, default=N_FOLDS, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per training (default: {STEPS['cpu']} on CPU, {STEPS['cuda']} on CUDA)")
    parser.add_argument("--learning-curve", nargs="+", type=int, default=[], metavar="STEPS",
                        help="only the baseline's first fold and seed at each of these budgets")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the mechanics on six synthetic patients, 32 px, {SMOKE_STEPS} steps (~45 s); no real data needed")
    parser.add_argument("--workers", type=int, default=1, help="processes for phases 2-3 (default: 1)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="data, cells, checkpoints and probabilities; a rerun resumes (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; with --smoke, in the work dir)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="also write the tables there")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None, trainer: Trainer = train_cell) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(s < 1 for s in [*args.learning_curve, *([args.steps] if args.steps is not None else [])]):
        parser.error("--steps and --learning-curve budgets must be >= 1")
    from thoracic_seg.batch import setup_logging
    from thoracic_seg.precision import resolve_device
    from thoracic_seg.recipe import load_recipe

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    recipe = load_recipe()
    if args.smoke:
        budget = Budget(steps=args.steps or SMOKE_STEPS, size=32, device=device.type, phase3_args=recipe.phase3_args,
                        train_args=(*recipe.train_args, "--base-channels", "4", "--batch-size", "4"))
    else:
        missing = [str(a) for a in ARCHIVES if not a.is_file()]
        if missing:
            print(f"real data not found: {', '.join(missing)} (run --smoke for the mechanics)", file=sys.stderr)
            return 2
        budget = Budget(steps=args.steps or STEPS[device.type],
                        size=recipe.cpu_size if device.type == "cpu" else 256, device=device.type,
                        phase3_args=recipe.phase3_args,
                        train_args=(*recipe.train_args, *(recipe.cpu_train_args if device.type == "cpu" else ())))
    setup_logging(args.verbose)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            roots = smoke_roots(work) if args.smoke else unpack(ARCHIVES, work)
            data_id = "synthetic-6x64px" if args.smoke else data_fingerprint(ARCHIVES)
            report = run(candidates=args.candidates, seeds=args.seeds, work=work, budget=budget, dicom_roots=roots,
                         data_id=data_id, n_folds=args.folds, curve=args.learning_curve, workers=args.workers,
                         trainer=trainer)
        except (ValueError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 1
    from bench_training import machine_description
    import torch

    m = machine_description(torch.device(device))
    report.update(command="python benchmarks/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  wall_seconds=round(time.perf_counter() - started, 1), commit=git_commit(),
                  machine=f"{m.get('cpu_model')}, {m.get('cpu_count')} cores, torch {m.get('torch')}")
    text = format_report(report)
    print("\n" + text)
    output = args.output or (work / "bench_quality.json" if args.smoke and args.work_dir else
                             None if args.smoke else DEFAULT_OUTPUT)
    if output is None:
        return 1 if report["failed_patients"] else 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**report, "rows": [jsonable_row(r) for r in report["rows"]]}, indent=1,
                                      allow_nan=False) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 1 if report["failed_patients"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
