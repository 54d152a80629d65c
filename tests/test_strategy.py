"""The FedMoE strategy: discovery and planning, budget-aware sampling, the server ledger,
the clean stop, reply validation and aggregation — against real in-process ClientApps."""

import sqlite3

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from fedmoe.models import model_for
from fedmoe.privacy import LEDGER_FILE, LedgerBook, LedgerEntry, LedgerError, epsilon
from fedmoe.records import ARRAYS, BUDGET_EXCEEDED, METRICS, TrainReport, to_arrays
from fedmoe.roles import split_state_dict
from server.strategy import FedMoE
from tests.helpers import SMALL, LocalGrid

SMALL_ENTRY = LedgerEntry(1, 2.0, 0.25, 4)


@pytest.fixture
def book(tmp_path):
    with LedgerBook(tmp_path / "server" / LEDGER_FILE) as b:
        yield b


def initial(config=SMALL) -> ArrayRecord:
    return to_arrays(split_state_dict(model_for(config)))


def train_round(strategy, grid, server_round, arrays=None):
    messages = list(strategy.configure_train(server_round, arrays or initial(), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    return messages, strategy.aggregate_train(server_round, replies)


def test_calibrated_plan_spends_the_budget_exactly_over_the_planned_rounds(book):
    grid = LocalGrid(3)
    strategy = FedMoE(SMALL, book=book)
    result = strategy.start(grid, initial(), num_rounds=SMALL.num_server_rounds + 2)
    # 3 planned rounds, then nobody can afford a 4th: a clean stop, not empty rounds
    assert [r.server_round for r in strategy.history] == [1, 2, 3]
    assert "no client can afford round 4" in strategy.stop_reason
    assert all(r.sampled == 3 and len(r.train) == 3 and not r.mismatches for r in strategy.history)
    assert len(strategy.history[-1].evaluate) == 3  # the last round was still evaluated
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    for client, plan in strategy.plans.items():
        spent = book.get(client).spent()
        assert plan.rounds_allowed == 3
        assert SMALL.target_epsilon - 0.01 <= spent <= SMALL.target_epsilon
        assert plan.delta < 1 / plan.num_train
        # independent recomputation from the parameters sent
        assert spent == pytest.approx(epsilon([plan.entry(1).segment] * 3, plan.delta))
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert len(queries) == 3  # each client queried once, before its first round


def test_given_noise_multiplier_reports_rounds_allowed_and_stops_early(book):
    config = SMALL.replace(noise_multiplier=2.0, target_epsilon=2.0, num_server_rounds=6)
    strategy = FedMoE(config, book=book)
    strategy.start(LocalGrid(2), initial(config), num_rounds=6)
    allowed = {p.rounds_allowed for p in strategy.plans.values()}
    assert allowed == {len(strategy.history)} and 0 < allowed.pop() < 6
    for client in strategy.plans:
        assert book.get(client).spent() <= config.target_epsilon


def test_client_budget_from_node_config_is_respected_by_the_server(book):
    grid = LocalGrid(2, node_configs={1: {"epsilon_budget": 1.0}})
    strategy = FedMoE(SMALL, book=book)
    strategy.start(grid, initial(), num_rounds=3)
    assert strategy.plans["partition-1"].budget == 1.0
    assert book.get("partition-1").spent() <= 1.0 < book.get("partition-0").spent()
    assert not any(r.rejected for r in strategy.history)  # the server never asked too much


def test_server_charges_on_send_and_flags_a_mismatching_report(book):
    grid = LocalGrid(2)
    strategy = FedMoE(SMALL, book=book)
    messages = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    charged = {c: book.get(c).spent() for c in strategy.plans}
    assert all(e > 0 for e in charged.values())  # before any reply
    replies = grid.send_and_receive(messages)
    replies[0].content.metric_records[METRICS]["epsilon"] = 0.001  # a client under-reports
    strategy.aggregate_train(1, replies)
    mismatches = strategy.history[-1].mismatches
    assert list(mismatches) == [strategy.clients[replies[0].metadata.src_node_id]]
    ours, theirs = next(iter(mismatches.values()))
    assert theirs == 0.001 and ours == pytest.approx(next(iter(charged.values())), rel=1e-9)


def test_refusal_is_a_failed_reply_and_the_client_gets_no_more_rounds(book, tmp_path):
    # partition-1's own ledger was over-spent elsewhere: the server does not know it
    grid = LocalGrid(2, node_configs={1: {"state_dir": str(tmp_path / "c1")}})
    with LedgerBook(tmp_path / "c1" / LEDGER_FILE) as client_book:
        client_book.open("partition-1", budget=4.0, delta=1e-4, accountant="rdp")
    strategy = FedMoE(SMALL, book=book)
    strategy.discover(grid, grid.get_node_ids(), 1)
    # the operator lowers the client's budget after the query
    db = sqlite3.connect(tmp_path / "c1" / LEDGER_FILE)
    db.execute("UPDATE ledger SET budget = 0.1")
    db.commit()
    grid.contexts[11].node_config["epsilon-budget"] = 0.1
    _, (arrays, metrics) = train_round(strategy, grid, 1)
    record = strategy.history[-1]
    assert list(record.train) == ["partition-0"] and metrics["num-clients"] == 1
    assert any(r.startswith("partition-1:") and "over this client's budget" in r
               for r in record.rejected)
    assert "partition-1" in strategy.excluded
    sent, _ = train_round(strategy, grid, 2, arrays)
    assert [m.metadata.dst_node_id for m in sent] == [10]


def test_refusal_error_codes_exclude_but_a_crash_does_not(book):
    grid = LocalGrid(2)
    strategy = FedMoE(SMALL, book=book)
    messages = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    refused = Message(Error(code=BUDGET_EXCEEDED, reason="over budget"), reply_to=messages[0])
    crashed = Message(Error(code=0, reason="ClientApp exception"), reply_to=messages[1])
    assert strategy.aggregate_train(1, [refused, crashed]) == (None, None)
    assert list(strategy.excluded) == [strategy.clients[messages[0].metadata.dst_node_id]]


def test_a_later_node_is_queried_and_planned_when_it_appears(book):
    grid = LocalGrid(3)
    late = grid.contexts.pop(12)
    strategy = FedMoE(SMALL, book=book)
    train_round(strategy, grid, 1)
    grid.contexts[12] = late
    sent, _ = train_round(strategy, grid, 2)
    assert len(sent) == 3 and "partition-2" in strategy.plans


def test_earlier_spend_reported_by_a_client_is_seeded_and_planned_around(book, tmp_path):
    state = tmp_path / "c0"
    with LedgerBook(state / LEDGER_FILE) as client_book:
        client_book.open("partition-0", budget=4.0, delta=1e-4, accountant="rdp")
        client_book.charge("partition-0", SMALL_ENTRY)
        before = client_book.get("partition-0").spent()
    grid = LocalGrid(1, node_configs={0: {"state_dir": str(state)}})
    strategy = FedMoE(SMALL.replace(min_available_clients=1), book=book)
    strategy.start(grid, initial(), num_rounds=3)
    plan = strategy.plans["partition-0"]
    assert plan.prior == (SMALL_ENTRY.segment,) and plan.rounds_allowed == 3
    server, client = book.get("partition-0"), LedgerBook(state / LEDGER_FILE).get("partition-0")
    assert server.history == client.history and len(server.entries) == 4
    assert before < server.spent() <= SMALL.target_epsilon
    assert not any(r.mismatches for r in strategy.history)


def test_reused_run_folder_with_another_accountant_is_a_clear_error(book):
    book.open("partition-0", budget=4.0, delta=1e-4, accountant="prv")
    with pytest.raises(LedgerError, match="cannot be mixed"):
        FedMoE(SMALL, book=book)


def test_aggregate_is_weighted_mean_and_drops_bad_replies(book):
    grid = LocalGrid(2)
    strategy = FedMoE(SMALL, book=book)
    arrays = initial()
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))[0]

    def reply(values, num_examples=10, **metrics):
        report = TrainReport(num_examples=num_examples, epsilon=0.5, steps=4).to_record()
        for k, v in metrics.items():
            report[k] = v
        record = ArrayRecord({k: Array(v) for k, v in values.items()})
        return Message(RecordDict({ARRAYS: record, METRICS: report}), reply_to=sent)

    def state(fill):
        return {k: np.full(a.shape, fill, dtype=np.float32) for k, a in arrays.items()}

    local = state(100.0) | {"moe.local_experts.0.fc1.bias": np.zeros(64, np.float32)}
    nan = state(100.0)
    nan["head.bias"][0] = np.nan
    bad_shape = state(100.0) | {"head.bias": np.zeros(3, np.float32)}
    replies = [reply(state(1.0), 30), reply(state(3.0), 10), reply(local), reply(nan),
               reply(bad_shape), reply(state(100.0), epsilon=float("inf"))]
    aggregated, metrics = strategy.aggregate_train(1, replies)
    assert set(aggregated.keys()) == set(arrays.keys())
    for value in aggregated.values():
        np.testing.assert_allclose(value.numpy(), 1.0 * 0.75 + 3.0 * 0.25, rtol=1e-6)
    assert metrics["num-clients"] == 1  # both good replies came from the same client here
    reasons = " | ".join(strategy.history[-1].rejected)
    assert "extra ['moe.local_experts.0.fc1.bias']" in reasons
    assert "NaN" in reasons and "shape (3,)" in reasons and "finite number" in reasons
