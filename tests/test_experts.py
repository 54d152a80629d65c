"""Sparse expert dispatch against dense-masked dispatch and a naive per-sample loop:
outputs, per-sample gradients (hooks) and per-sample norms (ghost clipping), including the
adversarial case where every expert receives exactly B rows, an unused expert and an
empty batch."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from torch import nn

from fedmoe.models.experts import (
    BLOCK_CELLS,
    DenseExperts,
    GroupedLinear,
    SparseExperts,
    grouped_linear_grad_sample,
    grouped_linear_norm_sample,
)
from fedmoe.models.layers import top_k_weights


class Mixture(nn.Module):
    """Router + expert bank, the unit under test; per-sample loss = ||y - target||²."""

    def __init__(self, bank: nn.Module, dim: int, num: int, top_k: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num)
        self.bank, self.top_k = bank, top_k

    def forward(self, x):
        _, weights = top_k_weights(self.router(x), self.top_k)
        return self.bank(x, weights)


def pair(num=4, dim=6, hidden=5, top_k=2, depth=1):
    """A dense and a sparse mixture with identical parameters, in float64."""
    torch.manual_seed(3)
    dense = Mixture(DenseExperts(num, dim, hidden, depth), dim, num, top_k).double()
    sparse = Mixture(SparseExperts(num, dim, hidden, depth), dim, num, top_k).double()
    with torch.no_grad():
        sparse.router.load_state_dict(dense.router.state_dict())
        for e, expert in enumerate(dense.bank):
            for d_layer, s_layer in zip([expert.fc1, *expert.hidden, expert.fc2],
                                        [sparse.bank.fc1, *sparse.bank.hidden, sparse.bank.fc2],
                                        strict=True):
                s_layer.weight[e] = d_layer.weight.T
                s_layer.bias[e] = d_layer.bias
    return dense, sparse


def loss_per_sample(model, x, target):
    y = model(x)
    return ((y - target) ** 2).flatten(1).sum(-1)


def as_sparse_layout(dense_grads: dict, num: int, depth: int = 1) -> dict:
    """Per-sample grads of the dense bank, stacked into the sparse bank's parameter layout."""
    out = {"router.weight": dense_grads["router.weight"], "router.bias": dense_grads["router.bias"]}
    names = ["fc1", *[f"hidden.{i}" for i in range(depth - 1)], "fc2"]
    for name in names:
        out[f"bank.{name}.weight"] = torch.stack(
            [dense_grads[f"bank.{e}.{name}.weight"].transpose(-1, -2) for e in range(num)], dim=1)
        out[f"bank.{name}.bias"] = torch.stack(
            [dense_grads[f"bank.{e}.{name}.bias"] for e in range(num)], dim=1)
    return out


def naive(model, x, target):
    rows = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        loss_per_sample(model, x[i : i + 1], target[i : i + 1]).sum().backward()
        rows.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                     for n, p in model.named_parameters()})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def opacus_grads(model, x, target):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    loss_per_sample(gsm, x, target).mean().backward()
    out = {n.removeprefix("_module."): p.grad_sample.clone() for n, p in gsm.named_parameters()}
    gsm._close()
    model.zero_grad(set_to_none=True)
    return out


def ghost_norms(model, x, target):
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=1.0, use_ghost_clipping=True)
    loss_per_sample(gsm, x, target).mean().backward()
    norms = gsm.get_norm_sample()
    gsm._close()
    model.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("shape,top_k,depth", [((5, 6), 2, 1), ((4, 7, 6), 2, 1),
                                               ((3, 5, 6), 1, 2), ((4, 6), 4, 1)])
def test_sparse_equals_dense_and_naive(shape, top_k, depth):
    dense, sparse = pair(top_k=top_k, depth=depth)
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn_like(x)
    assert torch.allclose(dense(x), sparse(x), atol=1e-12)  # same forward
    oracle = naive(sparse, x, target)
    samples = opacus_grads(sparse, x, target)
    assert samples.keys() == oracle.keys()
    for name, value in samples.items():
        assert (value - oracle[name]).abs().max() < 1e-8, name
    from_dense = as_sparse_layout(opacus_grads(dense, x, target), 4, depth)
    for name, value in samples.items():
        assert (value - from_dense[name]).abs().max() < 1e-8, name


def test_every_expert_receiving_exactly_batch_size_rows_is_still_per_sample():
    """With top-k = E and one token per sample every expert gets exactly B rows: plain
    token routing then passes rows off as samples, silently. Ours reads B from ``ref``."""
    dense, sparse = pair(num=3, top_k=3)
    x = torch.randn(3, 6, dtype=torch.float64)  # B = 3 = E
    target = torch.randn_like(x)
    oracle, samples = naive(sparse, x, target), opacus_grads(sparse, x, target)
    for name, value in samples.items():
        assert (value - oracle[name]).abs().max() < 1e-8, name


