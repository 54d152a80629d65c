"""A client's privacy plan for a run: δ, q, steps per round, σ, and what its budget allows.

The server plans every client once, before its first round, from what the client told it
(train set size, own budget, prior spend) and the run config. The train message carries the
plan's DP parameters; server and client both charge exactly those, so their ledgers agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedmoe.config import FedMoEConfig
from fedmoe.privacy.accountant import (
    AccountingError,
    Segment,
    calibrate_noise,
    epsilon,
    steps_per_epoch,
)
from fedmoe.privacy.label_prior import prior_noise_multiplier, prior_segment
from fedmoe.privacy.ledger import LedgerEntry

#: "Rounds the budget allows" is searched up to this many times the planned rounds (the
#: accountants slow down with very long histories); a plan at the cap allows at least that.
ROUNDS_ALLOWED_CAP = 10


#: The most δ the default rule ever gives (clients of ≤ 100 examples get exactly this).
MAX_DEFAULT_DELTA = 1e-3


class PlanError(ValueError):
    """A client cannot be planned with these settings (the server excludes it and says why)."""


def client_delta(config: FedMoEConfig, num_train: int) -> float:
    """δ for a client with ``num_train`` examples: ``target-delta``, or if that is 0 the
    largest power of ten ≤ 1/(10·n), capped at :data:`MAX_DEFAULT_DELTA` (1e-3).

    δ < 1/n is necessary, not sufficient: the mechanism that publishes each record with
    probability δ is (0, δ)-DP, so δ must be small in absolute terms too (Dwork & Roth,
    *The Algorithmic Foundations of Differential Privacy*, 2014, §2.3: δ "less than the
    inverse of any polynomial in the size of the database"; Ponomareva et al., *How to
    DP-fy ML*, JAIR 2023: δ ≪ 1/n). The power of ten keeps δ < 1/(10·n) with a margin and
    readable; the cap keeps a small client's δ at most 1/1000 (a 1-example client gets
    1e-3, not 0.1). Computed in integers: exact at every power of ten.
    """
    if config.target_delta > 0:
        return config.target_delta
    digits = 0  # the smallest j with 10**j ≥ n, so 10**-(j+1) ≤ 1/(10·n) < 10**-j
    while 10 ** digits < max(num_train, 1):
        digits += 1
    return min(MAX_DEFAULT_DELTA, 10.0 ** -(digits + 1))


def delta_error(delta: float, num_train: int, client: str) -> str:
    """Why δ ≥ 1/n protects nobody, and what to do (for refusals on both sides)."""
    return (f"client {client!r}: δ={delta:g} is not below 1/n = {1.0 / num_train:.3g} for its "
            f"{num_train} training examples: a mechanism that publishes a random record "
            "outright meets such a δ. Lower target-delta (or set it to 0 for the automatic "
            "rule)")


def check_delta(delta: float, num_train: int, client: str) -> None:
    """Raise :class:`PlanError` unless 0 < δ < 1/n."""
    if not 0 < delta < 1.0 / max(num_train, 1):
        raise PlanError(delta_error(delta, num_train, client))


def client_sample_rate(config: FedMoEConfig, num_train: int) -> float:
    """q for a client: ``batch-size / n`` (capped at 1) if a batch size is set, else ``sample-rate``."""
    if config.batch_size > 0:
        return min(1.0, config.batch_size / max(num_train, 1))
    return config.sample_rate


def gradient_noise_scale(noise_multiplier: float, sample_rate: float, num_train: int) -> float:
    """ν = σ / (q · n): the standard deviation of the Gaussian noise on a client's averaged
    clipped gradient per DP-SGD step, in units of the clipping bound C (the noise σC is
    added to a sum of about q·n clipped per-sample gradients). 0 for a non-private round.

    Every coordinate of the update gets noise of this size whatever the model, while the
    signal per coordinate shrinks as more coordinates share the clipping budget: the rule
    behind ``expert-noise-limit``. It reads n, which fedmoe treats as public (the plan's σ
    is calibrated from it, docs/architecture.md).

    Raises
    ------
    ValueError
        If σ < 0, q not in (0, 1] or n < 1.
    """
    if noise_multiplier < 0 or not 0 < sample_rate <= 1 or num_train < 1:
        raise ValueError(f"need σ >= 0, q in (0, 1], n >= 1; got σ={noise_multiplier}, "
                         f"q={sample_rate}, n={num_train}")
    return noise_multiplier / (sample_rate * num_train)


@dataclass(frozen=True)
class ClientPlan:
    """One client's DP parameters for the run.

    ``rounds_allowed`` is how many rounds of these parameters its budget pays for, after its
    ``prior`` spend (ledger history from earlier runs) and its label histogram, searched up
    to ``ROUNDS_ALLOWED_CAP`` × the planned rounds; 0 means it cannot take part.
    ``prior_noise`` is σ_h of the DP label histogram the client releases with its first
    round of this run (:mod:`fedmoe.privacy.label_prior`); 0 = none. ``pretrain_noise``
    > 0 is the σ of rounds 1..``pretrain_rounds`` (``pretrain-share``); every other round
    trains at ``noise_multiplier``.
    """

    client: str
    num_train: int
    budget: float
    delta: float
    accountant: str
    sample_rate: float
    steps: int  # per round
    noise_multiplier: float
    rounds_allowed: int
    prior: tuple[Segment, ...] = ()
    prior_noise: float = 0.0
    pretrain_rounds: int = 0
    pretrain_noise: float = 0.0

    @property
    def private(self) -> bool:
        """False for a non-private plan (budget ε=∞: σ=0, no clipping, no ledger charge)."""
        return self.noise_multiplier > 0

    def noise_at(self, server_round: int) -> float:
        """σ of round ``server_round`` (rounds are numbered from 1)."""
        if self.pretrain_noise and server_round <= self.pretrain_rounds:
            return self.pretrain_noise
        return self.noise_multiplier

    def segments(self, rounds: int) -> list[Segment]:
        """The DP-SGD of rounds 1..``rounds`` as accountant segments, in order (a client
        that skips rounds spends less: RDP only grows with steps)."""
        return _schedule(self.noise_multiplier, self.sample_rate, self.steps, rounds,
                         self.pretrain_noise, self.pretrain_rounds)

    def entry(self, server_round: int) -> LedgerEntry:
        """The round's ledger entry (only a private plan has one).

        Raises
        ------
        LedgerError
            For a non-private plan.
        """
        return LedgerEntry(server_round, self.noise_at(server_round), self.sample_rate,
                           self.steps)

    def prior_entry(self, server_round: int) -> LedgerEntry:
        """The ledger entry of the label-histogram release (one q = 1 step at σ_h).

        Raises
        ------
        LedgerError
            If the plan releases no histogram (``prior_noise`` is 0).
        """
        return LedgerEntry(server_round, *prior_segment(self.prior_noise))

    def to_dict(self) -> dict:
        return {
            "client": self.client,
            "num_train": self.num_train,
            "budget": self.budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps,
            "rounds_allowed": self.rounds_allowed,
            "prior_rounds": len(self.prior),
            "label_prior_noise": self.prior_noise,
            "pretrain_noise_multiplier": self.pretrain_noise,
        }


def _schedule(sigma: float, q: float, steps: int, rounds: int, pretrain_noise: float = 0.0,
              pretrain_rounds: int = 0) -> list[Segment]:
    """Rounds 1..``rounds`` of a plan as segments: the first ``pretrain_rounds`` at
    ``pretrain_noise`` (when > 0), the rest at σ."""
    first = min(rounds, pretrain_rounds) if pretrain_noise else 0
    out = [(pretrain_noise, q, steps * first)] if first else []
    return out + ([(sigma, q, steps * (rounds - first))] if rounds > first else [])


def plan_client(
    config: FedMoEConfig,
    client: str,
    *,
    num_train: int,
    budget: float,
    delta: float | None = None,
    prior: Sequence[Segment] = (),
    label_prior: bool = False,
) -> ClientPlan:
    """Plan ``client``: calibrate σ (unless ``noise-multiplier`` is set) for all planned rounds.

    ``delta`` overrides :func:`client_delta` (a client whose ledger already has a δ keeps it).
    With ``label_prior`` (the run's model has a personal label prior), a client with no
    earlier spend releases a DP label histogram with its first round: σ_h costs
    ``label-prior-share`` of its budget on its own, and σ of DP-SGD is calibrated for what
    the histogram leaves (composed, not subtracted: :mod:`fedmoe.privacy.label_prior`).
    With ``pretrain-share`` s > 0 (``tmoe`` with both phases, σ calibrated), the P
    pretraining rounds get σ_p calibrated so that they alone cost s·ε — with earlier
    spend ε₀, that they bring it to ε₀ + s·(ε − ε₀) — and the F fine-tuning rounds σ
    calibrated for what the histogram, those rounds and any earlier spend leave:
    ε(prior, σ_h, P rounds at σ_p, F rounds at σ) = ε, again composed. A share that
    leaves either phase no σ where one σ for every round would fit is a
    :class:`PlanError` naming ``pretrain-share``.
    A budget of ε=∞ gives a non-private plan: σ=0 and δ=0 (plain SGD on the same Poisson
    batches, nothing charged), every planned round allowed.

    Raises
    ------
    PlanError
        If δ is not below 1/``num_train`` (:func:`check_delta`), or the accountant cannot
        price even one round of the plan (PRV: :func:`~fedmoe.privacy.accountant.check_prv`).
    """
    q = client_sample_rate(config, num_train)
    steps = config.local_epochs * steps_per_epoch(q)
    if math.isinf(budget):
        return ClientPlan(client, num_train, math.inf, 0.0, config.accountant, q, steps, 0.0,
                          config.num_server_rounds, tuple(prior))
    delta = client_delta(config, num_train) if delta is None else delta
    check_delta(delta, num_train, client)
    prior = tuple((float(s), float(r), int(n)) for s, r, n in prior)
    sigma, prior_noise = config.noise_multiplier, 0.0
    try:
        if label_prior and config.label_prior_share > 0 and not prior:
            prior_noise = _prior_noise(budget, config.label_prior_share, delta,
                                       config.accountant)
        if math.isinf(prior_noise):  # a budget too small for even the histogram
            return ClientPlan(client, num_train, budget, delta, config.accountant, q, steps,
                              math.inf, 0, prior)
        spent = (*prior, prior_segment(prior_noise)) if prior_noise else prior
        pre_rounds, sigma_pre = _pretrain_phase(config), 0.0
        if sigma == 0 and pre_rounds:  # the share of what earlier runs left
            before = epsilon(list(prior), delta, config.accountant) if prior else 0.0
            sigma_pre = _calibrate(before + config.pretrain_share * (budget - before), delta,
                                   q, pre_rounds * steps, config.accountant, tuple(prior))
            rest = config.num_server_rounds - pre_rounds
            sigma = math.inf if math.isinf(sigma_pre) else _calibrate(  # no σ_p: no room
                budget, delta, q, rest * steps, config.accountant,
                (*spent, (sigma_pre, q, pre_rounds * steps)))
            if math.isinf(sigma) and not math.isinf(_calibrate(  # one σ would fit
                    budget, delta, q, config.num_server_rounds * steps, config.accountant,
                    spent)):
                raise PlanError(_share_error(config, budget, math.isinf(sigma_pre),
                                             bool(prior_noise), bool(prior)))
        elif sigma == 0:
            sigma = _calibrate(budget, delta, q, config.num_server_rounds * steps,
                               config.accountant, spent)
        if not math.isinf(sigma):
            epsilon([*spent, (sigma_pre or sigma, q, steps)], delta, config.accountant)
    except AccountingError as err:
        raise PlanError(f"client {client!r}: {err}") from err
    allowed = 0 if math.isinf(sigma) else rounds_allowed(
        budget, delta, config.accountant, (sigma, q, steps), spent,
        start=config.num_server_rounds, cap=ROUNDS_ALLOWED_CAP * config.num_server_rounds,
        pretrain=(sigma_pre, pre_rounds if sigma_pre else 0),
    )
    return ClientPlan(client, num_train, budget, delta, config.accountant, q, steps, sigma,
                      allowed, prior, prior_noise, pre_rounds if sigma_pre else 0, sigma_pre)


def _share_error(config: FedMoEConfig, budget: float, pretraining: bool, histogram: bool,
                 earlier: bool) -> str:
    """Why a client whose budget pays for the run at one σ has no σ for one phase:
    ``pretraining`` (its share is too small for any σ) or fine-tuning (the rest is)."""
    pre, fine = config.pretrain_rounds, config.num_server_rounds - config.pretrain_rounds
    if pretraining:
        return (f"pretrain-share={config.pretrain_share:g}: ε={config.pretrain_share * budget:g} "
                f"is too little for the {pre} pretraining round(s) at any σ; raise "
                "pretrain-share (0 = one σ for every round)")
    costs = (f" and the unigram histogram (label-prior-share={config.label_prior_share:g})"
             if histogram else "") + (" and earlier spend" if earlier else "")
    return (f"pretrain-share={config.pretrain_share:g}: the {pre} pretraining round(s) at "
            f"ε={config.pretrain_share * budget:g} on their own{costs} leave the {fine} "
            f"fine-tuning round(s) no budget at any σ (ε={budget:g} in all); lower "
            "pretrain-share (0 = one σ for every round)")


def _pretrain_phase(config: FedMoEConfig) -> int:
    """Pretraining rounds that get their own σ (``pretrain-share``): ``tmoe``'s P when
    the share is > 0 and both phases have rounds; else 0."""
    if config.pretrain_share <= 0 or config.pretrain_share_unused():
        return 0
    return config.pretrain_rounds


@lru_cache(maxsize=256)
def _prior_noise(budget: float, share: float, delta: float, accountant: str) -> float:
    """σ_h for one (budget, share, δ): clients alike share one calibration; ``inf`` if no
    σ_h can fit (a budget far too small)."""
    return _or_inf(prior_noise_multiplier, budget, share, delta, accountant)


@lru_cache(maxsize=256)
def _calibrate(budget: float, delta: float, q: float, steps: int, accountant: str,
               prior: tuple[Segment, ...]) -> float:
    """σ for one (budget, δ, q, steps, prior) — clients alike share one calibration.
    ``inf`` if the prior spend leaves no room."""
    return _or_inf(calibrate_noise, budget, delta, q, steps, accountant, prior=prior)


def _or_inf(calibrate, *args, **kwargs) -> float:
    """A calibration's σ, or ``inf`` where no σ fits the budget (its ValueError); an
    :class:`AccountingError` (the accountant cannot price it) propagates."""
    try:
        return calibrate(*args, **kwargs)
    except AccountingError:
        raise
    except ValueError:
        return math.inf


def rounds_allowed(
    budget: float, delta: float, accountant: str, per_round: Segment,
    prior: Sequence[Segment] = (), *, start: int = 1, cap: int = 10_000,
    pretrain: tuple[float, int] = (0.0, 0),
) -> int:
    """The most rounds (at most ``cap``) of ``per_round`` that keep ε ≤ ``budget`` after
    ``prior``; with ``pretrain`` = (σ_p, P), rounds 1..P are at σ_p instead. ``start`` is
    a guess (the planned rounds): a calibrated plan costs two accountant calls."""
    sigma, q, steps = per_round

    def fits(rounds: int) -> bool:
        history = [*prior, *_schedule(sigma, q, steps, rounds, *pretrain)]
        try:
            return epsilon(history, delta, accountant) <= budget + 1e-9
        except AccountingError:  # PRV cannot price this many rounds: do not allow them
            return False

    start = max(1, min(start, cap))
    if fits(start):
        low, high = start, start + 1
        while fits(high):  # ε grows with rounds: find a bracket, then bisect
            if high >= cap:
                return cap
            low, high = high, min(cap, 2 * high)
    elif not fits(1):
        return 0
    else:
        low, high = 1, start
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
