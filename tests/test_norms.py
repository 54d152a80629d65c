"""fedmoe's ghost-norm samplers for nn.Linear and nn.Embedding (registered with Opacus in
place of its own) against the norms of per-sample gradients from a naive per-sample loop:
2-, 3- and 4-dimensional inputs, both the Gram and the direct route, frozen parameters,
repeated token ids, and the registry itself."""

import pytest
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from fedmoe.privacy.norms import embedding_norm_sample, linear_norm_sample


def naive_norms(layer: nn.Module, inputs: torch.Tensor, backprops: torch.Tensor) -> dict:
    """Per-parameter per-sample gradient norms of Σ <layer(x_b), backprops_b>, one sample
    at a time."""
    rows = []
    for b in range(len(inputs)):
        layer.zero_grad(set_to_none=True)
        (layer(inputs[b : b + 1]) * backprops[b : b + 1]).sum().backward()
        rows.append({p: p.grad.norm() for p in layer.parameters() if p.requires_grad})
    return {p: torch.stack([r[p] for r in rows]) for p in rows[0]}


@pytest.mark.parametrize("shape,features", [
    ((6, 5), (5, 4)),  # 2-D input
    ((6, 3, 5), (5, 40)),  # T·(in+out) <= in·out: Gram route
    ((6, 9, 3), (3, 2)),  # direct route
    ((4, 3, 2, 5), (5, 7)),  # 4-D input, which Opacus' own sampler leaves without a norm
])
def test_linear_norms_equal_a_naive_loop(shape, features):
    torch.manual_seed(0)
    layer = nn.Linear(*features).double()
    x = torch.randn(*shape, dtype=torch.float64)
    backprops = torch.randn(*shape[:-1], features[1], dtype=torch.float64)
    got = linear_norm_sample(layer, [x], backprops)
    for p, expected in naive_norms(layer, x, backprops).items():
        assert torch.allclose(got[p], expected, rtol=1e-10), p.shape


def test_linear_norms_skip_frozen_parameters():
    layer = nn.Linear(3, 2).double()
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    got = linear_norm_sample(layer, [x], torch.randn(4, 5, 2, dtype=torch.float64))
    assert list(got) == [layer.weight]


def test_embedding_norms_equal_a_naive_loop_with_repeated_ids():
    torch.manual_seed(1)
    layer = nn.Embedding(7, 4).double()
    ids = torch.tensor([[1, 1, 3, 1], [2, 0, 0, 6], [5, 5, 5, 5]])
    backprops = torch.randn(3, 4, 4, dtype=torch.float64)
    got = embedding_norm_sample(layer, [ids], backprops)
    expected = naive_norms(layer, ids, backprops)[layer.weight]
    assert torch.allclose(got[layer.weight], expected, rtol=1e-10)


def test_an_empty_batch_has_empty_norms():
    linear, embedding = nn.Linear(3, 2), nn.Embedding(5, 2)
    got = linear_norm_sample(linear, [torch.zeros(0, 4, 3)], torch.zeros(0, 4, 2))
    assert {p: n.shape for p, n in got.items()} == {linear.weight: (0,), linear.bias: (0,)}
    got = embedding_norm_sample(embedding, [torch.zeros(0, 4, dtype=torch.long)],
                                torch.zeros(0, 4, 2))
    assert got[embedding.weight].shape == (0,)


def test_fedmoe_samplers_are_the_registered_ones():
    import fedmoe.privacy  # noqa: F401  (importing the privacy package registers them)

    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    assert registry[nn.Linear] is linear_norm_sample
    assert registry[nn.Embedding] is embedding_norm_sample
