"""Atomic writes, NIfTI I/O that keeps geometry, and the batch runner shared by every phase.

Every output is written under ``<folder>/.partial/`` and renamed into place, so a killed run never
leaves a file the next phase would read; one bad patient is reported (:class:`PatientError`) and
skipped, the batch goes on, a summary line closes it and the exit status is 0 only when nothing
failed. ``--patients``, ``--workers`` and ``--overwrite`` are :func:`add_common_arguments`.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from thoracic_seg.layout import DEFAULT_DATA_ROOT

log = logging.getLogger(__name__)
PARTIAL_DIR_NAME = ".partial"
# ---- Names and files -------------------------------------------------------------------------
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+\-]+")


def safe_patient_id(patient_id: object, fallback: str) -> str:
    """A DICOM PatientID made safe for a file name: anything but letters, digits, ``._+-`` becomes ``_``;
    leading dots are stripped so ``..`` can never climb out of the output folder. Falls back to
    ``fallback`` (normally the patient folder name, made safe the same way) when nothing is left.

    >>> safe_patient_id("../../etc", "P1")
    'etc'
    >>> safe_patient_id("LUNG1/001", "P1")
    'LUNG1_001'
    >>> safe_patient_id("", "LUNG1-002")
    'LUNG1-002'
    """
    def clean(text: object) -> str:
        text = _UNSAFE_CHARS.sub("_", str(text or "").strip())
        text = re.sub(r"\.{2,}", "_", text).strip("._ ")
        return text[:128]

    return clean(patient_id) or clean(fallback) or "patient"


def nifti_stem(path: Path) -> str:
    """``LUNG1-001.nii.gz`` -> ``LUNG1-001``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".npy", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def walk_files(root: Path | str) -> Iterator[Path]:
    """Every regular file below ``root`` in a stable (sorted) order, skipping hidden files and
    folders. Symbolic links to folders are followed (users link their downloaded collection
    under ``raw/``), each real folder once, so a link loop cannot recurse forever."""
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        try:
            stat = os.stat(folder)
        except OSError:
            subfolders[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:  # reached again through a link: a loop or an alias
            subfolders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                yield path


def list_patients(folder: Path, suffix: str = ".nii.gz") -> list[str]:
    """Patient ids of the ``<PatientID><suffix>`` files of a phase output folder, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if p.is_file())


# ---- Fingerprints: a phase records what it read, so a later run redoes a patient whose inputs changed ----


def file_sha256(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks: a CT NIfTI costs ~0.1 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(record: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable record (keys sorted, so dict order never matters)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_output(final_path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write ``final_path`` to; rename it into place on success.

    The temporary file lives in ``<folder>/.partial/`` with the same file name (writers such as
    SimpleITK choose the format from the extension), on the same file system, so the final
    ``os.replace`` is atomic. On error the temporary file is removed and the final path is
    untouched.
    """
    final_path = Path(final_path)
    remove_stale_partials(final_path.parent)
    partial_dir = final_path.parent / PARTIAL_DIR_NAME / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    _make_partial_dir(partial_dir)
    tmp_path = partial_dir / final_path.name
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise FileNotFoundError(f"nothing was written to {tmp_path}")
        _pause_for_a_test(final_path)
        os.replace(tmp_path, final_path)
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            partial_dir.parent.rmdir()  # only succeeds when no other writer uses it


#: Kill tests only: ``"<file name pattern>|<marker path>"``: the writer of the first matching file
#: creates the marker and waits, its temporary file written, its rename not done, to be killed there.
PAUSE_ENV = "THORACIC_SEG_PAUSE_BEFORE_RENAME"


def _pause_for_a_test(final_path: Path) -> None:
    pattern, _, marker = os.environ.get(PAUSE_ENV, "").partition("|")
    if marker and fnmatch.fnmatch(final_path.name, pattern) and not Path(marker).exists():
        written = Path(f"{marker}.writing")  # the test kills once the marker exists: it must be whole by then
        written.write_text(str(final_path), encoding="utf-8")
        os.replace(written, marker)
        time.sleep(600)


def _make_partial_dir(partial_dir: Path, attempts: int = 100) -> None:
    """Create ``<folder>/.partial/<pid>-<random>``. Another writer that finishes (or cleans stale
    folders) removes ``.partial/`` when it is empty, which can happen between the creation of
    ``.partial/`` and of our folder in it: then create both again. Once our folder exists,
    ``.partial/`` is not empty and stays."""
    for _ in range(attempts):
        try:
            partial_dir.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    partial_dir.mkdir(parents=True, exist_ok=True)  # one last time, raising what it raises


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_partials(folder: Path | str) -> None:
    """Remove what killed writers left in ``<folder>/.partial/``.

    :func:`atomic_output` names its temporary folder ``<pid>-<random>``; a process killed
    mid-write (SIGKILL, out of memory) never cleans it, so the next writer in the folder removes
    those of processes that no longer run (on this machine). Folders of live writers are left alone.
    """
    partial_root = Path(folder) / PARTIAL_DIR_NAME
    try:
        entries = list(os.scandir(partial_root))
    except OSError:
        return
    for entry in entries:
        pid_text = entry.name.split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(entry.path, ignore_errors=True)
    with contextlib.suppress(OSError):
        partial_root.rmdir()  # only succeeds when empty


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and raise ``PermissionError`` naming it if we cannot write;
    remove what killed writers left in it (:func:`remove_stale_partials`)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    remove_stale_partials(folder)


# ---- NIfTI I/O (SimpleITK keeps origin/spacing/direction; it converts LPS <-> RAS on disk) ----
def write_nifti(image: "Any", path: Path | str) -> None:
    """Write a SimpleITK image atomically (compressed when the name ends with ``.gz``)."""
    import SimpleITK as sitk

    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=str(path).endswith(".gz"))


