"""Flat top-k MoE classifier (``moe``): trunk -> (residual) top-k MoE -> head.

Roles: trunk and head ``shared``; router ``gate``; shared experts ``shared``; local
experts ``local`` (declared in :class:`fedmoe.models.layers.TopKMoE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.config import DISPATCHES, GATES
from fedmoe.models.centre import FeatureCentre
from fedmoe.models.layers import ExpertSwitch, TopKMoE
from fedmoe.models.prior import LabelPrior, ScoreScale, personal_logits
from fedmoe.models.tasks import Classification
from fedmoe.roles import Role, set_role


def check_positive(config, names: tuple[str, ...], nonnegative: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming every field of ``config`` that is out of range."""
    bad = [f"{n} must be >= 1" for n in names if getattr(config, n) < 1]
    bad += [f"{n} must be >= 0" for n in nonnegative if getattr(config, n) < 0]
    if getattr(config, "gate", "linear") not in GATES:
        bad.append(f"gate must be one of {GATES}")
    if getattr(config, "dispatch", "dense") not in DISPATCHES:
        bad.append(f"dispatch must be one of {DISPATCHES}")
    if bad:
        raise ValueError(f"{type(config).__name__}: " + "; ".join(bad))


def check_top_k(config) -> None:
    """Raise ValueError if ``config.top_k`` exceeds its routed experts (shared + local)."""
    experts = config.num_shared_experts + config.num_local_experts
    if config.top_k > experts:
        raise ValueError(f"{type(config).__name__}: top_k={config.top_k} exceeds the number of "
                         f"experts, {experts} ({config.num_shared_experts} shared + "
                         f"{config.num_local_experts} local)")


def _without_scale_as_before(model: nn.Module) -> None:
    """A model pickled before the score scale existed (an export file of an earlier
    fedmoe) has no ``scale``: it predicts as it did, with none (``nn.Identity``)."""
    if "scale" not in model._modules:
        model._modules["scale"] = nn.Identity()


@dataclass(frozen=True)
class MoEConfig:
    """Shape of a :class:`MoEClassifier` (defaults fit scikit-learn's 8x8 digits)."""

    in_features: int = 64
    num_classes: int = 10
    hidden_dim: int = 64
    expert_hidden_dim: int = 64
    num_shared_experts: int = 2
    num_local_experts: int = 2
    top_k: int = 2
    gate: str = "linear"
    dispatch: str = "dense"  # "dense" | "sparse" (see fedmoe.models.experts)
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    score_scale: bool = True  # a learned scale of the shared scores before the prior

    def __post_init__(self) -> None:
        check_positive(self, ("in_features", "num_classes", "hidden_dim", "expert_hidden_dim",
                              "num_shared_experts", "top_k"),
                       ("num_local_experts", "balance_coef", "z_loss_coef"))
        check_top_k(self)


class ResidualMoEClassifier(nn.Module):
    """trunk -> (residual) MoE layer -> head; subclasses choose the MoE layer.

    x: (B, in_features) -> logits (B, num_classes), aux (B,). Trunk and head are
    ``shared``; the MoE layer tags its routers and local experts itself; the personal
    :class:`~fedmoe.models.prior.LabelPrior` on the logits is ``local`` (uniform, i.e. no
    effect, until the client sets it from its DP label histogram).
    """

    task = Classification()

    def __init__(self, config, moe: nn.Module) -> None:
        super().__init__()
        self.config = config
        set_role(self, Role.SHARED)
        self.trunk = nn.Linear(config.in_features, config.hidden_dim)
        self.moe = moe
        self.head = nn.Linear(config.hidden_dim, config.num_classes)
        self.scale = ScoreScale() if config.score_scale else nn.Identity()
        self.prior = LabelPrior(config.num_classes)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _without_scale_as_before(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.trunk(x))  # (B, H)
        m, aux = self.moe(h)  # (B, H), (B,)
        return personal_logits(self.scale, self.prior, self.head(h + m),
                               training=self.training), aux  # (B, C), (B,)


