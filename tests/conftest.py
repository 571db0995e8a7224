"""Shared fixtures: the real sample data in ../shared/data (skipped when absent) and a tiny
synthetic cohort generated once per test run."""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SAMPLE_ARCHIVE = "nsclc-radiomics-sample.tar.xz"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; the test is skipped when it is not there."""
    if not (SHARED_DATA / SAMPLE_ARCHIVE).is_file():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_sample_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two real NSCLC-Radiomics patients, unpacked once per test run.

    Returns the folder holding ``LUNG1-005/`` and ``LUNG1-010/`` in the collection's layout.
    """
    dest = tmp_path_factory.mktemp("nsclc")
    with tarfile.open(shared_data / SAMPLE_ARCHIVE, "r:xz") as tar:
        tar.extractall(dest, filter="data")
    return dest / "nsclc-radiomics-sample"


@pytest.fixture(scope="session")
def reference_json(shared_data: Path) -> dict:
    return json.loads((shared_data / "reference-masks" / "reference.json").read_text())


@pytest.fixture(scope="session")
def reference_masks_dir(shared_data: Path) -> Path:
    return shared_data / "reference-masks"


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic cohort: (raw_dir, truth_dir, cohort) with 4 patients, 64 px, 24 slices.

    Read-only for tests: copy it before modifying files.
    """
    from make_synthetic_cohort import generate_cohort

    root = tmp_path_factory.mktemp("synthetic")
    raw_dir, truth_dir = root / "raw" / "synthetic", root / "synthetic_truth"
    cohort = generate_cohort(raw_dir, truth_dir, n_patients=4, seed=7, size=64, slices=24)
    return raw_dir, truth_dir, cohort


def write_mask_record(masks_dir: Path, patient_id: str, annotated, ptv=None) -> None:
    """Phase 2.5's per-patient record ``<PatientID>.json`` for a label map a test wrote by hand, as
    extract_multi_organ_masks.py writes it (``ptv`` default: derived, 10 mm)."""
    from thoracic_seg.batch import file_sha256
    from thoracic_seg.layout import PROCESSED_FORMAT

    mask = Path(masks_dir) / f"{patient_id}.nii.gz"
    record = {"format": PROCESSED_FORMAT, "patient_id": patient_id, "annotated": [bool(a) for a in annotated],
              "ptv": ptv if ptv is not None else {"source": "derived", "margin_mm": 10.0},
              "settings": {"ptv_margin_mm": 10.0, "derive_ptv": True}, "inputs_fingerprint": "written by a test",
              "mask_sha256": file_sha256(mask)}
    (Path(masks_dir) / f"{patient_id}.json").write_text(json.dumps(record))


def load_benchmark(name: str):
    """benchmarks/ is not a package: load ``benchmarks/<name>.py`` as module ``name`` (registered
    in ``sys.modules`` while in use, where dataclasses look their module up). A generator for a
    fixture: ``yield from load_benchmark("bench_training")``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def modules_loaded_by(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh Python process has imported after running ``code``."""
    import subprocess

    probe = f"{code}\nimport sys\nprint('LOADED', [m for m in {modules!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1].removeprefix("LOADED ").replace("'", '"'))
