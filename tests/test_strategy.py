"""The FedMoE strategy: discovery and planning, budget-aware sampling, the server ledger,
the clean stop, reply validation and aggregation — against real in-process ClientApps."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from fedmoe.models import model_for
from fedmoe.privacy import LEDGER_FILE, LedgerBook, LedgerEntry, LedgerError, epsilon
from fedmoe.records import (
    ARRAYS,
    BUDGET_EXCEEDED,
    METRICS,
    EvalReport,
    TrainReport,
    to_arrays,
)
from fedmoe.roles import split_state_dict
from server.strategy import FedMoE, RoundRecord
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
        # independent recomputation from the parameters sent: the label histogram (σ_h, one
        # q=1 step) with the first round, then three rounds of DP-SGD
        assert plan.prior_noise > 0
        sent = [(plan.prior_noise, 1.0, 1), *[plan.entry(1).segment] * 3]
        assert spent == pytest.approx(epsilon(sent, plan.delta))
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
    # the operator lowers the client's budget after the query: the server does not know
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


# ------------------------------------------------------------------ replies: dtypes, counts
def _first_round(book, clients=2):
    grid = LocalGrid(clients)
    strategy = FedMoE(SMALL, book=book)
    arrays = initial()
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    return strategy, arrays, sent


def _reply(sent, arrays, *, fill=1.0, dtype=np.float32, num_examples=10, steps=None):
    client_steps = steps if steps is not None else int(sent.content["config"]["steps"])
    report = TrainReport(num_examples=num_examples, epsilon=0.5, steps=client_steps)
    record = ArrayRecord({k: Array(np.full(a.shape, fill, dtype=dtype))
                          for k, a in arrays.items()})
    return Message(RecordDict({ARRAYS: record, METRICS: report.to_record()}), reply_to=sent)


@pytest.mark.parametrize("dtype", [np.int8, np.float64, np.float16, np.int32, np.uint8])
def test_reply_arrays_of_another_dtype_are_dropped_and_float32_stays_float32(book, dtype):
    strategy, arrays, sent = _first_round(book)
    good = _reply(sent[0], arrays, fill=1.0)
    bad = [_reply(sent[1], arrays, fill=3.0, dtype=dtype), _reply(sent[1], arrays, fill=5.0,
                                                                 dtype=dtype)]
    aggregated, _ = strategy.aggregate_train(1, [good, *bad])
    assert all(a.dtype == "float32" for a in aggregated.values())
    assert all(np.all(a.numpy() == 1.0) for a in aggregated.values())
    reasons = strategy.history[-1].rejected
    assert len(reasons) == 2 and all(f"dtype {np.dtype(dtype).name}" in r for r in reasons)


@pytest.mark.parametrize("claim", [10**12, "declared+1"])
def test_num_examples_above_the_declared_train_size_is_refused(book, claim):
    strategy, arrays, sent = _first_round(book)
    node = sent[1].metadata.dst_node_id
    declared = strategy.declared[strategy.clients[node]].num_train
    claimed = declared + 1 if claim == "declared+1" else claim
    honest = _reply(sent[0], arrays, fill=1.0, num_examples=10)
    inflated = _reply(sent[1], arrays, fill=100.0, num_examples=claimed)
    at_limit = _reply(sent[1], arrays, fill=2.0, num_examples=declared)
    aggregated, _ = strategy.aggregate_train(1, [honest, inflated, at_limit])
    weight = declared / (10 + declared)  # only the honest and the at-limit reply count
    for value in aggregated.values():
        np.testing.assert_allclose(value.numpy(), 1.0 * (1 - weight) + 2.0 * weight, rtol=1e-6)
    [reason] = strategy.history[-1].rejected
    assert f"num-examples={claimed}" in reason and f"[1, {declared}]" in reason


def test_steps_other_than_planned_are_refused(book):
    strategy, arrays, sent = _first_round(book)
    planned = int(sent[0].content["config"]["steps"])
    aggregated, _ = strategy.aggregate_train(1, [_reply(sent[0], arrays, steps=planned + 1)])
    assert aggregated is None
    assert f"the round planned {planned}" in strategy.history[-1].rejected[0]


@pytest.mark.parametrize("field,value,match", [
    ("num_examples", "declared+1", "test set size it declared"),
    ("num_examples", 10**12, "test set size it declared"),
    ("personalized_accuracy", 1.5, r"outside \[0, 1\]"),
    ("global_accuracy", -0.1, r"outside \[0, 1\]"),
    ("global_loss", -1.0, "negative"),
])
def test_evaluate_counts_and_ranges_are_checked(book, field, value, match, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="flwr")  # other tests quieten Flower's logger
    strategy, arrays, sent = _first_round(book)
    messages = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), LocalGrid(2)))
    replies = LocalGrid(2).send_and_receive(messages)
    node = replies[0].metadata.src_node_id
    declared = strategy.declared[strategy.clients[node]].num_test
    record = replies[0].content.metric_records[METRICS]
    good = EvalReport.from_record(record)
    assert 0 < good.num_examples <= declared
    record[field.replace("_", "-")] = declared + 1 if value == "declared+1" else value
    metrics = strategy.aggregate_evaluate(1, replies)
    evaluated = strategy.history[-1].evaluate
    assert strategy.clients[node] not in evaluated and len(evaluated) == 1
    assert metrics is not None
    import re
    assert any(re.search(match, r.message) for r in caplog.records)


# ------------------------------------------------------------------ δ
def test_delta_not_below_one_over_n_excludes_the_client_before_any_charge(book):
    grid = LocalGrid(2)
    n = {}
    strategy = FedMoE(SMALL.replace(target_delta=0.5), book=book)
    strategy.start(grid, initial(), num_rounds=2)
    for node, client in strategy.clients.items():
        n[client] = strategy.declared[client].num_train
        assert client in strategy.excluded and "δ=0.5 is not below 1/n" in strategy.excluded[client]
        assert f"{n[client]} training examples" in strategy.excluded[client]
    assert strategy.plans == {} and book.clients() == []  # nothing planned, nothing charged
    assert "every client is excluded before round 1" in strategy.stop_reason
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]
    from fedmoe.reporting import build_results, privacy_rows

    results = build_results(strategy.config, strategy.history, 1.0,
                            privacy=privacy_rows(book, strategy.plans),
                            excluded=strategy.all_excluded())
    listed = {e["client"]: e["reason"] for e in results["excluded"]}
    assert listed == strategy.excluded and len(listed) == 2


def test_delta_check_is_per_client_and_exact_at_one_over_n(book):
    """δ = 1/n of the median client: it (δ = 1/n exactly) and every larger client are
    excluded, every smaller one is planned."""
    from fedmoe.data import load_client_data

    sizes = {f"partition-{i}": len(load_client_data(SMALL, i, 12).train) for i in range(12)}
    median = sorted(sizes.values())[6]
    grid = LocalGrid(12)
    strategy = FedMoE(SMALL.replace(target_delta=1 / median, min_available_clients=1),
                      book=book)
    strategy.discover(grid, grid.get_node_ids(), 1)
    assert {c: i.num_train for c, i in strategy.declared.items()} == sizes
    assert set(strategy.plans) == {c for c, n in sizes.items() if n < median}
    assert set(strategy.excluded) == {c for c, n in sizes.items() if n >= median}


# ------------------------------------------------------------------ ε from the server's ledger
def test_every_epsilon_reported_is_the_server_ledgers(book):
    grid = LocalGrid(2)
    strategy = FedMoE(SMALL, book=book)
    strategy.start(grid, initial(), num_rounds=2)
    for rec in strategy.history:
        ledger = {c: [e for r, e in book.trajectory(c) if r == rec.server_round][-1]
                  for c in strategy.plans}
        assert rec.epsilon == pytest.approx(ledger, rel=1e-12)


def test_the_final_epsilon_counts_rounds_charged_after_the_last_evaluation(book):
    """A round charged but never evaluated (interrupted after the charge, or with
    fraction-evaluate < 1) is spent: the final table and summary show the ledger's spend at
    the end, never the spend at a client's last evaluation."""
    from fedmoe.reporting import build_results, privacy_rows
    from simulations.runner import client_table

    grid = LocalGrid(2)
    strategy = FedMoE(SMALL, book=book)
    train_round(strategy, grid, 1)
    strategy._evaluate(1, initial(), grid, 60)
    evaluated = dict(strategy.history[-1].epsilon)
    train_round(strategy, grid, 2)  # charged and trained; the run stops before evaluating
    spent = {c: book.get(c).spent() for c in strategy.plans}
    assert all(spent[c] > evaluated[c] for c in spent)
    results = build_results(SMALL, strategy.history, 1.0,
                            privacy=privacy_rows(book, strategy.plans))
    final = {row["client"]: row for row in results["final"]["clients"]}
    assert {c: row["epsilon"] for c, row in final.items()} == pytest.approx(spent)
    assert results["final"]["epsilon_max"] == pytest.approx(max(spent.values()))
    assert all("client_epsilon" not in row for row in final.values())  # other rounds'
    # a round lost to an interrupt: charged by the ledger, no client replied
    lost = build_results(SMALL, [*strategy.history, RoundRecord(3, epsilon=dict(spent))], 1.0,
                         privacy=privacy_rows(book, strategy.plans))["rounds"][-1]
    assert lost["clients"] == [] and lost["epsilon_max"] == pytest.approx(max(spent.values()))
    from io import StringIO

    from rich.console import Console
    console = Console(file=StringIO(), width=200)
    console.print(client_table(results))
    assert all(f"{e:.3f}" in console.file.getvalue() for e in spent.values())


