"""benchmarks/bench_disk.py: bytes per slice of every processed folder, scaled to a collection."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_disk.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_disk", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folder_bytes_and_table(bench, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.npy").write_bytes(b"0" * 100)
    (tmp_path / "a" / "b" / "y.json").write_bytes(b"0" * 28)
    assert bench.folder_bytes(tmp_path / "a") == 128
    per = {"ct_nifti": 250_000.0, "masks_multi_organ": 1_000.0, "normalized_ct": 150_000.0,
           "normalized_masks": 500.0, "training_cache": 196_623.0}
    lines = bench.table({"bytes_per_slice": per}, [40_000]).splitlines()
    assert lines[0].split() == ["folder", "bytes/slice", "GB/1000", "slices", "GB", "at", "40000"]
    assert lines[6].split() == ["training_cache", "196,623", "0.197", "7.9"]
    assert lines[7].split() == ["all", "of", "processed/", "598,123", "0.598", "23.9"]
    assert lines[9].split() == ["evaluate", "251,000", "0.251", "10.0"]


@pytest.mark.real_data
@pytest.mark.slow
def test_the_training_cache_costs_196623_bytes_per_slice(bench, real_sample_root, tmp_path):
    """float16 + uint8 at 256 x 256 = 196,608 bytes per slice, plus the headers and meta.json."""
    result = bench.measure(real_sample_root, tmp_path, 256)
    assert result["slices"] == 182
    assert 196_608 < result["bytes_per_slice"]["training_cache"] < 196_608 + 100
