"""The ClientApp's handlers, called the way the engine calls them."""

import sqlite3

import pytest
from flwr.app import MessageType

from clients.app import app
from clients.state import ClientStore
from fedmoe.models import model_for
from fedmoe.privacy import LEDGER_FILE, LedgerBook, epsilon
from fedmoe.records import (
    ARRAYS,
    BUDGET_EXCEEDED,
    CLIENT,
    DELTA_TOO_LARGE,
    LEDGER_UNUSABLE,
    METRICS,
    ClientInfo,
    EvalReport,
    TrainReport,
)
from fedmoe.roles import FEDERATED_ROLES, Role, split_state_dict, tensor_roles
from tests.helpers import SMALL, context, message, train_plan


def report_of(reply) -> TrainReport:
    assert not reply.has_error(), reply.error
    return TrainReport.from_record(reply.content.metric_records[METRICS])


def test_train_reply_carries_only_shared_and_gate_arrays_and_no_loss():
    reply = app(message(), context())
    assert not reply.has_error(), reply.error
    keys = set(reply.content.array_records[ARRAYS].keys())
    roles = tensor_roles(model_for(SMALL))
    assert keys == {k for k, r in roles.items() if r in FEDERATED_ROLES}
    assert not any(roles[k] is Role.LOCAL for k in keys)
    assert not any("local_experts" in k for k in keys)
    report = report_of(reply)
    assert report.epsilon > 0 and report.num_examples > 0 and report.steps == 4
    # only documented clear-text metrics leave the client
    assert set(reply.content.metric_records[METRICS]) == {"num-examples", "epsilon", "steps"}


def test_client_trains_exactly_the_planned_steps_and_charges_them(tmp_path):
    plan = train_plan(sigma=1.5)
    plan = type(plan)(1, 1.5, 0.25, 7, 1e-4, "rdp")  # 7 steps: not a whole number of epochs
    report = report_of(app(message(plan=plan), context(state_dir=str(tmp_path))))
    assert report.steps == 7
    assert report.epsilon == pytest.approx(epsilon([(1.5, 0.25, 7)], 1e-4), rel=1e-12)


def test_local_experts_persist_and_epsilon_composes(tmp_path):
    ctx = context(state_dir=str(tmp_path))
    first = report_of(app(message(server_round=1), ctx))
    store = ClientStore(tmp_path)
    local_after_1 = store.load_local()
    assert local_after_1 and all(k.startswith(("moe.local_experts.", "prior."))
                                 for k in local_after_1)
    assert {"prior.log_prior", "prior.counts", "prior.noise"} <= set(local_after_1)
    second = report_of(app(message(server_round=2), ctx))
    assert second.epsilon > first.epsilon
    with store.book("partition-0") as book:
        assert [e.server_round for e in book.get("partition-0").entries] == [1, 2]
    local_after_2 = store.load_local()
    assert any(not (local_after_2[k] == local_after_1[k]).all() for k in local_after_1)


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_state_dir_of_another_client_id_is_refused_and_left_as_it_is(tmp_path, kind):
    """The same state dir (the same data) under a new client-id would open a fresh budget
    beside the recorded spend: refused, naming the id it had, nothing written."""
    report_of(app(message(server_round=1), context(state_dir=str(tmp_path))))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    renamed = context(state_dir=str(tmp_path), client_id="hospital-b")
    reply = app(message(kind, server_round=2), renamed)
    assert reply.has_error()
    assert "client-id='partition-0'" in reply.error.reason
    assert "'hospital-b'" in reply.error.reason
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_client_refuses_a_round_over_its_own_budget_even_if_the_server_asks(tmp_path):
    # The node operator's budget (tighter than the run's) wins.
    ctx = context(state_dir=str(tmp_path), epsilon_budget=0.5)
    reply = app(message(sigma=0.6), ctx)
    assert reply.has_error() and reply.error.code == BUDGET_EXCEEDED
    assert "over this client's budget 0.500" in reply.error.reason
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        assert book.get("partition-0").entries == []  # refused: nothing charged
    assert ClientStore(tmp_path).load_local() is None  # and nothing trained
    # a round it can afford is charged to the same on-disk ledger
    assert not app(message(sigma=8.0), ctx).has_error()
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        assert len(book.get("partition-0").entries) == 1


def test_without_state_dir_each_run_gets_its_own_temp_folder(tmp_path):
    app(message(), context())  # conftest points the temp dir at tmp_path
    assert (tmp_path / "fedmoe-state" / "run-1" / "partition-0" / LEDGER_FILE).exists()


