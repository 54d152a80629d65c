"""``fedmoe deploy check``: a data holder's node config, data and state dir checked against a
run before its SuperNode starts. The oracle is the real first query: the server's
discovery of the same node (ClientApp query handler, then the server's planning) must
plan it the same way, or refuse or exclude it for the same reason."""

import os

import numpy as np
import pytest

from clients.app import Refusal, app
from clients.check import check_node
from fedmoe.cli import main
from fedmoe.config import ConfigError, FedMoEConfig, NodeSettings
from fedmoe.privacy import LEDGER_FILE, LedgerBook, epsilon
from fedmoe.privacy.ledger import LedgerEntry
from server.strategy import FedMoE
from tests.helpers import LocalGrid

RUN_TEXT = "dataset='node' num-features=3 num-classes=2 num-server-rounds=5"
RUN = FedMoEConfig(dataset="node", num_features=3, num_classes=2, num_server_rounds=5)


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(150) % 2
    x = rng.normal(size=(150, 3)) + y[:, None]
    path = tmp_path / "org.csv"
    rows = [",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x, y)]
    path.write_text("a,b,c,label\n" + "\n".join(rows) + "\n")
    return path


def node_config(data_file, tmp_path, **extra):
    return {"client-id": "org-0", "data-path": str(data_file),
            "state-dir": str(tmp_path / "state"), **extra}


def first_query(config, node_conf, tmp_path):
    """What the server makes of the node in a real run: its plan, exclusion or refusal."""
    grid = LocalGrid(1, node_configs={0: node_conf})
    with LedgerBook(tmp_path / "server" / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        strategy.discover(grid, [10], 1)
    return strategy


def spend(state_dir, rounds, delta=1e-4, budget=8.0):
    """A ledger that has spent ``rounds`` rounds of σ=1, q=0.1, 10 steps."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with LedgerBook(state_dir / LEDGER_FILE) as book:
        book.open("org-0", budget=budget, delta=delta, accountant="rdp")
        for r in range(1, rounds + 1):
            book.charge("org-0", LedgerEntry(r, 1.0, 0.1, 10))


@pytest.mark.parametrize("extra,earlier", [
    ({}, 0),                                              # a fresh node
    ({"epsilon-budget": 3.0, "delta": 1e-5, "accountant": "rdp"}, 0),  # its own pins
    ({"delta": 1e-4, "accountant": "rdp"}, 3),            # earlier runs' spend
])
def test_the_check_plans_the_node_as_the_servers_first_query_does(data_file, tmp_path, extra,
                                                                   earlier):
    conf = node_config(data_file, tmp_path, **extra)
    if earlier:
        spend(tmp_path / "state", earlier)
    before = sorted(os.listdir(tmp_path))
    found = check_node(RUN, NodeSettings.from_node_config(conf))
    assert sorted(os.listdir(tmp_path)) == before  # nothing created (no state dir made)
    server = first_query(RUN, conf, tmp_path)
    assert found.plan == server.plans["org-0"] and found.excluded is None
    assert (found.num_train, found.num_test) == (server.declared["org-0"].num_train,
                                                 server.declared["org-0"].num_test)
    assert found.rounds == RUN.num_server_rounds
    budget = min(RUN.target_epsilon, extra.get("epsilon-budget", RUN.target_epsilon))
    # σ is calibrated to spend the budget over the planned rounds, earlier spend included
    assert 0.95 * budget <= found.epsilon_after() <= budget
    if earlier:
        assert found.spent == pytest.approx(epsilon([(1.0, 0.1, 10 * earlier)], 1e-4))
        assert found.plan.prior and not found.plan.prior_noise  # no second histogram


def test_a_node_whose_budget_is_spent_is_excluded_for_the_servers_reason(data_file, tmp_path):
    conf = node_config(data_file, tmp_path, **{"epsilon-budget": 2.0})
    spend(tmp_path / "state", 40, budget=100.0)
    found = check_node(RUN, NodeSettings.from_node_config(conf))
    server = first_query(RUN, conf, tmp_path)
    assert found.excluded == server.excluded["org-0"]
    assert "exceeds its budget" in found.excluded and found.rounds == 0
    assert main(["deploy", "check", "--node-config", _flwr(conf), "--run-config", RUN_TEXT]) == 1


@pytest.mark.parametrize("extra,earlier,code,says", [
    ({"delta": 0.1}, 0, "DELTA_TOO_LARGE", "is not below 1/n"),
    ({"delta": 1e-5, "accountant": "rdp"}, 1, "LEDGER_UNUSABLE", "pins δ=1e-05"),  # at 1e-4
    # the state dir of org-0 under a new name: a fresh budget for the same data
    ({"client-id": "org-9"}, 1, "LEDGER_UNUSABLE", "Give this node the client-id it had "
                                                   "(client-id='org-0')"),
])
def test_a_node_that_would_refuse_the_run_is_refused_for_the_query_handlers_reason(
        data_file, tmp_path, extra, earlier, code, says):
    conf = node_config(data_file, tmp_path, **extra)
    if earlier:
        spend(tmp_path / "state", earlier)
    with pytest.raises(Refusal) as refused:
        check_node(RUN, NodeSettings.from_node_config(conf))
    server = first_query(RUN, conf, tmp_path)
    assert refused.value.reason == server.failed_nodes[10] and says in refused.value.reason
    from fedmoe import records
    assert refused.value.code == getattr(records, code)
    assert main(["deploy", "check", "--node-config", _flwr(conf), "--run-config", RUN_TEXT]) == 2


def test_a_damaged_ledger_is_refused_and_left_as_it_is(data_file, tmp_path):
    import sqlite3

    conf = node_config(data_file, tmp_path)
    spend(tmp_path / "state", 2)
    db = sqlite3.connect(tmp_path / "state" / LEDGER_FILE)
    db.execute("DELETE FROM charge WHERE seq = 1")
    db.commit()
    db.close()
    content = (tmp_path / "state" / LEDGER_FILE).read_bytes()
    with pytest.raises(Refusal, match="damaged"):
        check_node(RUN, NodeSettings.from_node_config(conf))
    assert (tmp_path / "state" / LEDGER_FILE).read_bytes() == content


@pytest.mark.parametrize("run,conf,says", [
    (RUN.replace(num_features=4), {}, "the run's model takes 4"),
    (RUN, {"data-path": "/nonexistent/org.csv"}, "no such file"),
    (RUN, {"state-dir": "FILE/sub"}, "is a file, not a folder"),
])
def test_unusable_data_or_state_dir_is_one_clear_error(data_file, tmp_path, run, conf, says):
    conf = node_config(data_file, tmp_path) | {
        k: v.replace("FILE", str(data_file)) for k, v in conf.items()}
    with pytest.raises(ConfigError, match=says):
        check_node(run, NodeSettings.from_node_config(conf))


def test_the_command_prints_the_plan_and_what_should_not_be_left_so(data_file, tmp_path,
                                                                    capsys):
    big = tmp_path / "big.csv"
    rows = data_file.read_text().splitlines()
    big.write_text("\n".join([rows[0]] + [f"{r.split(',')[0]},500{i}," + ",".join(
        r.split(",")[2:]) for i, r in enumerate(rows[1:])]) + "\n")
    conf = {"client-id": "org-0", "data-path": str(big)}  # no state dir, nothing pinned
    run = RUN_TEXT + " ema-decay=0.99"
    assert main(["deploy", "check", "--node-config", _flwr(conf), "--run-config", run]) == 0
    out, err = capsys.readouterr()
    assert "client org-0: 120 train / 30 test examples; no state dir" in out
    assert "pays for 5 of the run's 5 rounds; ε after the run" in out
    assert "no state-dir" in err and "not both pinned" in err and "feature-bounds" in err
    assert "ema-decay=0.99" in err  # the run config's own warnings too
    # with bounds that hold every value (b: 5000 to 500149) the scale warning goes
    assert main(["deploy", "check", "--node-config", _flwr(conf), "--run-config",
                 run + " feature-bounds='-1000:600000'"]) == 0
    assert "feature-bounds" not in capsys.readouterr().err
    # a malformed node config is named as such
    assert main(["deploy", "check", "--node-config", "client-id=org"]) == 2
    assert "--node-config 'client-id=org': cannot read client-id=org" in capsys.readouterr().err


def _flwr(conf: dict) -> str:
    """A node config dict as the ``--node-config`` text a SuperNode is started with."""
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in conf.items())


def test_the_query_handler_still_answers_and_refuses_as_before(tmp_path):
    """The handler's body moved into :func:`clients.app.describe_client`."""
    from flwr.app import MessageType

    from fedmoe.records import CLIENT, DELTA_TOO_LARGE, ClientInfo
    from tests.helpers import context, message

    reply = app(message(MessageType.QUERY), context(state_dir=str(tmp_path / "a")))
    info = ClientInfo.from_record(reply.content.config_records[CLIENT])
    assert info.client == "partition-0" and info.num_train > 0 and info.history == ()
    reply = app(message(MessageType.QUERY), context(state_dir=str(tmp_path / "b"), delta=0.5))
    assert reply.has_error() and reply.error.code == DELTA_TOO_LARGE


def test_a_deployments_server_app_logs_the_run_configs_warnings(monkeypatch, caplog):
    """`fedmoe simulate` prints them before it starts; in a deployment the ServerApp, which
    reads the run config Flower passes, logs them (flwr log)."""
    import logging

    from flwr.app import Context, RecordDict

    import server.app

    monkeypatch.setattr(server.app, "run_federation", lambda *args, **kwargs: None)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"ema-decay": 0.99, "num-server-rounds": 20})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        server.app.make_server_app()(None, context)
    assert any("fedmoe: warning: ema-decay=0.99" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        server.app.make_server_app()(None, Context(run_id=1, node_id=0, node_config={},
                                                   state=RecordDict(), run_config={}))
    assert not caplog.records
