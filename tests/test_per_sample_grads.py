"""Opacus per-sample gradients of the MoE against a naive one-sample-at-a-time oracle."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedmoe.models import build_model
from fedmoe.training import per_sample_loss

BALANCE = 0.05


def naive_per_sample_grads(model, x, y):
    """The oracle: backprop each sample alone, with no Opacus anywhere."""
    grads = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, x[i : i + 1], y[i : i + 1], BALANCE).sum().backward()
        grads.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for n, p in model.named_parameters()})
    return grads


def starve_expert(model, expert: int) -> None:
    """Make the router never pick ``expert``: a batch in which it receives no token."""
    with torch.no_grad():
        model.moe.gate.bias[expert] = -50.0


def opacus_grad_samples(model, x, y, mode):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    per_sample_loss(gsm, x, y, BALANCE).mean().backward()
    out = {n.removeprefix("_module."): p.grad_sample.detach().clone() for n, p in gsm.named_parameters()}
    gsm._close()
    return out


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_per_sample_grads_match_naive_loop(mode, top_k):
    model = build_model("moe-mlp", num_shared_experts=2, num_local_experts=2, top_k=top_k, hidden_dim=16,
                        expert_hidden_dim=8).double()
    starve_expert(model, 3)  # local expert 1 gets no token in this batch
    x, y = torch.randn(7, 64, dtype=torch.float64), torch.randint(0, 10, (7,))
    _, weights = model.moe.route(torch.relu(model.trunk(x)))
    assert (weights[:, 3] == 0).all(), "test setup: expert 3 must receive no token"

    oracle = naive_per_sample_grads(model, x, y)
    samples = opacus_grad_samples(model, x, y, mode)
    assert set(samples) == {n for n, _ in model.named_parameters()}
    for name, gs in samples.items():
        expected = torch.stack([g[name] for g in oracle])
        assert gs.shape == expected.shape, name
        assert (gs - expected).abs().max() < 1e-5, name
    starved = samples["moe.local_experts.1.fc1.weight"]
    assert starved.abs().max() == 0  # present, and exactly zero


def test_clipped_and_summed_gradient_matches_naive():
    model = build_model("moe-mlp", hidden_dim=16, expert_hidden_dim=8).double()
    starve_expert(model, 2)
    x, y = torch.randn(6, 64, dtype=torch.float64), torch.randint(0, 10, (6,))
    clip = 0.05  # small enough that every sample is clipped
    oracle = naive_per_sample_grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    norms = torch.stack([torch.sqrt(sum((g[n] ** 2).sum() for n in names)) for g in oracle])
    assert (norms > clip).all()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: sum(f * g[n] for f, g in zip(factors, oracle, strict=True)) / len(x) for n in names}

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=clip, expected_batch_size=len(x))
    per_sample_loss(gsm, x, y, BALANCE).mean().backward()
    opt.step()
    for n, p in gsm.named_parameters():
        assert (p.grad - expected[n.removeprefix("_module.")]).abs().max() < 1e-7, n
    gsm._close()


def test_balance_loss_is_per_sample():
    """A sample's loss must not depend on the rest of the batch (DP sensitivity bound)."""
    model = build_model("moe-mlp")
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    together = per_sample_loss(model, x, y, 1.0)
    alone = torch.cat([per_sample_loss(model, x[i : i + 1], y[i : i + 1], 1.0) for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-6)
