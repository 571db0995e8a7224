"""Phase 4 (division): patient-level train / val / test splits, stratified by annotated structure,
made once and kept.

``processed/training_cache/<PatientID>/meta.json`` -> ``<splits-dir>/train.txt``, ``val.txt``,
``test.txt`` (one PatientID per line, sorted) and ``summary.json``.

    python prepare_train_val_test_splits.py --data-root DATA [--splits-dir splits] [--seed 42] [--force]

Whole patients go to one split, never slices; every split gets patients with each structure annotated
where the data allows (:func:`assign_splits`); the same seed gives the same splits.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from thoracic_seg.batch import setup_logging, write_text_atomic
from thoracic_seg.layout import DEFAULT_DATA_ROOT, DEFAULT_SPLITS_DIR
from thoracic_seg.splits import (
    SPLIT_NAMES, SUMMARY_JSON, check_splits, format_summary, read_cohort, split_path, split_summary,
)

log = logging.getLogger(__name__)

DEFAULT_SEED = 42
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
# Who gets a patient when there are too few to go round (patients, or patients with a rare
# structure): train first (to learn it), then test (to measure it), then val.
_PREFERENCE: tuple[str, ...] = ("train", "test", "val")


# ---- Pure assignment -------------------------------------------------------------------------
def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three fractions (train, val, test), each in [0, 1], train > 0, summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"fractions must be 3 values (train val test), got {list(fractions)}")
    if any(not 0 <= f <= 1 for f in values) or not values[0] > 0:
        raise ValueError(f"fractions must lie in [0, 1] with train > 0, got {list(values)}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {list(values)} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def split_sizes(n_patients: int, fractions: Sequence[float]) -> dict[str, int]:
    """Patients per split: largest-remainder rounding of ``n * fraction``, then every split with
    a non-zero fraction gets at least one patient when there are enough (taken from the largest
    split), in the order train, test, val.

    >>> split_sizes(12, (0.7, 0.15, 0.15))
    {'train': 8, 'val': 2, 'test': 2}
    >>> split_sizes(3, (0.7, 0.15, 0.15))
    {'train': 1, 'val': 1, 'test': 1}
    """
    fractions = check_fractions(fractions)
    exact = {name: n_patients * f for name, f in zip(SPLIT_NAMES, fractions)}
    sizes = {name: math.floor(v) for name, v in exact.items()}
    by_remainder = sorted(SPLIT_NAMES, key=lambda s: (-(exact[s] - sizes[s]), _PREFERENCE.index(s)))
    for name in by_remainder[: n_patients - sum(sizes.values())]:
        sizes[name] += 1
    wanted = dict(zip(SPLIT_NAMES, fractions))
    for name in _PREFERENCE:
        if wanted[name] > 0 and sizes[name] == 0:
            donor = max(SPLIT_NAMES, key=lambda s: (sizes[s], -_PREFERENCE.index(s)))
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[name] += 1
    return sizes


def assign_splits(
    patient_ids: Sequence[str], annotated: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, list[str]]:
    """Stratified patient-level split -> ``{"train": [...], "val": [...], "test": [...]}`` (sorted).

    Iterative stratification (Sechidis et al., 2011): from the rarest annotated structure to the most
    common, each patient with it goes to a split that has none yet, else to the one furthest below its
    share (the heart is contoured in ~30% of NSCLC-Radiomics; a test split without one measures nothing).
    ``patient_ids``: P unique ids; ``annotated``: bool (P, 8) labels each patient has annotated;
    ``fractions``: (train, val, test) summing to 1; same ``seed`` and inputs, same split (any input order).
    """
    ids = list(patient_ids)
    flags = np.asarray(annotated, dtype=bool).reshape(len(ids), -1)
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids must be unique")
    sizes = split_sizes(len(ids), fractions)
    order = np.argsort(ids, kind="stable")  # independent of the caller's order...
    order = order[np.random.default_rng(seed).permutation(len(ids))]  # ...then shuffled by seed
    foreground = flags[:, 1:]  # background is always "annotated"
    totals = foreground.sum(axis=0)
    capacity = dict(sizes)
    got = {name: np.zeros(foreground.shape[1], dtype=np.int64) for name in SPLIT_NAMES}
    share = {name: sizes[name] / max(len(ids), 1) for name in SPLIT_NAMES}
    assigned: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    remaining = [int(i) for i in order]

    def put(i: int, name: str) -> None:
        assigned[name].append(ids[i])
        got[name] += foreground[i]
        capacity[name] -= 1
        remaining.remove(i)

    while remaining:
        left = foreground[remaining].sum(axis=0)
        if not left.any():  # patients without any annotated structure: fill by capacity
            for i in list(remaining):
                put(i, max(_open(capacity), key=lambda s: (capacity[s] / max(sizes[s], 1), -_PREFERENCE.index(s))))
            break
        label = int(np.argmin(np.where(left > 0, left, np.iinfo(np.int64).max)))
        for i in [i for i in remaining if foreground[i, label]]:
            def score(name: str, i: int = i) -> tuple:
                lacking = int(np.sum(foreground[i] & (got[name] == 0)))
                return (
                    got[name][label] == 0,  # a split without this structure yet
                    share[name] * totals[label] - got[name][label],  # furthest below its share
                    lacking,  # the patient's other structures it lacks
                    capacity[name] / max(sizes[name], 1),
                    -_PREFERENCE.index(name),
                )
            put(i, max(_open(capacity), key=score))
    return {name: sorted(v) for name, v in assigned.items()}


def _open(capacity: dict[str, int]) -> list[str]:
    return [name for name in SPLIT_NAMES if capacity[name] > 0]


# ---- Run -------------------------------------------------------------------------------------


def run(
    *, data_root: Path | str = DEFAULT_DATA_ROOT, splits_dir: Path | str = DEFAULT_SPLITS_DIR,
    patients: Sequence[str] | None = None, seed: int = DEFAULT_SEED, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    force: bool = False,
) -> dict[str, Any]:
    """Split the cached patients, write the split files and ``summary.json``; return the summary.

    Raises:
        FileExistsError: split files exist in ``splits_dir`` and ``force`` is False.
        FileNotFoundError: no training cache, or a requested patient has none.
    """
    fractions = check_fractions(fractions)
    splits_dir = Path(splits_dir)
    targets = [split_path(splits_dir, n) for n in SPLIT_NAMES] + [splits_dir / SUMMARY_JSON]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"splits already exist in {splits_dir} ({', '.join(existing)}); they are made once "
            "so test patients never leak into training; pass --force to replace them"
        )
    slices, annotated = read_cohort(data_root, patients)
    ids = sorted(slices)
    splits = assign_splits(ids, np.array([annotated[p] for p in ids]), fractions, seed)
    summary = {
        "seed": seed,
        "fractions": dict(zip(SPLIT_NAMES, fractions)),
        **split_summary(splits, slices, annotated),
    }
    splits_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        write_text_atomic(split_path(splits_dir, name), "".join(f"{p}\n" for p in splits[name]))
    write_text_atomic(splits_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    check_splits(splits_dir, data_root)
    for name in SPLIT_NAMES:
        if summary[name]["missing"]:
            log.warning("split %s has no patient with %s annotated", name, ", ".join(summary[name]["missing"]))
    return summary


# ---- Command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Phase 4: patient-level train/val/test splits, stratified by annotated structure."
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding processed/training_cache (default: %(default)s)")
    parser.add_argument("--splits-dir", type=Path, default=DEFAULT_SPLITS_DIR,
                        help="where train.txt, val.txt, test.txt, summary.json go "
                             "(default: %(default)s)")
    parser.add_argument("--patients", nargs="+", metavar="ID", default=None,
                        help="only these patient ids (default: every cached patient)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="random seed of the assignment (default: %(default)s)")
    parser.add_argument("--fractions", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"),
                        default=list(DEFAULT_FRACTIONS),
                        help="fractions of patients, summing to 1 (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing split files (they are normally made once)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_fractions(args.fractions)
    except ValueError as exc:
        parser.error(f"argument --fractions: {exc}")
    setup_logging(args.verbose)
    try:
        summary = run(data_root=args.data_root, splits_dir=args.splits_dir, patients=args.patients,
                      seed=args.seed, fractions=args.fractions, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    print(format_summary(summary))
    print(f"Phase 4: {summary['total']['patients']} patients split into "
          + ", ".join(f"{summary[n]['patients']} {n}" for n in SPLIT_NAMES)
          + f" in {args.splits_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