def test_reports_show_the_ledgers_epsilon_when_clients_report_less(book):
    """Clients with a fresh state each round (as in a reused run folder) report ε of one
    round; every report shows the server's composed ε and the client's beside it."""
    from fedmoe.reporting import build_results, privacy_rows
    from simulations.runner import ProgressListener, client_table

    grid = LocalGrid(2)
    strategy = FedMoE(SMALL, book=book)
    for r in (1, 2):
        for ctx in grid.contexts.values():  # forget the clients' own ledgers
            ctx.node_config["state-dir"] = str(book.path.parent / f"fresh-{r}-{ctx.node_id}")
        train_round(strategy, grid, r)
        strategy._evaluate(r, initial(), grid, 60)
    last = strategy.history[-1]
    server = {c: book.get(c).spent() for c in strategy.plans}
    assert last.epsilon == pytest.approx(server)
    results = build_results(SMALL, strategy.history, 1.0,
                            privacy=privacy_rows(book, strategy.plans),
                            excluded=strategy.all_excluded())
    for row in results["rounds"][-1]["clients"]:
        assert row["epsilon"] == pytest.approx(server[row["client"]])
        assert row["client_epsilon"] < row["epsilon"]
    assert results["final"]["epsilon_max"] == pytest.approx(max(server.values()))
    assert results["rounds"][-1]["epsilon_max"] == pytest.approx(max(server.values()))

    from io import StringIO

    from rich.console import Console
    console = Console(file=StringIO(), width=200)
    listener = ProgressListener(console)
    listener.started(SMALL, book.path.parent)
    listener.round_finished(last)
    status = listener.progress.tasks[0].fields["status"]
    listener.progress.stop()
    reported = max(e.epsilon for e in last.evaluate.values())
    assert f"ε max {max(server.values()):.2f} (clients report {reported:.2f})" in status
    console.print(client_table(results))
    table = console.file.getvalue()
    for row in results["final"]["clients"]:
        assert f"{row['epsilon']:.3f} (client {row['client_epsilon']:.3f})" in table


