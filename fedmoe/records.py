"""Conversion between fedmoe objects and Flower records — the library's only Flower glue.

A train or evaluate message from the server holds three records:

- ``arrays`` (ArrayRecord): the ``shared`` and ``gate`` tensors of the global model;
- ``config`` (ConfigRecord): this round's instructions (:class:`RoundPlan`);
- ``run-config`` (ConfigRecord): the run's validated :class:`~fedmoe.config.FedMoEConfig`.

A train reply holds ``arrays`` (the client's updated ``shared`` and ``gate`` tensors only)
and ``metrics`` (:class:`TrainReport`); an evaluate reply holds ``metrics``
(:class:`EvalReport`). The metric names are the documented wire format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmoe.config import FedMoEConfig

ARRAYS, CONFIG, RUN_CONFIG, METRICS = "arrays", "config", "run-config", "metrics"
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
    """What the server asks of a client this round (privacy parameters are planned once)."""

    server_round: int
    noise_multiplier: float

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(
            {"server-round": self.server_round, "noise-multiplier": self.noise_multiplier}
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundPlan:
        try:
            plan = cls(int(record["server-round"]), float(record["noise-multiplier"]))
        except KeyError as err:
            raise ReplyError(f"round config lacks {err}") from err
        if not (plan.noise_multiplier > 0 and math.isfinite(plan.noise_multiplier)):
            raise ReplyError(f"noise-multiplier must be finite and > 0, got {plan.noise_multiplier}")
        return plan


def server_message(arrays: ArrayRecord, plan: RoundPlan, config: FedMoEConfig) -> RecordDict:
    return RecordDict(
        {
            ARRAYS: arrays,
            CONFIG: plan.to_record(),
            RUN_CONFIG: ConfigRecord(config.to_run_config()),
        }
    )


def read_server_message(content: RecordDict) -> tuple[dict[str, torch.Tensor], RoundPlan, FedMoEConfig]:
    config = FedMoEConfig.from_run_config(dict(content.config_records[RUN_CONFIG]))
    plan = RoundPlan.from_record(content.config_records[CONFIG])
    return from_arrays(content.array_records[ARRAYS]), plan, config


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
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ReplyError(f"reply metric '{key}' must be a finite number, got {value!r}")
            values[f.name] = int(value) if f.type == "int" else float(value)
        return klass(**values)

    cls.to_record, cls.from_record = to_record, from_record
    return cls


@_metrics_dataclass
@dataclass(frozen=True)
class TrainReport:
    """Train-reply metrics. ``num-examples`` and ``partition-id`` are released in the clear;
    ``epsilon`` is the client's own ledger total after this round."""

    num_examples: int
    partition_id: int
    epsilon: float
    train_loss: float
    steps: int


@_metrics_dataclass
@dataclass(frozen=True)
class EvalReport:
    """Evaluate-reply metrics, computed on the client's own test split (released in the clear)."""

    num_examples: int
    partition_id: int
    personalized_accuracy: float
    global_accuracy: float
    personalized_loss: float
    epsilon: float
