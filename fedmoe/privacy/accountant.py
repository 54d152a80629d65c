"""(ε, δ) accounting over a history of DP-SGD segments, and σ calibration.

A *segment* is ``(noise_multiplier σ, sample_rate q, steps)``: ``steps`` Poisson-subsampled
Gaussian steps. Opacus' accountants do the maths (RDP by default, PRV as an option); this
module only feeds them a history, so composition across rounds is just a longer history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

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
    segments = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not segments:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    if accountant == "rdp":
        # Same (σ, q) segments compose additively in RDP; merging them is exact and faster.
        merged: dict[tuple[float, float], int] = {}
        for s, q, n in segments:
            merged[(s, q)] = merged.get((s, q), 0) + n
        segments = [(s, q, n) for (s, q), n in merged.items()]
    acc.history = segments
    eps = float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))
    return eps if math.isfinite(eps) else math.inf


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    *,
    tolerance: float = 0.01,
) -> float:
    """Smallest σ (within ``tolerance`` in ε) whose ``steps`` at rate q stay ≤ target ε.

    Costs a binary search over the accountant (seconds): call it once per run.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=tolerance,
            **_accountant_kwargs(accountant),
        )
    )

