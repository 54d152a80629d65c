"""MoE building blocks: experts, routers, the flat and the hierarchical dense-masked MoE layer.

Routers compute dense top-k weights (zero for the experts a token was not routed to);
the experts are a bank from :mod:`fedmoe.models.experts`, ``dispatch = "dense"`` (every
expert on every token, ``nn.Linear`` only) or ``"sparse"`` (only routed tokens, with its
own Opacus grad sampler). Either way an expert that no token chose gets an exact zero
per-sample gradient, not a missing one. Never route with plain ``x[sel]``/``index_add``:
that silently breaks per-sample gradients (see docs/architecture.md).

Auxiliary router losses are computed **per sample**, over that sample's own tokens:

- the Switch-Transformer balance term ``E · Σ_e f_e · P_e`` (f: share of the sample's
  token-slots routed to e, P: its mean router probability for e);
- the ST-MoE router z-loss ``mean_t logsumexp(logits_t)²``.

A batch-level term would couple samples and void DP-SGD's per-sample sensitivity bound,
and so would capacity-based token dropping; neither exists here. Each MoE layer returns
``(output, aux)`` with ``aux`` (B,) = ``balance_coef · balance + z_loss_coef · z``.

Expert usage (routing weight per expert, summed over tokens) is recorded only while
:attr:`MoELayer.track_usage` is on (evaluation); it never enters a loss.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.config import GATES
from fedmoe.models.experts import Expert, make_experts
from fedmoe.models.prior import label_priors
from fedmoe.roles import Role, set_role


class Router(nn.Module):
    """Scores E experts for each token: logits (..., E).

    ``linear``: one linear layer. ``attention``: the token's query (a linear projection to
    ``key_dim``) attends over a learned table of E expert keys, ``q · k_e / sqrt(key_dim)``;
    the key table is an ``nn.Linear`` without bias, so Opacus handles it like any layer.
    """

    def __init__(self, dim: int, num_experts: int, kind: str = "linear", key_dim: int = 16):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {kind!r}")
        self.kind = kind
        set_role(self, Role.GATE)
        if kind == "linear":
            self.proj = nn.Linear(dim, num_experts)
        else:
            self.query = nn.Linear(dim, key_dim)
            self.keys = nn.Linear(key_dim, num_experts, bias=False)
            self.scale = 1.0 / math.sqrt(key_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj(x)
        return self.keys(self.query(x)) * self.scale


def top_k_weights(
    logits: torch.Tensor, k: int, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities and normalised top-k weights, both (..., E).

    ``allowed`` (E,) bool masks experts out (their probability and weight are 0).
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(dim=-1)
    chosen = probs.topk(k, dim=-1).indices  # (..., k)
    keep = torch.zeros_like(probs).scatter(-1, chosen, 1.0)  # (..., E) in {0, 1}
    weights = probs * keep
    return probs, weights / weights.sum(dim=-1, keepdim=True)


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


def per_sample_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: logsumexp(logits)², averaged over one sample's tokens. (B,)."""
    z = torch.logsumexp(logits, dim=-1) ** 2  # (B,) or (B, T)
    return z.mean(dim=1) if z.dim() == 2 else z


class MoELayer(nn.Module, ABC):
    """What every MoE layer shares: aux-loss coefficients, the local switch, usage tracking."""

    def __init__(self, balance_coef: float, z_loss_coef: float) -> None:
        super().__init__()
        self.balance_coef, self.z_loss_coef = balance_coef, z_loss_coef
        self.use_local = True
        self.track_usage = False
        self.usage: torch.Tensor | None = None  # (E,) routing weight summed over tokens

    def _aux(self, probs, weights, logits) -> torch.Tensor:
        aux = self.balance_coef * per_sample_balance_loss(probs, weights)
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * per_sample_z_loss(logits)
        return aux

    def _record(self, weights: torch.Tensor) -> None:
        if self.track_usage:
            used = weights.detach().reshape(-1, weights.shape[-1]).sum(dim=0)
            self.usage = used if self.usage is None else self.usage + used

    def reset_usage(self) -> None:
        self.usage = None

    @abstractmethod
    def shared_banks(self) -> list[nn.Module]:
        """The banks of routed shared experts (the anchor of :meth:`pull_local_experts`)."""

    @torch.no_grad()
    def pull_local_experts(self, fraction: float) -> None:
        """Move each local expert ``fraction`` of the way towards the average routed shared
        expert of this layer (banks of the same layout and expert shape)."""
        local = getattr(self, "local_experts", None)
        banks = [bank for bank in self.shared_banks() if len(bank)]
        if not fraction or local is None or not len(local) or not banks:
            return
        total = sum(len(bank) for bank in banks)
        means = [bank.mean_expert() for bank in banks]
        anchor = {name: sum(len(bank) * mean[name] for bank, mean in zip(banks, means,
                                                                          strict=True)) / total
                  for name in means[0]}
        local.pull_(anchor, fraction)


