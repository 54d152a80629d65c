"""Conversion between fedmoe objects and Flower records — the library's only Flower glue.

Messages from the server hold:

- ``config`` (ConfigRecord): this round's instructions (:class:`RoundPlan`), with the
  client's DP parameters in a train message;
- ``run-config`` (ConfigRecord): the run's validated :class:`~fedmoe.config.FedMoEConfig`;
- ``arrays`` (ArrayRecord, train and evaluate only): the global ``shared`` and ``gate`` tensors.

Replies: a query reply holds ``client`` (:class:`ClientInfo`); a train reply holds ``arrays``
(the client's updated ``shared`` and ``gate`` tensors only, DP-protected) and ``metrics``
(:class:`TrainReport`), and in the round that releases the client's DP label histogram
with ``label-prior-shrinkage = "federation"`` also ``label-histogram`` (the released
noisy counts, DP-protected: :func:`histogram_record`); an evaluate reply holds
``metrics`` (:class:`EvalReport`).
Everything in a reply besides the train arrays is released in the clear; the record and
metric names are the documented wire format.

With a lossy ``upload-codec`` (:mod:`fedmoe.compression`) a train reply's ``arrays`` hold one
array, ``update``: the encoded difference between the trained tensors and the global ones
the client started from (raw bytes, ``stype`` ``fedmoe.codec.<name>``);
:func:`decode_upload` turns it back into full tensors on the server. With a lossy
``download-codec`` a train/evaluate message's ``arrays`` hold either the plain global
tensors (the client holds nothing of this run yet) or one encoded ``update`` relative to
what the client already holds, and a ``downlink`` ConfigRecord says which
(:class:`Downlink` on the server, :func:`receive_global` on the client).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import array_record_to_proto, config_record_to_proto

from fedmoe.compression import Codec, CodecError, compress, shapes_of
from fedmoe.config import ACCOUNTANTS, FedMoEConfig
from fedmoe.privacy.accountant import Segment
from fedmoe.privacy.label_prior import FederationPrior, prior_segment
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
#: Record of a message whose global tensors travel encoded (:class:`Downlink`).
DOWNLINK = "downlink"
#: The one array of an encoded update, and its ``stype`` prefix.
UPDATE, CODEC_STYPE = "update", "fedmoe.codec."
#: Record of a train reply carrying the client's released DP label histogram.
HISTOGRAM = "label-histogram"
#: A released count further than this many σ_h outside [0, n] is no Gaussian release of
#: n labels (probability < 1e-30): the reply is refused.
HISTOGRAM_SIGMAS = 12.0


class ReplyError(ValueError):
    """A client's reply is malformed; the server drops it and says why."""


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


# ----------------------------------------------------------------------- update codecs
def update_bytes(content: RecordDict) -> int:
    """Serialised size (Flower's protobuf encoding, bytes) of the model update a message
    carries: its ``arrays`` record and, if any, its ``downlink`` record. The rest of a
    message (round plan, run config, metrics) is not counted."""
    size = 0
    if ARRAYS in content.array_records:
        size += array_record_to_proto(content.array_records[ARRAYS]).ByteSize()
    if DOWNLINK in content.config_records:
        size += config_record_to_proto(content.config_records[DOWNLINK]).ByteSize()
    return size


def _encoded(codec: Codec, data: bytes) -> ArrayRecord:
    return ArrayRecord({UPDATE: Array(dtype="uint8", shape=(len(data),),
                                      stype=CODEC_STYPE + codec.name, data=data)})


def _payload(record: ArrayRecord, codec: Codec) -> bytes:
    """The bytes of an encoded update record.

    Raises
    ------
    CodecError
        If the record is not one ``update`` array of this codec.
    """
    if list(record.keys()) != [UPDATE]:
        raise CodecError(f"an encoded update must be one array '{UPDATE}', got keys "
                         f"{sorted(record.keys())[:3]}")
    array = record[UPDATE]
    if array.stype != CODEC_STYPE + codec.name or array.dtype != "uint8":
        raise CodecError(f"the update is encoded as {array.stype!r} ({array.dtype}); this run "
                         f"expects {CODEC_STYPE + codec.name!r} (uint8)")
    return array.data


