"""A real deployment on 127.0.0.1 with Flower's own runtime: ``flower-superlink`` with TLS (the
CA of ``fedmoe deploy init``), node authentication and a persistent database; ``flwr
supernode register``; ``flower-supernode`` processes, each on its own CSV file with its own
state dir and pinned δ/accountant; ``flwr run . fedmoe``. The commands are those of
docs/deployment.md.

One deployment, checked step by step (each SuperNode costs a ClientApp process per message,
so one federation serves every check):

1. a SuperNode whose key was never registered is refused (Flower's code 2004), and one
   without the CA certificate fails the TLS handshake;
2. run 1 (1 round) with 3 good nodes and one whose data file is malformed: the malformed
   node refuses with a reason naming its file, the run goes on with the others; every good
   node's ledger and local experts are in its state dir and the server's results match each
   client's own ledger;
3. node 0 is killed (SIGKILL, with its SuperExec) between rounds — as soon as it has sent
   its last reply of run 1, while the others finish — and restarted with the same key and
   state dir (again until the SuperLink re-activates it: after a crash Flower holds the node
   online for two missed heartbeats, 60 s): its local experts are byte-identical and its
   ledger unchanged; run 2's round is charged on top of it (a lifetime budget), once.

Every process is started by the test and stopped by pid (with its descendants).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmoe.cli import main as fedmoe_main
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from tests.test_flwr_run import (
    FLWR,
    VENV_BIN,
    _copy_app,
    _free_port,
    _live_pids,
    _processes,
    _stop,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="process handling assumes POSIX `ps`"),
    pytest.mark.skipif(not FLWR.exists(), reason=f"no flwr CLI next to {sys.executable}"),
]

RUN_TIMEOUT_S = 480
GOOD = (0, 1, 2)
BAD = 3  # registered, online, with a malformed data file


def _env(home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONPATH", None)  # the processes run the FAB's code, not the checkout's
    return env


def _write_data(folder: Path) -> list[Path]:
    """Digits split into three CSV files (150 rows, 64 features, label column 'digit') and a
    fourth with a NaN feature."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    header = [f"p{i}" for i in range(64)] + ["digit"]
    paths = []
    for i in range(4):
        rows = [[*map(float, x), int(y)] for x, y in
                zip(bunch.data[i * 150:(i + 1) * 150], bunch.target[i * 150:(i + 1) * 150])]
        if i == BAD:
            rows[7][3] = float("nan")
        path = folder / f"org-{i}.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        paths.append(path)
    return paths


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"flower-superlink exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"flower-superlink did not listen on {port}:\n{log.read_text()[-3000:]}")


