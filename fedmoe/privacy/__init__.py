"""Differential privacy: Opacus wiring, accounting, σ calibration and the privacy ledger."""

from fedmoe.privacy.accountant import calibrate_noise, epsilon, steps_per_epoch
from fedmoe.privacy.dp import PrivateTraining, make_private, secret_generator
from fedmoe.privacy.ledger import BudgetExceededError, LedgerEntry, LedgerError, PrivacyLedger

__all__ = [
    "calibrate_noise", "epsilon", "steps_per_epoch", "PrivateTraining", "make_private",
    "secret_generator", "BudgetExceededError", "LedgerEntry", "LedgerError", "PrivacyLedger",
]
