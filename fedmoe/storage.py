"""Crash-safe file writes shared by the run folder and the client's state directory, and
the run folder's write lock."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename: a crash leaves old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: The lock file of a run folder (:func:`run_folder_lock`).
LOCK_FILE = ".fedmoe.lock"
_held: dict[Path, tuple[int, int]] = {}  # run folder -> (file descriptor, holders)
_held_guard = threading.Lock()


class RunFolderBusy(RuntimeError):
    """Another process is writing into the run folder."""


def move_dir(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target`` (which must not exist) so that a process
    killed at any point leaves ``target`` either absent or complete: a rename where both
    are on one file system; else a copy to ``<target>.partial`` (an earlier one removed),
    renamed to ``target`` once complete, then ``source`` removed. A kill during that
    removal leaves a complete ``target`` next to a partial ``source``: readers must take
    ``target`` first."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
        return
    except OSError as err:
        if err.errno != errno.EXDEV:  # another file system
            raise
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, symlinks=True)
    os.rename(partial, target)
    shutil.rmtree(source)


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's write lock (``<run_dir>/.fedmoe.lock``, an exclusive ``flock``).

    One process writes a run folder at a time: a second one gets :class:`RunFolderBusy`
    at once, naming the holder's pid. The lock is re-entrant within a process (``fedmoe
    simulate`` takes it before Flower starts, its server thread takes it again) and the
    operating system releases it when the holder dies, even by SIGKILL: no stale lock is
    ever left to clean up. The folder is created if missing.

    Raises
    ------
    RunFolderBusy
        If another process holds the lock.
    """
    key = Path(run_dir).resolve()
    with _held_guard:
        if key in _held:
            fd, count = _held[key]
            _held[key] = (fd, count + 1)
        else:
            key.mkdir(parents=True, exist_ok=True)
            fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunFolderBusy(
                    f"{run_dir}: another fedmoe process (pid {holder}) is writing to this run "
                    "folder; wait for it to end, or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _held_guard:
            fd, count = _held[key]
            if count > 1:
                _held[key] = (fd, count - 1)
            else:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
