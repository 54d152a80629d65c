"""Per-sample gradient norms of ``nn.Linear`` and ``nn.Embedding`` without forming the
gradients, registered with Opacus in place of its own norm samplers.

Opacus' ghost clipping and fedmoe's book-keeping both read a layer type's norm sampler from
Opacus' registry, so registering these here changes both. Why not Opacus' (1.6) own:

- ``nn.Linear``: Opacus returns *no norm at all* for inputs of more than 3 dimensions
  (e.g. (B, L, H, D)): that layer would silently escape clipping. It always uses the Gram
  identity, even where forming the per-sample gradient is cheaper, and computes the
  gradient Gram twice. Here any input (B, ..., in) is flattened to (B, T, in) and each
  layer takes the cheaper route: ``||Σ_t a_t g_tᵀ||² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')``
  (cost T²·(in+out)) or the gradient itself (cost T·in·out).
- ``nn.Embedding``: Opacus deduplicates (sample, token id) pairs with
  ``torch.unique(dim=0)``, which on CPU runs a Python-speed loop (about a quarter of a
  ``tmoe`` book-keeping step). Here the pairs are one integer key each and deduplicated
  with the one-dimensional ``torch.unique``.

Both are tested against per-sample gradients from a naive per-sample loop.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn


@register_norm_sampler(nn.Linear)
def linear_norm_sample(layer: nn.Linear, activations, backprops):
    """Per-sample gradient norms of ``layer.weight`` and ``layer.bias``, each (B,)."""
    batch = backprops.shape[0]
    tokens = backprops.numel() // (batch * layer.out_features) if batch else 1
    g = backprops.reshape(batch, tokens, layer.out_features)  # (B, T, out)
    a = activations[0].to(g.dtype).reshape(batch, tokens, layer.in_features)  # (B, T, in)
    norms = {}
    if layer.weight.requires_grad:
        if tokens == 1:
            weight_sq = g.square().sum((1, 2)) * a.square().sum((1, 2))
        elif tokens * (layer.in_features + layer.out_features) <= (
                layer.in_features * layer.out_features):
            gram = torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
            weight_sq = gram.sum((1, 2))
        else:
            weight_sq = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
        norms[layer.weight] = weight_sq.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(dim=1).norm(dim=-1)
    return norms


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(layer: nn.Embedding, activations, backprops):
    """Per-sample gradient norm of ``layer.weight``, (B,): each sample's output-gradients
    summed per distinct token id, then ``sqrt(Σ_id ||Σ_{t: id_t = id} g_t||²)``."""
    ids = activations[0]
    batch = ids.shape[0]
    g = backprops.reshape(-1, layer.embedding_dim)
    samples = torch.arange(batch, device=ids.device).repeat_interleave(
        ids.numel() // batch if batch else 0)
    key = samples * layer.num_embeddings + ids.reshape(-1)
    unique, pair = torch.unique(key, return_inverse=True)
    summed = g.new_zeros(len(unique), layer.embedding_dim).index_add_(0, pair, g)
    weight_sq = g.new_zeros(batch).index_add_(
        0, torch.div(unique, layer.num_embeddings, rounding_mode="floor"),
        summed.square().sum(-1))
    return {layer.weight: weight_sq.sqrt()}
