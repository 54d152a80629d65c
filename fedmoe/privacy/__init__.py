"""Differential privacy: Opacus wiring, accounting, σ calibration and the privacy ledger."""

from fedmoe.privacy.accountant import calibrate_noise, epsilon, steps_per_epoch
from fedmoe.privacy.dp import PrivateTraining, make_private, secret_generator
from fedmoe.privacy.ledger import BudgetExceededError, LedgerEntry, LedgerError, PrivacyLedger
from fedmoe.privacy.plan import new_ledger, plan_noise, round_cost, steps_per_round

__all__ = [
    "calibrate_noise", "epsilon", "steps_per_epoch", "PrivateTraining", "make_private",
    "secret_generator", "BudgetExceededError", "LedgerEntry", "LedgerError", "PrivacyLedger",
    "new_ledger", "plan_noise", "round_cost", "steps_per_round",
]
