"""A client's differentially private label histogram, for its personal label prior.

The release is the Gaussian mechanism on the class counts of the client's training set:

    counts_c + N(0, σ_h²),  c = 1..C.

Adding or removing one record changes exactly one count by 1, so the L2 sensitivity is 1
under the add/remove adjacency Opacus' accountants use for DP-SGD, and the release is a
Gaussian mechanism with noise multiplier σ_h. A record with L targets (``tmoe``'s next-
byte windows: the unigram prior) adds its own target histogram scaled to unit L2 norm
(:func:`label_counts`): the same sensitivity, the same mechanism. In the accountant's
terms it is one step at sample rate q = 1, the segment ``(σ_h, 1.0, 1)`` (RDP α/(2σ_h²)
at every order α), so it is charged to the ledger like any DP-SGD round and composes with
them. The counts are computed once per client (its first training round) and never again:
the release is kept in the client's state, and everything computed from it afterwards
(the shrinkage of :func:`shrink_counts`, the personal logits, the training that uses
them) is post-processing of this release. With ``label-prior-shrinkage = "federation"``
the client also sends the release to the server — it is already accounted as released —
which estimates the federation's label distribution (:func:`federation_prior`) and
sends it back with every message; each client then shrinks its own noisy counts towards
it by as much as its noise and its own skew warrant (:func:`overdispersion`,
:func:`shrink_to_federation`; empirical Bayes). Both are functions of DP releases and
public n, σ only.

σ_h is calibrated so that the release alone would cost a share of the client's budget
(``label-prior-share``, default 0.25); composed with DP-SGD under RDP it costs much less
than that share (σ of DP-SGD rises by 0-6% at ε ∈ {1, 3, 8}, docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def label_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The counts a client's label histogram releases: (num_classes,) float64.

    ``labels`` (N,): one label per record, the class counts (summing to N). ``labels``
    (N, L): L targets per record (a language model's next tokens); each record adds its
    own target histogram h scaled to unit L2 norm, h / ‖h‖₂, so that adding or removing
    one record moves the counts by a vector of L2 norm exactly 1 — the sensitivity the
    Gaussian release of :func:`noisy_label_counts` is calibrated for. Scaling to unit L2
    rather than unit L1 norm (h / L) gives each record the largest weight that
    sensitivity allows: L / ‖h‖₂ ≈ 3 times as much mass for 64-byte source windows (the
    noise stays the same), so the noisy release is about three times as precise, at the
    price of weighting windows of many distinct bytes a little more than repetitive ones
    (a weighted unigram estimate). The total, Σ_i ‖h_i‖₁ / ‖h_i‖₂ ∈ [N, N·√L], is not
    public; :func:`histogram_size` estimates it from the release.

    Raises
    ------
    ValueError
        If ``labels`` is not (N,) or (N, L), or a label is outside [0, num_classes).
    """
    labels = torch.as_tensor(labels).long()
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must be (N,) or (N, L), got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if labels.dim() == 1:
        return torch.bincount(labels, minlength=num_classes).to(torch.float64)
    rows = torch.zeros(len(labels), num_classes, dtype=torch.float64)
    rows.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))  # (N, C)
    norms = rows.norm(dim=1, keepdim=True)
    return (rows / norms.clamp(min=1.0)).sum(0)  # an empty window (L = 0) adds nothing


def histogram_size(counts: torch.Tensor, num_train: int, per_window: bool) -> float:
    """n of the shrinkage model (:func:`overdispersion`, :func:`shrink_to_federation`):
    the public ``num_train`` for a histogram of one label per record; for a histogram of
    windows (:func:`label_counts` of (N, L) targets), whose total mass is not public, the
    release's own total Σ c̃ (its noise std is σ_h·√C: 3 % of the mass of 320 64-byte
    windows at ε = 8, about 20 % at ε = 1), at least 1. A function of the release and
    public values: post-processing."""
    if not per_window:
        return float(num_train)
    return max(1.0, float(torch.as_tensor(counts, dtype=torch.float64).sum()))


def noisy_label_counts(labels: torch.Tensor, num_classes: int, sigma: float,
                       generator: torch.Generator) -> torch.Tensor:
    """:func:`label_counts` of ``labels`` (N,) or (N, L) plus N(0, σ²) noise on each:
    (num_classes,) float.

    ``generator`` must be seeded from the OS (:func:`fedmoe.privacy.secret_generator`),
    never from the run config.

    Raises
    ------
    ValueError
        If ``sigma`` is not > 0 and finite, or as :func:`label_counts`.
    """
    if not 0.0 < sigma < float("inf"):
        raise ValueError(f"the histogram's noise multiplier must be > 0 and finite, got {sigma}")
    counts = label_counts(labels, num_classes)
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


