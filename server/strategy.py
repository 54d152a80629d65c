"""FedMoE: FedAvg over the ``shared`` and ``gate`` tensors, with a per-client privacy ledger.

A small subclass of Flower's :class:`~flwr.serverapp.strategy.FedAvg`: sampling, message
construction and weighted averaging are Flower's; FedMoE adds

- budget-aware sampling: a client whose ledger cannot pay for the next round is never
  sampled; the server charges a sampled client's ledger when it sends the round;
- the fedmoe message format (global arrays + round plan + run config);
- reply validation before aggregation: exactly the global keys (a ``local`` tensor is
  refused), the same shapes, finite values, well-formed metrics — Flower's own
  aggregation would broadcast a wrong shape and propagate NaN;
- a per-round history of every client's ε and accuracies (:attr:`history`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, sample_nodes
from flwr.supercore import log

from fedmoe.config import FedMoEConfig
from fedmoe.privacy import LedgerEntry, PrivacyLedger, new_ledger, round_cost
from fedmoe.records import (
    ARRAYS,
    METRICS,
    WEIGHT_KEY,
    EvalReport,
    ReplyError,
    RoundPlan,
    TrainReport,
    server_message,
)


@dataclass
class RoundRecord:
    """What one round did, per client (keyed by partition id) and overall."""

    server_round: int
    sampled: int = 0
    train: dict[int, TrainReport] = field(default_factory=dict)
    evaluate: dict[int, EvalReport] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)


class FedMoE(FedAvg):
    """Federated MoE strategy.

    Parameters
    ----------
    config : FedMoEConfig
        The run's validated config (sampling fractions, DP parameters, budgets).
    noise_multiplier : float
        σ planned once for the whole run (see :func:`fedmoe.privacy.calibrate_noise`).
    on_round : callable, optional (default: None)
        Called with each finished :class:`RoundRecord` (progress display).
    """

    def __init__(
        self,
        config: FedMoEConfig,
        *,
        noise_multiplier: float,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        super().__init__(
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
            min_available_nodes=config.min_available_clients,
            weighted_by_key=WEIGHT_KEY,
        )
        self.config = config
        self.noise_multiplier = noise_multiplier
        self.on_round = on_round
        self.ledgers: dict[int, PrivacyLedger] = {}  # node id -> server-side ledger
        self.history: list[RoundRecord] = []
        self._rng = random.Random(config.seed)
        self._expected: dict[str, tuple[int, ...]] = {}  # global keys -> shapes, this round

    def summary(self) -> None:
        super().summary()
        c = self.config
        log(INFO, "\t└──> DP-SGD: σ=%.4f, q=%g, C=%g, target ε=%g, δ=%g, accountant=%s",
            self.noise_multiplier, c.sample_rate, c.max_grad_norm, c.target_epsilon,
            c.delta, c.accountant)

    # ------------------------------------------------------------------ train
    def round_entry(self, server_round: int) -> LedgerEntry:
        """The privacy cost of one round for one client."""
        return round_cost(self.config, server_round, self.noise_multiplier)

    def ledger(self, node_id: int) -> PrivacyLedger:
        if node_id not in self.ledgers:
            self.ledgers[node_id] = new_ledger(self.config)
        return self.ledgers[node_id]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample among the clients that can afford this round and charge their ledgers."""
        self._record(server_round)
        self._expected = {k: tuple(a.shape) for k, a in arrays.items()}
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        entry = self.round_entry(server_round)
        affordable = [n for n in all_nodes if self.ledger(n).can_afford(entry)]
        if not affordable:
            log(WARNING, "configure_train: no client can afford round %s; training stops",
                server_round)
            return []
        size = min(len(affordable), max(self.min_train_nodes,
                                        int(len(all_nodes) * self.fraction_train)))
        nodes = self._rng.sample(affordable, size)
        for node in nodes:
            self.ledger(node).charge(entry)  # sent = spent: the server never under-counts
        self.history[-1].sampled = len(nodes)
        log(INFO, "configure_train: sampled %s of %s clients (%s can afford the round)",
            len(nodes), len(all_nodes), len(affordable))
        record = server_message(arrays, RoundPlan(server_round, self.noise_multiplier), self.config)
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, then weighted-average the ``shared`` and ``gate`` arrays."""
        record = self._record(server_round)
        valid: list = []
        for msg in replies:
            if msg.has_error():
                record.rejected.append(f"node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            try:
                report = self._check_train_reply(msg)
            except ReplyError as err:
                record.rejected.append(f"node {msg.metadata.src_node_id}: {err}")
                continue
            record.train[report.partition_id] = report
            valid.append(msg.content)
        for reason in record.rejected:
            log(WARNING, "aggregate_train: dropped reply from %s", reason)
        if not valid:
            return None, None
        arrays = aggregate_arrayrecords(valid, self.weighted_by_key)
        reports = list(record.train.values())
        metrics = MetricRecord({
            "train-loss": _weighted([r.train_loss for r in reports], reports),
            "epsilon-max": max(r.epsilon for r in reports),
            "num-clients": len(reports),
        })
        return arrays, metrics

    def _check_train_reply(self, msg: Message) -> TrainReport:
        content = msg.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise ReplyError(f"reply must carry '{ARRAYS}' and '{METRICS}' records")
        report = TrainReport.from_record(content.metric_records[METRICS])
        if report.num_examples < 1:
            raise ReplyError("num-examples must be >= 1")
        arrays = content.array_records[ARRAYS]
        expected = self._expected
        if set(arrays.keys()) != set(expected):
            extra = sorted(set(arrays.keys()) - set(expected))
            missing = sorted(set(expected) - set(arrays.keys()))
            raise ReplyError(f"array keys differ from the global model: extra {extra[:3]}, "
                             f"missing {missing[:3]}")
        for key, array in arrays.items():
            value = array.numpy()
            if value.shape != expected[key]:
                raise ReplyError(f"'{key}' has shape {value.shape}, expected {expected[key]}")
            if not np.all(np.isfinite(value)):
                raise ReplyError(f"'{key}' contains NaN or inf")
        return report

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        size = max(self.min_evaluate_nodes, int(len(all_nodes) * self.fraction_evaluate))
        nodes = self._rng.sample(all_nodes, min(size, len(all_nodes)))
        record = server_message(arrays, RoundPlan(server_round, self.noise_multiplier), self.config)
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Per-client personalised and global-only accuracy, and their weighted means."""
        record = self._record(server_round)
        for msg in replies:
            if msg.has_error():
                log(WARNING, "aggregate_evaluate: node %s failed: %s",
                    msg.metadata.src_node_id, msg.error.reason)
                continue
            try:
                report = EvalReport.from_record(msg.content.metric_records[METRICS])
            except (KeyError, ReplyError) as err:
                log(WARNING, "aggregate_evaluate: dropped reply: %s", err)
                continue
            record.evaluate[report.partition_id] = report
        if self.on_round is not None:
            self.on_round(record)
        reports = list(record.evaluate.values())
        if not reports:
            return None
        return MetricRecord({
            "personalized-accuracy": _weighted([r.personalized_accuracy for r in reports], reports),
            "global-accuracy": _weighted([r.global_accuracy for r in reports], reports),
            "epsilon-max": max(r.epsilon for r in reports),
        })

    # ---------------------------------------------------------------- helpers
    def _record(self, server_round: int) -> RoundRecord:
        if not self.history or self.history[-1].server_round != server_round:
            self.history.append(RoundRecord(server_round))
        return self.history[-1]


def _weighted(values: list[float], reports: list) -> float:
    weights = [r.num_examples for r in reports]
    return float(np.average(values, weights=weights)) if sum(weights) else float("nan")