class Federation:
    """The processes of one deployment under ``root``; stopped by pid in :meth:`close`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.keys = root / "keys"
        self.port = _free_port()

    def start(self, name: str, command: list[str], home: Path, cwd: Path | None = None
              ) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(command, env=_env(home), stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def supernode(self, i: int, node_config: str, *, key: Path | None = None,
                  ca: bool = True, name: str | None = None) -> subprocess.Popen:
        command = [str(VENV_BIN / "flower-supernode"), "--superlink",
                   f"127.0.0.1:{self.port}", "--port", str(_free_port()),
                   "--auth-supernode-private-key",
                   str(key or self.keys / "supernodes" / f"node-{i}" / "node.key"),
                   "--node-config", node_config]
        if ca:
            command += ["--root-certificates", str(self.keys / "ca.crt")]
        else:  # gives up instead of retrying for ever
            command += ["--max-retries", "1", "--max-wait-time", "30"]
        return self.start(name or f"node-{i}", command, self.root / f"home-{name or i}")

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything below it (as a crash would); the tree is read
        first, since Flower starts its SuperExec in a session of its own."""
        proc = self.procs[name]
        tree, grew = {proc.pid}, True
        while grew:
            children = {pid for pid, (ppid, _) in _processes().items() if ppid in tree} - tree
            tree |= children
            grew = bool(children)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        deadline = time.monotonic() + 10
        while tree & _live_pids() and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> set[int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        # Flower starts each SuperExec in a session of its own and names its parent only in
        # `--parent-pid`: a SuperExec whose SuperNode died (a refused restart) is found so
        ours = {str(p.pid) for p in self.procs.values()}
        orphans = {pid for pid, (_, args) in _processes().items()
                   if any(a == "--parent-pid" and b in ours
                          for a, b in zip(args.split(), args.split()[1:]))}
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _, survivors = _stop([str(self.root)])
        deadline = time.monotonic() + 15
        while orphans & _live_pids() and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in orphans & _live_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return survivors | (orphans & _live_pids())


def _flwr(fed: Federation, args: list[str], home: Path, cwd: Path | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(FLWR), *args], env=_env(home), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _node_config(i: int, data: Path, state: Path) -> str:
    return (f"client-id='org-{i}' data-path='{data}' label-column='digit' "
            f"state-dir='{state}' delta=0.0001 accountant='rdp'")


def _ledger(state: Path, client: str):
    with LedgerBook(state / LEDGER_FILE, read_only=True) as book:
        return book.get(client)


def _run(fed: Federation, app: Path, home: Path, run_config: str,
         while_running=None) -> dict:
    """``flwr run . fedmoe --stream``; ``while_running()`` is called every second until it
    returns True (or the run ends)."""
    log = (fed.root / "flwr-run.log").open("w")
    proc = subprocess.Popen([str(FLWR), "run", ".", "fedmoe", "--stream", "--run-config",
                             run_config], env=_env(home), cwd=app, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    fed.procs["flwr-run"] = proc
    end = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < end:
        if while_running is not None and while_running():
            while_running = None
        time.sleep(1)
    out = fed.log("flwr-run")
    if proc.poll() is None:
        pytest.fail(f"flwr run did not end in {RUN_TIMEOUT_S} s:\n{out[-4000:]}\n--- superlink "
                    f"---\n{fed.log('superlink')[-3000:]}")
    assert proc.returncode == 0, out[-6000:]
    run_dir = run_config.split("run-dir='")[1].split("'")[0]
    path = Path(run_dir) / "results.json"
    assert path.exists(), out[-6000:] + "\n--- superlink ---\n" + fed.log("superlink")[-3000:]
    return json.loads(path.read_text())


def _restart(fed: Federation, i: int, node_config: str, node_id: int) -> None:
    """Start SuperNode ``i`` again until the SuperLink activates it: after a crash the
    SuperLink holds the node online until two heartbeats are missed (60 s by default) and
    refuses a second activation (exit code 305) until then — what a service manager's
    restart-on-failure does."""
    marker = f"Activated node_id={node_id}"
    seen = fed.log("superlink").count(marker)
    end = time.monotonic() + 180
    attempt = 0
    while time.monotonic() < end:
        attempt += 1
        proc = fed.supernode(i, node_config, name=f"node-{i}-restart-{attempt}")
        while proc.poll() is None and time.monotonic() < end:
            if fed.log("superlink").count(marker) > seen:
                return
            time.sleep(1)
        time.sleep(5)
    pytest.fail(f"SuperNode {i} was not re-activated:\n{fed.log('superlink')[-3000:]}")


def test_deployment_tls_node_auth_own_data_and_restart(tmp_path):
    started = time.monotonic()
    fed = Federation(tmp_path)
    data = _write_data(tmp_path)
    states = [tmp_path / f"state-{i}" for i in range(4)]
    assert fedmoe_main(["deploy", "init", str(fed.keys), "--nodes", "4",
                        "--port", str(fed.port)]) == 0
    cli_home = tmp_path / "home-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text((fed.keys / "flwr-config.toml").read_text())
    app = _copy_app(tmp_path / "app")
    try:
        link = fed.start("superlink", [
            str(VENV_BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(fed.keys / "ca.crt"),
            "--ssl-certfile", str(fed.keys / "superlink" / "server.crt"),
            "--ssl-keyfile", str(fed.keys / "superlink" / "server.key"),
            "--enable-supernode-auth", "--database", str(tmp_path / "superlink.db"),
            "--port", str(fed.port), "--disable-runtime-dependency-installation",
        ], tmp_path / "home-superlink")
        _wait_port(fed.port, link, tmp_path / "superlink.log")
        registering = [subprocess.Popen(
            [str(FLWR), "supernode", "register",
             str(fed.keys / "supernodes" / f"node-{i}" / "node.pub"), "fedmoe"],
            env=_env(cli_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(4)]
        node_ids = []
        for proc in registering:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "registered successfully" in out, out
            node_ids.append(int(out.split("SuperNode ")[1].split()[0]))
        for i in range(4):
            fed.supernode(i, _node_config(i, data[i], states[i]))
        # 1. refused: a key never registered; a SuperNode without the CA certificate
        from fedmoe.deploy import init_deployment

        rogue = init_deployment(tmp_path / "rogue-keys", nodes=1).node_key(0)
        unregistered = fed.supernode(9, _node_config(9, data[0], tmp_path / "s9"),
                                     key=rogue, ca=True, name="rogue")
        no_ca = fed.supernode(0, _node_config(0, data[0], tmp_path / "s8"), ca=False,
                              name="no-ca")

        # 2. run 1: one round, four nodes online, one of them with a malformed file.
        # Node 0 is killed once it has sent its last reply of the run (between rounds:
        # run 1's last, run 2's first), while the others finish. One round is enough:
        # every message is a fresh ClientApp process, so a second round would repeat what
        # run 2 checks (state and ledger carried over from disk), at ~60 s a round.
        crash: dict[str, object] = {}

        def kill_node_0_after_its_last_reply() -> bool:
            if fed.log("node-0").count("Sent successfully") < 3:  # query, train, eval
                return False
            fed.kill("node-0")
            crash["experts"] = (states[0] / "local_experts.pt").read_bytes()
            crash["ledger"] = _ledger(states[0], "org-0")
            return True

        results = _run(fed, app, cli_home, "dataset='node' num-features=64 num-classes=10 "
                       "num-server-rounds=1 min-available-clients=4 sample-rate=0.2 "
                       f"run-dir='{tmp_path / 'run-1'}'", kill_node_0_after_its_last_reply)
        assert crash, "node 0 did not send 3 replies in run 1:\n" + fed.log("node-0")[-3000:]
        assert unregistered.wait(timeout=120) != 0
        assert "2004" in fed.log("rogue") and "Failed to activate SuperNode" in fed.log("rogue")
        assert no_ca.wait(timeout=120) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in fed.log("no-ca")

        assert [r["round"] for r in results["rounds"]] == [1]
        assert sorted(c["client"] for c in results["rounds"][0]["clients"]) == [
            f"org-{i}" for i in GOOD]  # trained and evaluated
        assert all(c["personalized_accuracy"] is not None
                   for c in results["rounds"][0]["clients"])
        refused = [e["reason"] for e in results["excluded"]]
        assert len(refused) == 1 and str(data[BAD]) in refused[0] and "NaN" in refused[0]
        logs = _flwr(fed, ["log", str(results["run_id"]), "fedmoe", "--show"], cli_home)
        assert "fedmoe: results written to" in logs.stdout + logs.stderr, logs.stdout[-3000:]
        rows = {row["client"]: row for row in results["privacy"]["clients"]}
        assert sorted(rows) == [f"org-{i}" for i in GOOD]
        for i in GOOD:
            assert (states[i] / "local_experts.pt").exists()
            ledger = _ledger(states[i], f"org-{i}")
            row = rows[f"org-{i}"]
            assert (ledger.delta, ledger.accountant) == (1e-4, "rdp") == (row["delta"],
                                                                          row["accountant"])
            assert {e.server_round for e in ledger.entries} == {1}
            assert ledger.spent() == pytest.approx(row["epsilon"], rel=1e-9)
        assert not (states[BAD] / LEDGER_FILE).exists()  # refused before any charge

        # 3. node 0, killed between rounds, restarted with the same key and state dir
        experts, before = crash["experts"], crash["ledger"]
        assert before.entries == _ledger(states[0], "org-0").entries
        _restart(fed, 0, _node_config(0, data[0], states[0]), node_ids[0])
        assert (states[0] / "local_experts.pt").read_bytes() == experts
        assert _ledger(states[0], "org-0").entries == before.entries
        results2 = _run(fed, app, cli_home, "dataset='node' num-features=64 num-classes=10 "
                        "num-server-rounds=1 min-available-clients=4 sample-rate=0.2 "
                        "target-epsilon=16 fraction-evaluate=0 "
                        f"run-dir='{tmp_path / 'run-2'}'")
        after = _ledger(states[0], "org-0")
        rows2 = {row["client"]: row for row in results2["privacy"]["clients"]}
        assert sorted(rows2) == [f"org-{i}" for i in GOOD] and rows2["org-0"]["rounds"] == 1
        assert [str(data[BAD]) in e["reason"] for e in results2["excluded"]] == [True]
        # lifetime budget: run 2's round is charged on top of run 1's, once
        assert after.entries[:len(before.entries)] == before.entries
        assert len(after.entries) == len(before.entries) + 1
        assert rows2["org-0"]["prior_rounds"] >= 1
        assert after.spent() == pytest.approx(rows2["org-0"]["epsilon"], rel=1e-9)
        assert after.spent() > before.spent()
        assert (states[0] / "local_experts.pt").read_bytes() != experts  # trained on them
    finally:
        survivors = fed.close()
    assert not survivors, f"processes left running: {survivors}"
    print(f"deployment test: {time.monotonic() - started:.0f} s")
