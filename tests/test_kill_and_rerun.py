"""Killed runs: phases 2, 2.5 and 3 and training are started as real processes, killed with SIGKILL
(the scheduler, out of memory, a closed laptop) early or while a file is being written, and run
again; the outputs must equal those of a run never killed, with no temporary file left behind.

The kills land where intended: the writer of a chosen file pauses inside ``batch.atomic_output``
(``PAUSE_ENV``, a test hook), its temporary file written and its rename not done, and is killed
there; the test fails when the pause is never reached. A kill on a watched output that the process
outruns must find it ended with exit 0.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import convert_dicom_to_nifti as conv
import extract_multi_organ_masks as em
import normalize_ct_and_masks as norm
import train_multi_organ as tm
from thoracic_seg.batch import PARTIAL_DIR_NAME, PAUSE_ENV
from thoracic_seg.layout import BEST_CHECKPOINT, HISTORY_JSON, LAST_CHECKPOINT, DataLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE, SLICES = 32, 8


def kill_when(script: str, argv: list[str], ready: Callable[[], bool], timeout: float = 60.0,
              pause: tuple[str, Path] | None = None) -> bool:
    """Run ``python <script> argv`` and SIGKILL it as soon as ``ready()``; True when it was killed.
    When it ends first, it must have exited 0 (a crash at start-up is no "ended first").

    ``pause`` ``(file name pattern, marker)``: the writer of the first file matching the pattern
    creates ``marker`` and waits inside ``batch.atomic_output`` (its temporary file written, the
    rename not done): the kill lands there, and the process never ends first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    if pause is not None:
        env[PAUSE_ENV] = f"{pause[0]}|{pause[1]}"
        ready = pause[1].exists
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / script), *argv], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if ready():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            if time.monotonic() > deadline:
                raise AssertionError(f"{script} neither reached the kill point nor ended in {timeout:.0f} s")
            time.sleep(0.001)
        assert pause is None, f"{script} ended (exit {process.returncode}) without reaching the pause at {pause[0]}"
        assert process.returncode == 0, f"{script} ended with exit {process.returncode} before the kill"
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def first_output(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(folder.glob(pattern))


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temporary_files(folder: Path) -> None:
    left = [str(p) for p in folder.rglob("*") if PARTIAL_DIR_NAME in p.parts]
    assert not left, f"temporary files left behind: {left}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-patient cohort (32 px, 8 slices) and the outputs of phases 2, 2.5, 3 never killed, each
    phase's input state kept apart so a killed run can start from it."""
    from make_synthetic_cohort import generate_cohort

    base = tmp_path_factory.mktemp("kill")
    raw = base / "raw"
    generate_cohort(raw, base / "truth", n_patients=3, seed=13, size=SIZE, slices=SLICES)
    states = {"raw": raw}
    root = base / "after_phase3"
    common = ["--data-root", str(root), "--workers", "1"]
    assert conv.main(common + ["--dicom-root", str(raw)]) == 0
    states["after_phase2"] = _snapshot(root, base / "after_phase2")
    assert em.main(common + ["--dicom-root", str(raw)]) == 0
    states["after_phase2_5"] = _snapshot(root, base / "after_phase2_5")
    assert norm.main(common + ["--size", str(SIZE)]) == 0
    states["after_phase3"] = root
    return states


def _snapshot(root: Path, copy: Path) -> Path:
    shutil.copytree(root, copy)
    return copy


PHASES = {  # phase: (script, main, state it starts from, folders it writes, {moment: file paused at})
    "2": ("convert_dicom_to_nifti.py", conv.main, None, ("ct_nifti",),
          {"first patient done": "SYN-002.nii.gz", "during a write": "SYN-001.nii.gz"}),
    "2.5": ("extract_multi_organ_masks.py", em.main, "after_phase2", ("masks",),
            {"first patient done": "SYN-002.nii.gz", "during a write": "SYN-001.json"}),
    "3": ("normalize_ct_and_masks.py", norm.main, "after_phase2_5",
          ("normalized_ct", "normalized_masks", "training_cache"),
          {"first patient done": "SYN-002.nii.gz", "during a write": "meta.json"}),
}


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("moment", ["first patient done", "during a write"])
def test_a_killed_phase_run_again_gives_the_outputs_of_a_run_never_killed(reference, tmp_path, phase, moment):
    script, main, start, folders, pause_at = PHASES[phase]
    root = tmp_path / "data"
    if start is None:
        root.mkdir()
    else:
        shutil.copytree(reference[start], root)
    layout = DataLayout(root)
    argv = ["--data-root", str(root), "--workers", "1"]
    argv += ["--size", str(SIZE)] if phase == "3" else ["--dicom-root", str(reference["raw"])]
    marker = tmp_path / "paused"
    assert kill_when(script, argv, lambda: False, pause=(pause_at[moment], marker))
    paused_file = Path(marker.read_text())
    assert not paused_file.exists() and (paused_file.parent / PARTIAL_DIR_NAME).is_dir()  # killed mid-write

    assert main(argv) == 0  # run again: done, skipped or redone, and nothing failed
    expected = files_of(reference["after_phase3"] / "processed")
    got = files_of(layout.processed)
    for name in ("ct_nifti", "masks_multi_organ", "normalized_ct", "normalized_masks", "training_cache"):
        if name in {getattr(layout, f).name for f in folders}:
            mine = {k: v for k, v in got.items() if k.startswith(name + "/")}
            theirs = {k: v for k, v in expected.items() if k.startswith(name + "/")}
            assert sorted(mine) == sorted(theirs)
            for key in theirs:
                assert mine[key] == theirs[key], f"{key} differs from the run never killed"
    no_temporary_files(root)


# --------------------------------------------------------------------------------------------
# Training: killed, then --resume
# --------------------------------------------------------------------------------------------
#: 2 training patients x 8 slices, batch 4: 4 steps per epoch; --max-steps 6 ends in epoch 2.
TRAIN_ARGS = ["--base-channels", "4", "--batch-size", "4", "--lr", "1e-3", "--lr-schedule", "cosine",
              "--augment", "--tumour-oversampling", "0.5", "--epochs", "3", "--max-steps", "6",
              "--device", "cpu", "--workers", "0", "--no-amp", "--log-every", "1"]
COMPARED = ("epoch", "train_loss", "val_loss", "mean_dice", "lr", "train_slices", "partial_epoch", "best")


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in the killed process: same arithmetic
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("moment", ["after the first epoch", "during a checkpoint write"])
def test_a_killed_training_resumed_ends_as_a_run_never_killed(reference, tmp_path, moment, one_thread):
    root = reference["after_phase3"]
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, ids in (("train", ["SYN-001", "SYN-002"]), ("val", ["SYN-003"]), ("test", [])):
        (splits / f"{name}.txt").write_text("".join(f"{pid}\n" for pid in ids))
    common = ["--data-root", str(root), "--splits-dir", str(splits), *TRAIN_ARGS]
    straight = tmp_path / "straight"
    assert tm.main(common + ["--output-dir", str(straight)]) == 0

    out = tmp_path / "killed"
    if moment == "after the first epoch":  # killed then, or it ended first (exit 0: see kill_when)
        kill_when("train_multi_organ.py", common + ["--output-dir", str(out)], first_output(out, LAST_CHECKPOINT))
    else:
        marker = tmp_path / "paused"
        assert kill_when("train_multi_organ.py", common + ["--output-dir", str(out)], lambda: False,
                         pause=(LAST_CHECKPOINT, marker))
        assert Path(marker.read_text()) == out / LAST_CHECKPOINT and not (out / LAST_CHECKPOINT).exists()
    resume = ["--resume", str(out)] if (out / LAST_CHECKPOINT).is_file() else []
    assert tm.main(common + ["--output-dir", str(out), *resume]) == 0

    expected = torch.load(straight / LAST_CHECKPOINT, weights_only=True)
    got = torch.load(out / LAST_CHECKPOINT, weights_only=True)
    assert got["steps_done"] == expected["steps_done"] == 6
    for name, value in expected["model_state"].items():
        assert torch.allclose(value.float(), got["model_state"][name].float(), atol=1e-6), name
    rows = [json.loads((folder / HISTORY_JSON).read_text()) for folder in (straight, out)]
    assert len(rows[0]) == len(rows[1]) == 2 and [row["partial_epoch"] for row in rows[1]] == [False, True]
    for row_a, row_b in zip(*rows):
        assert {k: row_b[k] for k in COMPARED} == pytest.approx({k: row_a[k] for k in COMPARED}, abs=1e-6)
    best = [torch.load(folder / BEST_CHECKPOINT, weights_only=True) for folder in (straight, out)]
    assert best[0]["epoch"] == best[1]["epoch"]
    no_temporary_files(out)