def test_prv_settings_it_cannot_price_exclude_clients_and_the_server_stays_up(book):
    config = SMALL.replace(accountant="prv", noise_multiplier=0.05, sample_rate=0.1)
    grid = LocalGrid(2)
    strategy = FedMoE(config, book=book)
    strategy.start(grid, initial(config), num_rounds=2)
    assert set(strategy.excluded) == {"partition-0", "partition-1"}
    for reason in strategy.excluded.values():
        assert "PRV accountant would need a grid" in reason and "accountant='rdp'" in reason
    assert "every client is excluded" in strategy.stop_reason
    assert not [m for m in grid.sent if m.metadata.message_type == "train"]


@pytest.mark.parametrize("field,value", [
    ("num-train", 0), ("num-test", -1), ("epsilon-budget", float("inf")),
    ("epsilon-budget", -1.0), ("ledger-delta", 1.5), ("ledger-delta", -1e-4),
    ("ledger-accountant", "gdp"),
])
def test_query_reply_numbers_out_of_range_are_refused(field, value):
    from fedmoe.records import ClientInfo, ReplyError

    record = ClientInfo("c", 100, 0.0, num_test=20).to_record()
    record[field] = value
    with pytest.raises(ReplyError, match="out of range"):
        ClientInfo.from_record(record)


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_the_released_model_is_the_moving_average_of_the_global_models(book, gamma):
    """ema-decay γ: every evaluation and the run's final model are w̄_t (w̄_1 = w_1, w̄_t =
    γ w̄_{t-1} + (1 − γ) w_t, recomputed here in float64 from the aggregated models), while
    each train round starts from the last global model w_{t-1}; γ = 0 releases w_t."""
    config = SMALL.replace(ema_decay=gamma)
    strategy = FedMoE(config, book=book)
    trained, sent_train, sent_eval = [], [], []
    aggregate, configure_train, configure_evaluate = (
        strategy._aggregate, strategy.configure_train, strategy.configure_evaluate)

    def numpy(arrays):
        return {k: a.numpy().copy() for k, a in arrays.items()}

    def spy_aggregate(valid):
        out = aggregate(valid)
        trained.append(numpy(out))
        return out

    def spy_train(server_round, arrays, *args):
        sent_train.append(numpy(arrays))
        return configure_train(server_round, arrays, *args)

    def spy_evaluate(server_round, arrays, *args):
        sent_eval.append(numpy(arrays))
        return configure_evaluate(server_round, arrays, *args)

    strategy._aggregate, strategy.configure_train = spy_aggregate, spy_train
    strategy.configure_evaluate = spy_evaluate
    result = strategy.start(LocalGrid(3), initial(config), num_rounds=config.num_server_rounds)
    rounds = config.num_server_rounds
    assert len(trained) == len(sent_eval) == rounds == 3
    average = {k: v.astype(np.float64) for k, v in trained[0].items()}
    for t in range(rounds):
        if t:
            average = {k: gamma * average[k] + (1 - gamma) * trained[t][k].astype(np.float64)
                       for k in average}
            for key in trained[t]:  # training goes on from the last global model
                np.testing.assert_array_equal(sent_train[t][key], trained[t - 1][key])
        for key in average:
            np.testing.assert_allclose(sent_eval[t][key], average[key], rtol=1e-6, atol=1e-7)
            assert sent_eval[t][key].dtype == trained[t][key].dtype
    final = numpy(result.arrays)
    for key in average:
        np.testing.assert_allclose(final[key], average[key], rtol=1e-6, atol=1e-7)
    moved = any(not np.allclose(final[k], trained[-1][k]) for k in final)
    assert moved == (gamma > 0)