def read_nifti(path: Path | str) -> "Any":
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


def same_geometry(a: "Any", b: "Any", tolerance_mm: float = 1e-3) -> bool:
    """True when two SimpleITK images share size, spacing, origin and direction."""
    import numpy as np

    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance_mm)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance_mm)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


def check_same_geometry(a: "Any", b: "Any", what: str) -> None:
    """Raise :class:`PatientError` naming ``what`` when the two images' grids differ."""
    if not same_geometry(a, b):
        raise PatientError(
            f"{what}: geometry mismatch: size {a.GetSize()} vs {b.GetSize()}, spacing "
            f"{a.GetSpacing()} vs {b.GetSpacing()}, origin {a.GetOrigin()} vs {b.GetOrigin()}"
        )


# ---- Batch runner ----------------------------------------------------------------------------
class PatientError(Exception):
    """A problem with one patient's input: reported with its message, no traceback."""


DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass
class PatientResult:
    """What happened to one patient in a phase."""

    patient_id: str
    status: str  # DONE, SKIPPED or FAILED
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _call_safely(task: Callable[[Any], PatientResult], item: Any, patient_id: str) -> PatientResult:
    try:
        return task(item)
    except PatientError as exc:
        return PatientResult(patient_id, FAILED, str(exc))
    except Exception as exc:  # one bad patient never stops the batch
        detail = traceback.format_exc(limit=4)
        return PatientResult(patient_id, FAILED, f"{type(exc).__name__}: {exc}", {"traceback": detail})


