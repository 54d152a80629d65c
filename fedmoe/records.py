"""Conversion between fedmoe objects and Flower records — the library's only Flower glue.

Messages from the server hold:

- ``config`` (ConfigRecord): this round's instructions (:class:`RoundPlan`), with the
  client's DP parameters in a train message;
- ``run-config`` (ConfigRecord): the run's validated :class:`~fedmoe.config.FedMoEConfig`;
- ``arrays`` (ArrayRecord, train and evaluate only): the global ``shared`` and ``gate`` tensors.

Replies: a query reply holds ``client`` (:class:`ClientInfo`); a train reply holds ``arrays``
(the client's updated ``shared`` and ``gate`` tensors only, DP-protected) and ``metrics``
(:class:`TrainReport`); an evaluate reply holds ``metrics`` (:class:`EvalReport`).
Everything in a reply besides the train arrays is released in the clear; the record and
metric names are the documented wire format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmoe.config import ACCOUNTANTS, FedMoEConfig
from fedmoe.privacy.accountant import Segment
from fedmoe.privacy.label_prior import prior_segment
from fedmoe.privacy.ledger import LedgerEntry, LedgerError
from fedmoe.privacy.plan import ClientPlan

ARRAYS, CONFIG, RUN_CONFIG, METRICS = "arrays", "config", "run-config", "metrics"
#: Record of a query reply (:class:`ClientInfo`).
CLIENT = "client"
#: Record of an evaluate reply with task-specific metrics (:func:`read_details`).
DETAILS = "details"
#: Error codes of a client's error reply refusing a round: its budget cannot pay for it; its
#: ledger cannot be used (unreadable, inconsistent, or at another δ/accountant); the
#: message is malformed; the round's δ is not below 1/n for its train set (it would
#: protect nobody); the node's own data or node config cannot be used (checked before any
#: charge: the reason names the file and the fix).
BUDGET_EXCEEDED, LEDGER_UNUSABLE, BAD_MESSAGE, DELTA_TOO_LARGE = 4001, 4002, 4003, 4004
DATA_UNUSABLE = 4005
#: Refusals that will repeat: the server gives that client no more rounds.
REFUSALS = (BUDGET_EXCEEDED, LEDGER_UNUSABLE, DELTA_TOO_LARGE, DATA_UNUSABLE)
#: Metric used by Flower's FedAvg to weight replies.
WEIGHT_KEY = "num-examples"


class ReplyError(ValueError):
    """A client's reply is malformed; the server drops it and says why."""


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a client this round.

    A train message carries the DP parameters of the client's round; server and client
    both charge exactly these to their ledgers, and the client trains with exactly these.
    ``prior_noise`` > 0 (a client's first round, when the model has a label prior) asks
    the client to release its DP label histogram at that σ_h too, charged before the round.
    An evaluate message carries only the round.
    """

    server_round: int
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    delta: float = 0.0
    accountant: str = ""
    prior_noise: float = 0.0

    @classmethod
    def for_training(cls, server_round: int, plan: ClientPlan, *,
                     with_prior: bool = False) -> RoundPlan:
        return cls(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps,
                   plan.delta, plan.accountant, plan.prior_noise if with_prior else 0.0)

    @property
    def is_training(self) -> bool:
        return self.steps > 0

    @property
    def private(self) -> bool:
        """False for a non-private round (σ=0: no clipping, no noise, no ledger charge)."""
        return self.noise_multiplier > 0

    def entry(self) -> LedgerEntry:
        return LedgerEntry(self.server_round, self.noise_multiplier, self.sample_rate, self.steps)

    def entries(self) -> list[LedgerEntry]:
        """What the client charges for this round, in order: its label histogram (if asked
        for), then the round's DP-SGD."""
        first = [LedgerEntry(self.server_round, *prior_segment(self.prior_noise))] \
            if self.prior_noise else []
        return [*first, self.entry()]

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord({"server-round": self.server_round})
        if self.is_training:
            record["noise-multiplier"] = self.noise_multiplier
            record["sample-rate"] = self.sample_rate
            record["steps"] = self.steps
            record["delta"] = self.delta
            record["accountant"] = self.accountant
            if self.prior_noise:
                record["prior-noise-multiplier"] = self.prior_noise
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundPlan:
        try:
            if "steps" not in record:
                return cls(int(record["server-round"]))
            plan = cls(int(record["server-round"]), float(record["noise-multiplier"]),
                       float(record["sample-rate"]), int(record["steps"]),
                       float(record["delta"]), str(record["accountant"]),
                       float(record.get("prior-noise-multiplier", 0.0)))
        except KeyError as err:
            raise ReplyError(f"round config lacks {err}") from err
        if not (plan.prior_noise == 0 or (plan.noise_multiplier > 0
                                          and 0 < plan.prior_noise < math.inf)):
            raise ReplyError(f"prior-noise-multiplier must be 0, or > 0 and finite in a "
                             f"private round; got {plan.prior_noise}")
        if plan.noise_multiplier == 0:  # non-private: no ledger entry, no δ
            if not (0 < plan.sample_rate <= 1 and plan.steps >= 1):
                raise ReplyError(f"invalid non-private round {plan}: need 0 < q ≤ 1, steps ≥ 1")
            return plan
        try:
            plan.entry()  # validates σ, q, steps
        except LedgerError as err:
            raise ReplyError(str(err)) from err
        if not 0 < plan.delta < 1:
            raise ReplyError(f"delta must be in (0, 1), got {plan.delta}")
        return plan


def server_message(arrays: ArrayRecord | None, plan: RoundPlan, config: FedMoEConfig) -> RecordDict:
    """A train/evaluate message (``arrays`` given) or a query (``arrays`` None)."""
    content = RecordDict({CONFIG: plan.to_record(), RUN_CONFIG: ConfigRecord(config.to_run_config())})
    if arrays is not None:
        content[ARRAYS] = arrays
    return content


def read_server_message(content: RecordDict) -> tuple[dict[str, torch.Tensor], RoundPlan, FedMoEConfig]:
    config = FedMoEConfig.from_run_config(dict(content.config_records[RUN_CONFIG]))
    plan = RoundPlan.from_record(content.config_records[CONFIG])
    arrays = content.array_records.get(ARRAYS)
    return (from_arrays(arrays) if arrays is not None else {}), plan, config


@dataclass(frozen=True)
class ClientInfo:
    """A client's answer to the server's query before its first round (released in the clear).

    ``num_train``/``num_test`` are the sizes of its train and test splits (the largest
    over the run's phases: a Transformer-MoE's pre-training and fine-tuning sets may
    differ). The server plans δ and q from ``num_train`` and refuses any later reply that
    claims more examples than declared here (those counts weight the averages).
    ``history`` is its ledger's earlier rounds, ``(σ, q, steps)`` each, so the server plans
    and accounts its remaining budget; ``ledger_delta``/``ledger_accountant`` are those of
    that ledger (0 and "" when it has none).
    """

    client: str
    num_train: int
    epsilon_budget: float  # the operator's own budget; 0 = accept the run's target
    ledger_delta: float = 0.0
    ledger_accountant: str = ""
    history: tuple[Segment, ...] = ()
    num_test: int = 0

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "client-id": self.client,
            "num-train": self.num_train,
            "num-test": self.num_test,
            "epsilon-budget": self.epsilon_budget,
            "ledger-delta": self.ledger_delta,
            "ledger-accountant": self.ledger_accountant,
            "history-noise-multiplier": [float(s) for s, _, _ in self.history],
            "history-sample-rate": [float(q) for _, q, _ in self.history],
            "history-steps": [int(n) for _, _, n in self.history],
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ClientInfo:
        try:
            sigmas = list(record["history-noise-multiplier"])
            rates = list(record["history-sample-rate"])
            steps = list(record["history-steps"])
            info = cls(str(record["client-id"]), int(record["num-train"]),
                       float(record["epsilon-budget"]), float(record["ledger-delta"]),
                       str(record["ledger-accountant"]),
                       tuple(zip(map(float, sigmas), map(float, rates), map(int, steps),
                                 strict=True)), int(record["num-test"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ReplyError(f"malformed client info: {err!r}") from err
        if (not info.client or info.num_train < 1 or info.num_test < 0
                or not 0 <= info.epsilon_budget < math.inf or not 0 <= info.ledger_delta < 1
                or info.ledger_accountant not in ("", *ACCOUNTANTS)):
            raise ReplyError(f"client info out of range: {info}")
        try:
            for s, q, n in info.history:
                LedgerEntry(0, s, q, n)
        except LedgerError as err:
            raise ReplyError(str(err)) from err
        return info


def _metrics_dataclass(cls):
    """Give a frozen dataclass of metrics ``to_record``/``from_record`` with kebab-case keys."""

    def to_record(self) -> MetricRecord:
        return MetricRecord({f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_record(klass, record: MetricRecord):
        values = {}
        for f in fields(klass):
            key = f.name.replace("_", "-")
            if key not in record:
                raise ReplyError(f"reply metrics lack '{key}'")
            value = record[key]
            # ε=∞ is a non-private client's honest answer; anything else must be finite
            infinite_ok = key == "epsilon" and value == math.inf
            if not isinstance(value, (int, float)) or not (math.isfinite(value) or infinite_ok):
                raise ReplyError(f"reply metric '{key}' must be a finite number, got {value!r}")
            values[f.name] = int(value) if f.type == "int" else float(value)
        return klass(**values)

    cls.to_record, cls.from_record = to_record, from_record
    return cls


@_metrics_dataclass
@dataclass(frozen=True)
class TrainReport:
    """Train-reply metrics, released in the clear: ``num-examples`` (FedAvg's weight),
    ``epsilon`` (the client's own ledger total after this round, which the server checks
    against its own; ``inf`` for a non-private round) and ``steps``. The training loss stays on the client: it is computed
    from private batches without noise."""

    num_examples: int
    epsilon: float
    steps: int


@_metrics_dataclass
@dataclass(frozen=True)
class EvalReport:
    """Evaluate-reply metrics, computed on the client's own test split (released in the clear).

    ``accuracy`` is the task's: classification accuracy, the mean over tasks (multi-task)
    or next-token accuracy (language model); ``loss`` its mean loss (per token for a
    language model, so perplexity = exp(loss))."""

    num_examples: int
    personalized_accuracy: float
    global_accuracy: float
    personalized_loss: float
    global_loss: float
    epsilon: float


def read_details(record: MetricRecord) -> dict[str, float | list[float]]:
    """Task-specific evaluate metrics (``personalized-perplexity``, ``task-<name>-accuracy``,
    ``expert-usage``...): finite numbers or lists of them.

    Raises
    ------
    ReplyError
        For any other value.
    """
    details: dict[str, float | list[float]] = {}
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ReplyError(f"detail '{key}' must be finite numbers, got {value!r}")
        details[key] = [float(v) for v in value] if isinstance(value, list) else float(value)
    return details