#: Additive smoothing of a federation-shrunk estimate: half a count per class on average
#: (Krichevsky–Trofimov's ½), spread over the classes like the federation's π̄
#: (:func:`federation_pseudo_counts`), so every class stays possible and no further
#: tempering is needed after the shrinkage.
FEDERATION_PSEUDO_COUNT = 0.5


@dataclass(frozen=True)
class FederationPrior:
    """What the server learns about its clients' label distributions from their DP label
    histograms: the federation's label distribution π̄, around which each client shrinks
    its own release (:func:`shrink_to_federation`; empirical Bayes, Efron & Morris, JASA
    1973; Morris, JASA 1983).

    Attributes
    ----------
    mean : tuple of float (C,)
        π̄, the federation's label distribution (non-negative, sums to 1).
    clients : int
        How many histograms the estimate is made from (≥ 2).
    """

    mean: tuple[float, ...]
    clients: int

    def __post_init__(self) -> None:
        mean = torch.tensor(self.mean, dtype=torch.float64)
        if (mean.dim() != 1 or len(mean) < 2 or not torch.isfinite(mean).all()
                or (mean < 0).any() or abs(float(mean.sum()) - 1.0) > 1e-6):
            raise ValueError(f"the federation's label distribution must be ≥ 2 non-negative "
                             f"shares summing to 1, got {self.mean}")
        if self.clients < 2:
            raise ValueError(f"the estimate needs ≥ 2 clients, got {self.clients}")


def federation_prior(histograms: Sequence[torch.Tensor]) -> FederationPrior:
    """Estimate π̄ (:class:`FederationPrior`) from the clients' DP label histograms.

    π̄ is the sum of the releases with negative entries then set to 0, normalised:
    π̄ ∝ max(Σ_i c̃_i, 0). Summing first lets the clients' noise average out before the
    positive part is taken; clipping each release first (Σ_i max(c̃_i, 0), as fedmoe did
    before) adds every client's positive noise to each class: on a vocabulary where most
    classes are rare, three times as much of π̄'s mass on classes no client holds
    (``tests/test_federation_prior.py``: 18 % against 6 %). If no summed count is above 0,
    π̄ is uniform. Uses only the releases: post-processing, no privacy cost.

    Parameters
    ----------
    histograms : sequence of Tensor (C,)
        The clients' released noisy counts (:func:`noisy_label_counts`), one per client.

    Raises
    ------
    ValueError
        For fewer than 2 histograms, or histograms that are not finite vectors of one
        length ≥ 2.
    """
    if len(histograms) < 2:
        raise ValueError(f"need ≥ 2 histograms, got {len(histograms)}")
    try:
        c = torch.stack([torch.as_tensor(h, dtype=torch.float64) for h in histograms])
    except RuntimeError as err:  # lengths that differ
        raise ValueError(f"histograms must be finite vectors of one length ≥ 2: {err}") from None
    if c.dim() != 2 or c.shape[1] < 2 or not torch.isfinite(c).all():
        raise ValueError(f"histograms must be finite vectors of one length ≥ 2, got shape "
                         f"{tuple(c.shape)}")
    total = c.sum(0).clamp(min=0)  # (C,)
    mean = total / total.sum() if total.sum() > 0 else torch.full_like(total, 1 / len(total))
    return FederationPrior(tuple(float(v) for v in mean / mean.sum()), len(c))


def federation_pseudo_counts(prior: FederationPrior) -> torch.Tensor:
    """The pseudo-counts a client adds to its federation-shrunk counts before they become
    its prior (π_i ∝ max(ĉ, 0) + α): (C,) float64,

        α_k = FEDERATION_PSEUDO_COUNT · C · π̄_k + 1/C.

    The first term is Dirichlet smoothing towards the federation's distribution — the
    smoothing of a document's unigram model towards its collection's (MacKay & Peto,
    "A hierarchical Dirichlet language model", Natural Language Engineering 1995; Zhai &
    Lafferty, "A study of smoothing methods for language models applied to ad hoc
    information retrieval", SIGIR 2001) — with the ½ per class of add-½
    (Krichevsky–Trofimov) as its total mass; the second, Perks' 1/C per class (Perks,
    J. Inst. Actuaries 1947; total mass 1), keeps possible a class the federation's π̄
    puts at 0. On balanced labels (π̄ ≈ 1/C) α is uniform too, ½ + 1/C per class instead of
    the ½ fedmoe had before (total mass C/2 + 1 against C/2: 20 % more for 10 classes,
    twice as much for 2); on a large, sparse vocabulary the uniform ½ put C/2 counts on its
    classes whatever their use: on ``tmoe``'s 256 bytes about 15 % of a client's histogram mass,
    most of it on bytes no client writes (docs/results.md §8). A function of π̄, itself
    post-processing of the DP releases: no privacy cost.
    """
    mean = torch.tensor(prior.mean, dtype=torch.float64)
    classes = len(mean)
    return FEDERATION_PSEUDO_COUNT * classes * mean + 1.0 / classes