class MoEClassifier(ResidualMoEClassifier):
    """The flat top-k MoE classifier."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config, TopKMoE(
            config.hidden_dim,
            config.expert_hidden_dim,
            config.num_shared_experts,
            config.num_local_experts,
            config.top_k,
            gate=config.gate,
            dispatch=config.dispatch,
            balance_coef=config.balance_coef,
            z_loss_coef=config.z_loss_coef,
        ))


@dataclass(frozen=True)
class LMoEConfig:
    """Shape of a :class:`LogitMoEClassifier` (defaults fit scikit-learn's 8x8 digits).

    ``expert_hidden_dim`` is the run config's ``expert-hidden-dim`` (this model has no
    trunk width: ``hidden-dim`` does not apply).
    """

    in_features: int = 64
    num_classes: int = 10
    expert_hidden_dim: int = 16
    num_shared_experts: int = 2
    num_local_experts: int = 2
    top_k: int = 2
    gate: str = "linear"
    dispatch: str = "dense"  # "dense" | "sparse" (see fedmoe.models.experts)
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    score_scale: bool = True  # a learned scale of the shared scores before the prior
    feature_centring: bool = True  # the inputs centred by a learned mean (FeatureCentre)

    def __post_init__(self) -> None:
        check_positive(self, ("in_features", "num_classes", "expert_hidden_dim",
                              "num_shared_experts", "top_k"),
                       ("num_local_experts", "balance_coef", "z_loss_coef"))
        check_top_k(self)


class LogitMoEClassifier(nn.Module):
    """Linear class scores refined by a top-k MoE over the scores (``lmoe``).

    x: (B, in_features) -> x - μ, centred by a learned mean (``feature_centring``:
    :class:`~fedmoe.models.centre.FeatureCentre`, ``shared``) -> z = trunk(x - μ) (B, C),
    a linear classifier (``shared``); the MoE
    layer routes each example on z and adds its experts' corrections, each a small MLP
    C -> expert_hidden_dim -> C: shared experts (``shared``), the client's local experts
    (``local``), one router (``gate``); then the personal label prior. Returns logits
    (B, C) and the per-sample router loss (B,) (plus the centring's, of value 0).

    Why this shape: under DP-SGD the noise is per coordinate, so the noise norm grows with
    the number of noised parameters and a local tensor's noise is never averaged over
    clients. A linear trunk (650 parameters on digits) is what a DP linear classifier
    would learn; the experts work in the 10-dimensional score space, so a local expert
    costs 346 parameters (hidden 16) instead of the 8,320 of ``moe``'s.

    Where DP noise would swamp even these (a client's ν = σ/(q·n) above
    ``expert-noise-limit``), the client's :class:`~fedmoe.models.layers.ExpertSwitch`
    turns the MoE part off and freezes it: the model is then the shared linear scores
    with the client's label prior, the strongest model such a noise level affords.
    """

    task = Classification()
    #: The layer that reads the centred input (:class:`~fedmoe.models.centre.CentreFold`).
    centre_reader = "trunk"

    def __init__(self, config: LMoEConfig) -> None:
        super().__init__()
        self.config = config
        set_role(self, Role.SHARED)
        self.trunk = nn.Linear(config.in_features, config.num_classes)
        self.moe = TopKMoE(
            config.num_classes,
            config.expert_hidden_dim,
            config.num_shared_experts,
            config.num_local_experts,
            config.top_k,
            gate=config.gate,
            dispatch=config.dispatch,
            balance_coef=config.balance_coef,
            z_loss_coef=config.z_loss_coef,
        )
        self.scale = ScoreScale() if config.score_scale else nn.Identity()
        self.prior = LabelPrior(config.num_classes)
        self.switch = ExpertSwitch(self.moe)
        # registered last: the other tensors keep their parameter order
        self.centre = FeatureCentre(config.in_features) if config.feature_centring else None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _without_scale_as_before(self)
        if not hasattr(self, "centre"):  # pickled before the centring existed: none
            self.centre = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centring = x.new_zeros(x.shape[0])  # (B,)
        if self.centre is not None:
            x, centring = self.centre.centred(x)  # (B, D), (B,): value 0, trains μ
        z = self.trunk(x)  # (B, C)
        if not self.switch.enabled:  # experts off for this client: scaled scores + prior
            return (personal_logits(self.scale, self.prior, z, training=self.training),
                    centring)  # (B, C), (B,)
        m, aux = self.moe(z)  # (B, C), (B,)
        return personal_logits(self.scale, self.prior, z + m,
                               training=self.training), aux + centring  # (B, C), (B,)
