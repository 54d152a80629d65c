"""The personal label-prior expert: a client's own class prior, added to a classifier's logits.

Under label skew (each client holds a few classes) the Bayes-optimal personal classifier is
the shared one re-weighted by the client's label distribution π_i:

    p_i(y | x) ∝ p(y | x) · π_i(y) / π(y)          (label shift; Saerens et al., 2002)

:class:`LabelPrior` holds ``log π_i`` (C classes; all zero = no prior held yet) and adds
it to the logits while the model routes over its personal parts. Training uses
the same adjusted logits, so the *shared* parameters learn prior-free ("balanced") scores
that every client can re-weight with its own prior: logit adjustment (Menon et al.,
"Long-tail learning via logit adjustment", ICLR 2021), as federated learning under label
skew uses it (Zhang et al., "Federated Learning with Label Distribution Skew via Logits
Calibration", ICML 2022). The global-only score (:func:`fedmoe.models.layers.set_use_local`
off) leaves the prior out.

π_i comes from a differentially private histogram of the client's training labels
(:func:`fedmoe.privacy.label_prior.noisy_label_counts`), released once and accounted in the
client's ledger; the buffer is a ``local`` tensor, kept with the client's local experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from fedmoe.roles import Role, set_role


#: κ in s = exp(κ·θ): the share of θ in each sample's clipped gradient (its gradient is
#: κ times d loss / d log s) and the speed of log s (κ² per unit step). At κ = 1 θ took
#: so much of the clipping bound C that the scores learned more slowly (IID digits,
#: validation, same noise draws: −0.5, −1.1, −3.1 points at ε = 8, 3, 1 against 0.25);
#: at 0.25 it takes 1/16 as much and s still reaches, at ε ≥ 3, the scale a fit of the
#: final scores gives (docs/results.md §3.4).
SCALE_RATE = 0.25


class Calibrated(NamedTuple):
    """A label-prior classifier's outputs while it trains (:func:`personal_logits`).

    ``logits`` (B, C): the shared scores plus the prior, what the scores train on;
    ``calibrated`` (B, C): s · (the scores, detached) plus the prior, what the scale s
    trains on. :class:`~fedmoe.models.tasks.Classification` sums the two cross-entropies
    per sample; everywhere else (evaluation, export) the model returns ``calibrated``.
    """

    logits: torch.Tensor
    calibrated: torch.Tensor


class ScoreScale(nn.Module):
    """``scores (..., C) -> s · scores``, one learned ``shared`` scale s = exp(κ·θ),
    κ = :data:`SCALE_RATE` (θ starts at 0: s = 1, the model as it was without it).

    Why: a personal label prior ``log π_i`` added to a classifier's scores is the Bayes
    correction only if the scores are calibrated log-likelihoods (label shift; Saerens et
    al., 2002). Scores trained by DP-SGD are not: clipping stops them short (too flat) at
    small noise and the noise makes them too sharp at large noise, so a fixed-weight
    prior overrules them or is overruled. One scale of the shared scores puts the two on
    one footing: temperature scaling (Guo et al., "On calibration of modern neural
    networks", ICML 2017), learned on the training data inside the same DP-SGD step and
    averaged like every shared tensor, rather than fitted on held-out data — equivalently
    the weight of the post-hoc logit adjustment (Menon et al., ICLR 2021), set by the
    data instead of by hand.

    s learns from the detached scores only (:func:`personal_logits`): the scores keep
    training on ``scores + log π`` exactly as without a scale. Trained jointly, s and the
    scores' weights co-adapt (s grew to ~9 on digits at ε = 8, multiplying the DP noise
    in the weights by as much; docs/results.md §3.4).

    Its per-sample gradient is exact, ∂ℓ_b/∂θ = κ · Σ g_b · s · x_b (g = ∂ℓ_b/∂output), from
    the registered grad sampler :func:`score_scale_grad_sample`, so DP-SGD clips and
    noises it with the rest of each sample's gradient (one accounted mechanism).
    """

    def __init__(self) -> None:
        super().__init__()
        set_role(self, Role.SHARED)
        self.log_scale = nn.Parameter(torch.zeros(1))  # θ (1,)

    @property
    def scale(self) -> float:
        """s = exp(κ·θ)."""
        return float((SCALE_RATE * self.log_scale.detach()).exp())

    def forward(self, scores: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return scores * (SCALE_RATE * self.log_scale).exp()


def personal_logits(scale: nn.Module, prior: LabelPrior, scores: torch.Tensor, *,
                    training: bool) -> torch.Tensor | Calibrated:
    """A label-prior classifier's output from its shared ``scores`` (B, C).

    With a :class:`ScoreScale` and while training with gradients on:
    :class:`Calibrated` ``(prior(scores), prior(scale(scores.detach())))``; otherwise the
    calibrated logits ``prior(scale(scores))`` (B, C) (``scale`` may be ``nn.Identity``).
    """
    if isinstance(scale, ScoreScale) and training and torch.is_grad_enabled():
        return Calibrated(prior(scores), prior(scale(scores.detach())))
    return prior(scale(scores))


@register_grad_sampler(ScoreScale)
def score_scale_grad_sample(layer: ScoreScale, activations, backprops):
    """Per-sample gradient of θ, (B, 1): Σ over the sample's other dimensions of
    ``backprops · activations`` times κ·exp(κ·θ)."""
    x = activations[0].to(backprops.dtype)
    per_sample = (backprops * x).flatten(1).sum(-1) if x.dim() > 1 else backprops * x
    per_sample = per_sample * SCALE_RATE * (SCALE_RATE * layer.log_scale.detach()).exp()
    return {layer.log_scale: per_sample.unsqueeze(-1)}


class LabelPrior(nn.Module):
    """``logits (..., C) -> logits + log π_i`` while :attr:`use_local` is on.

    A constant added to every logit changes neither the softmax nor the argmax, so ``log π_i``
    and ``log(C · π_i)`` predict alike; ``log π_i`` is never all zero once set (Σπ_i = 1, C ≥
    2), even for a uniform π_i (a fully shrunk histogram), which :attr:`is_set` relies on.

    The prior is a buffer, not a parameter: DP-SGD never trains or noises it; it is set
    once from a DP label histogram by :meth:`set_counts`. ``per_window``: the histogram
    counts windows of next-token targets (``tmoe``'s unigram prior), not one label per
    record.
    """

    #: Whether the histogram counts windows of targets (a language model's next tokens,
    #: :func:`fedmoe.privacy.label_prior.label_counts` of (N, L)) or one label a record
    #: (a class attribute too: a prior pickled before the attribute existed reads False).
    per_window: bool = False

    def __init__(self, num_classes: int, *, per_window: bool = False) -> None:
        super().__init__()
        set_role(self, Role.LOCAL)
        self.per_window = per_window
        self.register_buffer("log_prior", torch.zeros(num_classes))  # (C,)
        # the client's DP release its prior is computed from: noisy counts (C,) and their
        # σ_h (()); σ_h = 0 until released (and for exact counts of a non-private run)
        self.register_buffer("counts", torch.zeros(num_classes))
        self.register_buffer("noise", torch.tensor(0.0))
        self.use_local = True

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return logits + self.log_prior if self.use_local else logits

    @torch.no_grad()
    def set_counts(self, counts: torch.Tensor, pseudo_count: float | torch.Tensor) -> None:
        """Set π_i ∝ max(counts, 0) + pseudo_count from (noisy) class counts (C,).

        ``pseudo_count`` > 0 (additive smoothing: one value for every class, or (C,) one
        per class) keeps every class possible and tempers a noisy histogram; fedmoe uses
        the noise's standard deviation σ_h, or with the federation shrinkage
        :func:`~fedmoe.privacy.label_prior.federation_pseudo_counts`.

        Raises
        ------
        ValueError
            If ``counts`` is not (C,) and finite, or ``pseudo_count`` is not > 0 (every
            entry, finite) or not one value or (C,).
        """
        counts = torch.as_tensor(counts, dtype=self.log_prior.dtype)
        if counts.shape != self.log_prior.shape or not torch.isfinite(counts).all():
            raise ValueError(f"label counts must be {tuple(self.log_prior.shape)} and finite, "
                             f"got {tuple(counts.shape)}")
        pseudo = torch.as_tensor(pseudo_count, dtype=self.log_prior.dtype)
        if pseudo.shape not in ((), counts.shape) or not (
                torch.isfinite(pseudo).all() and (pseudo > 0).all()):
            raise ValueError(f"pseudo_count must be > 0 and finite, one value or "
                             f"{tuple(counts.shape)}, got {pseudo_count}")
        smoothed = counts.clamp(min=0.0) + pseudo
        self.log_prior.copy_((smoothed / smoothed.sum()).log())

    @torch.no_grad()
    def keep_release(self, counts: torch.Tensor, noise: float) -> None:
        """Keep the released (noisy) counts (C,) and their σ_h, from which the prior is
        computed (:func:`clients.app.apply_label_prior`) on every later message."""
        self.counts.copy_(torch.as_tensor(counts, dtype=self.counts.dtype))
        self.noise.fill_(float(noise))

    @property
    def released(self) -> bool:
        """Whether the client's DP label histogram is kept here (σ_h > 0)."""
        return bool(self.noise > 0)

    @property
    def is_set(self) -> bool:
        """Whether a prior has been set (the buffer starts at all zeros, which ``log π_i`` of
        a distribution over C ≥ 2 classes never is)."""
        return bool(self.log_prior.abs().sum() > 0)


def label_priors(model: nn.Module) -> list[LabelPrior]:
    """The label-prior modules of ``model`` (empty if it has none)."""
    return [m for m in model.modules() if isinstance(m, LabelPrior)]
