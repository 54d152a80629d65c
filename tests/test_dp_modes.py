"""DP-SGD steps in Opacus' hooks and ghost-clipping modes and fedmoe's one-backward
book-keeping mode, dense and sparse dispatch: the same clipped update for every model, the
planned noise scale, and an empty batch's noise-only step in every mode."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe.privacy import make_private
from fedmoe.training import per_sample_loss
from tests.test_models import CASES, naive_per_sample_grads


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["moe", "lmoe", "hmoe", "mtmoe", "tmoe-pretrain",
                                  "tmoe-finetune"])
def test_ghost_clipping_gives_the_same_update_as_hooks(name, dispatch):
    model, (x, y), _, _ = CASES[name]("linear", dispatch)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    updated = {}
    for mode in ("hooks", "ghost"):
        replica = copy.deepcopy(model)
        private = make_private(replica, TensorDataset(x, y), sample_rate=0.5,
                               noise_multiplier=0.0, max_grad_norm=0.05, learning_rate=1.0,
                               mode=mode)
        private.step(lambda m: per_sample_loss(m, x, y), len(x))
        private.close()
        updated[mode] = dict(replica.named_parameters())
    moved = 0
    for n, p in updated["hooks"].items():
        assert torch.allclose(p, updated["ghost"][n], atol=1e-10), n
        moved += int(not torch.equal(p, dict(model.named_parameters())[n]))
    assert moved > 0  # the step did something


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["moe", "lmoe", "hmoe", "mtmoe", "tmoe-pretrain",
                                  "tmoe-finetune"])
def test_bookkeeping_gives_the_same_update_as_hooks_with_one_backward(name, dispatch):
    """Linear, sparse experts and embeddings by their direct rules, LayerNorm through its
    materialised per-sample gradients: all against Opacus' hooks mode."""
    model, (x, y), _, _ = CASES[name]("linear", dispatch)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    updated = {}
    for mode, clip in (("hooks", 0.05), ("bookkeeping", 0.05), ("hooks-unclipped", 1e6),
                       ("bookkeeping-unclipped", 1e6)):
        replica = copy.deepcopy(model)
        private = make_private(replica, TensorDataset(x, y), sample_rate=0.5,
                               noise_multiplier=0.0, max_grad_norm=clip, learning_rate=1.0,
                               mode=mode.split("-")[0])
        private.step(lambda m: per_sample_loss(m, x, y), len(x))
        private.close()
        updated[mode] = dict(replica.named_parameters())
    for n, p in updated["hooks"].items():
        assert torch.allclose(p, updated["bookkeeping"][n], atol=1e-10), n
        assert torch.allclose(updated["hooks-unclipped"][n],
                              updated["bookkeeping-unclipped"][n], atol=1e-10), n


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["moe", "lmoe", "tmoe-pretrain", "tmoe-finetune"])
def test_bookkeeping_update_equals_a_naive_clip_and_sum(name, dispatch):
    """An oracle with no Opacus and no book-keeping: each sample's gradient by its own
    backward pass, clipped to C as Opacus does, averaged over B, one SGD step."""
    model, (x, y), _, _ = CASES[name]("linear", dispatch)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    clip, lr = 0.05, 1.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = naive_per_sample_grads(model, x, y)
    expected = {n: torch.zeros_like(p) for n, p in before.items()}
    for g in grads:
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n, v in g.items():
            expected[n] += factor * v
    private = make_private(model, TensorDataset(x, y), sample_rate=1.0, noise_multiplier=0.0,
                           max_grad_norm=clip, learning_rate=lr, mode="bookkeeping")
    private.step(lambda m: per_sample_loss(m, x, y), len(x))
    private.close()
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] - lr * expected[n] / len(x), atol=1e-10), n


def test_bookkeeping_noise_has_the_planned_scale():
    """Zero gradients: one step's update is pure noise, std = lr·σ·C / E[B]."""
    model = torch.nn.Linear(400, 250)
    torch.nn.init.zeros_(model.weight)
    data = TensorDataset(torch.zeros(200, 400), torch.zeros(200))
    private = make_private(model, data, sample_rate=0.1, noise_multiplier=1.3,
                           max_grad_norm=0.7, learning_rate=1.0, mode="bookkeeping")
    x = torch.zeros(20, 400)
    private.step(lambda m: m(x).sum(dim=1) * 0, len(x))
    private.close()
    update = -model.weight.detach().flatten()
    assert update.std().item() == pytest.approx(1.3 * 0.7 / 20, rel=0.02)


class Scaled(nn.Module):
    """A layer type Opacus has no grad sampler for."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("model,match", [
    (nn.Sequential(nn.Linear(3, 3), Scaled()), r"\['Scaled'\] has none.*'hooks'"),
    (nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Linear(3, 2)),
     r"\['Embedding'\] with padding_idx.*'hooks'"),
])
def test_bookkeeping_refuses_layers_it_cannot_handle(model, match):
    data = TensorDataset(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=match):
        make_private(model, data, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                     learning_rate=1.0, mode="bookkeeping")


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_empty_batch_is_a_noise_only_step(mode, dispatch):
    model, (x, y), _, _ = CASES["moe"]("linear", dispatch)
    model = model.float()
    private = make_private(model, TensorDataset(x.float(), y), sample_rate=0.5,
                           noise_multiplier=1.0, max_grad_norm=1.0, learning_rate=1.0, mode=mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    empty_x, empty_y = x[:0].float(), y[:0]
    losses = private.step(lambda m: per_sample_loss(m, empty_x, empty_y), 0)
    private.close()
    assert losses.shape == (0,)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unknown_mode_is_refused():
    model, (x, y), _, _ = CASES["moe"]()
    with pytest.raises(ValueError, match="grad-sample mode must be one of"):
        make_private(model, TensorDataset(x.float(), y), sample_rate=0.5, noise_multiplier=1.0,
                     max_grad_norm=1.0, learning_rate=1.0, mode="functorch")
