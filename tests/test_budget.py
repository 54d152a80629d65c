"""The privacy budget end to end: nobody ever exceeds its budget (property test), ledgers
survive a killed process, ``fedmoe budget`` reports them, and a run whose budget runs out
stops early."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.cli import main as cli
from fedmoe.config import FedMoEConfig
from fedmoe.models import model_for
from fedmoe.privacy import LEDGER_FILE, BudgetExceededError, LedgerBook, epsilon
from fedmoe.records import (
    ARRAYS,
    BUDGET_EXCEEDED,
    CLIENT,
    CONFIG,
    METRICS,
    ClientInfo,
    RoundPlan,
    TrainReport,
    to_arrays,
)
from fedmoe.roles import split_state_dict
from server.strategy import FedMoE
from tests import helpers  # noqa: F401  (gives Flower the task identity Message() needs)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- property
class LedgerOnlyGrid:
    """Clients that keep a real :class:`LedgerBook` and guard it like the ClientApp does
    (open at the plan's δ/accountant, charge before "training", refuse over budget), but
    skip the training itself so hypothesis can try many settings."""

    def __init__(self, root: Path, sizes: list[int], budgets: list[float], target: float):
        self.sizes, self.budgets, self.target = sizes, budgets, target
        self.books = {i: LedgerBook(root / f"client-{i}" / LEDGER_FILE) for i in range(len(sizes))}

    def get_node_ids(self):
        return list(self.books)

    def send_and_receive(self, messages, timeout=None):
        return [self._handle(m) for m in messages]

    def _handle(self, msg: Message) -> Message:
        i = msg.metadata.dst_node_id
        book, client = self.books[i], f"c{i}"
        if msg.metadata.message_type == MessageType.QUERY:
            ledger = book.get(client)
            info = ClientInfo(client, self.sizes[i], self.budgets[i],
                              ledger.delta if ledger else 0.0,
                              ledger.accountant if ledger else "",
                              tuple(ledger.history) if ledger else ())
            return Message(RecordDict({CLIENT: info.to_record()}), reply_to=msg)
        plan = RoundPlan.from_record(msg.content.config_records[CONFIG])
        budget = min(self.target, self.budgets[i]) if self.budgets[i] else self.target
        book.open(client, budget=budget, delta=plan.delta, accountant=plan.accountant)
        try:
            eps = book.charge(client, plan.entry())
        except BudgetExceededError as err:
            return Message(Error(code=BUDGET_EXCEEDED, reason=str(err)), reply_to=msg)
        report = TrainReport(num_examples=self.sizes[i], epsilon=eps, steps=plan.steps)
        # a trained reply: DP noise always moves the global arrays (an untouched copy is
        # dropped as a zero update)
        moved = ArrayRecord({k: Array(v.numpy() + np.float32(1e-3))
                             for k, v in msg.content.array_records[ARRAYS].items()})
        content = RecordDict({ARRAYS: moved, METRICS: report.to_record()})
        return Message(content, reply_to=msg)


INITIAL = to_arrays(split_state_dict(model_for(FedMoEConfig())))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sigma=st.one_of(st.just(0.0), st.floats(0.4, 5.0)),  # 0 = calibrated
    q=st.floats(0.01, 1.0),
    epochs=st.integers(1, 3),
    rounds=st.integers(1, 6),
    target=st.floats(0.3, 10.0),
    sizes=st.lists(st.integers(10, 5000), min_size=1, max_size=3),
    own_budgets=st.lists(st.one_of(st.just(0.0), st.floats(0.1, 12.0)), min_size=3, max_size=3),
    prv=st.booleans(),
)
def test_no_client_ever_exceeds_its_budget(tmp_path_factory, sigma, q, epochs, rounds, target,
                                           sizes, own_budgets, prv):
    # PRV only with a given σ and short histories: it is slow on very long ones
    accountant = "prv" if prv and sigma > 0 and q >= 0.05 else "rdp"
    config = FedMoEConfig(noise_multiplier=sigma, sample_rate=q, local_epochs=epochs,
                          num_server_rounds=rounds, target_epsilon=target, accountant=accountant,
                          min_available_clients=1)
    root = tmp_path_factory.mktemp("prop")
    grid = LedgerOnlyGrid(root, sizes, own_budgets[: len(sizes)], target)
    with LedgerBook(root / "server" / LEDGER_FILE) as server:
        strategy = FedMoE(config, book=server)
        for r in range(1, rounds + 3):  # ask for more rounds than planned
            messages = list(strategy.configure_train(r, INITIAL, ConfigRecord(), grid))
            if not messages:
                break
            strategy.aggregate_train(r, grid.send_and_receive(messages))
        for i, book in grid.books.items():
            own = own_budgets[i] if own_budgets[i] else target
            budget = min(target, own)
            for ledger in (server.get(f"c{i}"), book.get(f"c{i}")):
                if ledger is not None:
                    assert ledger.spent() <= budget + 1e-9
                    assert epsilon(ledger.history, ledger.delta, accountant) <= budget + 1e-9
            # the server never sent a round the client had to refuse
            assert not any(r.rejected for r in strategy.history)
            if sigma == 0 and f"c{i}" in strategy.plans:  # calibrated: all planned rounds fit
                assert strategy.plans[f"c{i}"].rounds_allowed >= rounds
            book.close()


# ----------------------------------------------------------------------------- durability
CLIENT_SCRIPT = """
import sys
from tests.helpers import SMALL, context, message
from clients.app import app
from fedmoe.records import RoundPlan
server_round, steps = int(sys.argv[2]), int(sys.argv[3])
plan = RoundPlan(server_round, 10.0, 0.25, steps, 1e-4, "rdp")
reply = app(message(plan=plan, config=SMALL.replace(target_epsilon=1e4)),
            context(state_dir=sys.argv[1]))
print("error" if reply.has_error() else "ok", flush=True)
"""


def _client_process(state: Path, server_round: int, steps: int) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(state), str(server_round),
                             str(steps)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _charges(state: Path) -> list[int]:
    if not (state / LEDGER_FILE).exists():
        return []
    with LedgerBook(state / LEDGER_FILE) as book:
        ledger = book.get("partition-0")
        return [e.server_round for e in ledger.entries] if ledger else []


def test_ledger_survives_a_client_killed_mid_training(tmp_path):
    state = tmp_path / "client"
    proc = _client_process(state, 1, steps=100_000)  # minutes of training
    try:
        deadline = time.monotonic() + 120
        while not _charges(state):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the client never charged its ledger"
            time.sleep(0.2)
        time.sleep(1.0)  # well inside training now
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _charges(state) == [1]  # the charge outlived the process
    assert not (state / "local_experts.pt").exists()  # it never finished the round

    restarted = _client_process(state, 2, steps=4)
    out, err = restarted.communicate(timeout=300)
    assert out.strip() == "ok", err[-3000:]
    assert _charges(state) == [1, 2]
    with LedgerBook(state / LEDGER_FILE) as book:
        ledger = book.get("partition-0")
        assert ledger.spent() == pytest.approx(epsilon(ledger.history, ledger.delta), rel=1e-12)
        assert ledger.entries[0].steps == 100_000  # the killed round is counted in full


# ----------------------------------------------------------------------------- fedmoe budget
def _ledger_folder(folder: Path) -> None:
    with LedgerBook(folder / LEDGER_FILE) as book:
        for client, sigma in (("partition-10", 1.2), ("partition-0", 1.1), ("partition-1", 1.3)):
            book.open(client, budget=8.0, delta=1e-4, accountant="rdp")
            for r in (1, 2, 3):
                book.charge(client, _entry(r, sigma))


def _entry(r, sigma):
    from fedmoe.privacy import LedgerEntry

    return LedgerEntry(r, sigma, 0.1, 10)


def test_budget_command_prints_table_and_recomputable_json(tmp_path, capsys):
    _ledger_folder(tmp_path)
    assert cli(["budget", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "partition-0" in table and "partition-1" in table and "ε left" in table
    assert cli(["budget", str(tmp_path), "--json"]) == 0
    ledgers = json.loads(capsys.readouterr().out)
    assert [c["client"] for c in ledgers] == ["partition-0", "partition-1", "partition-10"]
    for c in ledgers:
        assert {"client", "epsilon", "delta", "accountant", "history"} <= c.keys()
        assert [h["round"] for h in c["history"]] == [1, 2, 3]
        history = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in c["history"]]
        assert epsilon(history, c["delta"], c["accountant"]) == pytest.approx(c["epsilon"])
        # anyone can recompute with another accountant; PRV is tighter here
        assert epsilon(history, c["delta"], "prv") < c["epsilon"]
    assert 0.05 < ledgers[1]["epsilon"] < ledgers[0]["epsilon"] < 8.0  # more noise, less ε


def test_budget_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`fedmoe budget --json | head`: the reader goes away; exit 1, no traceback."""
    _ledger_folder(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.cli", "budget", str(tmp_path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    proc.stdout.close()  # before the command has printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_budget_command_without_a_ledger_explains(tmp_path, capsys):
    assert cli(["budget", str(tmp_path)]) == 2
    assert "no ledger.sqlite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- simulation
@pytest.mark.slow
def test_simulation_whose_budget_runs_out_stops_early(tmp_path):
    """In the in-process engine (the ServerApp logic and ClientApp of every engine; the
    Ray path is test_simulation.py's)."""
    from simulations.inline import run_inline

    # σ=2, q=0.1, 10 steps a round at δ=1e-4: ε after 2 rounds 1.02, after 3 rounds 1.22
    config = FedMoEConfig(num_server_rounds=4, noise_multiplier=2.0, target_epsilon=1.1,
                          target_delta=1e-4, run_dir=str(tmp_path / "run"))
    results = run_inline(config, 3).results
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert "no client can afford round 3" in results["privacy"]["stopped"]
    for client in results["privacy"]["clients"]:
        assert client["rounds"] == client["rounds_allowed"] == 2
        assert client["epsilon"] <= config.target_epsilon
    assert results["final"]["personalized_accuracy_mean"] is not None  # still evaluated
    assert results["final"]["epsilon_max"] <= config.target_epsilon
    assert (tmp_path / "run" / "privacy.png").stat().st_size > 1000
    assert cli(["budget", str(tmp_path / "run")]) == 0
