"""(ε, δ) accounting over a history of DP-SGD segments, and σ calibration.

A *segment* is ``(noise_multiplier σ, sample_rate q, steps)``: ``steps`` Poisson-subsampled
Gaussian steps. Opacus' accountants do the maths (RDP by default, PRV as an option); this
module only feeds them a history, so composition across rounds is just a longer history.

Opacus' PRV accountant discretises the privacy-loss distribution on a grid whose size it
derives from an RDP bound: ``N ≈ 2L / mesh`` points with ``L`` the RDP ε at δ/4000 and
``mesh = 0.01 / sqrt(T·ln(12000/δ)/2)`` over ``T`` steps. Small σ or very long histories
(large ε) make ``N`` explode — σ=0.1, q=0.1, 200 steps asks for 5.7·10⁷ points and
gigabytes — and for tiny δ its own floating-point check raises. :func:`epsilon` computes
that grid (cheaply, with Opacus' own domain functions) *before* handing a history to PRV
and raises :class:`AccountingError` instead when it would exceed :data:`PRV_MAX_POINTS`
or trip that check: PRV accounting costs at most a bounded time and memory, and never
takes the process down.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    compute_safe_domain_size,
)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

Segment = tuple[float, float, int]  # (sigma, q, steps)

#: RDP orders searched. Opacus' default stops at 63, which binds (and over-states ε) for
#: the few-step, large-ε runs typical of FL; the extra orders only ever tighten ε.
RDP_ALPHAS: list[float] = (
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512]
)


#: The most grid points × history segments handed to Opacus' PRV accountant. Measured
#: here (opacus 1.6, CPU): about 160 bytes and 2.5 µs per point, so at most ~0.5 GB and
#: ~8 s per evaluation; ordinary runs need 10⁵–2·10⁶ (σ=1, q=0.1: 200 steps 1.7·10⁵,
#: 2,000 steps 1.6·10⁶).
PRV_MAX_POINTS = 3_000_000
#: Opacus' PRV ε error and its δ error as a fraction of δ (its defaults).
PRV_EPS_ERROR, PRV_DELTA_ERROR = 0.01, 1e-3


class AccountingError(ValueError):
    """The accountant cannot give a reliable ε for this history at an affordable cost."""


def _accountant_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


def steps_per_epoch(sample_rate: float) -> int:
    """DP-SGD steps in one epoch of Poisson sampling at rate q (Opacus' DPDataLoader: int(1/q))."""
    return max(1, int(1.0 / sample_rate))


def epsilon(history: Iterable[Segment], delta: float, accountant: str = "rdp") -> float:
    """ε after composing every segment of ``history`` at the given δ (0 for no history).
    A segment at σ = ∞ releases nothing (its privacy loss is 0) and is left out.

    Raises
    ------
    AccountingError
        If a segment's σ is NaN or negative, or its q is not in (0, 1] (neither accountant
        terminates on those); if ``accountant`` is ``prv`` and the history is one it cannot
        account reliably or affordably (:func:`check_prv`).
    """
    # Composition does not depend on order, so rounds with the same (σ, q) are one segment
    # of their summed steps: exact for both accountants, faster, and the same history gives
    # the same ε however it was split into rounds.
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        if int(n) <= 0:
            continue
        if not (float(s) >= 0 and 0 < float(q) <= 1):  # NaN fails both
            raise AccountingError(f"segment (σ={s}, q={q}, steps={n}): σ must be a number "
                                  "≥ 0 and q in (0, 1]")
        if not math.isinf(float(s)):
            merged[(float(s), float(q))] = merged.get((float(s), float(q)), 0) + int(n)
    if not merged:
        return 0.0
    return _epsilon(tuple(sorted((s, q, n) for (s, q), n in merged.items())), delta, accountant)


def prv_grid_points(segments: Sequence[Segment], delta: float) -> int:
    """The size of the grid Opacus' PRV accountant would discretise ``segments`` on at δ:
    the same domain its ``PRVAccountant`` builds (RDP-derived bound ``L`` and mesh), with no
    large allocation."""
    total = sum(int(n) for _, _, n in segments)
    delta_error = delta * PRV_DELTA_ERROR
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        bound = compute_safe_domain_size(
            [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in segments],
            [int(n) for _, _, n in segments], eps_error=PRV_EPS_ERROR,
            delta_error=delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)
    if not math.isfinite(bound) or 2 * bound / mesh > 1e15:
        return 10**15  # beyond any limit (an infinite RDP bound: σ far too small)
    return Domain.create_aligned(-bound, bound, mesh).size


def check_prv(segments: Sequence[Segment], delta: float) -> None:
    """Raise :class:`AccountingError` unless Opacus' PRV accountant can give ε for
    ``segments`` at δ reliably and within :data:`PRV_MAX_POINTS`.

    Raises
    ------
    AccountingError
        Naming the cause (grid too large: σ too small or ε too large; δ so small that
        floating-point error dominates) and the fix.
    """
    points = prv_grid_points(segments, delta)
    sigmas = ", ".join(f"{s:g}" for s, _, _ in segments)
    steps = sum(int(n) for _, _, n in segments)
    if points * len(segments) > PRV_MAX_POINTS:
        raise AccountingError(
            f"the PRV accountant would need a grid of {points:.3g} points × {len(segments)} "
            f"segment(s) (limit {PRV_MAX_POINTS:.3g}, about "
            f"{points * len(segments) * 160 / 2**30:.1f} GB) for σ={sigmas} over {steps} "
            "steps: σ is too small or ε too large for it. Use accountant='rdp', or a larger "
            "noise-multiplier / a smaller target-epsilon")
    # Opacus' own check (DiscretePRV.compute_epsilon): float error must stay below δ
    if np.finfo(np.longdouble).eps * points > delta * (1 - PRV_DELTA_ERROR):
        raise AccountingError(
            f"δ={delta:g} is too small for the PRV accountant: its floating-point error on a "
            f"grid of {points:.3g} points ({float(np.finfo(np.longdouble).eps) * points:.2g}) "
            "would exceed δ. Use accountant='rdp', or a larger target-delta")


@lru_cache(maxsize=4096)
def _epsilon(segments: tuple[Segment, ...], delta: float, accountant: str) -> float:
    """Cached: a ledger re-evaluates the same history when it checks, charges and re-reads.

    Raises
    ------
    AccountingError
        For a PRV history :func:`check_prv` refuses (not cached: the check is cheap).
    """
    if accountant == "rdp":
        return _rdp_epsilon(segments, delta)
    check_prv(segments, delta)
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

    With PRV the bracket comes from RDP first (PRV is the tighter accountant, so its σ is
    at most RDP's, doubled if not); probes that PRV cannot account (:func:`check_prv`:
    the small σ a bisection tries first) count as over the target without running it, so
    calibration only pays for PRV near the answer.

    Raises
    ------
    AccountingError
        If PRV cannot account the history even at the σ RDP calibrates (tiny δ, or a
        target so large that the answer's grid is too big).
    ValueError
        If ``prior`` alone leaves less than ``tolerance`` of the target: no σ can help.
    """
    prior = list(prior)

    def eps(sigma: float) -> float:
        try:
            return epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)
        except AccountingError:
            if sigma >= high_checked:
                raise
            return math.inf  # a σ below the bracket PRV cannot price: treat as too small

    floor = epsilon(prior, delta, accountant)
    if floor > target_epsilon - tolerance:
        raise ValueError(
            f"the prior spend ε={floor:.3f} leaves no room under the target {target_epsilon:g}"
        )
    low, high = 0.0, 10.0
    high_checked = 0.0
    if accountant == "prv":
        try:
            high = calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp",
                                   prior=prior, tolerance=tolerance)
        except ValueError:  # RDP's looser prior leaves no room: bracket from 10 instead
            pass
        high_checked = high  # PRV must price this σ: else its error is the reason
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
