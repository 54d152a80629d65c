"""Methods (fedmoe.methods): role assignments asserted on real ClientApp replies, and the
non-private mode (target-epsilon = inf) of every method."""

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from clients.app import app
from clients.state import ClientStore
from fedmoe.config import METHODS, ConfigError, FedMoEConfig
from fedmoe.methods import METHOD_SPECS, MLPClassifier, method_model
from fedmoe.privacy import LEDGER_FILE, plan_client
from fedmoe.records import ARRAYS, BUDGET_EXCEEDED, METRICS, RoundPlan, TrainReport, to_arrays
from fedmoe.roles import Role, split_state_dict, tensor_roles
from fedmoe.training import train_plain_round
from tests.helpers import SMALL, context, message

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config_for(method: str, **keys) -> FedMoEConfig:
    return SMALL.replace(method=method, **keys)


def train_reply(method: str, tmp_path, **keys):
    config = config_for(method, **keys)
    reply = app(message(config=config, arrays=to_arrays(split_state_dict(method_model(config)))),
                context(state_dir=str(tmp_path)))
    assert not reply.has_error(), reply.error
    return config, reply


def all_arrays(reply) -> dict:
    return {k: a for record in reply.content.array_records.values() for k, a in record.items()}


def test_registry_covers_every_method_key():
    assert set(METHOD_SPECS) == set(METHODS)


def test_local_reply_carries_no_arrays_and_keeps_everything(tmp_path):
    config, reply = train_reply("local", tmp_path)
    assert all_arrays(reply) == {}
    kept = ClientStore(tmp_path).load_local()
    assert set(kept) == set(method_model(config).state_dict())


def test_fedavg_has_no_local_tensor_and_sends_the_whole_model(tmp_path):
    config, reply = train_reply("fedavg", tmp_path)
    model = method_model(config)
    assert Role.LOCAL not in set(tensor_roles(model).values())
    assert set(all_arrays(reply)) == set(model.state_dict())
    assert ClientStore(tmp_path).load_local() == {}


def test_fedper_head_never_leaves_the_client(tmp_path):
    config, reply = train_reply("fedper", tmp_path)
    sent = set(all_arrays(reply))
    assert sent == {"body.weight", "body.bias", "centre.shift"}  # the body reads x - μ
    kept = ClientStore(tmp_path).load_local()
    assert set(kept) == {"head.weight", "head.bias"}
    # a second round restores the trained head from disk, not a fresh one
    second = app(message(config=config, server_round=2,
                         arrays=to_arrays(split_state_dict(method_model(config)))),
                 context(state_dir=str(tmp_path)))
    assert not second.has_error()
    assert not torch.equal(ClientStore(tmp_path).load_local()["head.weight"], kept["head.weight"])


def test_fedmoe_keeps_its_local_experts(tmp_path):
    config, reply = train_reply("fedmoe", tmp_path)
    sent = set(all_arrays(reply))
    assert sent and not any("local_experts" in k for k in sent)


def test_mlp_width_sets_the_parameter_count():
    # in -> width -> 10 on 64 features: 64 w + w + 10 w + 10 parameters
    # (+ 64: the learned mean μ with feature-centring)
    for width in (64, 256):
        for centring in (False, True):
            model = method_model(FedMoEConfig(method="fedavg", mlp_width=width,
                                              feature_centring=centring))
            assert isinstance(model, MLPClassifier)
            assert sum(p.numel() for p in model.parameters()) == 75 * width + 10 + 64 * centring
    assert sum(p.numel() for p in method_model(FedMoEConfig(
        method="fedavg", mlp_width=64, feature_centring=False)).parameters()) == 4810  # 64-64-10


def test_baselines_refuse_models_they_cannot_stand_in_for():
    with pytest.raises(ConfigError, match="method 'fedavg'.*model 'tmoe'"):
        FedMoEConfig(method="fedavg", model="tmoe")
    with pytest.raises(ConfigError, match="method must be one of"):
        FedMoEConfig(method="fedprox")


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field(payload: int) -> int:
    """Protobuf wire size of one length-delimited field (tag < 16): tag, length, payload."""
    return 1 + _varint_len(payload) + payload


