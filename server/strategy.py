"""FedMoE: FedAvg over the ``shared`` and ``gate`` tensors, with a durable per-client privacy ledger.

A subclass of Flower's :class:`~flwr.serverapp.strategy.FedAvg`: sampling fractions, message
construction and weighted averaging are Flower's; FedMoE adds

- discovery: before a client's first round the server queries it (stable client id, train
  set size, own budget, earlier spend) and plans its δ, q, steps and σ once
  (:func:`fedmoe.privacy.plan_client`);
- budget-aware sampling: a client whose ledger cannot pay for the next round is never sent
  one; the server charges its own ledger (a :class:`~fedmoe.privacy.LedgerBook` in the run
  folder) when it sends the round, from the DP parameters it sent, whatever the client says;
- a mismatch flag when a client's reported ε differs from the server's own; every ε the
  run reports (:attr:`RoundRecord.epsilon`, the round metrics) is the server's ledger's;
- a clean stop when no client can afford a round (:meth:`FedMoE.start`), after which the
  last evaluation and the report still happen;
- reply validation before aggregation: exactly the global keys (a ``local`` tensor is
  refused), the same shapes and exactly the same dtypes, finite values, well-formed
  metrics — Flower's own aggregation would broadcast a wrong shape, promote float32 to
  float64 and propagate NaN — and every count a reply carries checked against what the
  client declared when it was queried (``num-examples`` weights the average: a reply
  claiming more examples than the client holds is dropped) or what it was sent (steps);
  then the update itself (:func:`server.aggregation.check_update`: norm at most
  ``max-update-norm``, not exactly zero, not a zeroed model). Any fault drops that reply
  only, with its reason in the round's ``rejected`` and a count in ``failures``;
- aggregation by ``aggregation`` (FedAvg, median or trimmed mean:
  :func:`server.aggregation.aggregate`), only with at least ``min-train-replies`` valid
  replies (else the global model stays as it was), then the server optimiser's step
  (``server-momentum``, ``server-learning-rate``: :func:`server.aggregation.server_step`),
  and with ``centring-fold`` the move of a shared centre's μ folded into its reader's bias
  (:class:`fedmoe.models.centre.CentreFold`: the new global reader computes the averaged
  reader function — exactly with a lossless ``download-codec``, up to the codec's error on the μ
  the clients read otherwise —, not one shifted by μ's noisy move);
- the released model (``ema-decay``): the exponential moving average of the global models
  after each round (:func:`server.aggregation.ema_step`) is what the clients evaluate and
  what the run returns as its final model, while training goes on from the last global
  model (:meth:`FedMoE.released`);
- bounded waits: ``reply-timeout`` for every round's replies (a reply not back in time is
  counted as a timeout) and for ``min-available-clients`` nodes to connect (the run then
  stops saying how many came); while it waits it logs why;
- a checkpoint hook after every finished round and a start round (``--resume``);
- update codecs (``upload-codec``, ``download-codec``, :mod:`fedmoe.compression`): an
  encoded train reply is decoded into full tensors before that validation (a malformed
  one is dropped with the reason), and the global tensors go out encoded relative to
  what each client holds (:class:`~fedmoe.records.Downlink`);
- a per-round history of every client's ε and accuracies and of the serialised bytes of
  the model update it uploaded and downloaded (:attr:`history`);
- non-private runs (``target-epsilon = inf``): σ=0 plans, no ledger charge, ε=∞ reported;
- ``label-prior-shrinkage = "federation"``: the clients' released DP label histograms
  (validated: :func:`fedmoe.records.read_histogram`) give an empirical-Bayes estimate of
  their label distributions (:func:`fedmoe.privacy.label_prior.federation_prior`), sent
  with every later message (:attr:`federation`): post-processing of DP releases.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from fedmoe.compression import Codec
from fedmoe.config import FedMoEConfig
from fedmoe.methods import label_prior_spec, server_centre_fold
from fedmoe.privacy import (
    BudgetExceededError,
    ClientPlan,
    LedgerBook,
    LedgerEntry,
    LedgerError,
    PlanError,
    client_delta,
    delta_error,
    plan_client,
)
from fedmoe.privacy.label_prior import FederationPrior, federation_prior
from fedmoe.privacy.ledger import client_sort_key
from fedmoe.records import (
    ARRAYS,
    CLIENT,
    DOWNLINK,
    DETAILS,
    METRICS,
    REFUSALS,
    WEIGHT_KEY,
    ClientInfo,
    Downlink,
    EvalReport,
    ReplyError,
    RoundPlan,
    TrainReport,
    decode_upload,
    read_details,
    read_histogram,
    server_message,
    update_bytes,
)
from server.aggregation import aggregate, as_dtypes, check_update, ema_step, server_step

#: Relative difference between a client's reported ε and the server's that is flagged.
MISMATCH_TOLERANCE = 1e-6
#: Kinds of failed train replies counted per round (``RoundRecord.failures``): an error
#: reply (the client raised or refused), no reply within ``reply-timeout``, a reply that
#: failed validation.
FAILURE_KINDS = ("error", "timeout", "invalid")
#: Seconds between "still waiting" log lines.
WAIT_LOG_INTERVAL = 10.0


@dataclass
class RoundRecord:
    """What one round did, per client id and overall."""

    server_round: int
    sampled: int = 0
    train: dict[str, TrainReport] = field(default_factory=dict)
    evaluate: dict[str, EvalReport] = field(default_factory=dict)
    #: client -> task-specific evaluate metrics (perplexity, per-task accuracy, expert usage)
    details: dict[str, dict] = field(default_factory=dict)
    phase: str = "train"
    rejected: list[str] = field(default_factory=list)
    #: client -> (server's ε, client's reported ε) where they differ
    mismatches: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: client -> ε spent after this round by the server's ledger (every client of the run
    #: with a ledger): the figure every report shows
    epsilon: dict[str, float] = field(default_factory=dict)
    #: client -> serialised bytes of the update in its train reply, as received
    #: (:func:`~fedmoe.records.update_bytes`)
    upload_bytes: dict[str, int] = field(default_factory=dict)
    #: client -> L2 norm of its update (its arrays minus the round's global arrays)
    update_norms: dict[str, float] = field(default_factory=dict)
    #: failed train replies by kind (:data:`FAILURE_KINDS`)
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    #: whether the round's valid replies changed the global model (False: fewer than
    #: min-train-replies, so it stayed as it was)
    aggregated: bool = False
    #: client -> serialised bytes of the global tensors sent to it this round (train and
    #: evaluate messages)
    download_bytes: dict[str, int] = field(default_factory=dict)


class FedMoE(FedAvg):
    """Federated MoE strategy with per-client privacy budgets.

    Parameters
    ----------
    config : FedMoEConfig
        The run's validated config (sampling fractions, DP parameters, budgets).
    book : LedgerBook
        The server's privacy ledgers, one per client id (``<run folder>/ledger.sqlite``).
    on_round : callable, optional (default: None)
        Called with each finished :class:`RoundRecord` (progress display).
    on_checkpoint : callable, optional (default: None)
        Called after every finished round with the round and the global arrays after it
        (:mod:`server.checkpoint` writes them with the strategy's state).
    """

    def __init__(
        self,
        config: FedMoEConfig,
        *,
        book: LedgerBook,
        on_round: Callable[[RoundRecord], None] | None = None,
        on_checkpoint: Callable[[int, ArrayRecord], None] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_train_nodes=1,
            min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
            min_available_nodes=config.min_available_clients,
            weighted_by_key=WEIGHT_KEY,
        )
        self.config = config
        self.book = book
        for client in book.clients():  # a reused run folder: its accounting must match
            ledger = book.get(client)
            if ledger.accountant != config.accountant:
                raise LedgerError(
                    f"{book.path}: client {client!r} is accounted with {ledger.accountant!r}, "
                    f"this run asks accountant={config.accountant!r}; ε from two accountings "
                    "cannot be mixed. Use a new run-dir or the ledger's accountant"
                )
        self.on_round = on_round
        self.on_checkpoint = on_checkpoint
        self.clients: dict[int, str] = {}  # node id -> client id
        self.declared: dict[str, ClientInfo] = {}  # client id -> what its query reply said
        self.plans: dict[str, ClientPlan] = {}  # client id -> its plan for this run
        self.excluded: dict[str, str] = {}  # client id -> why it gets no more rounds
        self.failed_nodes: dict[int, str] = {}  # nodes whose query failed -> why
        #: whether the run's model has a personal label prior (a DP histogram per client)
        self._prior_classes, self._prior_windows = label_prior_spec(config)
        self.label_prior = self._prior_classes > 0
        #: ``centring-fold`` for a shared centre: after each aggregation, μ's move from
        #: the μ sent is folded into its reader's bias (None: nothing to fold here)
        self._fold = server_centre_fold(config)
        self._histograms: set[str] = set()  # clients sent their label-histogram round
        #: label-prior-shrinkage = "federation": the released histograms received (client
        #: -> counts) and the empirical-Bayes estimate from them, sent with every message
        self.label_histograms: dict[str, list[float]] = {}
        self.federation: FederationPrior | None = None
        self._histogram_due: set[str] = set()  # clients whose reply this round carries one
        self.history: list[RoundRecord] = []
        self.stop_reason: str | None = None
        self._rng = random.Random(config.seed)
        #: global keys -> (shape, dtype) of this round's global arrays, and the arrays
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}
        self._global: dict[str, np.ndarray] = {}
        #: The server optimiser's momentum per global array (``server-momentum``; float64).
        self.velocity: dict[str, np.ndarray] = {}
        #: The exponential moving average of the global arrays after each round
        #: (``ema-decay``; float64; empty until the first aggregation or with γ = 0).
        self.average: dict[str, np.ndarray] = {}
        #: node -> client of this round's train messages (to count the missing replies)
        self._sent: dict[int, str] = {}
        self._upload = Codec.upload(config)
        self.downlink = Downlink(Codec.download(config))
        self._plain_size: tuple[ArrayRecord | None, int] = (None, 0)

    def summary(self) -> None:
        super().summary()
        c = self.config
        log(INFO, "\t└──> method: %s, aggregation: %s%s, max-update-norm=%g, "
            "min-train-replies=%s, reply-timeout=%gs", c.method, c.aggregation,
            f" (trim-fraction={c.trim_fraction:g})" if c.aggregation == "trimmed-mean" else "",
            c.max_update_norm, c.min_train_replies, c.reply_timeout)
        if not c.private:
            log(INFO, "\t└──> NON-PRIVATE: target ε=∞, plain SGD (no clipping, no noise, no "
                "ledger charge) for every client without an ε budget of its own")
            return
        sigma = f"σ={c.noise_multiplier:g} (given)" if c.noise_multiplier else "σ calibrated per client"
        log(INFO, "\t└──> DP-SGD: %s, C=%g, target ε=%g, δ=%s, accountant=%s", sigma,
            c.max_grad_norm, c.target_epsilon, c.target_delta or "auto (< 1/n per client)",
            c.accountant)

    # ------------------------------------------------------------------ the run
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's round loop (train, aggregate, evaluate), stopping cleanly when no client
        can afford another round: the last evaluation and the report still happen.

        Flower's own :meth:`Strategy.start` has no early exit and would keep sending empty
        rounds; centralised evaluation (``evaluate_fn``) is not used by fedmoe.
        ``timeout`` (default: the config's ``reply-timeout``) bounds every wait for
        replies; ``first_round`` > 1 continues a resumed run (``initial_arrays`` are then
        the checkpoint's), and ``on_checkpoint`` is called after every finished round.
        """
        if evaluate_fn is not None:
            raise ValueError("FedMoE evaluates on the clients; evaluate_fn is not supported")
        timeout = self.config.reply_timeout if timeout is None else timeout
        log(INFO, "Starting %s strategy for %s rounds:", type(self).__name__, num_rounds)
        self.summary()
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        evaluated = first_round > 1  # a resumed run has evaluated its earlier rounds
        t_start = time.time()
        for current_round in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            arrays = self.begin_phase(current_round, arrays)
            messages = list(self.configure_train(current_round, arrays, ConfigRecord(), grid))
            if not messages:
                log(WARNING, "fedmoe: training stops before round %s: %s", current_round,
                    self.stop_reason)
                self.history = [r for r in self.history if r.server_round != current_round]
                break
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            agg_arrays, train_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[current_round] = train_metrics
            evaluate_metrics = self._evaluate(current_round, self.released(arrays), grid,
                                              timeout)
            evaluated = True
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[current_round] = evaluate_metrics
            if self.on_checkpoint is not None:
                self.on_checkpoint(current_round, arrays)
        if not evaluated:  # stopped before any training: report the initial model
            self._evaluate(0, arrays, grid, timeout)
        result.arrays = self.released(arrays)
        log(INFO, "Strategy finished in %.2fs", time.time() - t_start)
        return result

    def begin_phase(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays round ``server_round`` trains from: ``arrays``, unless the
        round's phase is not that of the round that aggregated them (``tmoe``'s first
        fine-tuning round, or the one after it when that round was lost to a crash or
        not aggregated). Then the new task starts from the model the old one released
        (:meth:`released`: the pretrained average), with no momentum (:attr:`velocity`)
        and no average from the old task; once switched this changes nothing (the
        average is then empty, so the released model is ``arrays``)."""
        c = self.config
        source = max((r.server_round for r in self.history
                      if r.aggregated and r.server_round < server_round), default=1)
        if c.phase(server_round) == c.phase(source):
            return arrays
        arrays = self.released(arrays)
        self.velocity, self.average = {}, {}
        return arrays

    def released(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model the run evaluates and releases after a round whose global arrays are
        ``arrays``: their exponential moving average over the rounds (``ema-decay`` γ > 0,
        :attr:`average`), in the arrays' dtypes; ``arrays`` themselves with γ = 0 or
        before any aggregation."""
        if not self.average:
            return arrays
        return ArrayRecord({k: Array(v) for k, v in as_dtypes(
            self.average, {k: a.numpy() for k, a in arrays.items()}).items()})

    def _evaluate(
        self, server_round: int, arrays: ArrayRecord, grid: Grid, timeout: float
    ) -> MetricRecord | None:
        messages = self.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        return self.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ clients
    def discover(self, grid: Grid, node_ids: Iterable[int], server_round: int) -> None:
        """Query nodes seen for the first time and plan their clients."""
        new = [n for n in node_ids if n not in self.clients and n not in self.failed_nodes]
        if not new:
            return
        content = server_message(None, RoundPlan(server_round), self.config)
        queries = self._construct_messages(content, new, MessageType.QUERY)
        for reply in grid.send_and_receive(messages=queries, timeout=self.config.reply_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failed_nodes[node] = reply.error.reason
                log(WARNING, "node %s cannot take part: %s", node, reply.error.reason)
                continue
            try:
                info = ClientInfo.from_record(reply.content.config_records[CLIENT])
            except (KeyError, ReplyError) as err:
                self.failed_nodes[node] = f"malformed query reply: {err}"
                log(WARNING, "node %s cannot take part: %s", node, self.failed_nodes[node])
                continue
            if info.client in self.plans and info.client not in self.clients.values():
                self._rejoin(node, info)  # planned before this process (a resumed run)
                continue
            if info.client in self.clients.values():
                self.failed_nodes[node] = f"client id {info.client!r} is already taken"
                log(WARNING, "node %s: client id %r is already used by another node; set a "
                    "distinct client-id in its node config", node, info.client)
                continue
            self.clients[node] = info.client
            self.declared[info.client] = info
            self.plan_new_client(info)

    def _rejoin(self, node: int, info: ClientInfo) -> None:
        """A client planned before a resume comes back on a (new) node: it keeps its plan
        (σ was calibrated once for the whole run) and the server ledger's spend."""
        self.clients[node] = info.client
        self.declared[info.client] = info
        log(INFO, "client %s is back (node %s), with its plan of this run", info.client, node)

    def plan_new_client(self, info: ClientInfo) -> None:
        """Plan a new client against the server's own ledger (seeded with its earlier spend):
        its plan goes to :attr:`plans`, or the reason it gets no rounds to :attr:`excluded`."""
        c, client = self.config, info.client
        budget = min(c.target_epsilon, info.epsilon_budget) if info.epsilon_budget > 0 \
            else c.target_epsilon
        if info.ledger_accountant and info.ledger_accountant != c.accountant:
            self._exclude(client, f"its ledger accounts with {info.ledger_accountant!r}, this "
                                  f"run with {c.accountant!r}")
            return
        delta = info.ledger_delta or None  # a client's existing ledger keeps its δ
        if delta and c.target_delta and delta != c.target_delta:
            self._exclude(client, f"its ledger is at δ={delta:g}, this run asks "
                                  f"target-delta={c.target_delta:g}")
            return
        if math.isinf(budget):  # non-private: plain SGD, no ledger to open or charge
            self.plans[client] = plan_client(c, client, num_train=info.num_train, budget=budget)
            log(INFO, "client %s: n=%s, non-private (ε=∞: no clipping, no noise)", client,
                info.num_train)
            return
        if delta is None:
            delta = client_delta(c, info.num_train)
        if not delta < 1.0 / info.num_train:  # before anything is written to the ledger
            self._exclude(client, delta_error(delta, info.num_train, client))
            return
        try:
            existing = self.book.get(client)
            self.book.open(client, budget=budget, delta=delta, accountant=c.accountant)
            if existing is None:  # seed with the spend the client reports from earlier runs
                for sigma, q, steps in info.history:
                    self.book.charge(client, LedgerEntry(0, sigma, q, steps))
        except BudgetExceededError:
            self._exclude(client, "its earlier spend already exceeds its budget")
            return
        except LedgerError as err:
            self._exclude(client, str(err))
            return
        prior = self.book.get(client).history
        try:
            plan = plan_client(c, client, num_train=info.num_train, budget=budget,
                               delta=delta, prior=prior, label_prior=self.label_prior)
        except PlanError as err:
            self._exclude(client, str(err))
            return
        self.plans[client] = plan
        log(INFO, "client %s: n=%s, δ=%g, q=%g, %s steps/round, σ=%.4f%s, budget ε=%g allows %s "
            "round(s)", client, plan.num_train, plan.delta, plan.sample_rate, plan.steps,
            plan.noise_multiplier, f" (pretraining σ={plan.pretrain_noise:.4f})"
            if plan.pretrain_noise else "", budget, plan.rounds_allowed)
        if plan.rounds_allowed == 0:
            self._exclude(client, "its budget cannot pay for one round")

    def _exclude(self, client: str, why: str) -> None:
        if client not in self.excluded:
            self.excluded[client] = why
            log(WARNING, "client %s gets no more rounds: %s", client, why)

    def all_excluded(self) -> dict[str, str]:
        """Every client refused further rounds, and every node that could not take part
        (as ``node-<id>``), with the reason."""
        return {**{f"node-{n}": why for n, why in self.failed_nodes.items()}, **self.excluded}

    def can_afford(self, client: str, server_round: int) -> bool:
        plan = self.plans.get(client)
        if plan is None or client in self.excluded:
            return False
        if not plan.private:
            return True
        try:
            ledger = self.book.get(client)
        except LedgerError as err:  # damaged since the run began: never under-count
            self._exclude(client, str(err))
            return False
        return ledger is not None and ledger.can_afford(*self._entries(plan, server_round))

    def _with_histogram(self, plan: ClientPlan, server_round: int) -> bool:
        """Whether the client's round ``server_round`` also releases its DP label histogram
        (its first round of the run, when its plan has one; a histogram of next-token
        windows, ``tmoe``'s unigram prior, only in a pretraining round: a client first
        sampled later releases none and trains without the prior)."""
        if self._prior_windows and self.config.phase(server_round) != "pretrain":
            return False
        return bool(plan.prior_noise) and plan.client not in self._histograms

    def _entries(self, plan: ClientPlan, server_round: int) -> list[LedgerEntry]:
        """What the client's next round costs: its label histogram if due, then DP-SGD."""
        first = ([plan.prior_entry(server_round)] if self._with_histogram(plan, server_round)
                 else [])
        return [*first, plan.entry(server_round)]

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample among the clients that can afford this round and charge the server's ledger."""
        self._record(server_round)
        self._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        self._global = {k: a.numpy() for k, a in arrays.items()}
        self._sent = {}
        self._histogram_due = set()
        all_nodes = self.wait_for_nodes(grid)
        if all_nodes is None:
            return []
        self.discover(grid, all_nodes, server_round)
        affordable = self._by_client([n for n in all_nodes if n in self.clients
                                      and self.can_afford(self.clients[n], server_round)])
        if not affordable:
            known = set(self.clients.values())
            if known and known <= set(self.excluded):
                self.stop_reason = (f"every client is excluded before round {server_round} "
                                    "(reasons in results.json's excluded), e.g. "
                                    f"{next(iter(self.excluded.items()))[1]}")
            else:
                self.stop_reason = (f"no client can afford round {server_round} within its "
                                    f"budget (target ε={self.config.target_epsilon:g})")
            return []
        size = min(len(affordable), max(self.min_train_nodes,
                                        int(len(all_nodes) * self.fraction_train)))
        nodes = self._rng.sample(affordable, size)
        messages = []
        for node in nodes:
            plan = self.plans[self.clients[node]]
            histogram = self._with_histogram(plan, server_round)
            if plan.private:
                try:
                    for entry in self._entries(plan, server_round):  # sent = spent
                        self.book.charge(plan.client, entry)
                except (LedgerError, BudgetExceededError) as err:  # damaged since it was read
                    self._exclude(plan.client, str(err))
                    continue
            if histogram:
                self._histograms.add(plan.client)
                if self.config.label_prior_shrinkage == "federation":
                    self._histogram_due.add(plan.client)
            content = self._message(
                arrays, RoundPlan.for_training(server_round, plan, with_prior=histogram,
                                               federation=self.federation),
                plan.client)
            messages.extend(self._construct_messages(content, [node], MessageType.TRAIN))
            self._sent[node] = plan.client
        if not messages:
            self.stop_reason = f"no client could be charged for round {server_round}"
        self.history[-1].sampled = len(messages)
        log(INFO, "configure_train: sampled %s of %s clients (%s can afford the round)",
            len(nodes), len(all_nodes), len(affordable))
        return messages

    def wait_for_nodes(self, grid: Grid) -> list[int] | None:
        """The connected nodes, once at least ``min-available-clients`` are; None (and
        :attr:`stop_reason` says why) if they do not connect within ``reply-timeout``.

        Flower's ``sample_nodes`` would wait forever; this logs what it waits for every
        :data:`WAIT_LOG_INTERVAL` seconds.
        """
        need, timeout = self.min_available_nodes, self.config.reply_timeout
        end, next_log = time.monotonic() + timeout, 0.0
        while len(nodes := list(grid.get_node_ids())) < need:
            now = time.monotonic()
            if now >= end:
                self.stop_reason = (f"only {len(nodes)} of min-available-clients={need} nodes "
                                    f"connected within reply-timeout={timeout:g}s")
                log(WARNING, "fedmoe: %s", self.stop_reason)
                return None
            if now >= next_log:
                log(INFO, "fedmoe: waiting for nodes to connect: %s of min-available-clients=%s "
                    "connected, giving up in %.0fs", len(nodes), need, end - now)
                next_log = now + WAIT_LOG_INTERVAL
            time.sleep(min(1.0, max(0.0, end - now)))
        return nodes

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply (a fault drops that reply only), then, with at least
        ``min-train-replies`` valid ones, aggregate their ``shared`` and ``gate`` arrays by
        ``aggregation``. Never raises for a client's reply; returns ``(None, None)`` when
        the global model stays as it was."""
        record = self._record(server_round)
        valid: list[tuple[dict[str, np.ndarray], int]] = []
        answered: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            client = self.clients.get(node, f"node-{node}")
            checked = self._checked_reply(record, msg, client, server_round)
            if checked is not None:
                valid.append(checked)
        for node, client in self._sent.items():
            if node not in answered:
                self._fail(record, "timeout", client, f"no reply within reply-timeout="
                                                      f"{self.config.reply_timeout:g}s")
        if self._histogram_due:  # releases came with this round: re-estimate once
            self._update_federation()
        for reason in record.rejected:
            log(WARNING, "aggregate_train: dropped reply from %s", reason)
        if len(valid) < self.config.min_train_replies:
            log(WARNING, "round %s: %s valid train repl%s, min-train-replies=%s: the global "
                "model stays as it was", server_round, len(valid),
                "y" if len(valid) == 1 else "ies", self.config.min_train_replies)
            return None, None
        arrays = self._aggregate(valid)
        if arrays is None:
            return None, None
        record.aggregated = True
        spent = self.ledger_epsilons(record.train)
        metrics = MetricRecord({
            "epsilon-max": max(spent.values()),
            "num-clients": len(record.train),
        })
        return arrays, metrics

    def _checked_reply(
        self, record: RoundRecord, msg: Message, client: str, server_round: int
    ) -> tuple[dict[str, np.ndarray], int] | None:
        """A train reply's arrays and weight if every check passes; else None, with the
        reason recorded (:meth:`_fail`)."""
        if msg.has_error():
            self.downlink.lost(client)
            self._fail(record, "error", client, msg.error.reason)
            if msg.error.code in REFUSALS:  # its own ledger says no: it will again
                self._exclude(client, f"it refused round {server_round}: {msg.error.reason}")
            return None
        self.downlink.delivered(client)
        uploaded = update_bytes(msg.content)  # as received, before decoding
        try:
            self._decode_upload(msg)
            report = self._check_train_reply(msg, client)
            plan = self.plans.get(client)
            if (plan is None or plan.private) and not math.isfinite(report.epsilon):
                raise ReplyError(f"reply metric 'epsilon' must be a finite number in a DP "
                                 f"round, got {report.epsilon}")
            arrays = {k: a.numpy() for k, a in msg.content.array_records[ARRAYS].items()}
            norm = check_update(arrays, self._global, self.config.max_update_norm)
            histogram = (read_histogram(msg.content, self._prior_classes, plan.num_train,
                                        plan.prior_noise)
                         if client in self._histogram_due else None)
        except ReplyError as err:
            self._fail(record, "invalid", client, str(err))
            return None
        except Exception as err:  # noqa: BLE001  a foreign payload may fail anywhere
            self._fail(record, "invalid", client, f"malformed reply ({type(err).__name__}: "
                                                  f"{err})")
            return None
        if plan is None or plan.private:
            self._check_epsilon(record, client, report.epsilon)
        if histogram is not None:
            self.label_histograms[client] = [float(v) for v in histogram]
        record.train[client] = report
        record.update_norms[client] = norm
        record.upload_bytes[client] = uploaded
        return arrays, report.num_examples

    def _update_federation(self) -> None:
        """Re-estimate :attr:`federation` from every label histogram received (at least
        two needed): post-processing of the clients' DP releases."""
        known = [c for c in sorted(self.label_histograms, key=client_sort_key)
                 if c in self.plans]
        if len(known) < 2:
            return
        self.federation = federation_prior([torch.tensor(self.label_histograms[c])
                                            for c in known])

    def _fail(self, record: RoundRecord, kind: str, client: str, why: str) -> None:
        record.failures[kind] += 1
        record.rejected.append(f"{client}: {why}")

    def _aggregate(self, valid: list[tuple[dict[str, np.ndarray], int]]) -> ArrayRecord | None:
        """The new global arrays from the valid replies; None (the model stays) should the
        result not be finite, which bounded updates of finite values cannot cause."""
        c = self.config
        combined = aggregate([a for a, _ in valid], [float(w) for _, w in valid],
                             c.aggregation, trim_fraction=c.trim_fraction)
        velocity = {k: v.copy() for k, v in self.velocity.items()}
        combined = server_step(self._global, combined, velocity, c.server_momentum,
                               c.server_learning_rate)
        if self._fold is not None:  # the clients trained reading the μ sent (_global's)
            self._fold.apply(combined, self._global[self._fold.shift])
        if not all(np.all(np.isfinite(v)) for v in combined.values()):
            log(WARNING, "aggregate_train: the %s of %s replies is not finite; the global "
                "model stays as it was", c.aggregation, len(valid))
            return None
        self.velocity = velocity
        if c.ema_decay > 0:
            ema_step(self.average, combined, c.ema_decay)
        return ArrayRecord({k: Array(v) for k, v in combined.items()})

    def ledger_epsilons(self, clients: Iterable[str] | None = None) -> dict[str, float]:
        """ε spent by the server's ledger (the last charge's stored ε, which the ledger
        verified on reading), per client of ``clients`` (default: every client of this run
        that has a ledger); ε=∞ for a client trained non-privately (its plan has σ=0)."""
        chosen = set(self.clients.values()) if clients is None else set(clients)
        spent = {c: math.inf for c in chosen if c in self.plans and not self.plans[c].private}
        for client in (chosen - set(spent)) & set(self.book.clients()):
            trajectory = self.book.trajectory(client)
            spent[client] = trajectory[-1][1] if trajectory else 0.0
        return spent

    def _check_epsilon(self, record: RoundRecord, client: str, reported: float) -> None:
        """Flag a client whose own ε differs from what the server charged it."""
        ours = self.ledger_epsilons([client]).get(client, 0.0)
        if ours == reported:  # ε=∞ of a non-private round: nothing to compare
            return
        if not math.isclose(ours, reported, rel_tol=MISMATCH_TOLERANCE, abs_tol=1e-9):
            record.mismatches[client] = (ours, reported)
            log(WARNING, "privacy mismatch: client %s reports ε=%.6f, the server's ledger "
                "says ε=%.6f for the same rounds", client, reported, ours)

    def _decode_upload(self, msg: Message) -> None:
        """Replace an encoded update in ``msg`` by the full tensors it stands for.

        Raises
        ------
        ReplyError
            If the reply's update is malformed.
        """
        content = msg.content
        if ARRAYS in content.array_records and not self._upload.lossless:
            content[ARRAYS] = decode_upload(
                content.array_records[ARRAYS], self._upload,
                self._global)

    def _message(self, arrays: ArrayRecord, plan: RoundPlan, client: str) -> RecordDict:
        """A train/evaluate message's content for ``client``, the global tensors encoded by
        the download codec; counts its bytes."""
        content = server_message(arrays, plan, self.config)
        content[ARRAYS], link = self.downlink.content(client, arrays)
        if link is not None:
            content[DOWNLINK] = link
            size = update_bytes(content)
        else:  # the same plain tensors go to every client: serialise them once to count
            if self._plain_size[0] is not arrays:
                self._plain_size = (arrays, update_bytes(content))
            size = self._plain_size[1]
        downloads = self._record(plan.server_round).download_bytes
        downloads[client] = downloads.get(client, 0) + size
        return content

    def _check_train_reply(self, msg: Message, client: str) -> TrainReport:
        """The reply's report, if its arrays match the global model exactly (keys, shapes,
        dtypes, finite values) and its counts what the client declared and was sent.

        Raises
        ------
        ReplyError
            Naming the first fault.
        """
        content = msg.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise ReplyError(f"reply must carry '{ARRAYS}' and '{METRICS}' records")
        report = TrainReport.from_record(content.metric_records[METRICS])
        info, plan = self.declared.get(client), self.plans.get(client)
        if info is None or plan is None:
            raise ReplyError("reply from a client that was never planned")
        if not 1 <= report.num_examples <= info.num_train:
            raise ReplyError(f"num-examples={report.num_examples} is outside [1, "
                             f"{info.num_train}], the train set size it declared")
        if report.steps != plan.steps:
            raise ReplyError(f"steps={report.steps}, but the round planned {plan.steps}")
        arrays = content.array_records[ARRAYS]
        expected = self._expected
        if set(arrays.keys()) != set(expected):
            extra = sorted(set(arrays.keys()) - set(expected))
            missing = sorted(set(expected) - set(arrays.keys()))
            raise ReplyError(f"array keys differ from the global model: extra {extra[:3]}, "
                             f"missing {missing[:3]}")
        for key, array in arrays.items():
            shape, dtype = expected[key]
            if array.dtype != dtype:  # before numpy(): no conversion of a foreign payload
                raise ReplyError(f"'{key}' has dtype {array.dtype}, expected {dtype}")
            value = array.numpy()
            if value.shape != shape or value.dtype != np.dtype(dtype):
                raise ReplyError(f"'{key}' has shape {value.shape} and dtype {value.dtype}, "
                                 f"expected {shape} {dtype}")
            if not np.all(np.isfinite(value)):
                raise ReplyError(f"'{key}' contains NaN or inf")
        return report

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        all_nodes = self.wait_for_nodes(grid)
        if all_nodes is None:
            return []
        self.discover(grid, all_nodes, server_round)
        known = self._by_client([n for n in all_nodes if n in self.clients])
        size = max(self.min_evaluate_nodes, int(len(all_nodes) * self.fraction_evaluate))
        nodes = self._rng.sample(known, min(size, len(known)))
        plan = RoundPlan(server_round, federation=self.federation)
        return [message for node in nodes for message in self._construct_messages(
            self._message(arrays, plan, self.clients[node]), [node], MessageType.EVALUATE)]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Per-client personalised and global-only accuracy, and their weighted means."""
        record = self._record(server_round)
        for msg in replies:
            client = self.clients.get(msg.metadata.src_node_id, "?")
            if msg.has_error():
                self.downlink.lost(client)
                log(WARNING, "aggregate_evaluate: client %s failed: %s", client,
                    msg.error.reason)
                continue
            self.downlink.delivered(client)
            try:
                report = EvalReport.from_record(msg.content.metric_records[METRICS])
                self._check_eval_report(report, client)
                details = msg.content.metric_records.get(DETAILS)
                record.details[client] = read_details(details) if details else {}
            except (KeyError, ReplyError) as err:
                log(WARNING, "aggregate_evaluate: dropped reply of %s: %s", client, err)
                continue
            record.evaluate[client] = report
        record.epsilon = self.ledger_epsilons()
        if self.on_round is not None:
            self.on_round(record)
        reports = list(record.evaluate.values())
        if not reports:
            return None
        return MetricRecord({
            "personalized-accuracy": _weighted([r.personalized_accuracy for r in reports], reports),
            "global-accuracy": _weighted([r.global_accuracy for r in reports], reports),
            "epsilon-max": max(record.epsilon.values(), default=0.0),
        })

    def _check_eval_report(self, report: EvalReport, client: str) -> None:
        """Counts within what the client declared, accuracies in [0, 1], losses ≥ 0.

        Raises
        ------
        ReplyError
            Naming the first fault.
        """
        info = self.declared.get(client)
        if info is None:
            raise ReplyError("reply from a client that was never queried")
        if not 0 <= report.num_examples <= info.num_test:
            raise ReplyError(f"num-examples={report.num_examples} is outside [0, "
                             f"{info.num_test}], the test set size it declared")
        for name in ("personalized_accuracy", "global_accuracy"):
            if not 0 <= getattr(report, name) <= 1:
                raise ReplyError(f"{name}={getattr(report, name)} is outside [0, 1]")
        for name in ("personalized_loss", "global_loss"):
            if getattr(report, name) < 0:
                raise ReplyError(f"{name}={getattr(report, name)} is negative")

    # ---------------------------------------------------------------- helpers
    def _by_client(self, nodes: list[int]) -> list[int]:
        """``nodes`` in the order of their client ids: the seeded sampling then picks the
        same clients whatever node ids the engine gave them (Flower's simulation draws
        them at random; a resumed run gets new ones)."""
        return sorted(nodes, key=lambda n: client_sort_key(self.clients[n]))

    def _record(self, server_round: int) -> RoundRecord:
        if not self.history or self.history[-1].server_round != server_round:
            self.history.append(RoundRecord(server_round,
                                            phase=self.config.phase(max(server_round, 1))))
        return self.history[-1]


def _weighted(values: list[float], reports: list) -> float:
    weights = [r.num_examples for r in reports]
    return float(np.average(values, weights=weights)) if sum(weights) else float("nan")
