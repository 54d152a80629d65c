"""Deep MoE with hierarchical gating (``hmoe``): trunk -> two-level MoE of deep experts -> head.

A first router picks groups of experts, a second router inside each chosen group picks
experts (top-k at each level; see :class:`fedmoe.models.layers.HierarchicalMoE`). Experts
are ``expert_depth``-layer networks. Roles: trunk and head ``shared``; the group router
and the routers inside shared groups ``gate``; the experts of the ``num_groups`` groups
``shared``; the extra group of ``num_local_experts`` and the router inside it ``local``
(it only ever chooses among this client's own experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe.models.layers import HierarchicalMoE
from fedmoe.models.moe import ResidualMoEClassifier, check_positive


@dataclass(frozen=True)
class HMoEConfig:
    """Shape of a :class:`HierarchicalMoEClassifier`."""

    in_features: int = 64
    num_classes: int = 10
    hidden_dim: int = 64
    expert_hidden_dim: int = 32
    num_groups: int = 2
    experts_per_group: int = 2
    num_local_experts: int = 2
    group_top_k: int = 1
    top_k: int = 1  # experts picked inside each chosen group
    expert_depth: int = 2
    gate: str = "linear"
    dispatch: str = "dense"  # "dense" | "sparse" (see fedmoe.models.experts)
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    score_scale: bool = True  # a learned scale of the shared scores before the prior

    def __post_init__(self) -> None:
        check_positive(self, ("in_features", "num_classes", "hidden_dim", "expert_hidden_dim",
                              "num_groups", "experts_per_group", "group_top_k", "top_k",
                              "expert_depth"),
                       ("num_local_experts", "balance_coef", "z_loss_coef"))
        groups = self.num_groups + (1 if self.num_local_experts else 0)
        if self.group_top_k > groups:
            raise ValueError(f"HMoEConfig: group_top_k exceeds the {groups} groups")
        if self.top_k > self.experts_per_group or (
                self.num_local_experts and self.top_k > self.num_local_experts):
            raise ValueError(
                f"HMoEConfig: top_k={self.top_k} exceeds the experts of a group: "
                f"{self.experts_per_group} per shared group"
                + (f", {self.num_local_experts} in the local group" if self.num_local_experts
                   else ""))


class HierarchicalMoEClassifier(ResidualMoEClassifier):
    """The deep MoE classifier with two-level gating."""

    def __init__(self, config: HMoEConfig) -> None:
        super().__init__(config, HierarchicalMoE(
            config.hidden_dim,
            config.expert_hidden_dim,
            num_groups=config.num_groups,
            experts_per_group=config.experts_per_group,
            num_local=config.num_local_experts,
            group_top_k=config.group_top_k,
            expert_top_k=config.top_k,
            depth=config.expert_depth,
            gate=config.gate,
            dispatch=config.dispatch,
            balance_coef=config.balance_coef,
            z_loss_coef=config.z_loss_coef,
        ))