def _numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def apply_update(base: Mapping[str, np.ndarray],
                 update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + update`` tensor by tensor, in ``base``'s dtype: the one expression server and
    client both use, so both arrive at bit-identical tensors."""
    return {k: (np.asarray(base[k]) + update[k]).astype(np.asarray(base[k]).dtype)
            for k in base}


def encode_upload(
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    codec: Codec,
    residual: Mapping[str, np.ndarray] | None,
    *,
    error_feedback: bool = True,
) -> tuple[ArrayRecord, dict[str, np.ndarray] | None]:
    """A train reply's ``arrays``: the trained ``shared``+``gate`` tensors (``none``), or the
    encoded update ``trained − start`` with error feedback (:func:`fedmoe.compression.compress`).

    ``trained`` must be the model after the round's last DP-SGD step (already noised) and
    ``start`` the global tensors the client received: the codec sees nothing else.

    Returns
    -------
    (ArrayRecord, residual)
        The record, and the residual to keep for the next round (None: none to keep).
    """
    if codec.lossless or not trained:
        return to_arrays(trained), None
    after, before = _numpy(trained), _numpy(start)
    delta = {k: after[k] - before[k] if np.issubdtype(after[k].dtype, np.floating)
             else after[k] for k in after}
    data, _, new_residual = compress(codec, delta, residual, error_feedback=error_feedback)
    return _encoded(codec, data), new_residual


def decode_upload(record: ArrayRecord, codec: Codec,
                  global_arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The full tensors a train reply stands for: ``global + decode(update)`` (lossy codec),
    or ``record`` itself (``none``, or a reply without arrays when nothing is shared).

    Raises
    ------
    ReplyError
        If the encoded update is malformed (:meth:`fedmoe.compression.Codec.decode`).
    """
    if codec.lossless or (not global_arrays and not record):
        return record
    try:
        update = codec.decode(_payload(record, codec), shapes_of(global_arrays))
    except CodecError as err:
        raise ReplyError(f"malformed encoded update: {err}") from err
    full = _reconstruct(global_arrays, update)  # integer buffers travel as values
    return ArrayRecord({k: Array(v) for k, v in full.items()})


class Downlink:
    """Server side of the ``download-codec``: what each client holds of this run's model.

    A client's first message carries the plain global tensors; later ones carry
    ``encode(global − held)``, where ``held`` is exactly what the client reconstructed
    from the previous message (the server decodes its own bytes the same way), so the
    codec's error is corrected by the next message instead of piling up. A message is
    numbered (``seq``) and names the one it builds on (``base``, 0 = plain tensors); a
    client that does not hold ``base`` refuses the message, and the server sends that
    client plain tensors next time. What a client holds counts only once it has replied.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._held: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self._pending: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        self._seq = 0

    def content(self, client: str, arrays: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord | None]:
        """The ``arrays`` and ``downlink`` records of a message to ``client``."""
        if self.codec.lossless:
            return arrays, None
        if client in self._pending:  # it never confirmed the last one: start afresh
            self.lost(client)
        self._seq += 1
        glob = {k: a.numpy() for k, a in arrays.items()}
        held = self._held.get(client)
        if held is None or shapes_of(held[1]) != shapes_of(glob):
            record, base, now = arrays, 0, glob
        else:
            base, before = held
            data, decoded = self.codec.roundtrip(
                {k: v - before[k] if np.issubdtype(v.dtype, np.floating) else v
                 for k, v in glob.items()})
            record, now = _encoded(self.codec, data), _reconstruct(before, decoded)
        self._pending[client] = (self._seq, now)
        return record, ConfigRecord({"codec": self.codec.name, "seq": self._seq, "base": base})

    def delivered(self, client: str) -> None:
        """``client`` replied: it holds what it was last sent."""
        if client in self._pending:
            self._held[client] = self._pending.pop(client)

    def lost(self, client: str) -> None:
        """``client`` did not confirm its message: assume it holds nothing."""
        self._held.pop(client, None)
        self._pending.pop(client, None)


def _reconstruct(before: Mapping[str, np.ndarray],
                 decoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    floats = {k for k, v in decoded.items() if np.issubdtype(v.dtype, np.floating)}
    return {**apply_update({k: before[k] for k in floats}, {k: decoded[k] for k in floats}),
            **{k: decoded[k] for k in decoded if k not in floats}}


def receive_global(
    content: RecordDict, codec: Codec, held: tuple[int, dict[str, np.ndarray]] | None,
) -> tuple[dict[str, torch.Tensor], tuple[int, dict[str, np.ndarray]] | None]:
    """Client side of the ``download-codec``: the global tensors of a message, and what to
    keep for the next one (``(seq, tensors)``; ``held`` unchanged for a plain message
    without a ``downlink`` record). ``codec`` is the run's ``download-codec``.

    Raises
    ------
    CodecError
        If the message builds on a ``base`` this client does not hold, or its encoded
        update is malformed.
    """
    arrays = content.array_records.get(ARRAYS)
    if arrays is None:
        return {}, held
    if DOWNLINK not in content.config_records:
        return from_arrays(arrays), held
    link = content.config_records[DOWNLINK]
    try:
        name, seq, base = str(link["codec"]), int(link["seq"]), int(link["base"])
    except (KeyError, TypeError, ValueError) as err:
        raise CodecError(f"malformed '{DOWNLINK}' record: {err!r}") from err
    if name != codec.name or seq <= base or base < 0:
        raise CodecError(f"'{DOWNLINK}' record (codec {name!r}, message {seq} on {base}) does "
                         f"not fit this run's download-codec {codec.name!r}")
    if base == 0:
        now = {k: a.numpy() for k, a in arrays.items()}
    elif held is None or held[0] != base:
        raise CodecError(f"the global model is sent relative to message {base}, but this "
                         f"client holds {'nothing' if held is None else f'message {held[0]}'}")
    else:
        now = _reconstruct(held[1], codec.decode(_payload(arrays, codec), shapes_of(held[1])))
    return {k: torch.from_numpy(np.array(v)) for k, v in now.items()}, (seq, now)


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a client this round.

    A train message carries the DP parameters of the client's round; server and client
    both charge exactly these to their ledgers, and the client trains with exactly these.
    ``prior_noise`` > 0 (a client's first round, when the model has a label prior) asks
    the client to release its DP label histogram at that σ_h too, charged before the round.
    An evaluate message carries only the round. Either may carry ``federation``, the
    server's empirical-Bayes estimate of the clients' label distributions from their
    released histograms (``label-prior-shrinkage = "federation"``; post-processing of DP
    releases), from which the client computes its label prior.
    """

    server_round: int
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    delta: float = 0.0
    accountant: str = ""
    prior_noise: float = 0.0
    federation: FederationPrior | None = None

    @classmethod
    def for_training(cls, server_round: int, plan: ClientPlan, *,
                     with_prior: bool = False,
                     federation: FederationPrior | None = None) -> RoundPlan:
        return cls(server_round, plan.noise_at(server_round), plan.sample_rate, plan.steps,
                   plan.delta, plan.accountant, plan.prior_noise if with_prior else 0.0,
                   federation)

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
        if self.federation is not None:
            record["federation-label-mean"] = list(self.federation.mean)
            record["federation-clients"] = self.federation.clients
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundPlan:
        federation = _federation(record)
        try:
            if "steps" not in record:
                return cls(int(record["server-round"]), federation=federation)
            plan = cls(int(record["server-round"]), float(record["noise-multiplier"]),
                       float(record["sample-rate"]), int(record["steps"]),
                       float(record["delta"]), str(record["accountant"]),
                       float(record.get("prior-noise-multiplier", 0.0)), federation)
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


def _federation(record: ConfigRecord) -> FederationPrior | None:
    """The round config's :class:`FederationPrior`, or None when it carries none.

    Raises
    ------
    ReplyError
        If it is malformed (not a distribution, or from < 2 clients).
    """
    if "federation-label-mean" not in record:
        return None
    try:
        return FederationPrior(tuple(float(v) for v in record["federation-label-mean"]),
                               int(record["federation-clients"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ReplyError(f"malformed federation label prior in the round config: {err}") \
            from None


def histogram_record(counts: torch.Tensor) -> MetricRecord:
    """A train reply's ``label-histogram`` record: the client's released noisy counts (C,)."""
    return MetricRecord({"counts": [float(v) for v in counts]})


def read_histogram(content: RecordDict, num_classes: int, num_train: int,
                   noise: float) -> torch.Tensor | None:
    """The released label histogram (C,) of a train reply (None if the reply has none:
    the client then counts for nothing in the federation's estimate), if it can be one:
    C finite counts, each within :data:`HISTOGRAM_SIGMAS` σ_h of [0, n] (a Gaussian
    release of n labels at σ_h is never further out, in practice).

    Raises
    ------
    ReplyError
        If it is malformed or implausible.
    """
    if HISTOGRAM not in content.metric_records:
        return None
    values = content.metric_records[HISTOGRAM].get("counts")
    if not isinstance(values, list):
        raise ReplyError(f"the '{HISTOGRAM}' record must hold a 'counts' list")
    if len(values) != num_classes or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ReplyError(f"'{HISTOGRAM}' must be {num_classes} finite counts, got "
                         f"{len(values)} values")
    counts = torch.tensor([float(v) for v in values], dtype=torch.float64)
    margin = HISTOGRAM_SIGMAS * noise
    if (counts < -margin).any() or (counts > num_train + margin).any():
        raise ReplyError(f"'{HISTOGRAM}' has a count outside [-{margin:.3g}, "
                         f"{num_train + margin:.3g}]: no DP release of {num_train} labels "
                         f"at σ_h={noise:.3g}")
    return counts


def server_message(arrays: ArrayRecord | None, plan: RoundPlan, config: FedMoEConfig) -> RecordDict:
    """A train/evaluate message (``arrays`` given) or a query (``arrays`` None)."""
    content = RecordDict({CONFIG: plan.to_record(), RUN_CONFIG: ConfigRecord(config.to_run_config())})
    if arrays is not None:
        content[ARRAYS] = arrays
    return content


def read_server_message(
    content: RecordDict, *, decode: bool = True,
) -> tuple[dict[str, torch.Tensor], RoundPlan, FedMoEConfig]:
    """The global tensors, round plan and run config of a server message.

    ``decode=False`` leaves the tensors out (``{}``): a message whose tensors are encoded
    (``downlink``) is read with :func:`receive_global`, which needs what the client holds."""
    # a server of an earlier fedmoe sends no key it did not have: read as it meant it
    config = FedMoEConfig.from_recorded(dict(content.config_records[RUN_CONFIG]))
    plan = RoundPlan.from_record(content.config_records[CONFIG])
    arrays = content.array_records.get(ARRAYS)
    if not decode or arrays is None:
        return {}, plan, config
    return from_arrays(arrays), plan, config


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
