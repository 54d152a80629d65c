"""Feature centring learned inside DP-SGD: ``x -> x - μ`` with μ the features' mean.

A linear model's scores ``W x + b`` are the same function as ``W (x - μ) + (b + W μ)``,
but DP-SGD does not treat the two alike. Its noise lands on W and reaches the scores as
``ΔW · x``, so it grows with ``‖x‖``; and each sample's clipped gradient ``(p - y) xᵀ`` spends
the clipping bound C on ``‖x‖``, most of which, for features far from zero mean, is the
direction ``μ`` that every sample shares and no class is told apart by. On digits
(pixels in [0, 1]) ``‖x‖`` is 3.9 on average and ``‖x - μ‖`` 2.2. Centring the inputs is
the feature normalisation DP linear models are known to need (Tramèr & Boneh,
"Differentially private learning needs better features (or much more data)", ICLR 2021),
but μ is a statistic of the clients' data: it must itself be private.

:class:`FeatureCentre` learns it inside the same DP-SGD step as everything else: μ = κ·φ
is a parameter, trained on the per-sample loss ``½ ‖x_b - μ‖²`` (whose minimiser over the
data is the mean), clipped and noised with the rest of each sample's gradient and, where
the method aggregates it (``shared``: ``lmoe``, ``fedavg``, ``fedper``; ``local`` keeps its
own), averaged over clients like every shared tensor: one accounted mechanism, no release
of its own (argument in docs/architecture.md, "Feature centring"). While training, the
model reads ``x - μ₀``, μ₀ the μ its local round began with (the received global one), so
the task's loss never moves μ, μ's loss never moves the model, and the inputs shift only
between rounds; the centring term is added to the per-sample loss with value 0
(:meth:`FeatureCentre.centred`), so reported losses are the task's.

Because the model reads μ₀ for a whole round while μ itself moves, the function it was
trained as is ``W (x - μ₀) + b`` for the layer that reads the centred input (its *reader*:
``lmoe``'s trunk, an MLP's first layer). Read with the new μ the same parameters compute a
different function, shifted by ``-W (μ - μ₀)`` — noise included, a noisy μ jolts every score
between rounds. With ``centring-fold`` the shift is folded into the reader's bias,
``b <- b + W (μ - μ₀)`` (:func:`folded_bias`), so the function is unchanged and only the
gradients' geometry follows the new μ: by the server after each aggregation for a ``shared``
reader (:class:`CentreFold`), by the client after its round for a ``local`` one (:func:`
end_local_round`). Post-processing of DP outputs (argument in docs/architecture.md,
"Feature centring").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from fedmoe.roles import Role, tensor_roles

#: κ in μ = κ·φ: μ's gradient in each sample's clipped gradient is κ (μ - x_b) (norm ≈ κ·‖x - μ‖,
#: against the task's ‖p - y‖·‖x - μ‖ before clipping), and μ moves κ² per unit step. 0.5
#: and 1 moved μ faster but took more of each clipped gradient and lost at ε = 1
#: (docs/results.md, section 3.11).
CENTRE_RATE = 0.25


class FeatureCentre(nn.Module):
    """``x (..., D) -> x - μ`` (..., D), μ = κ·φ (D,) a parameter (zero at first) that takes
    the role of the model holding it (``shared`` in ``lmoe``, ``fedavg`` and ``fedper``;
    ``local`` in ``local``, where nothing leaves the client).

    :meth:`centred` gives the model's input and a per-sample loss to add to the task's,
    whose gradient trains μ towards the mean of the features; call
    :meth:`begin_local_round` (:func:`begin_local_round`) as each local round starts.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))  # φ (D,)
        #: the μ the model reads while training: μ when the local round began (the
        #: received global model's), fixed for the round (:meth:`begin_local_round`); None
        #: before (the current μ). Round state, not model state: a plain attribute, not a
        #: buffer (Opacus refuses a trainable layer with buffers), and never pickled.
        self.reference: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "reference": None}

    @property
    def mean(self) -> torch.Tensor:
        """μ = κ·φ (D,), detached."""
        return CENTRE_RATE * self.shift.detach()

    def begin_local_round(self) -> None:
        """Fix the μ the model reads for the local round that starts: the current one."""
        self.reference = self.mean.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return x - CENTRE_RATE * self.shift

    def centred(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x - μ_ref, ℓ)`` for x (B, D): the model's input and the centring loss (B,).

        While training, μ_ref is the μ the local round began with (:meth:`begin_local_round`),
        so the inputs shift only between rounds, by the federation's averaged μ, never by
        one client's noisy steps; ℓ's gradient is ``κ (μ - x_b)`` for φ (the current μ) and
        its value 0 (the reported loss stays the task's). Otherwise (evaluation, no
        gradient) μ_ref is the current μ and ℓ zeros."""
        if not (self.training and torch.is_grad_enabled()):
            return x - self.mean, x.new_zeros(x.shape[0])
        d = self(x).flatten(1)  # (B, D), with grad to φ
        half_sq = 0.5 * d.pow(2).sum(-1)  # (B,)
        reference = self.mean if self.reference is None else self.reference
        return x - reference.to(x), half_sq - half_sq.detach()


def begin_local_round(model: nn.Module) -> None:
    """Tell every :class:`FeatureCentre` of ``model`` that a local round starts."""
    for module in model.modules():
        if isinstance(module, FeatureCentre):
            module.begin_local_round()


def folded_bias(weight: Any, bias: Any, moved: Any) -> Any:
    """The reader's bias after μ moves by ``moved`` = μ_to − μ_from: ``b + W·moved``, so that
    ``W (x - μ_to) + b'`` equals ``W (x - μ_from) + b`` for every x. ``weight`` (O, D),
    ``bias`` (O,), ``moved`` (D,); torch tensors, or numpy arrays (computed in float64,
    returned in ``bias``'s dtype)."""
    if isinstance(bias, torch.Tensor):
        return bias + weight @ moved.to(weight)
    out = np.asarray(bias, np.float64) + np.asarray(weight, np.float64) @ np.asarray(
        moved, np.float64)
    return out.astype(np.asarray(bias).dtype)


@dataclass(frozen=True)
class CentreFold:
    """Where a model's centring folds (``centring-fold``): the state-dict keys of its
    :class:`FeatureCentre`'s φ and of the weight and bias of the ``nn.Linear`` that reads
    ``x - μ`` (the model's ``centre_reader``)."""

    shift: str
    weight: str
    bias: str
    reader: str  # the reader's submodule path

    @classmethod
    def of(cls, model: nn.Module) -> CentreFold | None:
        """The fold of ``model``: None without a centre. Models with a centre name their
        reader in ``centre_reader`` (a submodule path, an ``nn.Linear``)."""
        centre = getattr(model, "centre", None)
        if not isinstance(centre, FeatureCentre):
            return None
        reader = model.centre_reader
        if not isinstance(model.get_submodule(reader), nn.Linear):
            raise TypeError(f"{type(model).__name__}.centre_reader {reader!r} is no nn.Linear")
        return cls("centre.shift", f"{reader}.weight", f"{reader}.bias", reader)

    def keys(self) -> tuple[str, str, str]:
        return self.shift, self.weight, self.bias

    def role(self, model: nn.Module) -> Role | None:
        """The role that φ and the reader's weight and bias share in ``model`` (who folds:
        the server for ``shared``, the client for ``local``); None if they differ."""
        roles = {tensor_roles(model)[k] for k in self.keys()}
        return roles.pop() if len(roles) == 1 else None

    def apply(self, arrays: dict[str, np.ndarray], previous_shift: np.ndarray) -> None:
        """Fold, in ``arrays`` (key -> numpy array, in place), μ's move from
        κ·``previous_shift`` (the φ the reader's bias was trained against: the one sent)
        to κ·``arrays[shift]``."""
        moved = CENTRE_RATE * (np.asarray(arrays[self.shift], np.float64)
                               - np.asarray(previous_shift, np.float64))
        arrays[self.bias] = folded_bias(arrays[self.weight], arrays[self.bias], moved)


@torch.no_grad()
def end_local_round(model: nn.Module) -> None:
    """After a local round with ``centring-fold``: fold the move of μ during the round
    (from the μ₀ the model read, :meth:`FeatureCentre.begin_local_round`, to the current
    μ) into the reader's bias — for a model whose centre and reader are both ``local``
    (``local``: nothing leaves the client, no server folds for it). A shared centre is
    folded by the server (after aggregation, from the μ it sent). Call before the round's
    parameters are stored or sent."""
    fold = CentreFold.of(model)
    if fold is None or model.centre.reference is None or fold.role(model) != Role.LOCAL:
        return
    reader = model.get_submodule(fold.reader)
    reader.bias.copy_(folded_bias(reader.weight, reader.bias,
                                  model.centre.mean - model.centre.reference))
    model.centre.begin_local_round()  # the bias now answers to the current μ


@register_grad_sampler(FeatureCentre)
def feature_centre_grad_sample(layer: FeatureCentre, activations, backprops):
    """Per-sample gradient of φ, (B, D): ∂(x_b - κφ)/∂φ = -κ, so ``-κ · backprops_b``
    (summed over any token dimensions)."""
    g = backprops if backprops.dim() == 2 else backprops.flatten(1, -2).sum(1)  # (B, D)
    return {layer.shift: -CENTRE_RATE * g}  # B = 0 too (hooks mode's empty Poisson batch)
