"""(ε, δ) accounting over a history of DP-SGD segments, and σ calibration.

A *segment* is ``(noise_multiplier σ, sample_rate q, steps)``: ``steps`` Poisson-subsampled
Gaussian steps. Opacus' accountants do the maths (RDP by default, PRV as an option); this
module only feeds them a history, so composition across rounds is just a longer history.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

Segment = tuple[float, float, int]  # (sigma, q, steps)

#: RDP orders searched. Opacus' default stops at 63, which binds (and over-states ε) for
#: the few-step, large-ε runs typical of FL; the extra orders only ever tighten ε.
RDP_ALPHAS: list[float] = (
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512]
)


def _accountant_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


def steps_per_epoch(sample_rate: float) -> int:
    """DP-SGD steps in one epoch of Poisson sampling at rate q (Opacus' DPDataLoader: int(1/q))."""
    return max(1, int(1.0 / sample_rate))


def epsilon(history: Iterable[Segment], delta: float, accountant: str = "rdp") -> float:
    """ε after composing every segment of ``history`` at the given δ (0 for no history)."""
    # Composition does not depend on order, so rounds with the same (σ, q) are one segment
    # of their summed steps: exact for both accountants, faster, and the same history gives
    # the same ε however it was split into rounds.
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if int(n) > 0:
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    if not merged:
        return 0.0
    return _epsilon(tuple(sorted((s, q, n) for (s, q), n in merged.items())), delta, accountant)


@lru_cache(maxsize=4096)
def _epsilon(segments: tuple[Segment, ...], delta: float, accountant: str) -> float:
    """Cached: a ledger re-evaluates the same history when it checks, charges and re-reads."""
    if accountant == "rdp":
        return _rdp_epsilon(segments, delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(segments)
    with warnings.catch_warnings():
        # "Optimal order is the smallest/largest alpha": the bound is then looser than it
        # could be, never too small. Over-stating ε is the safe side; no need to alarm.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        # PRV at q=1 takes log(0) on a masked branch; the result is unaffected.
        warnings.filterwarnings("ignore", message="divide by zero encountered in log")
        eps = float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))
    return eps if math.isfinite(eps) else math.inf


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    *,
    prior: Sequence[Segment] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest σ whose ``steps`` at rate q, after the ``prior`` history, stay ≤ target ε.

    Bisection on the accountant's own ε (monotone in σ): the result is never above the
    target and at most ``tolerance`` below it. Costs seconds: call it once per run.

    Raises
    ------
    ValueError
        If ``prior`` alone leaves less than ``tolerance`` of the target: no σ can help.
    """
    prior = list(prior)

    def eps(sigma: float) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    floor = epsilon(prior, delta, accountant)
    if floor > target_epsilon - tolerance:
        raise ValueError(
            f"the prior spend ε={floor:.3f} leaves no room under the target {target_epsilon:g}"
        )
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise ValueError(f"no σ ≤ 1e6 reaches ε ≤ {target_epsilon:g}; raise the target")
    while True:
        mid = (low + high) / 2.0
        value = eps(mid)
        if value > target_epsilon:
            low = mid
        else:
            high = mid
            if value >= target_epsilon - tolerance:
                return high
        if high - low < 1e-9 * high:  # ε flat in σ (tiny q·steps): the upper end is safe
            return high


@lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at every order of :data:`RDP_ALPHAS` (Opacus'
    maths). Opacus' ``compute_rdp`` is this vector times the steps, so caching it per (σ, q)
    makes ε of a history that grows by a round cost one cheap conversion instead of the
    whole per-order computation (about 0.5 s on these machines) again."""
    return compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ALPHAS)


def _rdp_epsilon(segments: tuple[Segment, ...], delta: float) -> float:
    """What Opacus' ``RDPAccountant.get_epsilon`` computes for this history, from cached
    per-step RDP vectors: Σ steps · rdp(σ, q), then the same RDP -> (ε, δ) conversion."""
    rdp = sum(n * _rdp_per_step(s, q) for s, q, n in segments)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = get_privacy_spent(orders=RDP_ALPHAS, rdp=rdp, delta=delta)
    eps = float(eps)
    return eps if math.isfinite(eps) else math.inf
