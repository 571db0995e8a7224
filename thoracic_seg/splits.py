"""Patient splits: the files ``splits/train.txt``, ``val.txt``, ``test.txt`` (one patient id per line),
their checks, and the per-split summary of which structures the patients have."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from thoracic_seg import organs
from thoracic_seg.layout import CACHE_META, DataLayout, read_cache_meta


SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
SUMMARY_JSON = "summary.json"


def split_path(splits_dir: Path | str, name: str) -> Path:
    """``<splits_dir>/<name>.txt`` for ``name`` in :data:`SPLIT_NAMES`."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
    return Path(splits_dir) / f"{name}.txt"


def read_split_file(splits_dir: Path | str, name: str) -> list[str]:
    """Patient ids listed in ``<splits_dir>/<name>.txt`` (blank lines and ``#`` comments ignored)."""
    path = split_path(splits_dir, name)
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} not found; run prepare_train_val_test_splits.py "
            f"--splits-dir {Path(splits_dir)}"
        )
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def read_splits(splits_dir: Path | str) -> dict[str, list[str]]:
    """``{split: [ids]}`` from the three split files; ``ValueError`` naming a patient listed twice
    (within or across splits), ``FileNotFoundError`` for a missing split file."""
    splits = {name: read_split_file(splits_dir, name) for name in SPLIT_NAMES}
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        for pid in ids:
            if pid in seen:
                raise ValueError(
                    f"patient {pid} is listed in both {seen[pid]}.txt and {name}.txt of {splits_dir}"
                    if seen[pid] != name else f"patient {pid} is listed twice in {name}.txt"
                )
            seen[pid] = name
    return splits


def check_splits(splits_dir: Path | str, data_root: Path | str) -> dict[str, list[str]]:
    """:func:`read_splits`, and every listed patient has a training cache (``FileNotFoundError``)."""
    splits = read_splits(splits_dir)
    cache = DataLayout(Path(data_root)).training_cache
    missing = [pid for ids in splits.values() for pid in ids if not (cache / pid / CACHE_META).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} patient(s) of {splits_dir} have no training cache in {cache}: "
            f"{', '.join(missing[:10])}; run normalize_ct_and_masks.py"
        )
    return splits


def split_summary(
    splits: dict[str, list[str]], slices: dict[str, int], annotated: dict[str, Sequence[bool]]
) -> dict[str, Any]:
    """Patients, slices and patients-with-each-structure-annotated per split (and in total),
    structures keyed by ``organs`` keys; ``missing`` lists structures a split lacks although
    the cohort has them."""
    keys = [organs.structure(label).key for label in organs.FOREGROUND_LABELS]

    def describe(ids: Sequence[str]) -> dict[str, Any]:
        return {
            "patients": len(ids),
            "slices": int(sum(slices[p] for p in ids)),
            "annotated": {key: int(sum(bool(annotated[p][label]) for p in ids))
                          for key, label in zip(keys, organs.FOREGROUND_LABELS)},
        }

    total = describe([p for ids in splits.values() for p in ids])
    out: dict[str, Any] = {name: describe(ids) for name, ids in splits.items()}
    for name in SPLIT_NAMES:
        out[name]["missing"] = [k for k in keys if total["annotated"][k] and not out[name]["annotated"][k]]
    out["total"] = total
    return out


def read_cohort(
    data_root: Path | str, patients: Sequence[str] | None = None
) -> tuple[dict[str, int], dict[str, list[bool]]]:
    """``({pid: slices}, {pid: annotated flags (8,)})`` from the training cache's ``meta.json``."""
    cache = DataLayout(Path(data_root)).training_cache
    ids = list(patients) if patients else sorted(p.name for p in cache.glob("*") if (p / CACHE_META).is_file())
    if not ids:
        raise FileNotFoundError(f"no training cache in {cache}; run normalize_ct_and_masks.py")
    slices, annotated = {}, {}
    for pid in ids:
        meta = read_cache_meta(data_root, pid)
        slices[pid] = int(meta["shape_zyx"][0])
        annotated[pid] = [bool(a) for a in meta["annotated"]]
    return slices, annotated


def format_summary(summary: dict[str, Any]) -> str:
    """A table: one row per split, patients, slices and patients per annotated structure."""
    keys = list(summary["total"]["annotated"])
    header = f"{'split':<6}{'patients':>9}{'slices':>8}" + "".join(f"{k:>12}" for k in keys)
    rows = [header]
    for name in (*SPLIT_NAMES, "total"):
        s = summary[name]
        rows.append(f"{name:<6}{s['patients']:>9}{s['slices']:>8}" + "".join(f"{s['annotated'][k]:>12}" for k in keys))
    return "\n".join(rows)


def load_split(splits_dir: Path | str, name: str) -> list[str]:
    """Patient ids of split ``name`` ("train", "val" or "test") in ``splits_dir``."""
    return read_split_file(splits_dir, name)
