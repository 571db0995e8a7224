"""Benchmark: calibrate the quality check's thresholds on the quality benchmark's held-out patients.

    .venv/bin/python benchmarks/calibrate_qa.py --work-dir bench-work            # today's thresholds
    .venv/bin/python benchmarks/calibrate_qa.py --work-dir bench-work --search   # + chosen by cross-validation

Reads the cells ``bench_quality.py`` left in ``--work-dir`` (it trains and infers nothing): for each cell of
the baseline (a fold x seed network), each held-out patient's labels and class probabilities, post-processed
as prediction's ``--postprocess``, are checked (``thoracic_seg.qa``) with the training volumes of that
fold's training patients only, and each structure is paired with its Dice. Prints per flag the structures
flagged among Dice < 0.5, 0.5-0.8 and >= 0.8, and the flagged fractions against the targets (>= 80% of
Dice < 0.5, <= 20% of Dice >= 0.8); ``--search`` chooses thresholds on the other folds and applies them
to the held-out fold. Writes JSON (every structure with its features) and, with ``--markdown``, the tables.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # `python benchmarks/calibrate_qa.py` from anywhere
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

log = logging.getLogger("calibrate_qa")

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "calibrate_qa.json"
#: Dice bands of the table: poor (< 0.5), fair, good (>= 0.8).
POOR_BELOW, GOOD_FROM = 0.5, 0.8
BANDS = ("poor", "fair", "good")
BAND_TITLES = {"poor": f"Dice < {POOR_BELOW:g}", "fair": f"{POOR_BELOW:g}-{GOOD_FROM:g}",
               "good": f"Dice >= {GOOD_FROM:g}"}
#: The issue's targets: at least this fraction of poor structures flagged, at most this of good ones.
TARGET_POOR_FLAGGED, TARGET_GOOD_FLAGGED = 0.8, 0.2
#: ``--search``: the values tried for each threshold, from the fewest flags to the most (the first of equal
#: choices wins: the most lenient). Side and pieces are geometry of the true anatomy and stay as they are.
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "volume_factor": (3.0, 2.0, 1.5, 1.25, 1.0),
    "min_confidence": (0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
    "max_removed_fraction": (0.2, 0.1, 0.05, 0.02, 0.01),
    "max_tube_gap_mm": (20.0, 10.0, 5.0, 0.0),
    "max_end_area_mm2": (2000.0, 1000.0, 500.0, 100.0),
}


# ---- Pure: bands, tallies, the choice of thresholds ---------------------------------------------
def band(dice: float) -> str:
    """``poor`` (Dice < 0.5), ``fair`` or ``good`` (Dice >= 0.8)."""
    return "poor" if dice < POOR_BELOW else "good" if dice >= GOOD_FROM else "fair"


def flag_cases(cases: Sequence[Mapping[str, Any]], thresholds: Mapping[str, float]) -> list[dict[str, Any]]:
    """One item per scored structure of ``cases`` (a held-out patient of a cell each: ``features`` per
    label, ``dice`` per label for the annotated structures): its fold, band and flag codes under
    ``thresholds`` (``qa.flag_structures``)."""
    from thoracic_seg import qa

    items = []
    for case in cases:
        checked = qa.flag_structures(case["features"], thresholds)
        for label, dice in case["dice"].items():
            items.append({"fold": case["fold"], "seed": case["seed"], "patient_id": case["patient_id"],
                          "label": label, "dice": dice, "band": band(dice), "flags": checked[label].codes,
                          "reasons": [f.reason for f in checked[label].flags],
                          "not_checked": dict(checked[label].not_checked)})
    return items


def tally(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per band: ``n``, ``flagged`` (any flag), ``by_flag`` {code: flagged}, and the fractions of
    poor and good structures flagged with whether they meet the targets (None without such structures)."""
    from thoracic_seg.qa import FLAG_CODES

    counts = {b: {"n": 0, "flagged": 0, "by_flag": dict.fromkeys(FLAG_CODES, 0)} for b in BANDS}
    for item in items:
        c = counts[item["band"]]
        c["n"] += 1
        c["flagged"] += bool(item["flags"])
        for code in set(item["flags"]):
            c["by_flag"][code] += 1
    poor, good = counts["poor"], counts["good"]
    poor_fraction = poor["flagged"] / poor["n"] if poor["n"] else None
    good_fraction = good["flagged"] / good["n"] if good["n"] else None
    return {"bands": counts, "poor_flagged": poor_fraction, "good_flagged": good_fraction,
            "meets_targets": (poor_fraction is None or poor_fraction >= TARGET_POOR_FLAGGED)
            and (good_fraction is None or good_fraction <= TARGET_GOOD_FLAGGED)}


