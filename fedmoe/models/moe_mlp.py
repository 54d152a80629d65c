"""Flat top-k MoE classifier: trunk -> (residual) top-k MoE -> head.

Roles: trunk and head ``shared``; router ``gate``; shared experts ``shared``; local
experts ``local`` (declared in :class:`fedmoe.models.layers.TopKMoE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.models.layers import TopKMoE
from fedmoe.roles import Role, set_role


@dataclass(frozen=True)
class MoEMLPConfig:
    """Shape of a :class:`MoEMLPClassifier` (defaults fit scikit-learn's 8x8 digits)."""

    in_features: int = 64
    num_classes: int = 10
    hidden_dim: int = 64
    expert_hidden_dim: int = 64
    num_shared_experts: int = 2
    num_local_experts: int = 2
    top_k: int = 2

    def __post_init__(self) -> None:
        positive = ("in_features", "num_classes", "hidden_dim", "expert_hidden_dim",
                    "num_shared_experts", "top_k")
        bad = [n for n in positive if getattr(self, n) < 1]
        if bad or self.num_local_experts < 0:
            raise ValueError(f"MoEMLPConfig: {bad or ['num_local_experts']} must be positive")
        if self.top_k > self.num_shared_experts + self.num_local_experts:
            raise ValueError("MoEMLPConfig: top_k exceeds the number of experts")


class MoEMLPClassifier(nn.Module):
    """x: (B, in_features) -> logits (B, num_classes), balance loss (B,)."""

    def __init__(self, config: MoEMLPConfig) -> None:
        super().__init__()
        self.config = config
        set_role(self, Role.SHARED)  # trunk and head; the MoE tags gate and local experts
        self.trunk = nn.Linear(config.in_features, config.hidden_dim)
        self.moe = TopKMoE(
            config.hidden_dim,
            config.expert_hidden_dim,
            config.num_shared_experts,
            config.num_local_experts,
            config.top_k,
        )
        self.head = nn.Linear(config.hidden_dim, config.num_classes)

    def set_use_local(self, enabled: bool) -> None:
        """Route over local experts too (personalised) or over shared ones only (global)."""
        self.moe.use_local = enabled

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.trunk(x))  # (B, H)
        m, balance = self.moe(h)  # (B, H), (B,)
        return self.head(h + m), balance  # (B, C), (B,)
