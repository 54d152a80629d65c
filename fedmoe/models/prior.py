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

import torch
from torch import nn

from fedmoe.roles import Role, set_role


class LabelPrior(nn.Module):
    """``logits (..., C) -> logits + log π_i`` while :attr:`use_local` is on.

    A constant added to every logit changes neither the softmax nor the argmax, so ``log π_i``
    and ``log(C · π_i)`` predict alike; ``log π_i`` is never all zero once set (Σπ_i = 1, C ≥
    2), even for a uniform π_i (a fully shrunk histogram), which :attr:`is_set` relies on.

    The prior is a buffer, not a parameter: DP-SGD never trains or noises it; it is set
    once from a DP label histogram by :meth:`set_counts`.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        set_role(self, Role.LOCAL)
        self.register_buffer("log_prior", torch.zeros(num_classes))  # (C,)
        # the client's DP release its prior is computed from: noisy counts (C,) and their
        # σ_h (()); σ_h = 0 until released (and for exact counts of a non-private run)
        self.register_buffer("counts", torch.zeros(num_classes))
        self.register_buffer("noise", torch.tensor(0.0))
        self.use_local = True

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., C)
        return logits + self.log_prior if self.use_local else logits

    @torch.no_grad()
    def set_counts(self, counts: torch.Tensor, pseudo_count: float) -> None:
        """Set π_i ∝ max(counts, 0) + pseudo_count from (noisy) class counts (C,).

        ``pseudo_count`` > 0 (additive smoothing) keeps every class possible and tempers a
        noisy histogram; fedmoe uses the noise's standard deviation σ_h.

        Raises
        ------
        ValueError
            If ``counts`` is not (C,) and finite, or ``pseudo_count`` is not > 0.
        """
        counts = torch.as_tensor(counts, dtype=self.log_prior.dtype)
        if counts.shape != self.log_prior.shape or not torch.isfinite(counts).all():
            raise ValueError(f"label counts must be {tuple(self.log_prior.shape)} and finite, "
                             f"got {tuple(counts.shape)}")
        if not pseudo_count > 0:
            raise ValueError(f"pseudo_count must be > 0, got {pseudo_count}")
        smoothed = counts.clamp(min=0.0) + pseudo_count
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