def run_batch(
    items: Sequence[Any], task: Callable[[Any], PatientResult], *, workers: int = 1, desc: str = "patients",
    patient_id_of: Callable[[Any], str] = str, on_result: Callable[[PatientResult], None] | None = None,
) -> list[PatientResult]:
    """Run ``task(item)`` for every item, in ``workers`` processes, with a tqdm bar over patients.

    ``task`` must be picklable when ``workers > 1`` (a module-level function or a
    ``functools.partial`` of one). Exceptions become ``FAILED`` results with their message and
    are logged with the patient id; the batch always goes on. Results come back in input order.
    ``on_result(result)`` runs in this process as each patient finishes (a phase records it in
    its summary files there, so a run killed midway keeps what it did).
    """
    results: dict[int, PatientResult] = {}
    bar = progress_bar(len(items), desc, "patient")
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = _call_safely(task, item, patient_id_of(item))
            _log_result(results[i])
            if on_result is not None:
                on_result(results[i])
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            futures = {pool.submit(_call_safely, task, item, patient_id_of(item)): i for i, item in enumerate(items)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # the worker process itself died
                    results[i] = PatientResult(patient_id_of(items[i]), FAILED, f"worker crashed: {exc}")
                _log_result(results[i])
                if on_result is not None:
                    on_result(results[i])
                bar.update()
    bar.close()
    return [results[i] for i in range(len(items))]


def run_batch_into_report(items: Sequence[Any], task: Callable[[Any], PatientResult], *,
                          write_report: Callable[[Sequence[PatientResult]], None], results: dict[str, PatientResult],
                          wanted: Sequence[str], **batch_options: Any) -> list[PatientResult]:
    """:func:`run_batch` for a phase with a report: each result is merged into the report as it
    finishes (a killed run keeps its rows), ``results`` (patient id -> result, holding those decided
    before the batch) gets the new ones, and the report is written once more with the results of
    ``wanted``, in that order, which are returned."""
    for result in run_batch(items, task, on_result=lambda r: write_report([r]), **batch_options):
        results[result.patient_id] = result
    ordered = [results[pid] for pid in wanted]
    write_report(ordered)
    return ordered


def run_from_command_line(parser: argparse.ArgumentParser, run: Callable[..., Any], *,
                          errors: tuple[type[Exception], ...] = (FileNotFoundError, ValueError),
                          usage_error: bool = True, **options: Any) -> Any:
    """``run(**options)`` for a script's ``main()``: an error of ``errors`` (no such folder, a value
    out of range) ends the command with its one-line message, as argparse's usage error (exit 2)
    or, without ``usage_error``, logged; then None is returned and ``main`` exits 1."""
    try:
        return run(**options)
    except errors as exc:
        if usage_error:
            parser.error(str(exc))
        log.error("%s", exc)
        return None


#: When the output is not a terminal (nohup, sbatch, ``> log 2>&1``), progress is a plain line at
#: most this often (and at the end), never a bar redrawn with carriage returns.
PLAIN_PROGRESS_SECONDS = 30.0


class PlainProgress:
    """The part of tqdm's interface the phases use (``update``, ``set_postfix``, ``close``, ``n``),
    written as plain lines to stderr at most every ``interval`` seconds and once at ``close``:
    ``epoch 3: 480/840 slice (57%), 41.2 slice/s, 12 s, loss=0.0812``."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", *,
                 interval: float = PLAIN_PROGRESS_SECONDS, file: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, float(interval)
        self.file, self.clock = file, clock
        self.n, self.postfix, self.closed = 0, "", False
        self.start = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write()

    def _write(self) -> None:
        now = self.clock()
        self.last = now
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share}{rate}, {elapsed:.0f} s{extra}",
              file=self.file or sys.stderr, flush=True)

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str, *, leave: bool = True, disable: bool = False,
                 stream: Any = None) -> Any:
    """A tqdm bar on a terminal; :class:`PlainProgress` lines when ``stream`` (default stderr) is not
    one, so a log file holds a few lines per phase or epoch instead of thousands of redrawn bars."""
    stream = stream or sys.stderr
    if disable or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, disable=disable, file=stream)
    return PlainProgress(total, desc, unit, file=stream)


def _log_result(result: PatientResult) -> None:
    if result.status == FAILED:
        log.error("%s: FAILED: %s", result.patient_id, result.message)
        if "traceback" in result.info:
            log.debug("%s", result.info["traceback"])
    elif result.message:
        log.info("%s: %s: %s", result.patient_id, result.status, result.message)


def summary_line(phase: str, results: Sequence[PatientResult], done_word: str = "converted") -> str:
    """``Phase 2: 18 converted, 1 skipped, 1 failed (LUNG1-007)``."""
    counts = {s: sum(r.status == s for r in results) for s in (DONE, SKIPPED, FAILED)}
    failed = [r.patient_id for r in results if r.status == FAILED]
    line = f"{phase}: {counts[DONE]} {done_word}, {counts[SKIPPED]} skipped, {counts[FAILED]} failed"
    if failed:
        shown = ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else "")
        line += f" ({shown})"
    return line


def exit_status(results: Sequence[PatientResult]) -> int:
    """0 when no patient failed, 1 otherwise."""
    return 1 if any(r.status == FAILED for r in results) else 0


# ---- Command line ----------------------------------------------------------------------------
def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every phase shares."""
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data folder holding raw/ and processed/ (default: %(default)s)")
    parser.add_argument("--patients", nargs="+", metavar="ID", default=None,
                        help="only these patient ids (default: all)")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="worker processes (default: min(4, cores) = %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="redo patients whose output already exists")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a one-line error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr through tqdm-friendly handlers; call only from ``main()``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        force=True,
    )