def test_ledger_kept_at_another_delta_or_accountant_is_refused(tmp_path):
    ctx = context(state_dir=str(tmp_path))
    assert not app(message(), ctx).has_error()  # ledger now at δ=1e-4, rdp
    plan = train_plan(server_round=2, delta=1e-5)
    reply = app(message(plan=plan), ctx)
    assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
    assert "δ=0.0001" in reply.error.reason and "cannot be mixed" in reply.error.reason
    prv = type(plan)(2, plan.noise_multiplier, plan.sample_rate, plan.steps, 1e-4, "prv")
    reply = app(message(plan=prv), ctx)
    assert reply.has_error() and "'rdp'" in reply.error.reason
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        assert len(book.get("partition-0").entries) == 1  # neither was charged


def test_tampered_or_overspent_ledger_refuses(tmp_path):
    ctx = context(state_dir=str(tmp_path / "a"))
    app(message(server_round=1), ctx)
    app(message(server_round=2), ctx)
    db = sqlite3.connect(tmp_path / "a" / LEDGER_FILE)
    db.execute("DELETE FROM charge WHERE seq = 1")  # "forget" a round
    db.commit()
    reply = app(message(server_round=3), ctx)
    assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
    assert "damaged" in reply.error.reason and "restored from a backup" in reply.error.reason
    # over-spent: the operator lowered the budget below the spend; nothing more is accepted
    ctx = context(state_dir=str(tmp_path / "b"))
    app(message(server_round=1), ctx)
    reply = app(message(server_round=2),
                context(state_dir=str(tmp_path / "b"), epsilon_budget=0.01))
    assert reply.has_error() and reply.error.code == BUDGET_EXCEEDED


def test_unreadable_ledger_is_kept_and_the_client_refuses(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("not a database")
    reply = app(message(), context(state_dir=str(tmp_path)))
    assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
    assert "restored from a backup" in reply.error.reason
    assert (tmp_path / LEDGER_FILE).read_text() == "not a database"
    assert ClientStore(tmp_path).load_local() is None  # it did not train


def test_query_reports_client_id_size_budget_and_history(tmp_path):
    ctx = context(state_dir=str(tmp_path), client_id="hospital-a", epsilon_budget=3.0)
    info = ClientInfo.from_record(app(message(MessageType.QUERY), ctx).content.config_records[CLIENT])
    assert info.client == "hospital-a" and info.num_train > 100 and info.epsilon_budget == 3.0
    assert info.history == () and info.ledger_delta == 0
    app(message(sigma=2.5), ctx)
    info = ClientInfo.from_record(app(message(MessageType.QUERY), ctx).content.config_records[CLIENT])
    assert info.history == ((2.5, 0.25, 4),)
    assert (info.ledger_delta, info.ledger_accountant) == (1e-4, "rdp")


def test_evaluate_reports_personalised_and_global_accuracy(tmp_path):
    ctx = context(state_dir=str(tmp_path))
    app(message(), ctx)
    reply = app(message(kind=MessageType.EVALUATE), ctx)
    report = EvalReport.from_record(reply.content.metric_records[METRICS])
    assert 0 <= report.personalized_accuracy <= 1 and 0 <= report.global_accuracy <= 1
    assert report.epsilon > 0 and report.num_examples > 0
    assert not reply.content.array_records  # evaluation sends no arrays back
    assert split_state_dict(model_for(SMALL), {Role.LOCAL}).keys() == ClientStore(tmp_path).load_local().keys()


def test_client_refuses_a_round_plan_whose_delta_is_not_below_one_over_n(tmp_path):
    """Whatever the server plans: δ ≥ 1/n for the client's own train set is refused before
    the ledger is touched."""
    from fedmoe.data import load_client_data
    from fedmoe.records import RoundPlan

    n = len(load_client_data(SMALL, 0, 3).train)
    for delta in (0.5, 1 / n):
        plan = RoundPlan(1, 2.0, 0.25, 4, delta, "rdp")
        reply = app(message(plan=plan), context(state_dir=str(tmp_path)))
        assert reply.has_error() and reply.error.code == DELTA_TOO_LARGE
        assert f"{n} training examples" in reply.error.reason
        assert "partition-0" in reply.error.reason
    assert not (tmp_path / LEDGER_FILE).exists()
    ok = RoundPlan(1, 2.0, 0.25, 4, 0.99 / n, "rdp")
    assert not app(message(plan=ok), context(state_dir=str(tmp_path))).has_error()


def test_query_declares_the_largest_train_and_test_split_of_the_run(tmp_path):
    from fedmoe.data import load_client_data

    config = SMALL
    ctx = context(state_dir=str(tmp_path))
    reply = app(message(MessageType.QUERY, config=config), ctx)
    info = ClientInfo.from_record(reply.content.config_records[CLIENT])
    data = load_client_data(config, 0, 3)
    assert (info.num_train, info.num_test) == (len(data.train), len(data.test))
