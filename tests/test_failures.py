"""Dropouts and stragglers: clients that crash, send NaN or answer too late are tolerated
and counted; a round without enough valid replies keeps the global model; the server never
waits for nodes (or replies) longer than reply-timeout, and says why it waits."""

import logging
import math
import time

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, MessageType

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import ARRAYS
from server.strategy import FedMoE
from simulations.inline import run_inline
from tests.helpers import SMALL, LocalGrid
from tests.test_strategy import _first_round, _reply, initial

TIMEOUT = 8.0


class HostileClients:
    """The real ClientApp, except: ``raising`` partitions crash after training (their
    ledgers are charged, no reply comes), ``nan`` sends a NaN in round ``nan_round``,
    ``sleeper`` answers round ``sleep_round`` a second after the reply timeout."""

    def __init__(self, raising, nan, nan_round, sleeper, sleep_round):
        from clients.app import app

        self.app, self.raising, self.nan, self.nan_round = app, raising, nan, nan_round
        self.sleeper, self.sleep_round = sleeper, sleep_round

    def __call__(self, msg, context):
        partition = context.node_config["partition-id"]
        server_round = int(msg.content["config"]["server-round"])
        train = msg.metadata.message_type == MessageType.TRAIN
        reply = self.app(msg, context)
        if not train:
            return reply
        if partition in self.raising:
            raise RuntimeError(f"partition {partition} crashed mid-round")
        if partition == self.nan and server_round == self.nan_round:
            arrays = reply.content[ARRAYS]
            key = sorted(arrays.keys())[0]
            value = arrays[key].numpy().copy()
            value.flat[0] = np.nan
            arrays[key] = Array(value)
        if partition == self.sleeper and server_round == self.sleep_round:
            time.sleep(TIMEOUT + 1.0)
        return reply


@pytest.mark.slow
def test_crashes_nan_and_a_straggler_are_tolerated_and_counted(tmp_path):
    config = FedMoEConfig(num_server_rounds=2, run_dir=str(tmp_path / "run"),
                          reply_timeout=TIMEOUT, min_train_replies=4)
    hostile = HostileClients(raising={0, 4, 7}, nan=2, nan_round=1, sleeper=5, sleep_round=2)
    run = run_inline(config, 10, client_app=hostile)
    rounds = run.results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["failures"] for r in rounds] == [
        {"error": 3, "timeout": 0, "invalid": 1},
        {"error": 3, "timeout": 1, "invalid": 0},
    ]
    assert all(r["aggregated"] for r in rounds)
    assert any("NaN" in why for why in rounds[0]["rejected"])
    assert any("crashed mid-round" in why for why in rounds[0]["rejected"])
    assert any("no reply within reply-timeout=8s" in why for why in rounds[1]["rejected"])
    trained = [{c["client"] for c in r["clients"] if c["update_norm"] is not None}
               for r in rounds]
    assert [len(t) for t in trained] == [6, 6]
    for r in rounds:
        assert r["personalized_accuracy_mean"] is not None
        assert math.isfinite(r["personalized_accuracy_mean"])
        assert all(math.isfinite(c["update_norm"]) for c in r["clients"]
                   if c["update_norm"] is not None)
    # the crashed clients were charged (they trained): sent = spent on the server's side too
    rows = {p["client"]: p for p in run.results["privacy"]["clients"]}
    assert rows["partition-0"]["rounds"] == 2 and rows["partition-0"]["epsilon"] > 0
    assert run.results["final"]["personalized_accuracy_mean"] > 0.3


def test_too_few_valid_replies_keep_the_global_model(book, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy, arrays, sent = _first_round(book)
    strategy.config = strategy.config.replace(min_train_replies=2)
    good, bad = _reply(sent[0], arrays, fill=1.0), _reply(sent[1], arrays, fill=np.nan)
    aggregated, metrics = strategy.aggregate_train(1, [good, bad])
    record = strategy.history[-1]
    assert aggregated is None and metrics is None and not record.aggregated
    assert record.failures == {"error": 0, "timeout": 0, "invalid": 1}
    assert "min-train-replies=2: the global model stays as it was" in caplog.text


def test_missing_replies_count_as_timeouts(book):
    strategy, arrays, sent = _first_round(book, clients=3)
    aggregated, _ = strategy.aggregate_train(1, [_reply(sent[0], arrays, fill=1.0)])
    assert aggregated is not None
    assert strategy.history[-1].failures["timeout"] == 2


def test_the_server_stops_when_nodes_do_not_connect_and_says_why(book, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    config = SMALL.replace(min_available_clients=3, reply_timeout=1.5)
    strategy = FedMoE(config, book=book)
    start = time.monotonic()
    strategy.start(LocalGrid(2), initial(config), num_rounds=3)
    assert time.monotonic() - start < 10
    assert strategy.stop_reason == ("only 2 of min-available-clients=3 nodes connected within "
                                    "reply-timeout=1.5s")
    assert "waiting for nodes to connect: 2 of min-available-clients=3 connected" in caplog.text
    assert strategy.history == [] or not strategy.history[-1].train


def test_min_train_replies_above_the_clients_is_refused_before_anything_starts(tmp_path):
    from simulations.runner import preflight

    config = FedMoEConfig(min_train_replies=4, run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="min-train-replies=4 exceeds --clients 3"):
        preflight(config, 3)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="min-train-replies=4 exceeds the 3 simulated"):
        run_inline(config, 3)


@pytest.fixture
def book(tmp_path):
    with LedgerBook(tmp_path / "server" / LEDGER_FILE) as b:
        yield b
