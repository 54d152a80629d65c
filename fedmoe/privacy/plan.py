"""A run's privacy plan, derived from its config: σ for the run, the cost of one round,
and a fresh ledger. Server and client both price a round here, so they always agree."""

from __future__ import annotations

from fedmoe.config import FedMoEConfig
from fedmoe.privacy.accountant import calibrate_noise, steps_per_epoch
from fedmoe.privacy.ledger import LedgerEntry, PrivacyLedger


def steps_per_round(config: FedMoEConfig) -> int:
    return config.local_epochs * steps_per_epoch(config.sample_rate)


def plan_noise(config: FedMoEConfig) -> float:
    """σ that keeps a client within ``target-epsilon`` if it trains in every planned round."""
    return calibrate_noise(
        config.target_epsilon,
        config.delta,
        config.sample_rate,
        config.num_server_rounds * steps_per_round(config),
        config.accountant,
    )


def round_cost(config: FedMoEConfig, server_round: int, noise_multiplier: float) -> LedgerEntry:
    """The ledger entry one round of local DP-SGD costs a client."""
    return LedgerEntry(
        server_round=server_round,
        noise_multiplier=noise_multiplier,
        sample_rate=config.sample_rate,
        steps=steps_per_round(config),
    )


def new_ledger(config: FedMoEConfig, budget: float | None = None) -> PrivacyLedger:
    """An empty ledger at the run's δ and accountant; ``budget`` defaults to target-epsilon."""
    return PrivacyLedger(
        budget=config.target_epsilon if budget is None else budget,
        delta=config.delta,
        accountant=config.accountant,
    )
