"""Issue 14: with ``K = 0`` and no body crop the pipeline is the network and the numbers of before
slice context existed, bit for bit. ``k0_reference.py`` runs a small fixed-step pipeline; its
reference output was written by the code of commit 4568e3c (the last without
``--context-slices`` and ``--crop-body``), see that file's docstring."""
from __future__ import annotations

import json
from pathlib import Path

import k0_reference
import pytest

REFERENCE = Path(__file__).parent / "data" / "k0_reference.json"


@pytest.mark.slow
def test_k0_without_crop_reproduces_the_previous_version_bit_for_bit(tmp_path):
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert reference["recipe"] == k0_reference.RECIPE
    here = k0_reference.machine()
    same = ("cpu", "cpu_capability", "torch")  # the model name alone hides AVX2 vs AVX-512 kernels
    if {k: here[k] for k in same} != {k: reference["machine"].get(k) for k in same}:
        pytest.skip(f"the reference was measured on {reference['machine']}; floating-point results are "
                    f"bit-identical only on the same CPU and torch (this is {here})")
    now = k0_reference.run_reference(tmp_path)
    assert json.dumps(now["history"]) == json.dumps(reference["history"])   # every loss, exact
    assert now["metrics_csv"] == reference["metrics_csv"]
    assert now["predictions"] == reference["predictions"]
    assert len(now["history"]) == 2 and now["predictions"]               # the run did what it should
