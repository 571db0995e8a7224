"""Every benchmark's ``--help`` runs from a clone: its imports resolve and nothing runs at import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO / "benchmarks").glob("bench_*.py")))
def test_every_benchmark_prints_its_help(script):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:200]
