"""End to end through Flower's own CLI: ``flwr run .`` against a lazily started local SuperLink.

This is the path a user takes with the Flower tooling (not ``fedmoe simulate``): ``flwr``
builds a FAB from the app folder, starts a detached ``flower-superlink --simulation`` on
first use, submits the run and (``--stream``) follows its logs until it ends.

Isolation, so the test neither touches the checkout nor meets another SuperLink:

* ``flwr run .`` migrates a legacy ``[tool.flwr.federations]`` table of pyproject.toml into
  the Flower config and *rewrites pyproject.toml* (comments the table out). The test
  therefore runs ``flwr run .`` inside a throw-away copy of the app, never in the checkout.
* ``FLWR_HOME`` is a tmp dir (Flower config, SuperLink database and log, installed FABs).
* The local SuperLink listens on a fixed port (39091) unless
  ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` says otherwise; a SuperLink already running there
  would be reused. The test picks a free port, so it always starts (and stops) its own.
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` makes the SuperLink run the app in the
  current venv instead of building a per-run environment with ``uv sync``.
* The detached SuperLink outlives ``flwr run``; the test stops it and every process below it
  (SuperExec, flwr-simulation, Ray) by pid, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FLWR = VENV_BIN / "flwr"
TIMEOUT_S = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="process handling assumes POSIX `ps`"),
    pytest.mark.skipif(not FLWR.exists(), reason=f"no flwr CLI next to {sys.executable}"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process on the machine."""
    # -ww: full command lines (ps otherwise cuts them to 80 columns when not on a tty)
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True
    ).stdout
    procs = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            procs[int(parts[0])] = (int(parts[1]), parts[2] if len(parts) == 3 else "")
    return procs


def _ours(markers: list[str]) -> set[int]:
    """Processes whose command line names one of ``markers``, plus all their descendants."""
    procs = _processes()
    found = {
        pid
        for pid, (_, args) in procs.items()
        if pid != os.getpid() and any(m in args for m in markers)
    }
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop(markers: list[str], grace_s: float = 15.0) -> tuple[dict[int, str], set[int]]:
    """SIGTERM the processes marked by ``markers`` (and their trees), SIGKILL stragglers.

    Returns the processes it stopped (pid -> command line) and any it could not stop.
    """
    procs = _processes()
    targets = _ours(markers)  # snapshot the whole tree before anything dies and is reparented
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = targets & _live_pids()
        if not alive:
            break
        time.sleep(0.3)
    alive = (targets & _live_pids()) | _ours(markers)
    _signal(alive, signal.SIGKILL)
    time.sleep(0.5)
    return {pid: procs.get(pid, (0, ""))[1] for pid in targets}, _ours(markers) & _live_pids()


def _live_pids() -> set[int]:
    # zombies are dead for our purpose (their parent reaps them)
    out = subprocess.run(
        ["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    return {int(p) for p, st in (ln.split(None, 1) for ln in out.splitlines()) if "Z" not in st}


def _copy_app(dst: Path) -> Path:
    """A copy of the Flower app (what the FAB is built from), without venv/VCS/caches."""
    shutil.copytree(
        REPO,
        dst,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".ci", ".flwr", "tests", "runs", "build", "dist",
            "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
        ),
    )
    return dst


def test_flwr_run_local_simulation(tmp_path):
    app = _copy_app(tmp_path / "app")
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    run_dir = tmp_path / "run"
    port = _free_port()

    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # use this venv, no `uv sync`
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        # `flwr` starts `flower-superlink` by name: it must be this venv's
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    command = [
        str(FLWR), "run", ".", "--stream",
        "--federation-config", "num-supernodes=3",
        "--run-config", f"num-server-rounds=2 run-dir='{run_dir}'",
    ]
    # The SuperLink's command line names its log file under FLWR_HOME; its children
    # (SuperExec, flwr-simulation) name the SuperLink's port.
    markers = [str(flwr_home), f"127.0.0.1:{port}"]

    cli = subprocess.Popen(
        command, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        try:
            output, _ = cli.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(cli.pid, signal.SIGKILL)
            output, _ = cli.communicate()
            log = flwr_home / "local-superlink" / "superlink.log"
            tail = log.read_text()[-4000:] if log.exists() else "(no SuperLink log)"
            pytest.fail(
                f"`flwr run` did not finish in {TIMEOUT_S}s\n--- output ---\n{output[-6000:]}"
                f"\n--- superlink.log ---\n{tail}"
            )
        assert cli.returncode == 0, output[-6000:]
        assert "Successfully started run" in output, output[-6000:]
        assert "Federation `@none/default` (3 simulated SuperNodes)" in output, output[-6000:]

        results_path = run_dir / "results.json"
        assert results_path.exists(), f"no {results_path}\n{output[-6000:]}"
        results = json.loads(results_path.read_text())
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        stopped, survivors = _stop(markers)
    assert not survivors, f"processes left running: {survivors}"
    # the SuperLink this test made `flwr` start was found (and stopped) by pid
    assert any("flower-superlink" in args for args in stopped.values()), stopped

    # Flower rewrites a pyproject with a legacy [tool.flwr.federations] table; ours has none
    assert (app / "pyproject.toml").read_text() == (REPO / "pyproject.toml").read_text()
    assert {"config", "rounds", "final"} <= results.keys()
    assert results["config"]["num-server-rounds"] == 2
    assert results["config"]["run-dir"] == str(run_dir)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert sorted(c["client"] for c in results["rounds"][-1]["clients"]) == [
        "partition-0", "partition-1", "partition-2"]
    assert results["final"]["epsilon_max"] > 0
    assert results["final"]["epsilon_max"] <= results["config"]["target-epsilon"]
