"""Banks of feed-forward experts, mixed by routing weights: dense-masked or sparse dispatch.

``bank(x, weights)`` returns ``Σ_e weights[..., e] · expert_e(x)`` for x (..., D) and
weights (..., E) that are zero for the experts a token was not routed to. Two layouts, one
contract (select with the run-config key ``dispatch``):

- :class:`DenseExperts` (``dense``): every expert runs on every token, built from
  ``nn.Linear`` only. E/k× the expert compute of sparse dispatch, exact per-sample
  gradients in every Opacus mode (hooks, functorch, ghost).
- :class:`SparseExperts` (``sparse``): only the (token, expert) pairs with a non-zero
  weight are computed, by :class:`GroupedLinear` layers (one weight slice per expert,
  rows grouped by expert). Opacus cannot infer per-sample gradients of dispatched rows —
  plain ``x[sel]``/``index_add`` routing gives silently *wrong* ones when an expert happens
  to receive exactly B rows — so :class:`GroupedLinear` has its own registered grad sampler
  and ghost-norm sampler. Each call passes a (B,) reference tensor as its *last* input,
  from which Opacus reads the batch size. Correct in Opacus' hooks and ghost modes; not in
  functorch mode (it would vmap over rows, not samples).

Both give the same output and the same per-sample gradients (tests/test_experts.py); the
parameters differ in layout (a ModuleList of experts vs stacked (E, ·, ·) weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.utils import register_norm_sampler
from torch import nn

from fedmoe.config import DISPATCHES


class Expert(nn.Module):
    """A feed-forward expert D -> H (-> H)*(depth-1) -> D with ReLU between layers."""

    def __init__(self, dim: int, hidden: int, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"expert depth must be >= 1, got {depth}")
        self.fc1 = nn.Linear(dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        h = F.relu(self.fc1(x))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.fc2(h)


class DenseExperts(nn.ModuleList):
    """E experts, each run on every token; non-chosen ones are weighted by exactly 0."""

    def __init__(self, num: int, dim: int, hidden: int, depth: int = 1) -> None:
        super().__init__(Expert(dim, hidden, depth) for _ in range(num))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.mix_many(x, [weights])[0]

    def mean_expert(self) -> dict[str, torch.Tensor]:
        """The parameters of the average expert, by name (empty for an empty bank)."""
        per_expert = [dict(expert.named_parameters()) for expert in self]
        return {name: torch.stack([p[name] for p in per_expert]).mean(0)
                for name in (per_expert[0] if per_expert else {})}

    def pull_(self, anchor: dict[str, torch.Tensor], fraction: float) -> None:
        """Move every expert ``fraction`` of the way towards ``anchor`` (a mean_expert)."""
        for expert in self:
            for name, p in expert.named_parameters():
                p.lerp_(anchor[name], fraction)

    def mix_many(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """One mixture per weight tensor, each expert run once (several routers, one bank:
        a module run twice in one forward is "parameter tying" to Opacus' ghost clipping)."""
        if not len(self):
            return [torch.zeros_like(x) for _ in weights]
        outs = torch.stack([expert(x) for expert in self], dim=-2)  # (..., E, D)
        return [(w.unsqueeze(-1) * outs).sum(dim=-2) for w in weights]


class GroupedLinear(nn.Module):
    """E independent affine maps over dispatched rows: row r uses expert ``experts[r]``.

    ``forward(x, experts, samples, ref)``: x (M, in) rows grouped by expert (ascending),
    experts (M,) and samples (M,) the expert and the sample of each row, ref (B,) any
    tensor whose length is the batch size (Opacus reads B from the last input).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = (
            num_experts, in_features, out_features)
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features)
                                   .uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, experts: torch.Tensor, samples: torch.Tensor,
                ref: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        chunks = torch.split(x, counts)
        outs = [c @ self.weight[e] + self.bias[e] for e, c in enumerate(chunks)]
        return torch.cat(outs) if outs else x.new_zeros(0, self.out_features)


#: Cells per padded block in :func:`_cell_blocks`.
BLOCK_CELLS = 64


def _cell_blocks(layer: GroupedLinear, activations, backprops):
    """The rows of every non-empty (expert, sample) cell, zero-padded into blocks.

    Per-sample sums over a cell's rows become batched matrix products once every cell is a
    (length, features) matrix. Padding all E·B cells to the longest one wastes work in
    proportion to routing imbalance, so cells are sorted by row count and cut into blocks
    of :data:`BLOCK_CELLS`, each padded only to its own longest cell.

    Returns the batch size and a list of ``(cells, xs, gs)``: the flat cell indices
    (``expert * B + sample``) of a block, its inputs (n, L, in) and output-gradients
    (n, L, out).
    """
    x, experts, samples, ref = activations
    batch = ref.shape[0]
    x = x.to(backprops.dtype)
    key = experts * batch + samples
    if key.numel() > 1 and bool((key[1:] < key[:-1]).any()):
        # SparseExperts already emits rows by expert, then by token (so by sample): this
        # sort only runs for other callers
        order = torch.argsort(key, stable=True)
        key, x, backprops = key[order], x[order], backprops[order]
    counts = torch.bincount(key, minlength=layer.num_experts * batch)
    lengths, by_length = torch.sort(counts, descending=True, stable=True)
    used = int((lengths > 0).sum()) if key.numel() else 0
    if not used:
        return batch, []
    lengths, by_length = lengths[:used], by_length[:used]
    rank = torch.empty_like(counts)
    rank[by_length] = torch.arange(used, device=key.device)
    block_len = lengths[::BLOCK_CELLS]
    sizes = (used - BLOCK_CELLS * torch.arange(len(block_len), device=key.device)).clamp(
        max=BLOCK_CELLS)
    offsets = torch.cumsum(sizes * block_len, 0) - sizes * block_len
    row_rank = rank[key]
    block = torch.div(row_rank, BLOCK_CELLS, rounding_mode="floor")
    position = torch.arange(key.numel(), device=key.device) - (torch.cumsum(counts, 0)
                                                               - counts)[key]
    slot = offsets[block] + (row_rank - block * BLOCK_CELLS) * block_len[block] + position
    total = int((sizes * block_len).sum())
    padding = torch.ones(total, dtype=torch.bool, device=key.device)
    padding[slot] = False
    padding = padding.nonzero().squeeze(1)  # zero only these: the rest is overwritten
    xs = x.new_empty(total, x.shape[-1]).index_copy_(0, slot, x).index_fill_(0, padding, 0)
    gs = x.new_empty(total, backprops.shape[-1]).index_copy_(0, slot, backprops).index_fill_(
        0, padding, 0)
    blocks, start = [], 0
    for i, (n, length) in enumerate(zip(sizes.tolist(), block_len.tolist(), strict=True)):
        cells = by_length[i * BLOCK_CELLS:i * BLOCK_CELLS + n]
        blocks.append((cells, xs[start:start + n * length].view(n, length, -1),
                       gs[start:start + n * length].view(n, length, -1)))
        start += n * length
    return batch, blocks


@register_grad_sampler(GroupedLinear)
def grouped_linear_grad_sample(layer: GroupedLinear, activations, backprops):
    """Per-sample gradients: weight (B, E, in, out), bias (B, E, out); zero for an expert
    that a sample sent no row to."""
    batch, blocks = _cell_blocks(layer, activations, backprops)
    e, i, o = layer.num_experts, layer.in_features, layer.out_features
    weight = backprops.new_zeros(e * batch, i, o)
    bias = backprops.new_zeros(e * batch, o)
    for cells, xs, gs in blocks:
        weight[cells] = torch.bmm(xs.transpose(1, 2), gs)
        bias[cells] = gs.sum(dim=1)
    return {
        layer.weight: weight.view(e, batch, i, o).transpose(0, 1),
        layer.bias: bias.view(e, batch, o).transpose(0, 1),
    }


@register_norm_sampler(GroupedLinear)
def grouped_linear_norm_sample(layer: GroupedLinear, activations, backprops):
    """Per-sample gradient norms without materialising the gradients (ghost clipping):
    ||Σ_r x_r g_rᵀ||² = Σ_{r,r'} (x_r·x_r')(g_r·g_r') over each (expert, sample)'s rows,
    or the cell's gradient itself where that is cheaper (L·in·out < L²·(in+out))."""
    batch, blocks = _cell_blocks(layer, activations, backprops)
    i, o = layer.in_features, layer.out_features
    weight_sq = backprops.new_zeros(layer.num_experts * batch)
    bias_sq = backprops.new_zeros(layer.num_experts * batch)
    for cells, xs, gs in blocks:
        if xs.shape[1] * (i + o) <= i * o:
            g_gram = torch.bmm(gs, gs.transpose(1, 2))
            weight_sq[cells] = (torch.bmm(xs, xs.transpose(1, 2)) * g_gram).sum((1, 2))
            bias_sq[cells] = g_gram.sum((1, 2))  # ||Σ_r g_r||² = Σ_{r,r'} g_r·g_r'
        else:
            weight_sq[cells] = torch.bmm(xs.transpose(1, 2), gs).pow(2).sum((1, 2))
            bias_sq[cells] = gs.sum(dim=1).pow(2).sum(-1)
    weight_sq = weight_sq.view(layer.num_experts, batch).sum(0).clamp(min=0)
    bias_sq = bias_sq.view(layer.num_experts, batch).sum(0).clamp(min=0)
    # frozen tensors are not clipped: like Opacus' own samplers, give norms only for
    # trainable ones (a norm for a frozen tensor would over-clip in book-keeping)
    return {p: sq.sqrt() for p, sq in ((layer.weight, weight_sq), (layer.bias, bias_sq))
            if p.requires_grad}


class SparseExperts(nn.Module):
    """E experts (stacked weights) computed only on the tokens routed to them."""

    def __init__(self, num: int, dim: int, hidden: int, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"expert depth must be >= 1, got {depth}")
        self.num = num
        self.fc1 = GroupedLinear(num, dim, hidden)
        self.hidden = nn.ModuleList(GroupedLinear(num, hidden, hidden) for _ in range(depth - 1))
        self.fc2 = GroupedLinear(num, hidden, dim)

    def __len__(self) -> int:
        return self.num

    def mean_expert(self) -> dict[str, torch.Tensor]:
        """The parameters of the average expert, by name (each stacked tensor's mean)."""
        return {name: p.mean(0) for name, p in self.named_parameters()}

    def pull_(self, anchor: dict[str, torch.Tensor], fraction: float) -> None:
        """Move every expert ``fraction`` of the way towards ``anchor`` (a mean_expert)."""
        for name, p in self.named_parameters():
            p.lerp_(anchor[name].expand_as(p), fraction)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.mix_many(x, [weights])[0]

    def mix_many(self, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """One mixture per weight tensor; each (token, expert) pair that any of them routes
        is computed once, in one pass through the bank."""
        batch, dim = x.shape[0], x.shape[-1]
        per_sample = x[0].numel() // dim if batch else 1  # tokens per sample
        flat_x = x.reshape(-1, dim)
        flat_w = [w.reshape(-1, self.num) for w in weights]
        active = flat_w[0] != 0
        for w in flat_w[1:]:
            active = active | (w != 0)
        tokens, experts = active.nonzero(as_tuple=True)
        order = torch.argsort(experts, stable=True)  # rows grouped by expert
        tokens, experts = tokens[order], experts[order]
        samples = torch.div(tokens, per_sample, rounding_mode="floor")
        ref = x.new_zeros(batch)
        h = F.relu(self.fc1(flat_x[tokens], experts, samples, ref))
        for layer in self.hidden:
            h = F.relu(layer(h, experts, samples, ref))
        out = self.fc2(h, experts, samples, ref)  # (rows, D)
        return [torch.zeros_like(flat_x).index_add(0, tokens, out * w[tokens, experts]
                                                   .unsqueeze(-1)).view_as(x) for w in flat_w]


def make_experts(dispatch: str, num: int, dim: int, hidden: int, depth: int = 1) -> nn.Module:
    """A bank of ``num`` experts in the ``dispatch`` layout (``dense`` or ``sparse``).

    An empty bank has no parameters in either layout (Opacus requires a per-sample
    gradient for every parameter, and an empty stack would never get one)."""
    if dispatch == "dense" or (num == 0 and dispatch in DISPATCHES):
        return DenseExperts(num, dim, hidden, depth)
    if dispatch == "sparse":
        return SparseExperts(num, dim, hidden, depth)
    raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
