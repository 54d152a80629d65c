"""Differential privacy: Opacus wiring, accounting, per-client plans and the privacy ledger."""

from fedmoe.privacy.accountant import (
    AccountingError,
    calibrate_noise,
    check_prv,
    epsilon,
    steps_per_epoch,
)
from fedmoe.privacy.dp import PrivateTraining, make_private, secret_generator
from fedmoe.privacy.ledger import (
    LEDGER_FILE,
    BudgetExceededError,
    LedgerBook,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
)
from fedmoe.privacy.plan import (
    MAX_DEFAULT_DELTA,
    ClientPlan,
    PlanError,
    check_delta,
    client_delta,
    client_sample_rate,
    delta_error,
    plan_client,
    rounds_allowed,
)

__all__ = [
    "calibrate_noise", "epsilon", "steps_per_epoch", "PrivateTraining", "make_private",
    "secret_generator", "LEDGER_FILE", "BudgetExceededError", "LedgerBook", "LedgerEntry",
    "LedgerError", "PrivacyLedger", "ClientPlan", "client_delta", "client_sample_rate",
    "plan_client", "rounds_allowed", "MAX_DEFAULT_DELTA", "PlanError", "check_delta",
    "delta_error", "AccountingError", "check_prv",
]