def overdispersion(counts: torch.Tensor, sigma: float, num_train: float,
                   mean: torch.Tensor) -> float:
    """ρ_i ∈ [0, 1], how far one client's label shares spread around the federation's π̄,
    estimated by moments from its own release alone.

    Model (Dirichlet-multinomial with a concentration A_i of the client's own): π_i ~
    Dirichlet(A_i·π̄), so Var(π_ik) = ρ_i·π̄_k(1 − π̄_k) with ρ_i = 1/(A_i + 1) (0: the
    client draws its labels as the federation does; 1: it holds one class); c̃_k = n·π_ik
    + multinomial error (variance ≈ n·π̄_k(1 − π̄_k)) + N(0, σ²). Then
    E[(c̃_k − nπ̄_k)²] ≈ n²ρ_i·v_k + n·v_k + σ² with v_k = π̄_k(1 − π̄_k), and

        ρ_i = clip(Σ_k [(c̃_k − nπ̄_k)² − σ² − n·v_k] / Σ_k n²·v_k, 0, 1).

    A client's own concentration rather than one pooled over the federation: clients
    differ in how atypical they are (a package of codec tables among ordinary Python
    source; a hospital with a rare case mix), and a pooled ρ shrinks an atypical client
    towards π̄ as much as a typical one (docs/results.md §3.3). The estimate improves with
    the number of classes C it sums over. A function of the client's release, its public
    σ and n, and π̄: post-processing.

    Parameters
    ----------
    counts : Tensor (C,)
        The client's released noisy counts c̃.
    sigma : float
        Their σ_h (≥ 0).
    num_train : float
        n, the number of labels counted (:func:`histogram_size`).
    mean : Tensor (C,), float64
        π̄ (:attr:`FederationPrior.mean`).

    The inputs are checked by :func:`shrink_to_federation`, which calls it.
    """
    c = torch.as_tensor(counts, dtype=torch.float64)
    v = mean * (1 - mean)
    scale = float((num_train ** 2 * v).sum())
    if scale <= 0:  # π̄ on one class: no spread to estimate, nothing to shrink towards but it
        return 0.0
    excess = float(((c - num_train * mean) ** 2 - sigma ** 2 - num_train * v).sum())
    return min(max(excess / scale, 0.0), 1.0)


def shrink_to_federation(counts: torch.Tensor, sigma: float, num_train: float,
                         prior: FederationPrior) -> torch.Tensor:
    """A client's class counts estimated from its noisy release and the federation's
    :class:`FederationPrior`: per class the posterior mean of n·π_k under the normal model
    n·π_k ~ N(n·π̄_k, n²ρ·v_k), c̃_k | π_k ~ N(n·π_k, σ² + n·v_k), v_k = π̄_k(1 − π̄_k),
    ρ the client's :func:`overdispersion`:

        ĉ_k = w_k · c̃_k + (1 − w_k) · n·π̄_k,   w_k = n²ρv_k / (n²ρv_k + σ² + n·v_k).

    Without label skew (ρ ≈ 0) the estimate is the federation's distribution and the
    client's noisy histogram tilts nothing; under strong skew (n²ρv_k ≫ σ²) it is the
    client's own counts. A class the federation barely holds (v_k ≈ 0: a byte that is
    rare everywhere) stays near its rare share whatever the noise puts on it; with v_k = 0
    and σ = 0 (0/0) the client's own count is kept. A function of DP releases and public
    n, σ: post-processing.

    Parameters
    ----------
    counts : Tensor (C,)
        The client's released noisy counts.
    sigma : float
        Their σ_h (≥ 0).
    num_train : float
        n, the number of labels counted (≥ 1; :func:`histogram_size`).
    prior : FederationPrior
        The server's estimate from every client's release.

    Returns
    -------
    Tensor (C,), float64
        ĉ (may have entries below 0 where c̃ has; :meth:`LabelPrior.set_counts` clips them).

    Raises
    ------
    ValueError
        If ``counts`` is not finite or not of the prior's length, σ < 0 or n < 1.
    """
    c = torch.as_tensor(counts, dtype=torch.float64)
    mean = torch.tensor(prior.mean, dtype=torch.float64)
    if c.shape != mean.shape or not torch.isfinite(c).all():
        raise ValueError(f"counts must be finite and of shape {tuple(mean.shape)}, got "
                         f"{tuple(c.shape)}")
    if not (0.0 <= sigma < float("inf") and num_train >= 1):
        raise ValueError(f"need σ ≥ 0 (finite) and n ≥ 1, got σ={sigma}, n={num_train}")
    v = mean * (1 - mean)
    between = num_train ** 2 * overdispersion(c, sigma, num_train, mean) * v
    weight = between / (between + sigma ** 2 + num_train * v)
    weight = torch.where(torch.isfinite(weight), weight, torch.ones_like(weight))  # 0/0
    return weight * c + (1 - weight) * num_train * mean
