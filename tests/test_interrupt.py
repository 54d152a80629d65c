"""Ctrl-C and SIGKILL of ``fedmoe simulate``: a prompt stop with the report of the finished
rounds, and nothing left behind (found by recorded ids only); every client that takes no
part is listed in results.json with the reason."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from uuid import uuid4

import pytest

from fedmoe.privacy import LEDGER_FILE, LedgerBook
from server.app import RunInterrupted, StoppableGrid, StopRequest, run_federation
from simulations.leftovers import RunRecord, clean_leftovers, records_dir, start_time
from tests.helpers import SMALL, LocalGrid

ROOT = Path(__file__).resolve().parents[1]


class PushGrid(LocalGrid):
    """LocalGrid with Flower's push/pull interface: replies are computed on push."""

    def __init__(self, *args, deliver: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deliver, self.replies = deliver, {}

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self.sent.append(msg)
            if self.deliver:
                self.replies[msg.metadata.message_id] = self.app(
                    msg, self.contexts[msg.metadata.dst_node_id])
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def test_stoppable_grid_gives_up_waiting_as_soon_as_stop_is_set():
    stop = StopRequest()
    grid = StoppableGrid(PushGrid(2, deliver=False), stop)  # replies never come
    from tests.helpers import message

    msg = message(dst=10)
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    with pytest.raises(RunInterrupted):
        grid.send_and_receive([msg], timeout=3600)
    assert time.monotonic() - start < 2.0


class StopAfter:
    """A listener that asks the run to stop once round ``n`` has finished."""

    def __init__(self, n: int, stop: StopRequest) -> None:
        self.n, self.stop, self.finished_with = n, stop, None

    def started(self, config, run_dir) -> None:
        pass

    def round_finished(self, record) -> None:
        if record.server_round == self.n:
            self.stop.request("SIGTERM")

    def finished(self, results, path) -> None:
        self.finished_with = (results, path)


def test_stop_writes_the_report_of_the_finished_rounds(tmp_path):
    config = SMALL.replace(num_server_rounds=3, run_dir=str(tmp_path / "run"))
    stop = StopRequest()
    listener = StopAfter(1, stop)
    results = run_federation(PushGrid(3), config, listener, run_id=1, stop=stop)

    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == results and listener.finished_with is not None
    assert [r["round"] for r in results["rounds"]] == [1]
    assert "interrupted (SIGTERM) during round 2" in results["privacy"]["stopped"]
    assert len(results["final"]["clients"]) == 3
    # the stop came before round 2 was sent: no ledger charges it, and the ledger, read
    # back, agrees with the report (a round sent before a stop would stay charged)
    with LedgerBook(tmp_path / "run" / LEDGER_FILE) as book:
        for client in book.clients():
            # round 1 only (a first round also charges the label histogram: two entries)
            assert {r for r, _ in book.trajectory(client)} == {1}
    assert {p["client"]: p["rounds"] for p in results["privacy"]["clients"]} == {
        "partition-0": 1, "partition-1": 1, "partition-2": 1}


def test_a_stop_in_round_1_writes_its_plots_without_a_matplotlib_warning(tmp_path):
    """No round finished: the plots have no labelled line (Matplotlib warned "No artists
    with labels found to put in legend" on the console of a run stopped in round 1)."""
    config = SMALL.replace(num_server_rounds=2, run_dir=str(tmp_path / "run"))
    stop = StopRequest()
    stop.request("SIGINT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = run_federation(PushGrid(2), config, StopAfter(0, stop), run_id=1, stop=stop)
    assert results["rounds"] == [] and "interrupted (SIGINT)" in results["privacy"]["stopped"]
    for plot in ("progress.png", "privacy.png"):
        assert (tmp_path / "run" / plot).stat().st_size > 1000


def test_clients_that_take_no_part_are_listed_with_the_reason(tmp_path):
    config = SMALL.replace(num_server_rounds=1, run_dir=str(tmp_path / "run"))
    grid = PushGrid(3, node_configs={1: {"epsilon_budget": 1e-4}})
    results = run_federation(grid, config, run_id=1)
    assert results["excluded"] == [
        {"client": "partition-1", "reason": "its budget cannot pay for one round"}]
    rounds = {p["client"]: p["rounds"] for p in results["privacy"]["clients"]}
    assert rounds == {"partition-0": 1, "partition-1": 0, "partition-2": 1}


# ------------------------------------------------------------------ leftovers
def _dead_process() -> tuple[int, int]:
    """(pid, start time) of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    started = start_time(proc.pid)
    proc.wait()
    return proc.pid, started


def test_clean_ends_recorded_processes_of_a_dead_run_and_moves_its_state(tmp_path):
    from clients.state import run_state_root

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        owner, owner_start = _dead_process()
        state = run_state_root(77) / "partition-0"
        state.mkdir(parents=True)
        (state / "ledger.sqlite").write_bytes(b"x")
        record = RunRecord(owner, owner_start, str(tmp_path / "run"), run_id=77, processes={
            str(sleeper.pid): {"start": start_time(sleeper.pid), "command": "sleep 60"},
            # `other` is recorded with another start time: a reused pid, never touched
            str(other.pid): {"start": start_time(other.pid) - 1, "command": "sleep 60"},
        })
        record.save()
        live = RunRecord(os.getpid(), start_time(os.getpid()), str(tmp_path / "live"))
        live.save()  # a run that is still going: not a leftover

        lines = clean_leftovers()
        assert sleeper.wait(timeout=10) is not None
        assert other.poll() is None
        assert any(f"ended process {sleeper.pid}" in line for line in lines)
        assert not record.path.exists() and live.path.exists()
        assert not run_state_root(77).exists()
        assert (tmp_path / "run" / "clients" / "run-77" / "partition-0" / "ledger.sqlite").exists()
        assert clean_leftovers() == []  # nothing left the second time
    finally:
        for proc in (sleeper, other):
            proc.kill()
            proc.wait()
        live.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ the real command line
def _start(out: Path, rounds: int = 200) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "fedmoe.cli", "simulate", "--clients", "3", "--rounds",
         str(rounds), "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc: subprocess.Popen, timeout: float = 240) -> RunRecord:
    """Wait until the run's record names its run id and Ray processes and a client has
    finished a round (its local experts are saved); return the record."""
    from clients.state import run_state_root

    path = Path(tempfile.gettempdir()) / "fedmoe-runs" / f"{proc.pid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.exists():
            record = RunRecord.load(path)
            if record.run_id is not None and record.processes and list(
                    run_state_root(record.run_id).glob("*/local_experts.pt")):
                return record
        time.sleep(0.5)
    raise AssertionError("the run did not start training in time")


def _signalled(out: Path, signals: list[tuple[float, int]]):
    """Start a long run into ``out``; once it trains, send each signal after its wait (s);
    return (process, run record, stdout, stderr) once it has exited, at most 30 s after the
    last signal."""
    proc = _start(out)
    try:
        record = _wait_for_training(proc)
        for wait, sig in signals:
            time.sleep(wait)
            proc.send_signal(sig)
        sent = time.monotonic()
        out_text, err = proc.communicate(timeout=60)
        assert time.monotonic() - sent < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, record, out_text, err


def _alive(record: RunRecord) -> list[int]:
    return [int(p) for p, info in record.processes.items()
            if start_time(int(p)) == info["start"]]


@pytest.mark.slow
@pytest.mark.usefixtures("system_temp_dir")
@pytest.mark.parametrize("sig, cause, repeat", [
    (signal.SIGINT, "Ctrl-C", False),
    # `timeout`: the process, then its group, at once. The first SIGTERM is the stop, so
    # this case is also the single SIGTERM's (a Ray run of its own, ~45 s, is saved)
    (signal.SIGTERM, "SIGTERM", True),
])
def test_a_stop_signal_stops_promptly_writes_the_report_and_exits_130(tmp_path, sig, cause,
                                                                      repeat):
    out = tmp_path / "run"
    # a repeat 0.1 s later is the same request, not an abort
    proc, record, out_text, err = _signalled(out, [(3, sig)] + ([(0.1, sig)] if repeat else []))
    assert proc.returncode == 130, err
    assert "interrupted; report of the" in err
    results = json.loads((out / "results.json").read_text())
    assert f"interrupted ({cause})" in results["privacy"]["stopped"]
    assert f"stopping ({cause}" in err
    assert "Manually terminating" not in out_text + err  # Ray's actor logs: only --verbose
    finished = [r["round"] for r in results["rounds"]]
    assert finished == list(range(1, len(finished) + 1)) and len(finished) < 200
    assert not _alive(record)  # no Ray process of its own left
    assert not record.path.exists()
    # ledgers readable: the server's, and each client's own (moved into the run folder)
    from fedmoe.cli import main as cli

    assert cli(["budget", str(out), "--json"]) == 0
    kept = out / "clients" / f"run-{record.run_id}"
    for client in kept.iterdir():
        assert cli(["budget", str(client), "--json"]) == 0


@pytest.mark.slow
@pytest.mark.usefixtures("system_temp_dir")
def test_a_second_stop_signal_aborts_at_once(tmp_path):
    """A second SIGTERM (after the repeat window) aborts within seconds, even where a
    thread of Flower's engine is left waiting on a dead Ray actor: exit 130, or killed by
    the signal itself where it comes while Ray shuts down (Ray's core puts the default
    action back then; what a kill leaves, the next run or `fedmoe clean` ends)."""
    proc, _, _, err = _signalled(tmp_path / "run", [(2, signal.SIGTERM), (1.5, signal.SIGTERM)])
    assert proc.returncode in (130, -signal.SIGTERM), err
    assert proc.returncode == -signal.SIGTERM or "fedmoe: interrupted" in err


@pytest.mark.slow
@pytest.mark.usefixtures("system_temp_dir")
def test_after_sigkill_clean_removes_what_the_run_left_by_its_record(tmp_path):
    from clients.state import run_state_root

    out = tmp_path / "run"
    proc = _start(out)
    try:
        record = _wait_for_training(proc)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    record = RunRecord.load(record.path)  # the latest record the run wrote
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fedmoe.cli", "clean"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"killed run {record.pid}" in done.stdout
    assert not _alive(record)
    assert not record.path.exists() and records_dir() == record.path.parent
    assert not run_state_root(record.run_id).exists()
    assert list((out / "clients" / f"run-{record.run_id}").glob("*/ledger.sqlite"))


def test_a_resume_killed_before_its_first_round_leaves_the_clients_state_findable(tmp_path):
    """Run A is killed, resume B takes A's client state and is killed before it finishes a
    round (the checkpoint still names A), `fedmoe clean` moves B's state into the run
    folder; resume C must continue that state — the clients' ledgers and experts — not
    start the clients afresh (their ledgers would under-count what they spent)."""
    from clients.state import run_state_root
    from simulations.runner import STATE_OWNER, carry_client_state

    run_dir = tmp_path / "run"
    ledger = run_state_root(1) / "partition-0" / "ledger.sqlite"  # run A's, in the temp dir
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"spent")
    assert carry_client_state(1, 2, run_dir) == run_state_root(2)  # resume B
    assert (run_state_root(2) / "partition-0" / "ledger.sqlite").read_bytes() == b"spent"
    assert json.loads((run_dir / STATE_OWNER).read_text()) == {"run_id": 2}
    (run_dir / "clients").mkdir(exist_ok=True)  # B killed; `fedmoe clean` moves its state
    run_state_root(2).rename(run_dir / "clients" / "run-2")
    target = carry_client_state(1, 3, run_dir)  # resume C: the checkpoint still names A
    assert target == run_state_root(3)
    assert (target / "partition-0" / "ledger.sqlite").read_bytes() == b"spent"
    assert not (run_dir / "clients" / "run-2").exists()
    assert carry_client_state(1, 3, run_dir) is None  # already there: nothing moves


def test_move_dir_across_file_systems_leaves_the_target_absent_or_complete(tmp_path,
                                                                           monkeypatch):
    """Across file systems (no rename) the copy goes to <target>.partial first: a kill
    during the copy leaves no target, only the complete source."""
    import errno

    from fedmoe import storage

    source, target = tmp_path / "a", tmp_path / "b" / "run-5"
    (source / "c").mkdir(parents=True)
    (source / "c" / "ledger.sqlite").write_bytes(b"x" * 100)
    real_rename = os.rename

    def cross_device(src, dst):
        if Path(src) == source:
            raise OSError(errno.EXDEV, "cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(storage.os, "rename", cross_device)
    killed = {"on": True}

    def rename_or_die(src, dst):
        if killed["on"] and Path(src).name.endswith(".partial"):
            raise KeyboardInterrupt  # killed after the copy, before the rename
        return cross_device(src, dst)

    monkeypatch.setattr(storage.os, "rename", rename_or_die)
    with pytest.raises(KeyboardInterrupt):
        storage.move_dir(source, target)
    assert not target.exists() and (source / "c" / "ledger.sqlite").exists()
    assert target.with_name("run-5.partial").exists()  # the interrupted copy
    killed["on"] = False
    storage.move_dir(source, target)  # again, uninterrupted: the stale .partial is replaced
    assert (target / "c" / "ledger.sqlite").read_bytes() == b"x" * 100
    assert not source.exists() and not target.with_name("run-5.partial").exists()
