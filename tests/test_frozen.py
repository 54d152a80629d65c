"""Frozen parameters in every DP mode: a frozen tensor is neither clipped, noised nor
updated, and it does not count in a sample's gradient norm. Checked for every layer type
with a rule (Linear, Embedding, GroupedLinear, LayerNorm), weight and bias apart and whole
layers, in hooks, ghost and book-keeping modes, against the naive per-sample oracle."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmoe.privacy import make_private
from fedmoe.training import per_sample_loss
from tests.test_models import CASES, naive_per_sample_grads

#: Which tensors to freeze (name prefixes of the sparse Transformer-MoE's parameters).
FROZEN = {
    "embedding": ["tok_emb.weight"],
    "layernorm-weight": ["blocks.0.ln1.weight"],
    "layernorm-whole": ["blocks.0.ln2."],
    "linear-weight": ["blocks.0.attn.qkv.weight"],
    "linear-bias": ["blocks.0.attn.out.bias"],
    "linear-whole": ["blocks.0.moe.gate.proj."],
    "grouped-weight": ["blocks.0.moe.shared_experts.fc1.weight"],
    "grouped-bias": ["blocks.0.moe.local_experts.fc2.bias"],
    "grouped-whole": ["blocks.0.moe.shared_experts.fc2."],
    "mix": ["tok_emb.weight", "blocks.0.ln1.bias", "blocks.0.attn.qkv.bias",
            "blocks.0.moe.local_experts.fc1.weight", "blocks.0.moe.shared_experts.fc2.bias"],
}


def _naive_update(model, x, y, clip, lr):
    """Each sample's gradient by its own backward pass (frozen tensors: none), clipped to C,
    summed, averaged over B: the expected parameters after one noiseless step."""
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for g in naive_per_sample_grads(model, x, y):
        norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n, v in g.items():
            expected[n] -= lr * factor * v / len(x)
    return expected


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_frozen_tensors_are_skipped_in_every_mode(mode, frozen, phase):
    model, (x, y), _, _ = CASES[f"tmoe-{phase}"]("linear", "sparse")
    model = model.double()
    names = [n for n, _ in model.named_parameters()
             if any(n == f or (f.endswith(".") and n.startswith(f)) for f in FROZEN[frozen])]
    assert names, frozen
    for n, p in model.named_parameters():
        p.requires_grad_(n not in names)
    clip, lr = 0.05, 1.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _naive_update(model, x, y, clip, lr)
    replica = copy.deepcopy(model)
    private = make_private(replica, TensorDataset(x, y), sample_rate=1.0,
                           noise_multiplier=0.0, max_grad_norm=clip, learning_rate=lr,
                           mode=mode)
    private.step(lambda m: per_sample_loss(m, x, y), len(x))
    private.close()
    moved = 0
    for n, p in replica.named_parameters():
        assert torch.allclose(p, expected[n], atol=1e-10), n
        if n in names:
            assert torch.equal(p, before[n]), n
        moved += int(not torch.equal(p, before[n]))
    assert moved > 0


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_frozen_tensors_get_no_noise(mode):
    """With noise on, a frozen tensor stays exactly as it was; trainable ones move."""
    model, (x, y), _, _ = CASES["tmoe-pretrain"]("linear", "sparse")
    frozen = {"blocks.0.moe.shared_experts.fc1.weight", "tok_emb.weight", "blocks.0.ln1.bias",
              "blocks.0.attn.qkv.bias"}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    private = make_private(model, TensorDataset(x, y), sample_rate=1.0, noise_multiplier=1.0,
                           max_grad_norm=1.0, learning_rate=1.0, mode=mode)
    private.step(lambda m: per_sample_loss(m, x, y), len(x))
    private.close()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
