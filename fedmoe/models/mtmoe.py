"""Multi-task MoE (``mtmoe``): shared experts, one gate and one head per task (MMoE).

trunk -> :class:`fedmoe.models.layers.MultiGateMoE` (one router per task over the same
experts) -> one head per task. Task losses are weighted adaptively by learned
uncertainty (:class:`fedmoe.models.tasks.MultiTask`): each task's log-variance comes from
``log_vars``, a bias-free linear layer applied to a constant 1 so that Opacus computes its
per-sample gradient like any other layer's. A client that holds no label for a task
simply contributes no loss for it.

Roles: trunk, heads and shared experts ``shared``; the task routers ``gate``; local
experts and the uncertainty weights ``local`` (each client weighs the tasks it holds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.models.layers import MultiGateMoE
from fedmoe.models.moe import check_positive, check_top_k
from fedmoe.models.tasks import MultiTask
from fedmoe.roles import Role, set_role

#: The tasks derived from the digits data set: the digit, its parity, whether it is >= 5.
DIGIT_TASKS: tuple[tuple[str, int], ...] = (("digit", 10), ("parity", 2), ("ge5", 2))


@dataclass(frozen=True)
class MTMoEConfig:
    """Shape of a :class:`MultiTaskMoE`; ``tasks`` = ((name, classes), ...)."""

    in_features: int = 64
    tasks: tuple[tuple[str, int], ...] = DIGIT_TASKS
    hidden_dim: int = 64
    expert_hidden_dim: int = 64
    num_shared_experts: int = 2
    num_local_experts: int = 2
    top_k: int = 2
    gate: str = "linear"
    dispatch: str = "dense"  # "dense" | "sparse" (see fedmoe.models.experts)
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        check_positive(self, ("in_features", "hidden_dim", "expert_hidden_dim",
                              "num_shared_experts", "top_k"),
                       ("num_local_experts", "balance_coef", "z_loss_coef"))
        if not self.tasks or any(c < 2 for _, c in self.tasks):
            raise ValueError("MTMoEConfig: tasks must be non-empty, each with >= 2 classes")
        check_top_k(self)


class MultiTaskMoE(nn.Module):
    """x: (B, in_features) -> ((logits per task, log-variances (B, T)), aux (B,))."""

    def __init__(self, config: MTMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.task = MultiTask([name for name, _ in config.tasks])
        set_role(self, Role.SHARED)
        self.trunk = nn.Linear(config.in_features, config.hidden_dim)
        self.moe = MultiGateMoE(
            config.hidden_dim, config.expert_hidden_dim, config.num_shared_experts,
            config.num_local_experts, config.top_k, len(config.tasks), gate=config.gate,
            dispatch=config.dispatch,
            balance_coef=config.balance_coef, z_loss_coef=config.z_loss_coef,
        )
        self.heads = nn.ModuleList(nn.Linear(config.hidden_dim, c) for _, c in config.tasks)
        self.log_vars = set_role(nn.Linear(1, len(config.tasks), bias=False), Role.LOCAL)
        nn.init.zeros_(self.log_vars.weight)

    def forward(self, x: torch.Tensor):
        h = F.relu(self.trunk(x))
        mixtures, aux = self.moe(h)
        logits = [head(h + m) for head, m in zip(self.heads, mixtures, strict=True)]
        log_vars = self.log_vars(torch.ones(len(x), 1, dtype=x.dtype, device=x.device))
        return (logits, log_vars), aux