def test_the_phase_switch_follows_the_round_that_made_the_arrays(book):
    """tmoe, 2 pretraining rounds: fine-tuning starts from the released (averaged)
    pretrained model with no momentum or average — in round 3, or in round 4 when round 3
    was lost to a crash (resume_point lists it, not aggregated) — and, once switched,
    later rounds train from the arrays as they are."""
    from server.strategy import RoundRecord

    config = SMALL.replace(model="tmoe", num_server_rounds=6, pretrain_rounds=2,
                           ema_decay=0.5)
    w = {"a": np.ones((2,), np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in w.items()})
    for lost in (False, True):
        strategy = FedMoE(config, book=book)
        strategy.history = [RoundRecord(1, aggregated=True), RoundRecord(2, aggregated=True)]
        strategy.average, strategy.velocity = {"a": np.full(2, 0.25)}, {"a": np.full(2, 3.0)}
        assert strategy.begin_phase(2, arrays) is arrays  # still pretraining
        first = 3
        if lost:
            strategy.history.append(RoundRecord(3))  # charged, never finished
            first = 4
        out = strategy.begin_phase(first, arrays)
        np.testing.assert_array_equal(out["a"].numpy(), np.full(2, 0.25, np.float32))
        assert out["a"].numpy().dtype == np.float32
        assert not strategy.average and not strategy.velocity
        strategy.history.append(RoundRecord(first))  # not aggregated either (no replies)
        assert strategy.begin_phase(first + 1, out) is out  # idempotent after the switch
        strategy.history.append(RoundRecord(first + 1, aggregated=True))
        strategy.average = {"a": np.full(2, 7.0)}
        assert strategy.begin_phase(first + 2, out) is out and strategy.average


def test_progress_is_a_line_per_round_where_the_output_is_not_a_terminal():
    """Under nohup, a service manager or a pipe a progress bar is drawn once, at the end:
    there each finished round prints its own line."""
    from io import StringIO

    from rich.console import Console

    from simulations.runner import ProgressListener

    for terminal in (False, True):
        console = Console(file=StringIO(), width=200, force_terminal=terminal)
        listener = ProgressListener(console)
        listener.started(SMALL, Path("run"))
        for r in (1, 2):
            listener.round_finished(RoundRecord(server_round=r, sampled=3,
                                                epsilon={"partition-0": 0.5 * r}))
        listener.progress.stop()
        out = console.file.getvalue()
        lines = [line for line in out.splitlines() if line.startswith("round ")]
        if terminal:  # the bar: no line of its own per round
            assert "round 1/3 ·" not in out and "round 2/3 ·" not in out
        else:
            assert lines == [f"round {r}/{SMALL.num_server_rounds} · clients 0/3 trained · "
                             f"ε max {0.5 * r:.2f} · not evaluated" for r in (1, 2)]