class TopKMoE(MoELayer):
    """Always-on experts + shared and local experts behind one learned top-k router.

    ``num_always_on`` experts (``shared``) process every token unrouted (DeepSeek-style
    shared experts). Routed experts ``0 .. S-1`` are shared (aggregated), ``S .. S+L-1``
    local (personal). :attr:`use_local` = False masks the local ones out of routing, which
    is how a client's model is scored "global-only".

    Forward: x (B, D) or (B, T, D) -> (output of the same shape, aux (B,)).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_shared: int,
        num_local: int,
        top_k: int,
        *,
        num_always_on: int = 0,
        depth: int = 1,
        gate: str = "linear",
        dispatch: str = "dense",
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(balance_coef, z_loss_coef)
        if not 1 <= top_k <= num_shared + num_local:
            raise ValueError(f"top_k={top_k} must be in [1, {num_shared + num_local}]")
        if num_shared < 1:
            raise ValueError("a routed MoE needs at least one shared routed expert")
        self.num_shared, self.num_local, self.top_k = num_shared, num_local, top_k
        self.gate = Router(dim, num_shared + num_local, gate)
        self.always_on = set_role(
            nn.ModuleList(Expert(dim, hidden, depth) for _ in range(num_always_on)), Role.SHARED
        )
        self.shared_experts = set_role(
            make_experts(dispatch, num_shared, dim, hidden, depth), Role.SHARED
        )
        self.local_experts = set_role(
            make_experts(dispatch, num_local, dim, hidden, depth), Role.LOCAL
        )

    @property
    def num_experts(self) -> int:
        """Routed experts."""
        return self.num_shared + self.num_local

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, probabilities and normalised top-k weights, each (..., E)."""
        logits = self.gate(x)
        allowed = None
        if not self.use_local and self.num_local:
            allowed = torch.arange(self.num_experts, device=x.device) < self.num_shared
        k = self.top_k if self.use_local else min(self.top_k, self.num_shared)
        probs, weights = top_k_weights(logits, k, allowed)
        return logits, probs, weights

    def shared_banks(self) -> list[nn.Module]:
        return [self.shared_experts]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, probs, weights = self.route(x)
        if not self.use_local:
            logits = logits[..., : self.num_shared]
            probs, weights = probs[..., : self.num_shared], weights[..., : self.num_shared]
        y = self.shared_experts(x, weights[..., : self.num_shared])  # (..., D)
        if self.use_local and self.num_local:
            y = y + self.local_experts(x, weights[..., self.num_shared :])
        for expert in self.always_on:
            y = y + expert(x)
        self._record(weights if self.use_local else F.pad(weights, (0, self.num_local)))
        return y, self._aux(probs, weights, logits)


