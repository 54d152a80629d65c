"""``local-pull``: after each DP step every local expert moves a fraction of the way towards
its layer's average routed shared expert. Checked against the same average re-derived from
state-dict names, for every model and both expert layouts; shared, gate and always-on
tensors never move; and train_dp_round applies it after every step."""

import re

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmoe.models.layers import pull_local_experts
from fedmoe.training import train_dp_round
from tests.test_models import CASES

# <layer>.local_experts[.<i>].<rest>  and  <layer>.(shared_experts|groups.<g>)[.<j>].<rest>
LOCAL = re.compile(r"^(?P<layer>.*)\.local_experts\.(?:(?P<i>\d+)\.)?(?P<rest>(?:fc|hidden).*)$")


def expected_after_pull(state: dict, dispatch: str, fraction: float) -> dict:
    """The oracle: each local tensor lerped towards the mean of the matching shared ones."""
    out = dict(state)
    for name, value in state.items():
        match = LOCAL.match(name)
        if not match:
            continue
        layer, rest = re.escape(match["layer"]), re.escape(match["rest"])
        index = r"\.\d+" if dispatch == "dense" else ""
        shared = re.compile(rf"^{layer}\.(?:shared_experts|groups\.\d+){index}\.{rest}$")
        peers = [v for n, v in state.items() if shared.match(n)]
        assert peers, name
        stacked = torch.stack(peers) if dispatch == "dense" else torch.cat(peers)
        anchor = stacked.mean(0)
        out[name] = value + fraction * (anchor - value)
    return out


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["moe", "lmoe", "hmoe", "mtmoe", "tmoe-pretrain"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_pull_moves_only_local_experts_towards_the_shared_average(name, dispatch, fraction):
    model, _, _, _ = CASES[name]("linear", dispatch)
    model = model.double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pull_local_experts(model, fraction)
    after = dict(model.named_parameters())
    expected = expected_after_pull(before, dispatch, fraction)
    moved = [n for n in before if LOCAL.match(n)]
    assert moved  # the case has local experts
    for n, value in expected.items():
        assert torch.allclose(after[n], value, atol=1e-12), n
        if n not in moved or fraction == 0.0:
            assert torch.equal(after[n], before[n]), n


def test_train_dp_round_pulls_after_every_step():
    """With no gradient and no noise (lr 0), two steps at pull 0.5 leave a local tensor a
    quarter of the way from the shared average: anchor + 0.25 (old - anchor)."""
    model, (x, y), _, _ = CASES["moe"]("linear", "dense")
    model, x = model.double(), x.double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_dp_round(model, TensorDataset(x, y), steps=2, sample_rate=0.5, noise_multiplier=0.0,
                   max_grad_norm=1.0, learning_rate=0.0, grad_sample_mode="bookkeeping",
                   local_pull=0.5)
    expected = expected_after_pull(before, "dense", 0.75)
    for n, p in model.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-12), n
