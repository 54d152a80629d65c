"""The ClientApp's handlers, called the way the engine calls them."""

import pytest
from flwr.app import MessageType

from clients.app import BUDGET_EXCEEDED, app
from clients.state import ContextStore, DirectoryStore
from fedmoe.models import model_for
from fedmoe.privacy import LedgerError
from fedmoe.records import ARRAYS, METRICS, EvalReport, TrainReport
from fedmoe.roles import FEDERATED_ROLES, Role, split_state_dict, tensor_roles
from tests.helpers import SMALL, context, message


def test_train_reply_carries_only_shared_and_gate_arrays():
    ctx = context()
    reply = app(message(), ctx)
    assert not reply.has_error(), reply.error
    keys = set(reply.content.array_records[ARRAYS].keys())
    roles = tensor_roles(model_for(SMALL))
    assert keys == {k for k, r in roles.items() if r in FEDERATED_ROLES}
    assert not any(roles[k] is Role.LOCAL for k in keys)
    assert not any("local_experts" in k for k in keys)
    report = TrainReport.from_record(reply.content.metric_records[METRICS])
    assert report.epsilon > 0 and report.num_examples > 0 and report.steps == 4


def test_local_experts_persist_and_epsilon_composes():
    ctx = context()
    first = TrainReport.from_record(app(message(server_round=1), ctx).content.metric_records[METRICS])
    store = ContextStore(ctx)
    local_after_1 = store.load_local()
    assert local_after_1 and all(k.startswith("moe.local_experts.") for k in local_after_1)
    second = TrainReport.from_record(app(message(server_round=2), ctx).content.metric_records[METRICS])
    assert second.epsilon > first.epsilon
    assert len(store.load_ledger().entries) == 2
    local_after_2 = store.load_local()
    assert any(not (local_after_2[k] == local_after_1[k]).all() for k in local_after_1)


def test_client_refuses_a_round_over_its_own_budget(tmp_path):
    # The node operator's budget (tighter than the run's) wins; state on disk.
    ctx = context(state_dir=str(tmp_path), epsilon_budget=0.5)
    reply = app(message(sigma=0.6), ctx)
    assert reply.has_error() and reply.error.code == BUDGET_EXCEEDED
    assert "over this client's budget 0.500" in reply.error.reason
    assert DirectoryStore(tmp_path).load_ledger() is None  # refused: nothing charged
    assert DirectoryStore(tmp_path).load_local() is None
    # a round it can afford is charged to the same on-disk ledger
    assert not app(message(sigma=8.0), ctx).has_error()
    assert len(DirectoryStore(tmp_path).load_ledger().entries) == 1


def test_directory_store_is_write_ahead(tmp_path):
    ctx = context(state_dir=str(tmp_path))
    app(message(), ctx)
    ledger = DirectoryStore(tmp_path).load_ledger()
    assert [e.server_round for e in ledger.entries] == [1]
    assert DirectoryStore(tmp_path).load_local().keys() == split_state_dict(model_for(SMALL), {Role.LOCAL}).keys()


def test_evaluate_reports_personalised_and_global_accuracy():
    ctx = context()
    app(message(), ctx)
    reply = app(message(kind=MessageType.EVALUATE), ctx)
    report = EvalReport.from_record(reply.content.metric_records[METRICS])
    assert 0 <= report.personalized_accuracy <= 1 and 0 <= report.global_accuracy <= 1
    assert report.epsilon > 0 and report.num_examples > 0
    assert not reply.content.array_records  # evaluation sends no arrays back


def test_client_with_unreadable_ledger_refuses_to_train(tmp_path):
    (tmp_path / "privacy_ledger.json").write_text("not json")
    with pytest.raises(LedgerError, match="Training is refused"):
        app(message(), context(state_dir=str(tmp_path)))
    assert (tmp_path / "privacy_ledger.json").read_text() == "not json"
    assert DirectoryStore(tmp_path).load_local() is None  # it did not train
