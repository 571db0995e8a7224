"""The statistics of the quality benchmark (``bench_quality.py``), pure functions over its metric rows.

A row is one (candidate, fold, seed, held-out patient, rendering, post-processing, structure):
``dice``, ``surface_dice``, ``hd95_mm`` (inf: truth or prediction empty), ``apl_mm``, ``annotated``,
``diagonal_mm`` (the CT's diagonal, the HD95 penalty). Nothing here trains or reads a file.

The decision rule, written before the six-patient run (:func:`decide`): a candidate replaces the
baseline only when the 95% bootstrap interval (patients resampled) of its mean paired Dice difference,
pooled over the structures it aims at, lies above 0, and no structure's interval lies entirely below
-0.01. Otherwise the simpler default stays and the table says "no measurable difference" (or "worse").
With four heart patients (eight scores with two seeds) an interval clears 0 only when nearly every
patient improves: small differences are expected to be inconclusive, and are reported so. The harm
check blocks only a structure whose whole interval is below -0.01; with 4-6 patients a wide interval
(say [-0.15, +0.02]) does not block, so the per-structure table must be read beside the verdict. A
percentile bootstrap over so few patients gives intervals narrower than the truth. A candidate aimed
at other scanners (``scanner-aug``) is decided on the re-rendered CTs; the original CTs' row shows
what it costs on the scanner trained on.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterable, Mapping, Sequence

#: Bootstrap resamples of the patients, and the seed that makes the interval reproducible.
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: The decision rule's harm bound: no structure's interval may lie entirely below this Dice change.
HARM_BOUND = -0.01
#: Post-processing is chosen only for a structure whose baseline mean Dice (on the other folds) reaches
#: this: below it the network does not find the structure, and removing components is choosing noise.
POSTPROCESS_DICE_FLOOR = 0.5
#: A rule qualifies when no pair of the other folds loses more Dice than this (the table's precision).
POSTPROCESS_TOLERANCE = 0.001
NO_POSTPROCESS = "none"


def scored(row: Mapping[str, Any]) -> bool:
    """A row with a truth to score against (annotated) and a defined Dice (not both empty)."""
    dice = row.get("dice")
    return bool(row.get("annotated")) and dice is not None and not (isinstance(dice, float) and math.isnan(dice))


def penalised_hd95(row: Mapping[str, Any]) -> float | None:
    """HD95 in mm with an empty truth or prediction (inf) replaced by the CT's diagonal (``diagonal_mm``):
    a network that predicts nothing gets the worst distance the CT allows, never a missing value."""
    value = row.get("hd95_mm")
    if value is None:
        return None
    return float(row["diagonal_mm"]) if math.isinf(value) else float(value)


def median(values: Sequence[float]) -> float | None:
    """The median (mean of the middle two for an even count); None for no values. inf sorts last."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def mean(values: Sequence[float]) -> float | None:
    """The mean; None for no values."""
    return sum(values) / len(values) if values else None


