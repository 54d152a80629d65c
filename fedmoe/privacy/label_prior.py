"""A client's differentially private label histogram, for its personal label prior.

The release is the Gaussian mechanism on the class counts of the client's training set:

    counts_c + N(0, σ_h²),  c = 1..C.

Adding or removing one record changes exactly one count by 1, so the L2 sensitivity is 1
under the add/remove adjacency Opacus' accountants use for DP-SGD, and the release is a
Gaussian mechanism with noise multiplier σ_h. In the accountant's terms it is one step at
sample rate q = 1, the segment ``(σ_h, 1.0, 1)`` (RDP α/(2σ_h²) at every order α), so it is
charged to the ledger like any DP-SGD round and composes with them. The counts are
computed once per client (its first training round) and never again: the prior is
kept in the client's state, and everything computed from it afterwards (the shrinkage of
:func:`shrink_counts`, the personal logits, the training that uses them) is
post-processing of this release.

σ_h is calibrated so that the release alone would cost a share of the client's budget
(``label-prior-share``, default 0.25); composed with DP-SGD under RDP it costs much less
than that share (σ of DP-SGD rises by 0-6% at ε ∈ {1, 3, 8}, docs/architecture.md).
"""

from __future__ import annotations

import torch

from fedmoe.privacy.accountant import Segment, calibrate_noise


def prior_noise_multiplier(budget: float, share: float, delta: float,
                           accountant: str = "rdp") -> float:
    """σ_h of the label histogram: the smallest σ whose single release costs at most
    ``share · budget`` at ``delta``.

    Raises
    ------
    ValueError
        If ``share`` is not in (0, 1) or ``budget`` is not > 0 and finite.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"label-prior-share must be in (0, 1), got {share}")
    if not 0.0 < budget < float("inf"):
        raise ValueError(f"the budget must be > 0 and finite, got {budget}")
    return calibrate_noise(share * budget, delta, 1.0, 1, accountant,
                           tolerance=min(0.01, 0.1 * share * budget))


def prior_segment(sigma: float) -> Segment:
    """The accountant segment of one histogram release at noise multiplier ``sigma``."""
    return (float(sigma), 1.0, 1)


def noisy_label_counts(labels: torch.Tensor, num_classes: int, sigma: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Class counts of ``labels`` (N,) plus N(0, σ²) noise on each: (num_classes,) float.

    ``generator`` must be seeded from the OS (:func:`fedmoe.privacy.secret_generator`),
    never from the run config.

    Raises
    ------
    ValueError
        If ``sigma`` is not > 0 and finite, or a label is outside [0, num_classes).
    """
    if not 0.0 < sigma < float("inf"):
        raise ValueError(f"the histogram's noise multiplier must be > 0 and finite, got {sigma}")
    labels = torch.as_tensor(labels).reshape(-1).long()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    noise = torch.empty(num_classes, dtype=torch.float64).normal_(0.0, sigma,
                                                                  generator=generator)
    return (counts + noise).to(torch.float32)


def shrink_counts(counts: torch.Tensor, sigma: float) -> torch.Tensor:
    """Shrink noisy class counts towards their own mean (positive-part James–Stein).

    With ``c = μ + N(0, σ²·I)`` over C classes and ``c̄`` the mean of ``c``, returns

        ĉ = c̄ + max(0, 1 − (C − 3)·σ² / ‖c − c̄‖²) · (c − c̄),

    which has lower expected squared error than ``c`` for every μ when C ≥ 4 (James &
    Stein 1961; the shrink-to-the-mean form is Efron & Morris, JASA 1973; the positive part
    lowers it further, Baranchik 1964). Under no label skew (μ flat) ‖c − c̄‖² is mostly
    noise and ĉ is close to flat, so a noisy histogram does not tilt a client's logits at
    random; under strong skew ‖c − c̄‖² ≫ (C − 3)σ² and ĉ ≈ c. For C ≤ 3 the counts are
    returned unchanged (no shrinkage estimator dominates there).

    A function of the DP release and the public σ only: post-processing, no privacy cost.

    Parameters
    ----------
    counts : Tensor (C,)
        The noisy counts of :func:`noisy_label_counts`.
    sigma : float
        The release's noise standard deviation σ_h (> 0).

    Raises
    ------
    ValueError
        If ``counts`` is not one-dimensional and finite or ``sigma`` is not > 0 and finite.
    """
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or not torch.isfinite(counts).all():
        raise ValueError(f"counts must be a finite (C,) vector, got shape {tuple(counts.shape)}")
    if not 0.0 < sigma < float("inf"):
        raise ValueError(f"sigma must be > 0 and finite, got {sigma}")
    c = counts.to(torch.float64)
    if len(c) <= 3:
        return counts.clone()
    centred = c - c.mean()
    spread = float((centred ** 2).sum())
    factor = max(0.0, 1.0 - (len(c) - 3) * sigma ** 2 / spread) if spread > 0 else 0.0
    return (c.mean() + factor * centred).to(counts.dtype)
