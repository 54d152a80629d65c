"""What a ``fedmoe simulate`` run leaves behind if it is killed, and how to remove it.

Flower's simulation engine starts Ray (a GCS server, a raylet, workers, agents) as
descendants of the ``fedmoe simulate`` process, and the simulated clients keep their state
under the temp dir (:func:`clients.state.run_state_root`). A run that ends normally, or on
Ctrl-C, stops Ray and moves that state into its run folder. A run killed with SIGKILL
cannot: so while it runs it keeps a small record, ``<temp>/fedmoe-runs/<pid>.json``, of its
own process (pid and start time), its run folder, Flower's run id, and every descendant
process (pid and start time, refreshed every half second). :func:`clean_leftovers` (run by
the next ``fedmoe simulate`` and by ``fedmoe clean``) reads the records whose owner is gone,
ends the recorded processes that are still alive (matched by pid *and* start time, so a
reused pid is never touched), moves the recorded clients' state into the run folder, and
deletes the record. Nothing that is not in a record is touched.

Process discovery reads ``/proc`` (Linux); elsewhere no processes are recorded.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmoe.storage import move_dir, write_atomic

#: How often a running simulation refreshes its record of descendant processes (seconds).
POLL_SECONDS = 0.5
#: How long a recorded process gets to exit after SIGTERM before SIGKILL (seconds).
TERM_GRACE_SECONDS = 5.0


def records_dir() -> Path:
    """Where running simulations keep their records: ``<temp>/fedmoe-runs``."""
    return Path(tempfile.gettempdir()) / "fedmoe-runs"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
        return None
    return int(fields[1]), int(fields[19])


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None if it is not running."""
    stat = _stat(pid)
    return stat[1] if stat else None


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        stat = _stat(pid)
        if stat:
            children.setdefault(stat[0], []).append((pid, stat[1]))
    found, todo = {}, [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def is_running(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` is still running."""
    return start_time(pid) == started


@dataclass
class RunRecord:
    """One running simulation: its own process, run folder, run id and descendants."""

    pid: int
    start: int
    run_dir: str
    run_id: int | None = None
    #: pid -> {"start": ticks, "command": text}
    processes: dict[str, dict] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return records_dir() / f"{self.pid}.json"

    def save(self) -> None:
        write_atomic(self.path, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls(**json.loads(path.read_text()))


class Recorder:
    """Keeps this process's :class:`RunRecord` up to date while a simulation runs.

    Use as a context manager around the simulation; :meth:`finish` (on a normal end or
    Ctrl-C) ends any recorded process still alive and deletes the record.
    """

    def __init__(self, run_dir: Path) -> None:
        pid = os.getpid()
        self.record = RunRecord(pid=pid, start=start_time(pid) or 0, run_dir=str(run_dir))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, name="fedmoe-recorder", daemon=True)

    def __enter__(self) -> Recorder:
        self.record.save()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def set_run_id(self, run_id: int) -> None:
        with self._lock:
            self.record.run_id = run_id
            self.record.save()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.refresh()

    def refresh(self) -> None:
        """Add the live descendants not yet recorded (a record only grows: a process that
        exited stays listed and is matched by start time later)."""
        found = descendants(self.record.pid)
        with self._lock:
            new = {str(p): s for p, s in found.items() if str(p) not in self.record.processes}
            if new:
                for pid, started in new.items():
                    self.record.processes[pid] = {"start": started,
                                                  "command": _command(int(pid))}
                self.record.save()

    def finish(self) -> list[str]:
        """End recorded processes still alive (Ray should have stopped them); delete the
        record. Returns a line per process ended."""
        self.__exit__()
        ended = end_processes(self.record)
        self.record.path.unlink(missing_ok=True)
        return ended


def end_processes(record: RunRecord) -> list[str]:
    """SIGTERM, then after :data:`TERM_GRACE_SECONDS` SIGKILL, every recorded process that
    is still the same process (pid and start time); a line per process ended."""
    alive = [(int(p), info) for p, info in record.processes.items()
             if int(p) != os.getpid() and is_running(int(p), info["start"])]
    for pid, _ in alive:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_SECONDS
    while time.monotonic() < deadline and any(is_running(p, i["start"]) for p, i in alive):
        time.sleep(0.1)
    for pid, info in alive:
        if is_running(pid, info["start"]):
            _signal(pid, signal.SIGKILL)
    return [f"process {pid} ({info['command'] or '?'})" for pid, info in alive]


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def clean_leftovers() -> list[str]:
    """Remove what killed ``fedmoe simulate`` runs left: for every record whose owner is no
    longer running, end its recorded processes, move its clients' state from the temp dir
    into its run folder (``<run folder>/clients/run-<id>``), and delete the record.

    Returns
    -------
    list of str
        One line per thing removed or moved (empty when nothing was left).
    """
    from clients.state import run_state_root

    done: list[str] = []
    folder = records_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = RunRecord.load(path)
        except (OSError, ValueError, TypeError) as err:
            done.append(f"unreadable record {path} left as it is: {err}")
            continue
        if is_running(record.pid, record.start):
            continue  # a live run (this user's or another's): not a leftover
        done += [f"killed run {record.pid}: ended {line}" for line in end_processes(record)]
        if record.run_id is not None:
            state = run_state_root(record.run_id)
            if state.is_dir():
                target = Path(record.run_dir) / "clients" / state.name
                if target.exists():
                    done.append(f"killed run {record.pid}: clients' state {state} left in "
                                f"place ({target} already exists)")
                else:
                    move_dir(state, target)
                    done.append(f"killed run {record.pid}: moved clients' state {state} to "
                                f"{target}")
        path.unlink(missing_ok=True)
    return done