def test_upload_bytes_are_the_serialised_arrays(tmp_path):
    """The strategy's figure equals the protobuf size of the arrays record, computed here
    from the wire format's rules around np.save's bytes of every array (independent):
    ArrayRecord{repeated Item{key, Array{dtype, packed shape, stype, data}}}."""
    from fedmoe.privacy import LedgerBook
    from server.strategy import FedMoE
    from tests.helpers import LocalGrid

    config = config_for("fedavg", num_server_rounds=1)
    with LedgerBook(tmp_path / "ledger.sqlite") as book:
        strategy = FedMoE(config, book=book)
        strategy.start(LocalGrid(2), to_arrays(split_state_dict(method_model(config))), 1)
    total = 0
    for key, tensor in method_model(config).state_dict().items():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        shape = sum(_varint_len(d) for d in tensor.shape)
        array = (_field(len("float32")) + (_field(shape) if shape else 0)
                 + _field(len("numpy.ndarray")) + _field(len(buffer.getvalue())))
        total += _field(_field(len(key)) + _field(array))
    assert set(strategy.history[0].upload_bytes.values()) == {total}


# ------------------------------------------------------------------ non-private mode
def test_non_private_plan_has_no_noise_and_no_ledger_entry():
    plan = plan_client(FedMoEConfig(target_epsilon=math.inf), "c", num_train=500,
                       budget=math.inf)
    assert plan.noise_multiplier == 0 and not plan.private
    assert plan.rounds_allowed == FedMoEConfig().num_server_rounds


def test_non_private_round_charges_nothing_and_reports_infinite_epsilon(tmp_path):
    config = config_for("fedavg", target_epsilon=math.inf)
    plan = RoundPlan(1, 0.0, 0.25, 4, 0.0, "rdp")
    reply = app(message(config=config, plan=plan,
                        arrays=to_arrays(split_state_dict(method_model(config)))),
                context(state_dir=str(tmp_path)))
    assert not reply.has_error(), reply.error
    report = TrainReport.from_record(reply.content.metric_records[METRICS])
    assert report.epsilon == math.inf and report.steps == 4
    assert not (tmp_path / LEDGER_FILE).exists()


def test_client_with_own_budget_refuses_a_non_private_round(tmp_path):
    config = config_for("fedavg", target_epsilon=math.inf)
    reply = app(message(config=config, plan=RoundPlan(1, 0.0, 0.25, 4, 0.0, "rdp"),
                        arrays=to_arrays(split_state_dict(method_model(config)))),
                context(state_dir=str(tmp_path), epsilon_budget=2.0))
    assert reply.has_error() and reply.error.code == BUDGET_EXCEEDED
    assert "non-private" in reply.error.reason


def test_plain_round_is_sgd_on_the_batch_mean_loss():
    """Oracle: q = 1 puts every example in every batch; the plain round must then be
    exactly full-batch SGD on the mean cross-entropy, with no clipping and no noise."""
    torch.manual_seed(3)
    x, y = torch.randn(40, 64) * 5, torch.randint(0, 10, (40,))  # large gradients: no clip
    model = MLPClassifier(64, 16, 10)
    oracle = MLPClassifier(64, 16, 10)
    oracle.load_state_dict(model.state_dict())
    train_plain_round(model, torch.utils.data.TensorDataset(x, y), steps=3, sample_rate=1.0,
                      learning_rate=0.1)
    opt = torch.optim.SGD(oracle.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(oracle(x)[0], y).backward()
        opt.step()
    for a, b in zip(model.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_non_private_run_is_labelled_and_leaves_the_ledger_empty(tmp_path):
    from fedmoe.privacy import LedgerBook
    from simulations.inline import run_inline

    config = config_for("fedper", target_epsilon=math.inf, num_server_rounds=1,
                        run_dir=str(tmp_path / "run"))
    run = run_inline(config, 2)
    assert run.results["privacy"]["mode"] == "non-private"
    assert {c["epsilon"] for c in run.results["final"]["clients"]} == {math.inf}
    with LedgerBook(tmp_path / "run" / LEDGER_FILE) as book:
        assert book.clients() == []
    for path in (tmp_path / "run" / "clients").rglob(LEDGER_FILE):  # the clients' own
        with LedgerBook(path) as book:
            assert book.clients() == []