class HierarchicalMoE(MoELayer):
    """Two-level gating over groups of deep experts.

    A group router picks ``group_top_k`` of the groups; inside each group its own router
    picks ``expert_top_k`` of the group's experts. An expert's weight is its group's weight
    times its weight within the group. Groups ``0 .. G-1`` hold shared experts; if
    ``num_local > 0`` one more group holds the local (personal) experts, and
    :attr:`use_local` = False masks that group out at the first level.

    Forward: x (B, D) or (B, T, D) -> (output of the same shape, aux (B,)), aux summing
    both levels' balance and z terms.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        num_groups: int,
        experts_per_group: int,
        num_local: int,
        group_top_k: int,
        expert_top_k: int,
        depth: int = 2,
        gate: str = "linear",
        dispatch: str = "dense",
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__(balance_coef, z_loss_coef)
        total_groups = num_groups + (1 if num_local else 0)
        if not 1 <= group_top_k <= total_groups:
            raise ValueError(f"group_top_k={group_top_k} must be in [1, {total_groups}]")
        if not 1 <= expert_top_k <= experts_per_group:
            raise ValueError(f"expert_top_k={expert_top_k} must be in [1, {experts_per_group}]")
        if num_local and expert_top_k > num_local:
            raise ValueError(f"expert_top_k={expert_top_k} exceeds num_local={num_local}")
        self.num_groups, self.num_local = num_groups, num_local
        self.group_top_k, self.expert_top_k = group_top_k, expert_top_k
        self.group_gate = Router(dim, total_groups, gate)
        self.expert_gates = nn.ModuleList(
            Router(dim, experts_per_group, gate) for _ in range(num_groups)
        )
        self.groups = set_role(nn.ModuleList(
            make_experts(dispatch, experts_per_group, dim, hidden, depth)
            for _ in range(num_groups)
        ), Role.SHARED)
        if num_local:
            # routes among this client's own experts only: personal, like them
            self.local_gate = set_role(Router(dim, num_local, gate), Role.LOCAL)
            self.local_experts = set_role(
                make_experts(dispatch, num_local, dim, hidden, depth), Role.LOCAL
            )

    def shared_banks(self) -> list[nn.Module]:
        return list(self.groups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total_groups = self.num_groups + (1 if self.num_local else 0)
        group_logits = self.group_gate(x)
        allowed, k = None, self.group_top_k
        if self.num_local and not self.use_local:
            allowed = torch.arange(total_groups, device=x.device) < self.num_groups
            k = min(k, self.num_groups)
        group_probs, group_weights = top_k_weights(group_logits, k, allowed)
        aux = self._aux(group_probs, group_weights, group_logits)

        members = [(gate, experts) for gate, experts in zip(self.expert_gates, self.groups,
                                                            strict=True)]
        if self.num_local:
            members.append((self.local_gate, self.local_experts))
        y = torch.zeros_like(x)
        usage = []
        for g, (gate, experts) in enumerate(members):
            if g >= self.num_groups and not self.use_local:
                usage.append(torch.zeros_like(group_weights[..., :1]).expand(
                    *group_weights.shape[:-1], len(experts)))
                continue
            logits = gate(x)
            probs, weights = top_k_weights(logits, self.expert_top_k)
            aux = aux + self._aux(probs, weights, logits)
            combined = group_weights[..., g : g + 1] * weights  # (..., E_g), 0 if g not chosen
            y = y + experts(x, combined)
            usage.append(combined)
        self._record(torch.cat(usage, dim=-1))
        return y, aux


class MultiGateMoE(MoELayer):
    """One set of experts, one top-k router per task (multi-gate mixture-of-experts).

    Experts ``0 .. S-1`` are shared, ``S .. S+L-1`` local; every task's router scores all of
    them. Forward: x (B, D) -> (list of one (B, D) mixture per task, aux (B,) summed over
    the task routers).
    """

    def __init__(self, dim: int, hidden: int, num_shared: int, num_local: int, top_k: int,
                 num_tasks: int, *, gate: str = "linear", dispatch: str = "dense",
                 balance_coef: float = 0.01, z_loss_coef: float = 0.0) -> None:
        super().__init__(balance_coef, z_loss_coef)
        if not 1 <= top_k <= num_shared + num_local:
            raise ValueError(f"top_k={top_k} must be in [1, {num_shared + num_local}]")
        self.num_shared, self.num_local, self.top_k = num_shared, num_local, top_k
        self.gates = nn.ModuleList(Router(dim, num_shared + num_local, gate)
                                   for _ in range(num_tasks))
        self.shared_experts = set_role(
            make_experts(dispatch, num_shared, dim, hidden), Role.SHARED
        )
        self.local_experts = set_role(
            make_experts(dispatch, num_local, dim, hidden), Role.LOCAL
        )

    def shared_banks(self) -> list[nn.Module]:
        return [self.shared_experts]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        num = self.num_shared + (self.num_local if self.use_local else 0)
        k = self.top_k if self.use_local else min(self.top_k, self.num_shared)
        mixtures, aux, usage = [], None, []
        routed = []
        for gate in self.gates:
            logits = gate(x)[..., :num]
            probs, weights = top_k_weights(logits, k)
            routed.append(weights)
            term = self._aux(probs, weights, logits)
            aux = term if aux is None else aux + term
            usage.append(weights if self.use_local else F.pad(weights, (0, self.num_local)))
        # each bank runs once for all tasks
        mixtures = self.shared_experts.mix_many(x, [w[..., : self.num_shared] for w in routed])
        if num > self.num_shared:
            local = self.local_experts.mix_many(x, [w[..., self.num_shared :] for w in routed])
            mixtures = [m + loc for m, loc in zip(mixtures, local, strict=True)]
        self._record(torch.cat(usage, dim=-1))
        return mixtures, aux


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def pull_local_experts(model: nn.Module, fraction: float) -> None:
    """Pull every MoE layer's local experts towards its shared ones (``local-pull``).

    Uses the parameters only, never data: applied after a DP-SGD step it is
    post-processing, and the next step's gradients are taken at a point that is still a
    function of DP outputs alone."""
    for layer in moe_layers(model):
        layer.pull_local_experts(fraction)


class ExpertSwitch(nn.Module):
    """A client's decision whether its model's MoE part trains and runs (``expert-noise-limit``).

    A ``local`` buffer ``state`` (()): -1 undecided (the experts run), 1 on, 0 off. The
    client decides once, at its first DP round, from its own noise scale
    ν = σ / (q · n) (:func:`fedmoe.privacy.plan.gradient_noise_scale`), and keeps the
    decision with its local tensors. The model owning the switch skips its MoE part while
    it is off; :func:`decide_experts` also freezes that part, so DP-SGD neither clips nor
    noises it (frozen tensors are not in the released update's book-keeping).
    """

    def __init__(self, guarded: nn.Module) -> None:
        super().__init__()
        set_role(self, Role.LOCAL)
        self.register_buffer("state", torch.tensor(-1.0))
        self._guarded = [guarded]  # a list: not registered as a submodule twice

    @property
    def enabled(self) -> bool:
        return bool(self.state != 0)

    @property
    def decided(self) -> bool:
        return bool(self.state >= 0)

    def set(self, on: bool) -> None:
        """Record the decision and (un)freeze the guarded part accordingly."""
        self.state.fill_(1.0 if on else 0.0)
        self.apply_state()

    def apply_state(self) -> None:
        """Freeze the guarded part while the switch is off (call after loading state)."""
        self._guarded[0].requires_grad_(self.enabled)


def expert_switches(model: nn.Module) -> list[ExpertSwitch]:
    return [m for m in model.modules() if isinstance(m, ExpertSwitch)]


def decide_experts(model: nn.Module, noise_scale: float, limit: float) -> bool | None:
    """Decide, once, whether ``model``'s switched MoE part trains: on iff the client's noise
    scale ν = σ/(q·n) is ≤ ``limit`` (ν = 0 for a non-private round). A decision already
    held in the model's local state is kept. Returns the decision (None: no switch)."""
    switches = expert_switches(model)
    for switch in switches:
        if not switch.decided:
            switch.set(noise_scale <= limit)
        switch.apply_state()
    return switches[0].enabled if switches else None


def set_use_local(model: nn.Module, enabled: bool) -> None:
    """Route over local experts too and apply the personal label prior (personalised), or
    use the shared parts only (global-only)."""
    for layer in [*moe_layers(model), *label_priors(model)]:
        layer.use_local = enabled


def expert_usage(model: nn.Module, forward) -> list[float]:
    """Share of routing weight per expert (all MoE layers, concatenated) during ``forward()``."""
    layers = moe_layers(model)
    for layer in layers:
        layer.reset_usage()
        layer.track_usage = True
    try:
        forward()
    finally:
        for layer in layers:
            layer.track_usage = False
    shares = []
    for layer in layers:
        if layer.usage is not None:
            total = float(layer.usage.sum())
            shares += [float(u) / total if total else 0.0 for u in layer.usage]
        layer.reset_usage()
    return shares