def grid_thresholds(grid: Mapping[str, Sequence[float]] = SEARCH_GRID) -> list[dict[str, float]]:
    """Every combination of ``grid``'s values over today's thresholds, the most lenient first."""
    from thoracic_seg.qa import QA_THRESHOLDS

    names = list(grid)
    return [{**QA_THRESHOLDS, **dict(zip(names, values))} for values in itertools.product(*(grid[n] for n in names))]


def choose(cases: Sequence[Mapping[str, Any]], candidates: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The candidate thresholds best on ``cases``: the most poor structures flagged among those that flag at
    most :data:`TARGET_GOOD_FLAGGED` of the good ones (ties: fewer good ones, then the earlier candidate);
    when none does, the fewest good ones flagged (ties: more poor ones). ``{"thresholds", "tally"}``."""
    best, best_key = None, None
    for thresholds in candidates:
        t = tally(flag_cases(cases, thresholds))
        poor, good = t["poor_flagged"] or 0.0, t["good_flagged"] or 0.0
        key = (good <= TARGET_GOOD_FLAGGED, poor, -good) if good <= TARGET_GOOD_FLAGGED else (False, -good, poor)
        if best_key is None or key > best_key:
            best, best_key = {"thresholds": dict(thresholds), "tally": t}, key
    if best is None:
        raise ValueError("no candidate thresholds to choose from")
    return best


def cross_validate(cases: Sequence[Mapping[str, Any]], candidates: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Thresholds chosen on all folds but one and applied to that one, for each fold: the chosen values
    per fold and the pooled out-of-sample tally; and the in-sample choice on every fold (the recommendation,
    optimistic by construction)."""
    folds = sorted({c["fold"] for c in cases})
    per_fold, held_out_items = [], []
    for fold in folds:
        others = [c for c in cases if c["fold"] != fold]
        if not others:
            continue
        chosen = choose(others, candidates)
        items = flag_cases([c for c in cases if c["fold"] == fold], chosen["thresholds"])
        held_out_items += items
        per_fold.append({"fold": fold, "thresholds": chosen["thresholds"], "chosen_on": chosen["tally"],
                         "held_out": tally(items)})
    in_sample = choose(cases, candidates)
    return {"per_fold": per_fold, "out_of_sample": tally(held_out_items), "in_sample": in_sample}


# ---- Reading the cells --------------------------------------------------------------------------
def _checkpoint_of(folder: Path, record: Mapping[str, Any]) -> Path:
    """The cell's checkpoint: its run folder's (a moved work dir), else the path its record names."""
    from thoracic_seg.layout import LAST_CHECKPOINT

    here = folder / "run" / LAST_CHECKPOINT
    return here if here.is_file() else Path((record.get("checkpoints") or [record.get("checkpoint")])[0])


def fold_training_volumes(checkpoint: Mapping[str, Any], train: Sequence[str], work: Path,
                          data_root: Path | None = None) -> dict[str, Any]:
    """The training volumes of a fold: the checkpoint's own record when it has one, else measured as
    training measures them (``training.training_volumes``) on the fold's ``train`` patients' phase 3 cache:
    ``data_root``, or the one the checkpoint was trained on (moved with ``work``: its folder name under it).
    Never the held-out patients'. ``FileNotFoundError`` naming the folders tried."""
    from thoracic_seg.training import training_volumes

    if isinstance(checkpoint.get("training_volumes"), dict):
        return checkpoint["training_volumes"]
    trained_on = Path(str((checkpoint.get("train_config") or {}).get("data_root", "")))
    tried = [p for p in (data_root, trained_on, work / trained_on.name) if p is not None and str(p) not in ("", ".")]
    for root in tried:
        if (root / "processed" / "training_cache").is_dir():
            return training_volumes(root, train)
    raise FileNotFoundError(f"no phase 3 training cache for the training patients {list(train)} under "
                            f"{', '.join(map(str, tried)) or 'any folder'}; give --data-root")


def row_variant(label: int, postprocess: str) -> str:
    """The post-processing variant of a cell's rows that scored ``label`` as ``postprocess`` does today.
    A cell's ``--postprocess`` rows hold the rule in force when it was scored; the benchmark also scores
    each candidate rule (and none) on every structure, so today's rule of ``label`` is read from the
    variant with the same fraction: ``none`` where the structure is left alone, ``largest``, ``drop<10%``
    ... Any other ``postprocess`` or a tumour: ``postprocess`` itself. ``ValueError``: a rule no variant has."""
    from thoracic_seg import organs
    from thoracic_seg.postprocess import POSTPROCESS_CANDIDATES, POSTPROCESS_MIN_FRACTION, SINGLE_COMPONENT_LABELS
    import quality_stats as stats

    if postprocess != "--postprocess" or label not in SINGLE_COMPONENT_LABELS:  # every variant leaves GTV/PTV alone
        return postprocess
    fraction = POSTPROCESS_MIN_FRACTION.get(label, 0.0)
    if fraction <= 0:
        return stats.NO_POSTPROCESS
    name = next((n for n, f in POSTPROCESS_CANDIDATES.items() if min(f, 1.0) == min(fraction, 1.0)), None)
    if name is None:
        raise ValueError(f"--postprocess removes {organs.structure(label).name} pieces under {fraction:g} of its "
                         f"largest, a rule the benchmark does not score ({POSTPROCESS_CANDIDATES}): run "
                         "bench_quality.py with it first")
    return name


def read_cell(folder: Path, *, postprocess: str, rendering: str, work: Path,
              data_root: Path | None = None) -> list[dict[str, Any]]:
    """The cases of one cell: per held-out patient its features per label (``qa.structure_features`` of the
    held-out labels after ``postprocess``, with the probabilities and the fold's training volumes) and the
    Dice per annotated structure from ``cell.json``'s rows of that ``rendering`` and ``postprocess``."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    import quality_stats as stats
    from bench_quality import from_json_row, postprocess_variants
    from thoracic_seg import organs, qa
    from thoracic_seg.grid import orientation_code
    from thoracic_seg.postprocess import remove_small_components
    from thoracic_seg.ptv import ptv_from_gtv
    from unet_multi_organ import checkpoint_ptv

    cell = json.loads((folder / "cell.json").read_text(encoding="utf-8"))
    training, scoring, record = cell["key"]["training"], cell["key"]["scoring"], cell["record"]
    variants = postprocess_variants()
    if postprocess != stats.NO_POSTPROCESS and postprocess not in variants:
        raise ValueError(f"unknown post-processing {postprocess!r}; the benchmark has {stats.NO_POSTPROCESS}, "
                         f"{', '.join(variants)}")
    rules = variants.get(postprocess, {})
    checkpoint = torch.load(_checkpoint_of(folder, record), map_location="cpu", weights_only=True)
    volumes = fold_training_volumes(checkpoint, list(training["train"]), work, data_root)
    ptv = checkpoint_ptv(checkpoint)
    by_key = {s.key: s.label for s in organs.STRUCTURES}
    variant = {key: row_variant(label, postprocess) for key, label in by_key.items()}
    cases = []
    for pid in scoring["test"]:
        rows = [from_json_row(r) for r in cell["rows"] if r["patient_id"] == pid and r["rendering"] == rendering
                and r["postprocess"] == variant[r["structure"]]]
        dice = {by_key[r["structure"]]: float(r["dice"]) for r in rows if stats.scored(r)}
        image = sitk.ReadImage(str(folder / "held_out" / f"{pid}.nii.gz"))
        raw = sitk.GetArrayFromImage(image)
        labels = remove_small_components(raw, rules) if rules else raw
        spacing = image.GetSpacing()[::-1]
        with np.load(folder / "held_out" / f"{pid}_probabilities.npz") as stored:
            probabilities, scale = stored["probabilities"], float(stored["scale"])
        ptv_mask = ptv_from_gtv(labels == organs.GTV, spacing, float(ptv["margin_mm"])) \
            if ptv.get("source") == "derived" else None
        features = qa.structure_features(labels, spacing, orientation=orientation_code(image),
                                         labels_before=raw if rules else None, probabilities=probabilities,
                                         probability_scale=scale, ptv_mask=ptv_mask, training_volumes=volumes)
        cases.append({"fold": training["fold"], "seed": training["seed"], "patient_id": pid, "features": features,
                      "dice": dice, "train": list(training["train"])})
    return cases


def read_cases(work: Path, *, candidate: str, postprocess: str, rendering: str,
               data_root: Path | None = None) -> list[dict[str, Any]]:
    """Every held-out patient of every cell of ``candidate`` in ``work/cells`` (sorted by folder)."""
    folders = sorted(p.parent for p in (work / "cells" / candidate).glob("*/cell.json"))
    if not folders:
        raise FileNotFoundError(f"no finished cell of candidate {candidate!r} under {work / 'cells'} "
                                "(run benchmarks/bench_quality.py --work-dir there first)")
    cases = []
    for folder in folders:
        cases += read_cell(folder, postprocess=postprocess, rendering=rendering, work=work, data_root=data_root)
        log.info("%s: %d held-out patient(s)", folder.relative_to(work), len(cases))
    return cases


# ---- Tables -------------------------------------------------------------------------------------
def _share(flagged: int, n: int) -> str:
    return f"{flagged} of {n} ({flagged / n:.0%})" if n else "-"


def flag_table(t: Mapping[str, Any]) -> str:
    """Per flag, the structures it flags in each Dice band; then any flag, and the targets."""
    from thoracic_seg.qa import FLAG_CODES

    bands = t["bands"]
    lines = ["| flag | " + " | ".join(f"{BAND_TITLES[b]} (n={bands[b]['n']})" for b in BANDS) + " |",
             "|---|" + "---:|" * len(BANDS)]
    for code in FLAG_CODES:
        lines.append(f"| {code} | " + " | ".join(str(bands[b]["by_flag"][code]) for b in BANDS) + " |")
    lines.append("| **any flag** | " + " | ".join(_share(bands[b]["flagged"], bands[b]["n"]) for b in BANDS) + " |")
    return "\n".join(lines) + "\n\n" + targets_line(t)


def targets_line(t: Mapping[str, Any]) -> str:
    def part(fraction: float | None, target: str, ok: bool) -> str:
        return f"{target}: {'-' if fraction is None else f'{fraction:.0%}'} ({'met' if ok else 'NOT met'})"

    poor, good = t["poor_flagged"], t["good_flagged"]
    return ("Targets: " + part(poor, f">= {TARGET_POOR_FLAGGED:.0%} of Dice < {POOR_BELOW:g} flagged",
                               poor is None or poor >= TARGET_POOR_FLAGGED)
            + "; " + part(good, f"<= {TARGET_GOOD_FLAGGED:.0%} of Dice >= {GOOD_FROM:g} flagged",
                          good is None or good <= TARGET_GOOD_FLAGGED) + ".")


def structure_table(items: Sequence[Mapping[str, Any]]) -> str:
    """Per structure: how many of its poor and good scores were flagged, and by what."""
    from thoracic_seg import organs

    lines = ["| structure | n | mean Dice | Dice < 0.5 flagged | Dice >= 0.8 flagged | flags raised |",
             "|---|---:|---:|---:|---:|---|"]
    for label in organs.FOREGROUND_LABELS:
        mine = [i for i in items if i["label"] == label]
        if not mine:
            continue
        raised: dict[str, int] = {}
        for item in mine:
            for code in item["flags"]:
                raised[code] = raised.get(code, 0) + 1
        shares = [_share(sum(bool(i["flags"]) for i in mine if i["band"] == b), sum(i["band"] == b for i in mine))
                  for b in ("poor", "good")]
        lines.append(f"| {organs.structure(label).key} | {len(mine)} | {sum(i['dice'] for i in mine) / len(mine):.3f} "
                     f"| {shares[0]} | {shares[1]} | {', '.join(f'{k} {v}' for k, v in raised.items()) or '-'} |")
    return "\n".join(lines)


def _changed(thresholds: Mapping[str, float]) -> str:
    from thoracic_seg.qa import QA_THRESHOLDS

    changed = {k: v for k, v in thresholds.items() if QA_THRESHOLDS.get(k) != v}
    return ", ".join(f"{k} {v:g}" for k, v in changed.items()) or "today's thresholds"


def search_tables(search: Mapping[str, Any]) -> str:
    """The thresholds chosen per fold, their held-out result, and the in-sample choice."""
    lines = ["| held-out fold | thresholds chosen on the other folds (changes) | poor flagged there "
             "| good flagged there | poor flagged held out | good flagged held out |", "|---:|---|---:|---:|---:|---:|"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    for fold in search["per_fold"]:
        on, held = fold["chosen_on"], fold["held_out"]
        lines.append(f"| {fold['fold']} | {_changed(fold['thresholds'])} | {pct(on['poor_flagged'])} "
                     f"| {pct(on['good_flagged'])} | {pct(held['poor_flagged'])} | {pct(held['good_flagged'])} |")
    out, inside = search["out_of_sample"], search["in_sample"]
    in_sample = f"In sample (chosen on every fold: {_changed(inside['thresholds'])}; optimistic):"
    return "\n".join(lines + ["", "Out of sample (each fold with thresholds chosen without it):", "",
                              flag_table(out), "", in_sample, "", flag_table(inside["tally"])])


def format_report(report: Mapping[str, Any]) -> str:
    head = (f"Quality check on the held-out structures of `{report['work_dir']}` (candidate {report['candidate']}, "
            f"{report['rendering']} CTs, post-processing {report['postprocess']}): {len(report['cases'])} patient "
            f"scores in {len({c['fold'] for c in report['cases']})} folds; training volumes of each fold's training "
            f"patients only.")
    parts = [head, "", "With today's thresholds (`thoracic_seg.qa.QA_THRESHOLDS`):", "", flag_table(report["table"]),
             "", structure_table(report["items"])]
    if report.get("search"):
        parts += ["", "Thresholds chosen by cross-validation over folds (`--search`):", "",
                  search_tables(report["search"])]
    return "\n".join(parts)


# ---- Run ----------------------------------------------------------------------------------------
def run(*, work_dir: Path | str, candidate: str = "baseline", postprocess: str = "--postprocess",
        rendering: str = "original", search: bool = False, data_root: Path | str | None = None,
        grid: Mapping[str, Sequence[float]] = SEARCH_GRID) -> dict[str, Any]:
    """The calibration report of ``work_dir`` (a ``bench_quality.py --work-dir``): ``cases`` (per held-out
    patient and cell, its features per label), ``items`` (per scored structure, its flags under today's
    thresholds), ``table`` (:func:`tally`) and, with ``search``, :func:`cross_validate` over ``grid``.
    ``FileNotFoundError`` without finished cells or training cache; ``ValueError`` for an unknown rule."""
    from thoracic_seg.qa import QA_THRESHOLDS

    work = Path(work_dir)
    cases = read_cases(work, candidate=candidate, postprocess=postprocess, rendering=rendering,
                       data_root=Path(data_root) if data_root else None)
    items = flag_cases(cases, QA_THRESHOLDS)
    report = {"benchmark": "calibrate_qa", "work_dir": str(work), "candidate": candidate, "postprocess": postprocess,
              "rendering": rendering, "thresholds": dict(QA_THRESHOLDS), "cases": cases, "items": items,
              "table": tally(items)}
    if search:
        report["search"] = cross_validate(cases, grid_thresholds(grid))
        report["grid"] = {k: list(v) for k, v in grid.items()}
    return report


def jsonable(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report for JSON: features rounded, labels as keys in text."""
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 4)
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="bench_quality.py's --work-dir (its cells/)")
    parser.add_argument("--candidate", default="baseline", help="whose cells (default: %(default)s)")
    parser.add_argument("--postprocess", default="--postprocess",
                        help="the post-processing of the checked labels, a rule of bench_quality.py "
                             "(default: %(default)s, as prediction's --postprocess; none: the raw labels)")
    parser.add_argument("--rendering", default="original", choices=("original",),
                        help="held-out CTs (only the original ones have probabilities) (default: %(default)s)")
    parser.add_argument("--search", action="store_true",
                        help="also choose thresholds on the other folds and apply them to each held-out fold "
                             f"({' x '.join(str(len(v)) for v in SEARCH_GRID.values())} combinations)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="phase 3 data root of the training patients, for checkpoints without training "
                             "volumes (default: the one each checkpoint was trained on)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="also write the tables there")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from thoracic_seg.batch import run_from_command_line, setup_logging

    setup_logging(args.verbose)
    report = run_from_command_line(parser, run, usage_error=False, work_dir=args.work_dir, candidate=args.candidate,
                                   postprocess=args.postprocess, rendering=args.rendering, search=args.search,
                                   data_root=args.data_root)
    if report is None:
        return 1
    text = format_report(report)
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(jsonable({**report, "command": "python benchmarks/calibrate_qa.py " + " ".join(
        argv if argv is not None else sys.argv[1:])}), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
