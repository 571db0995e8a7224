"""Phase 4 division (prepare_train_val_test_splits.py): patient-level, stratified, reproducible,
made once."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import prepare_train_val_test_splits as sp
from thoracic_seg import organs
from thoracic_seg.layout import PROCESSED_FORMAT, DataLayout
from thoracic_seg.splits import SPLIT_NAMES, check_splits

ALL = [True] * 8


def flags(*missing: int) -> list[bool]:
    """Annotated flags with every label but ``missing``."""
    return [label not in missing for label in range(organs.NUM_CLASSES)]


def write_cohort(root: Path, patients: dict[str, tuple[int, list[bool]]]) -> Path:
    """A training cache holding only the meta.json of each ``pid: (slices, annotated)``."""
    for pid, (slices, annotated) in patients.items():
        folder = DataLayout(root).training_cache / pid
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps(
            {"format": PROCESSED_FORMAT, "patient_id": pid, "shape_zyx": [slices, 32, 32], "annotated": annotated,
             "orientation": {"stored": "LPS", "network": "LPS"}}))
    return root


def heart_cohort(n: int = 12, with_heart: int = 3) -> dict[str, tuple[int, list[bool]]]:
    return {f"P{i:02d}": (10 + i, ALL if i < with_heart else flags(organs.HEART, organs.PTV))
            for i in range(n)}


@pytest.mark.parametrize("n,fractions,expected", [
    (100, (0.7, 0.15, 0.15), (70, 15, 15)),
    (12, (0.7, 0.15, 0.15), (8, 2, 2)),
    (5, (0.7, 0.15, 0.15), (3, 1, 1)),
    (4, (0.7, 0.15, 0.15), (2, 1, 1)),
    (3, (0.7, 0.15, 0.15), (1, 1, 1)),
    (2, (0.7, 0.15, 0.15), (1, 0, 1)),  # not enough for three: train, then test
    (1, (0.7, 0.15, 0.15), (1, 0, 0)),
    (10, (0.8, 0.2, 0.0), (8, 2, 0)),
    (7, (0.5, 0.25, 0.25), (3, 2, 2)),
])
def test_split_sizes(n, fractions, expected) -> None:
    assert tuple(sp.split_sizes(n, fractions).values()) == expected


@pytest.mark.parametrize("fractions,match", [
    ((0.7, 0.2, 0.2), "must sum to 1"),
    ((0.7, 0.3), "must be 3 values"),
    ((0.0, 0.5, 0.5), "train > 0"),
    ((1.2, -0.1, -0.1), r"in \[0, 1\]"),
])
def test_bad_fractions(fractions, match) -> None:
    with pytest.raises(ValueError, match=match):
        sp.check_fractions(fractions)


def test_assignment_is_reproducible_and_order_free() -> None:
    ids = [f"LUNG1-{i:03d}" for i in range(40)]
    annotated = np.array([flags(organs.HEART) if i % 3 else ALL for i in range(40)])
    first = sp.assign_splits(ids, annotated, seed=42)
    assert sp.assign_splits(ids, annotated, seed=42) == first
    reverse = sp.assign_splits(ids[::-1], annotated[::-1], seed=42)
    assert reverse == first
    assert sp.assign_splits(ids, annotated, seed=43) != first
    assert [len(v) for v in first.values()] == [28, 6, 6]
    listed = [p for v in first.values() for p in v]
    assert sorted(listed) == ids  # every patient exactly once
    assert all(v == sorted(v) for v in first.values())


def test_every_split_gets_a_rare_structure() -> None:
    cohort = heart_cohort(12, with_heart=3)
    ids = sorted(cohort)
    annotated = np.array([cohort[p][1] for p in ids])
    for seed in range(20):
        splits = sp.assign_splits(ids, annotated, seed=seed)
        hearts = {name: sum(cohort[p][1][organs.HEART] for p in v) for name, v in splits.items()}
        assert hearts == {"train": 1, "val": 1, "test": 1}, (seed, hearts)
        assert [len(v) for v in splits.values()] == [8, 2, 2]


def test_stratification_follows_the_fractions_on_a_large_cohort() -> None:
    rng = np.random.default_rng(0)
    annotated = np.ones((200, 8), dtype=bool)
    annotated[:, organs.HEART] = rng.random(200) < 0.3  # as in NSCLC-Radiomics
    annotated[:, organs.ESOPHAGUS] = rng.random(200) < 0.85
    annotated[:, organs.PTV] = False
    ids = [f"P{i:03d}" for i in range(200)]
    splits = sp.assign_splits(ids, annotated, seed=42)
    index = {p: i for i, p in enumerate(ids)}
    hearts_total = annotated[:, organs.HEART].sum()
    for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        hearts = annotated[[index[p] for p in splits[name]], organs.HEART].sum()
        assert abs(hearts - share * hearts_total) <= 1, (name, hearts, hearts_total)


def test_two_hearts_go_to_train_and_test() -> None:
    cohort = heart_cohort(6, with_heart=2)
    ids = sorted(cohort)
    splits = sp.assign_splits(ids, np.array([cohort[p][1] for p in ids]), seed=42)
    assert {name for name, v in splits.items() for p in v if cohort[p][1][organs.HEART]} == {"train", "test"}


def test_patients_without_annotations_are_split_too() -> None:
    annotated = np.zeros((5, 8), dtype=bool)
    annotated[:, 0] = True
    splits = sp.assign_splits(list("ABCDE"), annotated, seed=42)
    assert [len(v) for v in splits.values()] == [3, 1, 1]


def test_run_writes_sorted_files_and_summary(tmp_path) -> None:
    root = write_cohort(tmp_path / "DATA", heart_cohort(12, with_heart=3))
    splits_dir = tmp_path / "splits"
    summary = sp.run(data_root=root, splits_dir=splits_dir)
    lists = {name: (splits_dir / f"{name}.txt").read_text().splitlines() for name in SPLIT_NAMES}
    assert all(v == sorted(v) and v for v in lists.values())
    assert sorted(p for v in lists.values() for p in v) == sorted(heart_cohort())
    on_disk = json.loads((splits_dir / "summary.json").read_text())
    assert on_disk == summary
    assert summary["seed"] == 42 and summary["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    for name, ids in lists.items():
        assert summary[name]["patients"] == len(ids)
        assert summary[name]["slices"] == sum(10 + int(p[1:]) for p in ids)
        assert list(summary[name]["annotated"]) == [organs.structure(k).key for k in range(1, 8)]
        assert summary[name]["annotated"]["heart"] == 1
        assert summary[name]["annotated"]["ptv"] == sum(int(p[1:]) < 3 for p in ids)
        assert summary[name]["missing"] == []
    assert summary["total"] == {"patients": 12, "slices": sum(range(10, 22)),
                                "annotated": {"gtv": 12, "ptv": 3, "lung_right": 12, "lung_left": 12,
                                              "heart": 3, "esophagus": 12, "spinal_cord": 12}}
    assert check_splits(splits_dir, root) == lists


def test_refuses_to_overwrite_without_force(tmp_path, capsys) -> None:
    root = write_cohort(tmp_path / "DATA", heart_cohort(12))
    splits_dir = tmp_path / "splits"
    first = sp.run(data_root=root, splits_dir=splits_dir)
    (splits_dir / "val.txt").write_text("edited by hand\n")
    with pytest.raises(FileExistsError, match=r"splits already exist in .*pass --force"):
        sp.run(data_root=root, splits_dir=splits_dir, seed=7)
    assert (splits_dir / "val.txt").read_text() == "edited by hand\n"
    assert sp.main(["--data-root", str(root), "--splits-dir", str(splits_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert sp.run(data_root=root, splits_dir=splits_dir, force=True) == first
    assert (splits_dir / "val.txt").read_text() != "edited by hand\n"


def test_check_splits_finds_overlap_and_missing_cache(tmp_path) -> None:
    root = write_cohort(tmp_path / "DATA", heart_cohort(4))
    splits_dir = tmp_path / "splits"
    splits_dir.mkdir()
    for name, text in (("train", "P00\nP01\n"), ("val", "P02\n"), ("test", "P03\nP01\n")):
        (splits_dir / f"{name}.txt").write_text(text)
    with pytest.raises(ValueError, match="patient P01 is listed in both train.txt and test.txt"):
        check_splits(splits_dir, root)
    (splits_dir / "test.txt").write_text("P03\nP99\n")
    with pytest.raises(FileNotFoundError, match=r"1 patient\(s\) .* no training cache .*: P99"):
        check_splits(splits_dir, root)
    (splits_dir / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*test.txt not found"):
        check_splits(splits_dir, root)


def test_requested_patient_without_cache(tmp_path) -> None:
    root = write_cohort(tmp_path / "DATA", heart_cohort(4))
    with pytest.raises(FileNotFoundError, match="LUNG1-999: no training cache"):
        sp.run(data_root=root, splits_dir=tmp_path / "splits", patients=["P00", "LUNG1-999"])
    assert not (tmp_path / "splits" / "train.txt").exists()


def test_empty_cache_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no training cache in"):
        sp.run(data_root=tmp_path, splits_dir=tmp_path / "splits")


def test_small_cohort_still_gets_val_and_test(tmp_path) -> None:
    root = write_cohort(tmp_path / "DATA", heart_cohort(3, with_heart=1))
    summary = sp.run(data_root=root, splits_dir=tmp_path / "splits")
    assert [summary[n]["patients"] for n in SPLIT_NAMES] == [1, 1, 1]
    assert summary["train"]["annotated"]["heart"] == 1


@pytest.mark.parametrize("args,message", [
    (["--fractions", "0.7", "0.2", "0.2"], "argument --fractions: fractions must sum to 1"),
    (["--fractions", "0.7", "0.3"], "argument --fractions: expected 3 arguments"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
])
def test_invalid_arguments_give_one_line_errors(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sp.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]


def test_main_prints_the_table(tmp_path, capsys) -> None:
    root = write_cohort(tmp_path / "DATA", heart_cohort(12))
    assert sp.main(["--data-root", str(root), "--splits-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "Phase 4: 12 patients split into 8 train, 2 val, 2 test" in out
    assert out.splitlines()[0].split() == ["split", "patients", "slices", "gtv", "ptv", "lung_right",
                                           "lung_left", "heart", "esophagus", "spinal_cord"]
