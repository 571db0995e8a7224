"""thoracic_seg/batch.py and layout.py: safe names, atomic writes, geometry checks and the batch runner."""
from __future__ import annotations

import argparse
import functools
import io

import numpy as np
import pytest
import SimpleITK as sitk

from thoracic_seg import batch as pio


@pytest.mark.parametrize(
    "raw,fallback,expected",
    [
        ("LUNG1-001", "x", "LUNG1-001"),
        ("../../etc", "x", "etc"),
        ("..", "LUNG1-002", "LUNG1-002"),
        ("a/b\\c", "x", "a_b_c"),
        ("pat\x00ient\n1", "x", "pat_ient_1"),
        ("  ", "folder name", "folder_name"),
        (None, "", "patient"),
        ("x..y", "f", "x_y"),
    ],
)
def test_safe_patient_id(raw, fallback, expected) -> None:
    assert pio.safe_patient_id(raw, fallback) == expected


def test_atomic_output_renames_on_success(tmp_path) -> None:
    target = tmp_path / "out.txt"
    with pio.atomic_output(target) as tmp:
        tmp.write_text("hello")
        assert not target.exists()
        assert tmp.parent.parent.name == pio.PARTIAL_DIR_NAME
    assert target.read_text() == "hello"
    assert not (tmp_path / pio.PARTIAL_DIR_NAME).exists()


def test_atomic_output_leaves_nothing_on_error(tmp_path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with pio.atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_survives_another_writer_removing_the_empty_partial_folder(tmp_path, monkeypatch) -> None:
    """The race `make demo` once lost (phase 2.5, 2 workers): writer A creates `.partial/`, writer B
    finishes and removes the still empty `.partial/`, A's mkdir of its own folder in it fails."""
    original = pio.Path.mkdir
    races = []

    def mkdir_losing_the_race(self, *args, **kwargs):
        if self.parent.name == pio.PARTIAL_DIR_NAME and len(races) < 3:
            original(self.parent, exist_ok=True)     # A made .partial/ ...
            self.parent.rmdir()                      # ... B removed it, empty
            races.append(self)
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pio.Path, "mkdir", mkdir_losing_the_race)
    target = tmp_path / "out.txt"
    with pio.atomic_output(target) as tmp:
        tmp.write_text("hello")
    assert target.read_text() == "hello" and len(races) == 3
    assert not (tmp_path / pio.PARTIAL_DIR_NAME).exists()


def test_check_writable_names_the_folder(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="a_file"):
        pio.check_writable(blocker / "sub")


def _image(size=(4, 3, 2), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(np.zeros(size[::-1], np.uint8))
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    return img


def test_geometry_check_and_nifti_round_trip(tmp_path) -> None:
    a = _image(origin=(-10.0, 5.0, 2.5))
    pio.write_nifti(a, tmp_path / "a.nii.gz")
    b = pio.read_nifti(tmp_path / "a.nii.gz")
    assert pio.same_geometry(a, b)
    pio.check_same_geometry(a, b, "P1")
    with pytest.raises(pio.PatientError, match="P1: geometry mismatch"):
        pio.check_same_geometry(a, _image(origin=(-10.0, 5.0, 5.5)), "P1")
    assert pio.list_patients(tmp_path) == ["a"]
    assert pio.nifti_stem(tmp_path / "a.nii.gz") == "a"


def _square_or_fail(x: int) -> pio.PatientResult:
    if x == 3:
        raise pio.PatientError("P3: bad input file x.dcm")
    if x == 4:
        raise ZeroDivisionError("division by zero")
    return pio.PatientResult(f"P{x}", pio.DONE, info={"value": x * x})


@pytest.mark.parametrize("workers", [1, 2])
def test_run_batch_goes_on_after_failures(workers: int) -> None:
    results = pio.run_batch([1, 2, 3, 4, 5], _square_or_fail, workers=workers,
                            patient_id_of=lambda x: f"P{x}")
    assert [r.patient_id for r in results] == ["P1", "P2", "P3", "P4", "P5"]
    assert [r.status for r in results] == ["done", "done", "failed", "failed", "done"]
    assert results[1].info == {"value": 4}
    assert results[2].message == "P3: bad input file x.dcm"
    assert results[3].message == "ZeroDivisionError: division by zero"
    assert pio.exit_status(results) == 1
    assert pio.exit_status(results[:2]) == 0
    assert pio.summary_line("Phase 2", results) == "Phase 2: 3 converted, 0 skipped, 2 failed (P3, P4)"


def test_run_batch_with_partial_task() -> None:
    task = functools.partial(_square_or_fail)
    assert pio.run_batch([], task) == []
    assert pio.run_batch([2], task, workers=4)[0].info == {"value": 4}


def test_common_arguments() -> None:
    parser = pio.add_common_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--patients", "A", "B", "--workers", "2", "--overwrite"])
    assert args.patients == ["A", "B"] and args.workers == 2 and args.overwrite
    assert str(args.data_root) == "DATA"
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "0"])