def test_unused_expert_gets_exact_zero_per_sample_gradient():
    _, sparse = pair(num=4, top_k=1)
    with torch.no_grad():
        sparse.router.bias[2] = -50.0
    x = torch.randn(6, 3, 6, dtype=torch.float64)
    samples = opacus_grads(sparse, x, torch.randn_like(x))
    assert samples["bank.fc1.weight"].shape == (6, 4, 6, 5)
    assert samples["bank.fc1.weight"][:, 2].abs().max() == 0
    assert samples["bank.fc2.bias"][:, 2].abs().max() == 0
    assert samples["bank.fc1.weight"][:, [0, 1, 3]].abs().sum() > 0


@pytest.mark.parametrize("shape", [(5, 6), (4, 7, 6)])
def test_ghost_norms_equal_the_norms_of_naive_per_sample_gradients(shape):
    _, sparse = pair(top_k=2, depth=2)
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn_like(x)
    oracle = naive(sparse, x, target)
    expected = torch.sqrt(sum((g.reshape(len(x), -1) ** 2).sum(-1) for g in oracle.values()))
    assert torch.allclose(ghost_norms(sparse, x, target), expected, rtol=1e-8)


def test_empty_batch_takes_a_noise_only_step():
    _, sparse = pair()
    sparse = sparse.float()
    gsm = GradSampleModule(sparse, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=4)
    x = torch.zeros(0, 3, 6)
    with torch.no_grad():
        assert sparse(x).shape == (0, 3, 6)
    loss_per_sample(gsm, x, torch.zeros_like(x)).sum().backward()
    assert gsm._module.bank.fc1.weight.grad_sample.shape == (0, 4, 6, 5)
    before = sparse.bank.fc1.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, sparse.bank.fc1.weight)  # noise was added
    gsm._close()


def test_sparse_and_dense_give_the_same_clipped_gradient():
    dense, sparse = pair(top_k=2)
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    target = torch.randn_like(x)
    grads = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                          max_grad_norm=0.5, expected_batch_size=len(x))
        loss_per_sample(gsm, x, target).mean().backward()
        opt.step()
        grads[name] = {n.removeprefix("_module."): p.grad.clone()[None]
                       for n, p in gsm.named_parameters()}
        gsm._close()
    converted = as_sparse_layout(grads["dense"], 4)
    for name, value in grads["sparse"].items():
        assert (value - converted[name]).abs().max() < 1e-10, name


@pytest.mark.parametrize("features,shuffle", [((2, 3), False), ((8, 8), False),
                                              ((6, 40), True)])
def test_grouped_linear_samplers_equal_a_naive_loop_over_uneven_cells(features, shuffle):
    """Cells of 0..11 rows over several padded blocks; (2, 3) takes the direct product,
    (6, 40) the Gram route for most blocks, (8, 8) both; shuffled rows take the sort."""
    torch.manual_seed(5)
    i, o = features
    batch, num = 40, 4
    assert num * batch > 2 * BLOCK_CELLS
    counts = torch.randint(0, 12, (num, batch))
    counts[1, :5] = 0  # some samples send expert 1 nothing
    experts = torch.arange(num).repeat_interleave(counts.sum(1))
    samples = torch.cat([torch.arange(batch).repeat_interleave(counts[e]) for e in range(num)])
    x = torch.randn(len(experts), i, dtype=torch.float64)
    g = torch.randn(len(experts), o, dtype=torch.float64)
    if shuffle:
        perm = torch.randperm(len(experts))
        experts, samples, x, g = experts[perm], samples[perm], x[perm], g[perm]
    layer = GroupedLinear(num, i, o).double()
    inputs = (x, experts, samples, torch.zeros(batch))
    grads = grouped_linear_grad_sample(layer, inputs, g)
    norms = grouped_linear_norm_sample(layer, inputs, g)
    expected_w = torch.zeros(batch, num, i, o, dtype=torch.float64)
    expected_b = torch.zeros(batch, num, o, dtype=torch.float64)
    for b in range(batch):
        for e in range(num):
            rows = (experts == e) & (samples == b)
            expected_w[b, e] = x[rows].T @ g[rows]
            expected_b[b, e] = g[rows].sum(0)
    assert torch.allclose(grads[layer.weight], expected_w, atol=1e-10)
    assert torch.allclose(grads[layer.bias], expected_b, atol=1e-10)
    assert torch.allclose(norms[layer.weight], expected_w.flatten(1).norm(dim=1), rtol=1e-10)
    assert torch.allclose(norms[layer.bias], expected_b.flatten(1).norm(dim=1), rtol=1e-10)