def describe(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One table cell of scored rows: n, Dice mean, surface Dice mean, HD95 median (inf included),
    inf count and penalised mean, APL mean (mm)."""
    rows = [r for r in rows if scored(r)]
    hd95 = [r["hd95_mm"] for r in rows if r.get("hd95_mm") is not None]
    penalised = [penalised_hd95(r) for r in rows if r.get("hd95_mm") is not None]
    return {"n": len(rows), "dice": mean([r["dice"] for r in rows]),
            "surface_dice": mean([r["surface_dice"] for r in rows if r.get("surface_dice") is not None]),
            "hd95_median": median(hd95), "hd95_inf": sum(math.isinf(v) for v in hd95),
            "hd95_penalised_mean": mean(penalised),
            "apl_mm": mean([r["apl_mm"] for r in rows if r.get("apl_mm") is not None])}


# ---- Paired differences and their interval ----
def paired_differences(rows: Sequence[Mapping[str, Any]], candidate: str, baseline: str, structure: str,
                       metric: str = "dice", rendering: str = "original",
                       postprocess: str = NO_POSTPROCESS) -> list[dict[str, Any]]:
    """``candidate`` minus ``baseline`` per (held-out patient, seed) of one structure.

    A candidate without seeds of its own (an ensemble: ``seed`` None) is paired with every seed of the
    baseline on the same patient (does the ensemble beat a single network?). Returns dicts with
    ``patient_id``, ``seed``, ``difference``."""
    def pick(name: str) -> dict[tuple[str, Any], float]:
        return {(r["patient_id"], r["seed"]): float(r[metric]) for r in rows
                if r["candidate"] == name and r["structure"] == structure and r["rendering"] == rendering
                and r["postprocess"] == postprocess and scored(r) and r.get(metric) is not None}

    mine, base = pick(candidate), pick(baseline)
    out = []
    for (patient, seed), value in sorted(base.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        other = mine.get((patient, seed), mine.get((patient, None)))
        if other is not None:
            out.append({"patient_id": patient, "seed": seed, "difference": other - value})
    return out


def bootstrap_interval(pairs: Sequence[Mapping[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of the mean difference when the *patients* are resampled with replacement
    (each drawn patient brings all its pairs: seeds of one patient are not independent). None for no pairs;
    a single patient gives its own mean twice (no spread can be estimated: say so where it is shown)."""
    by_patient: dict[str, list[float]] = {}
    for pair in pairs:
        by_patient.setdefault(pair["patient_id"], []).append(float(pair["difference"]))
    if not by_patient:
        return None
    groups = [by_patient[p] for p in sorted(by_patient)]
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [groups[rng.randrange(len(groups))] for _ in groups]
        means.append(sum(sum(g) for g in drawn) / sum(len(g) for g in drawn))
    means.sort()
    tail = (1 - level) / 2
    return means[int(math.floor(tail * (resamples - 1)))], means[int(math.ceil((1 - tail) * (resamples - 1)))]


def compare(rows: Sequence[Mapping[str, Any]], candidate: str, baseline: str, structures: Iterable[str],
            metric: str = "dice", rendering: str = "original") -> list[dict[str, Any]]:
    """Per structure: n pairs, patients, mean difference, 95% interval, pairs up / down / equal."""
    out = []
    for structure in structures:
        pairs = paired_differences(rows, candidate, baseline, structure, metric, rendering)
        diffs = [p["difference"] for p in pairs]
        out.append({"candidate": candidate, "structure": structure, "metric": metric, "rendering": rendering,
                    "n": len(pairs), "patients": len({p["patient_id"] for p in pairs}), "mean": mean(diffs),
                    "interval": bootstrap_interval(pairs), "up": sum(d > 0 for d in diffs),
                    "down": sum(d < 0 for d in diffs), "equal": sum(d == 0 for d in diffs)})
    return out


def pooled_pairs(rows: Sequence[Mapping[str, Any]], candidate: str, baseline: str, structures: Iterable[str],
                 rendering: str = "original") -> list[dict[str, Any]]:
    """The Dice differences of several structures pooled per (patient, seed): their mean over the
    structures that patient has, so the interval over patients weighs each patient once."""
    pooled: dict[tuple[str, Any], list[float]] = {}
    for structure in structures:
        for pair in paired_differences(rows, candidate, baseline, structure, "dice", rendering):
            pooled.setdefault((pair["patient_id"], pair["seed"]), []).append(pair["difference"])
    return [{"patient_id": p, "seed": s, "difference": sum(v) / len(v)} for (p, s), v in sorted(
        pooled.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))]


