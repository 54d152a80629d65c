"""MoE building blocks: experts, the top-k router and the dense-masked MoE layer.

Routing is *dense-masked* top-k: every expert runs on every token and the router's
non-chosen weights are zero. It costs E/k× the expert compute of sparse dispatch, but it
is built from ``nn.Linear`` only, so every Opacus grad-sample mode gives exact per-sample
gradients, including for an expert that no token chose (its per-sample gradient is zero,
not missing). Do not replace it with ``x[sel]``/``index_add`` dispatch: that silently
breaks per-sample gradients (see docs/architecture.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.roles import Role, set_role


class Expert(nn.Module):
    """A two-layer feed-forward expert: D -> H -> D."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.fc2(F.relu(self.fc1(x)))


class TopKMoE(nn.Module):
    """Shared + local experts behind one learned top-k router.

    Experts ``0 .. S-1`` are shared (aggregated), ``S .. S+L-1`` local (personal). The
    router scores all of them; :attr:`use_local` = False masks the local ones out, which
    is how a client's model is scored "global-only".

    The forward returns the mixed output and a per-sample load-balancing loss. The loss
    is the Switch-Transformer balance term computed *within* each sample (its own tokens),
    never across the batch: a batch-level term would couple samples and void the DP-SGD
    per-sample sensitivity bound.
    """

    def __init__(self, dim: int, hidden: int, num_shared: int, num_local: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_shared + num_local:
            raise ValueError(f"top_k={top_k} must be in [1, {num_shared + num_local}]")
        self.num_shared, self.num_local, self.top_k = num_shared, num_local, top_k
        self.gate = set_role(nn.Linear(dim, num_shared + num_local), Role.GATE)
        self.shared_experts = set_role(
            nn.ModuleList(Expert(dim, hidden) for _ in range(num_shared)), Role.SHARED
        )
        self.local_experts = set_role(
            nn.ModuleList(Expert(dim, hidden) for _ in range(num_local)), Role.LOCAL
        )
        self.use_local = True

    @property
    def num_experts(self) -> int:
        return self.num_shared + self.num_local

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and normalised top-k weights, both (..., E)."""
        logits = self.gate(x)  # (..., E)
        if not self.use_local and self.num_local:
            mask = torch.zeros(self.num_experts, dtype=torch.bool, device=x.device)
            mask[self.num_shared:] = True
            logits = logits.masked_fill(mask, float("-inf"))
        probs = logits.softmax(dim=-1)  # (..., E)
        k = self.top_k if self.use_local else min(self.top_k, self.num_shared)
        chosen = probs.topk(k, dim=-1).indices  # (..., k)
        keep = torch.zeros_like(probs).scatter(-1, chosen, 1.0)  # (..., E) in {0, 1}
        weights = probs * keep
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (..., E), k non-zeros
        return probs, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, D) or (B, T, D) -> output of the same shape, balance loss (B,)."""
        probs, weights = self.route(x)
        experts = [*self.shared_experts, *self.local_experts]
        if not self.use_local:
            experts = experts[: self.num_shared]
            probs, weights = probs[..., : self.num_shared], weights[..., : self.num_shared]
        outs = torch.stack([e(x) for e in experts], dim=-2)  # (..., E, D)
        y = (weights.unsqueeze(-1) * outs).sum(dim=-2)  # (..., D)
        return y, per_sample_balance_loss(probs, weights)


def per_sample_balance_loss(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch balance loss E * sum_e f_e * P_e, with f and P averaged over one sample's tokens.

    probs, weights: (B, E) or (B, T, E). Returns (B,). Equals 1 for perfectly uniform
    routing and grows with concentration. Gradients flow through ``probs`` only.
    """
    num_experts = probs.shape[-1]
    dispatched = (weights > 0).to(probs.dtype)  # (..., E)
    if probs.dim() == 3:  # token inputs: average over the sample's own tokens
        frac, mean_prob = dispatched.mean(dim=1), probs.mean(dim=1)  # (B, E)
    else:
        frac, mean_prob = dispatched, probs
    frac = frac / frac.sum(dim=-1, keepdim=True)
    return num_experts * (frac * mean_prob).sum(dim=-1)  # (B,)
