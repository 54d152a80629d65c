"""The expert switch (``expert-noise-limit``): when a client's DP noise scale ν = σ/(q·n)
is above the limit, its MoE part is off, frozen (never clipped, noised or changed) and the
model is the shared scores with the label prior; the decision is taken once and kept."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.models import build_model
from fedmoe.models.layers import decide_experts, expert_switches
from fedmoe.privacy.plan import gradient_noise_scale
from fedmoe.records import RoundPlan
from fedmoe.roles import Role, merge_state_dict, split_state_dict
from fedmoe.training import train_dp_round


def test_noise_scale_is_sigma_over_expected_batch():
    # σ C added to a sum of q n clipped gradients, divided by q n: σ/(q n) in units of C
    assert gradient_noise_scale(2.0, 0.1, 150) == pytest.approx(2.0 / 15.0)
    assert gradient_noise_scale(0.0, 0.5, 10) == 0.0  # non-private round
    for bad in [(-1.0, 0.1, 10), (1.0, 0.0, 10), (1.0, 1.5, 10), (1.0, 0.1, 0)]:
        with pytest.raises(ValueError):
            gradient_noise_scale(*bad)


def test_switch_off_is_scores_plus_prior_and_frozen():
    torch.manual_seed(0)
    model = build_model("lmoe")
    x = torch.randn(5, 64)
    assert decide_experts(model, noise_scale=0.3, limit=0.1) is False
    assert all(not p.requires_grad for p in model.moe.parameters())
    assert model.trunk.weight.requires_grad
    training, aux = model(x)  # while training: the scores + prior, and the scale's pair
    assert torch.allclose(training.logits, model.prior(model.trunk(x)))
    assert torch.equal(aux, torch.zeros(5))
    model.eval()
    logits, _ = model(x)  # predicting: the scaled scores + prior
    assert torch.allclose(logits, model.prior(model.scale(model.trunk(x))))


def test_switch_on_at_or_below_the_limit_runs_the_experts():
    torch.manual_seed(0)
    model = build_model("lmoe")
    assert decide_experts(model, noise_scale=0.1, limit=0.1) is True
    x = torch.randn(5, 64)
    z = model.trunk(x)
    m, _ = model.moe(z)
    assert torch.allclose(model(x)[0].logits, model.prior(z + m))
    model.eval()
    assert torch.allclose(model(x)[0], model.prior(model.scale(z + m)))
    assert all(p.requires_grad for p in model.parameters())


def test_decision_is_local_state_taken_once():
    model = build_model("lmoe")
    decide_experts(model, noise_scale=1.0, limit=0.1)
    local = split_state_dict(model, {Role.LOCAL})
    assert local["switch.state"].item() == 0.0
    assert "switch.state" not in split_state_dict(model)  # never released
    fresh = build_model("lmoe")
    merge_state_dict(fresh, local, {Role.LOCAL})
    # a later, smaller noise scale does not flip a decision already taken
    assert decide_experts(fresh, noise_scale=0.0, limit=0.1) is False
    assert not any(p.requires_grad for p in fresh.moe.parameters())


def test_models_without_a_switch_are_untouched():
    model = build_model("moe")
    assert expert_switches(model) == []
    assert decide_experts(model, noise_scale=10.0, limit=0.0) is None
    assert all(p.requires_grad for p in model.parameters())


def test_dp_sgd_leaves_a_switched_off_moe_bit_identical():
    """Frozen experts are outside DP-SGD: no clipping share, no noise, no change; the
    trunk does train (the oracle: the parameters before and after)."""
    torch.manual_seed(1)
    model = build_model("lmoe")
    decide_experts(model, noise_scale=1.0, limit=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(40, 64), torch.randint(0, 10, (40,)))
    train_dp_round(model, data, steps=3, sample_rate=0.25, noise_multiplier=1.0,
                   max_grad_norm=1.0, learning_rate=0.5, grad_sample_mode="bookkeeping")
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("moe."):
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["trunk.weight"], before["trunk.weight"])


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan, 2e6])
def test_limit_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="expert-noise-limit"):
        FedMoEConfig.from_run_config({"expert-noise-limit": bad})


# ----------------------------------------------------------------- through the client app
from clients.app import app  # noqa: E402
from clients.state import ClientStore  # noqa: E402
from fedmoe.models import model_for  # noqa: E402
from fedmoe.records import ARRAYS, from_arrays  # noqa: E402
from tests.helpers import SMALL, context, message  # noqa: E402


@pytest.mark.parametrize("limit, on", [(0.0, False), (1e6, True)])
def test_client_decides_from_its_plan_and_releases_unchanged_frozen_experts(tmp_path, limit,
                                                                              on):
    config = SMALL.replace(model="lmoe", expert_noise_limit=limit, label_prior_share=0.0)
    torch.manual_seed(3)
    start = split_state_dict(model_for(config))
    from fedmoe.records import to_arrays
    plan = RoundPlan(1, 1.5, 0.25, 4, 1e-4, "rdp")
    reply = app(message(plan=plan, config=config, arrays=to_arrays(start)),
                context(state_dir=str(tmp_path)))
    assert not reply.has_error(), reply.error
    sent = from_arrays(reply.content.array_records[ARRAYS])
    moe_keys = [k for k in start if k.startswith("moe.")]
    assert moe_keys
    unchanged = all(torch.equal(sent[k], start[k]) for k in moe_keys)
    assert unchanged is (not on)
    assert not torch.equal(sent["trunk.weight"], start["trunk.weight"])
    assert ClientStore(tmp_path).load_local()["switch.state"].item() == float(on)