def decide(rows: Sequence[Mapping[str, Any]], candidate: str, baseline: str, aims_at: Sequence[str],
           structures: Sequence[str], rendering: str = "original") -> dict[str, Any]:
    """The decision rule of the module docstring: ``switch``, ``no measurable difference`` or ``worse``,
    with the pooled interval over ``aims_at`` and the structures whose interval lies below the harm bound."""
    pooled = pooled_pairs(rows, candidate, baseline, aims_at, rendering)
    interval = bootstrap_interval(pooled)
    per_structure = compare(rows, candidate, baseline, structures, "dice", rendering)
    harmed = [c["structure"] for c in per_structure if c["interval"] and c["interval"][1] < HARM_BOUND]
    if interval is None:
        verdict = "not measured"
    elif interval[0] > 0 and not harmed:
        verdict = "switch"
    elif interval[1] < 0 or harmed:
        verdict = "worse"
    else:
        verdict = "no measurable difference"
    return {"candidate": candidate, "aims_at": list(aims_at), "rendering": rendering, "n": len(pooled),
            "mean": mean([p["difference"] for p in pooled]), "interval": interval, "harmed": harmed,
            "verdict": verdict}


# ---- Post-processing chosen out of sample ----
def choose_rule(rows: Sequence[Mapping[str, Any]], structure: str, rules: Sequence[str]) -> str:
    """The rule for ``structure`` from ``rows`` (the other folds): none when their mean Dice without
    post-processing is under :data:`POSTPROCESS_DICE_FLOOR`; else the rule with the best mean Dice change
    among those that never lose more than :data:`POSTPROCESS_TOLERANCE` on a pair and gain on average."""
    plain = {_pair_key(r): r["dice"] for r in rows if r["structure"] == structure
             and r["postprocess"] == NO_POSTPROCESS and scored(r)}
    if not plain or (mean(list(plain.values())) or 0.0) < POSTPROCESS_DICE_FLOOR:
        return NO_POSTPROCESS
    best, best_gain = NO_POSTPROCESS, 0.0
    for rule in rules:
        changes = [r["dice"] - plain[_pair_key(r)] for r in rows if r["structure"] == structure
                   and r["postprocess"] == rule and scored(r) and _pair_key(r) in plain]
        if changes and min(changes) >= -POSTPROCESS_TOLERANCE and mean(changes) > best_gain:
            best, best_gain = rule, mean(changes)
    return best


def _pair_key(row: Mapping[str, Any]) -> tuple:
    return row["candidate"], row["fold"], row["seed"], row["patient_id"], row["rendering"]


def held_out_postprocessing(rows: Sequence[Mapping[str, Any]], baseline: str, structures: Sequence[str],
                            rules: Sequence[str]) -> list[dict[str, Any]]:
    """Per (fold, structure): the rule chosen on the *other* folds' baseline rows and its effect on this
    fold's baseline rows (Dice with the rule minus without, per patient and seed), so the table reports
    what choosing a rule does to patients it was not chosen on."""
    base = [r for r in rows if r["candidate"] == baseline and r["rendering"] == "original"]
    out = []
    for fold in sorted({r["fold"] for r in base}):
        others = [r for r in base if r["fold"] != fold]
        mine = [r for r in base if r["fold"] == fold]
        for structure in structures:
            rule = choose_rule(others, structure, rules)
            plain = {_pair_key(r): r["dice"] for r in mine if r["structure"] == structure
                     and r["postprocess"] == NO_POSTPROCESS and scored(r)}
            changes = [r["dice"] - plain[_pair_key(r)] for r in mine if r["structure"] == structure
                       and r["postprocess"] == rule and scored(r) and _pair_key(r) in plain]
            if rule == NO_POSTPROCESS:
                changes = [0.0] * len(plain)
            out.append({"fold": fold, "structure": structure, "rule": rule, "n": len(changes),
                        "change_mean": mean(changes), "change_worst": min(changes) if changes else None})
    return out


def group_by(rows: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]) -> dict[Any, list]:
    """Rows grouped by ``key(row)``, in first-seen order."""
    out: dict[Any, list] = {}
    for row in rows:
        out.setdefault(key(row), []).append(row)
    return out