def test_the_next_write_removes_what_a_killed_writer_left_but_not_a_live_writers_files(tmp_path) -> None:
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    killed = tmp_path / ".partial" / f"{int(dead.stdout)}-0123456789ab"  # its process has ended
    killed.mkdir(parents=True)
    (killed / "P1.nii.gz").write_bytes(b"half a file")
    live = tmp_path / ".partial" / f"{os.getpid()}-ba9876543210"  # a writer still running
    live.mkdir()
    pio.write_text_atomic(tmp_path / "report.csv", "a\n")
    assert not killed.exists() and live.is_dir()
    live.rmdir()
    pio.check_writable(tmp_path)  # a phase's first look at its output folder cleans as well
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]


# --------------------------------------------------------------------------------------------
# Walking a DICOM tree: links followed once; progress that suits a log file
# --------------------------------------------------------------------------------------------
def test_walk_files_follows_links_once_and_survives_loops(tmp_path) -> None:
    collection = tmp_path / "elsewhere" / "NSCLC"
    (collection / "P1" / "study").mkdir(parents=True)
    (collection / "P1" / "study" / "1.dcm").write_bytes(b"x")
    (collection / "P1" / ".hidden.dcm").write_bytes(b"x")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "NSCLC").symlink_to(collection, target_is_directory=True)  # ln -s /path/to/collection raw/NSCLC
    (collection / "P1" / "loop").symlink_to(collection, target_is_directory=True)  # a link loop
    (raw / "again").symlink_to(collection, target_is_directory=True)  # the same folder twice
    found = list(pio.walk_files(raw))
    assert [p.relative_to(raw).as_posix() for p in found] == ["NSCLC/P1/study/1.dcm"]


def test_plain_progress_writes_bounded_lines_without_carriage_returns(capsys) -> None:
    now = [0.0]
    bar = pio.PlainProgress(840, "epoch 3", "slice", interval=30.0, clock=lambda: now[0])
    for _ in range(105):  # one batch of 8 slices a second for 105 s
        now[0] += 1.0
        bar.update(8)
    bar.set_postfix(loss="0.0812")
    bar.close()
    bar.close()  # closing twice writes nothing more
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["epoch 3: 240/840 slice (29%), 8.0 slice/s, 30 s",
                     "epoch 3: 480/840 slice (57%), 8.0 slice/s, 60 s",
                     "epoch 3: 720/840 slice (86%), 8.0 slice/s, 90 s",
                     "epoch 3: 840/840 slice (100%), 8.0 slice/s, 105 s, loss=0.0812"]


def test_progress_bar_is_a_bar_on_a_terminal_and_lines_in_a_file(tmp_path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(pio.progress_bar(3, "x", "patient", stream=io.StringIO()), pio.PlainProgress)
    bar = pio.progress_bar(3, "x", "patient", stream=Terminal())
    assert not isinstance(bar, pio.PlainProgress) and hasattr(bar, "set_postfix")
    bar.close()


def test_run_batch_logs_plain_lines_when_not_a_terminal(capsys) -> None:
    results = pio.run_batch(["A", "B"], lambda pid: pio.PatientResult(pid, pio.DONE), desc="Phase 9")
    assert [r.status for r in results] == [pio.DONE, pio.DONE]
    err = capsys.readouterr().err
    assert "\r" not in err and "Phase 9: 2/2 patient (100%)" in err
