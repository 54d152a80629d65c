"""The fedmoe ClientApp: one per data holder, DP-SGD on its own data.

Flower glue only: the work is done by :mod:`fedmoe`. Three handlers:

- **query** (once, before the client's first round): say who it is (its stable client id),
  how many training examples it holds, its own ε budget and its ledger's history, so the
  server can plan its δ, q and σ;
- **train**: check the round plan against the client's own ledger and charge it (one SQLite
  transaction, *before* any data is touched: a crash may over-count, never under-count);
  refuse with an error reply if the round would exceed the client's budget. Then rebuild
  the model from the global arrays and the stored local experts, run exactly the planned
  DP-SGD steps, store the local experts, and reply with ``shared``+``gate`` arrays only
  (the method decides which tensors those are, :mod:`fedmoe.methods`: none at all for
  ``local``), encoded by the run's ``upload-codec`` after training, i.e. after DP noise
  (:func:`fedmoe.records.encode_upload`; the error-feedback residual is kept in the
  client's state dir). The round that releases the client's DP label histogram also sends
  that release (``label-prior-shrinkage = "federation"``; already charged, nothing new);
  every message may carry the server's estimate from all releases, from which the client
  computes its label prior (:func:`apply_label_prior`). A non-private run
  (``target-epsilon = inf``, σ=0) trains with plain SGD and
  charges nothing, unless the client has an ε budget of its own: then it refuses;
- **evaluate**: personalised and global-only accuracy on the client's own test split.

A message whose global tensors come encoded (``download-codec``) is decoded against what
the client kept from the previous one (:func:`fedmoe.records.receive_global`); one it
cannot decode is refused (``BAD_MESSAGE``) before anything else happens.
"""

from __future__ import annotations

import math

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.state import ClientStore, open_store
from fedmoe.compression import Codec, CodecError
from fedmoe.config import ConfigError, FedMoEConfig, NodeSettings
from fedmoe.data import ClientData, load_client_data, load_node_data
from fedmoe.data.text import unigram_perplexity
from fedmoe.methods import method_model
from fedmoe.models.layers import decide_experts
from fedmoe.models.prior import LabelPrior, label_priors
from fedmoe.privacy import BudgetExceededError, LedgerError, delta_error, secret_generator
from fedmoe.privacy.label_prior import (
    FederationPrior,
    federation_pseudo_counts,
    histogram_size,
    label_counts,
    noisy_label_counts,
    shrink_counts,
    shrink_to_federation,
)
from fedmoe.privacy.plan import gradient_noise_scale
from fedmoe.records import (
    ARRAYS,
    BAD_MESSAGE,
    BUDGET_EXCEEDED,
    CLIENT,
    DATA_UNUSABLE,
    DELTA_TOO_LARGE,
    DETAILS,
    HISTOGRAM,
    LEDGER_UNUSABLE,
    METRICS,
    ClientInfo,
    EvalReport,
    RoundPlan,
    TrainReport,
    encode_upload,
    histogram_record,
    read_server_message,
    receive_global,
)
from fedmoe.roles import Role, merge_state_dict, split_state_dict
from fedmoe.training import evaluate, train_dp_round, train_plain_round

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    opened = _open_or_refuse(msg, context)
    if isinstance(opened, Message):
        return opened
    node, store, (_, plan, config), data = opened
    try:
        info = describe_client(node, store, config, data, plan.server_round)
    except Refusal as refusal:
        return _refuse(msg, refusal.code, refusal.reason)
    return Message(RecordDict({CLIENT: info.to_record()}), reply_to=msg)


class Refusal(Exception):
    """Why a client will not take part: the error ``code`` of its reply and the ``reason``
    the server logs."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def describe_client(node: NodeSettings, store: ClientStore, config: FedMoEConfig,
                    data: ClientData, server_round: int = 1) -> ClientInfo:
    """What a client's query reply says about it (:class:`~fedmoe.records.ClientInfo`):
    its id, split sizes, own ε budget and its ledger's δ, accountant and history.

    Raises
    ------
    Refusal
        ``LEDGER_UNUSABLE`` if its ledger does not verify, is another client-id's, or is
        pinned to another δ or accountant than the node config; ``DELTA_TOO_LARGE`` if the node's pinned δ is not
        below 1/n of its train split.
    """
    try:
        ledger = store.ledger(node.client,
                              private=math.isfinite(node.budget(config.target_epsilon)))
    except LedgerError as err:
        raise Refusal(LEDGER_UNUSABLE, str(err)) from err
    if ledger and node.pin_error(ledger.delta, ledger.accountant):
        raise Refusal(LEDGER_UNUSABLE, f"{store.root}: its ledger was created at "
                      f"δ={ledger.delta:g}, accountant {ledger.accountant!r}, but the node "
                      f"config pins δ={node.delta:g}, accountant {node.accountant!r}; a "
                      "ledger keeps the δ and accountant it was created with: pin those")
    num_train, num_test = _split_sizes(config, node, data, server_round)
    if node.delta and node.delta >= 1.0 / num_train:
        raise Refusal(DELTA_TOO_LARGE, delta_error(node.delta, num_train, node.client))
    return ClientInfo(  # a pinned δ/accountant is what the server must plan this client at
        client=node.client,
        num_train=num_train,
        epsilon_budget=node.epsilon_budget,
        ledger_delta=ledger.delta if ledger else node.delta,
        ledger_accountant=ledger.accountant if ledger else node.accountant,
        history=tuple(ledger.history) if ledger else (),
        num_test=num_test,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    opened = _open_or_refuse(msg, context)  # before any charge
    if isinstance(opened, Message):
        return opened
    node, store, (global_state, plan, config), data = opened
    if not plan.is_training:
        return _refuse(msg, BAD_MESSAGE, "a train message must carry the round's DP parameters")
    budget = node.budget(config.target_epsilon)
    if not plan.private and math.isfinite(budget):
        return _refuse(msg, BUDGET_EXCEEDED, f"the server asks for a non-private round (σ=0); "
                                             f"this client trains only under its ε={budget:g}")
    model = personal_model(config, node, store, global_state, plan.server_round)
    priors = label_priors(model)
    if plan.prior_noise and (len(priors) != 1 or priors[0].is_set):
        return _refuse(msg, BAD_MESSAGE, "the server asks for a label histogram, but this "
                       "client's model " + ("already holds its label prior" if priors else
                                            "has no label prior") + "; refused before any charge")
    if plan.prior_noise and not _counts_for(priors[0], data.train):
        return _refuse(msg, BAD_MESSAGE, "the server asks for a histogram of next-token "
                       "windows in a round that trains on labels (not a pretraining round); "
                       "refused before any charge")
    if unfit := _federation_error(priors, plan):
        return _refuse(msg, BAD_MESSAGE, unfit + "; refused before any charge")
    epsilon = math.inf  # a non-private round: nothing to charge, no guarantee
    if plan.private:
        if plan.delta >= 1.0 / len(data.train):  # checked before the ledger is touched
            return _refuse(msg, DELTA_TOO_LARGE, delta_error(plan.delta, len(data.train),
                                                             node.client))
        if pinned := node.pin_error(plan.delta, plan.accountant):
            return _refuse(msg, LEDGER_UNUSABLE, pinned)
        try:
            with store.book(node.client) as book:
                book.open(node.client, budget=budget, delta=plan.delta,
                          accountant=plan.accountant)
                for entry in plan.entries():  # write-ahead: histogram (if asked), round
                    epsilon = book.charge(node.client, entry)
        except BudgetExceededError as err:
            return _refuse(msg, BUDGET_EXCEEDED, str(err))
        except LedgerError as err:
            return _refuse(msg, LEDGER_UNUSABLE, str(err))
    release = set_label_prior(priors, data.train, plan, config)
    apply_label_prior(priors, config, plan.federation, len(data.train))
    decide_experts(model, gradient_noise_scale(plan.noise_multiplier, plan.sample_rate,
                                               len(data.train)), config.expert_noise_limit)

    if plan.private:
        result = train_dp_round(
            model,
            data.train,
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            learning_rate=config.learning_rate,
            grad_sample_mode=config.clipping,
            local_pull=config.local_pull,
            fold_centre=config.centring_fold,
        )
    else:
        result = train_plain_round(model, data.train, steps=plan.steps,
                                   sample_rate=plan.sample_rate,
                                   learning_rate=config.learning_rate,
                                   local_pull=config.local_pull,
                                   fold_centre=config.centring_fold)
    store.save_local(split_state_dict(model, {Role.LOCAL}))

    # the round's DP-SGD has finished: only its (noised) result reaches the codec
    arrays, residual = encode_upload(split_state_dict(model), global_state,
                                     Codec.upload(config), store.load_residual(),
                                     error_feedback=config.error_feedback)
    store.save_residual(residual)
    report = TrainReport(num_examples=len(data.train), epsilon=epsilon, steps=result.steps)
    content = RecordDict({ARRAYS: arrays, METRICS: report.to_record()})
    if release is not None and config.label_prior_shrinkage == "federation":
        content[HISTOGRAM] = histogram_record(release)  # the release itself, already charged
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    opened = _open_or_refuse(msg, context)
    if isinstance(opened, Message):
        return opened
    node, store, (global_state, plan, config), data = opened
    try:
        ledger = store.ledger(node.client,
                              private=math.isfinite(node.budget(config.target_epsilon)))
    except LedgerError as err:
        return _refuse(msg, LEDGER_UNUSABLE, str(err))
    model = personal_model(config, node, store, global_state, plan.server_round)
    priors = label_priors(model)
    if unfit := _federation_error(priors, plan):
        return _refuse(msg, BAD_MESSAGE, unfit)
    apply_label_prior(priors, config, plan.federation, len(data.train))
    personal = evaluate(model, data.test, use_local=True)
    global_only = evaluate(model, data.test, use_local=False)
    report = EvalReport(
        num_examples=personal.num_examples,
        personalized_accuracy=personal.accuracy,
        global_accuracy=global_only.accuracy,
        personalized_loss=personal.loss,
        global_loss=global_only.loss,
        epsilon=_spent(node, config, ledger),
    )
    details = MetricRecord({
        **{f"personalized-{k}": v for k, v in personal.details.items()},
        **{f"global-{k}": v for k, v in global_only.details.items()},
        "expert-usage": personal.expert_usage,
    })
    if "perplexity" in personal.details:  # the baseline a language model must beat, from
        # the test split alone: released in the clear like every test metric, it must not
        # be a function of the training data (fitted on the train split it would release
        # the client's exact byte counts, unnoised)
        details["unigram-perplexity"] = unigram_perplexity(data.test.tensors[1],
                                                           data.test.tensors[1])
    return Message(RecordDict({METRICS: report.to_record(), DETAILS: details}), reply_to=msg)


def _open_or_refuse(
    msg: Message, context: Context
) -> tuple[NodeSettings, ClientStore, tuple[dict, RoundPlan, FedMoEConfig], ClientData] | Message:
    """:func:`_open`, or the refusal to send back: a message whose global tensors cannot be
    decoded (BAD_MESSAGE), a node config or data file that cannot be used (DATA_UNUSABLE)."""
    try:
        return _open(msg, context)
    except CodecError as err:
        return _refuse(msg, BAD_MESSAGE, str(err))
    except ConfigError as err:
        return _refuse(msg, DATA_UNUSABLE, str(err))


def _open(
    msg: Message, context: Context
) -> tuple[NodeSettings, ClientStore, tuple[dict, RoundPlan, FedMoEConfig], ClientData]:
    """What every handler starts from: node settings, state store, the message (its global
    tensors decoded), own data (the node's own ``data-path``, else its share of the run's
    data set).

    Raises
    ------
    fedmoe.compression.CodecError
        If the message's encoded global tensors cannot be decoded.
    ConfigError
        If the node config or the node's data cannot be used
        (:class:`~fedmoe.data.files.DataFileError` names the file and the fix).
    """
    node = NodeSettings.from_node_config(context.node_config)
    _, plan, config = read_server_message(msg.content, decode=False)
    store = open_store(context, node)
    held = store.load_reference() if config.download_codec != "none" else None
    global_state, now = receive_global(msg.content, Codec.download(config), held)
    if now is not None and now is not held:
        store.save_reference(now)
    if node.data_path:
        data = load_node_data(config, node.data_path, node.label_column)
    else:
        data = load_client_data(config, node.partition_id, node.num_partitions,
                                config.phase(plan.server_round))
    return node, store, (global_state, plan, config), data


def _split_sizes(config: FedMoEConfig, node: NodeSettings, data: ClientData,
                 server_round: int) -> tuple[int, int]:
    """The largest train and test split over the run's phases (a Transformer-MoE's
    pre-training and fine-tuning sets may differ): what a later reply may claim at most."""
    phases = {config.phase(r) for r in range(1, config.num_server_rounds + 1)}
    phases.discard(config.phase(server_round))
    sizes = [(len(data.train), len(data.test))]
    for phase in sorted(phases):
        other = load_client_data(config, node.partition_id, node.num_partitions, phase)
        sizes.append((len(other.train), len(other.test)))
    return max(n for n, _ in sizes), max(m for _, m in sizes)
def _spent(node: NodeSettings, config: FedMoEConfig, ledger) -> float:
    """The ε this client reports: its ledger's, or ∞ when it trains non-privately."""
    if math.isinf(node.budget(config.target_epsilon)):
        return math.inf
    return ledger.spent() if ledger else 0.0


def _refuse(msg: Message, code: int, reason: str) -> Message:
    """An error reply: the server counts it as a failed reply and logs ``reason``."""
    return Message(Error(code=code, reason=reason), reply_to=msg)


def set_label_prior(priors: list[LabelPrior], train_set, plan: RoundPlan,
                    config: FedMoEConfig) -> torch.Tensor | None:
    """Give the model its personal label prior, once: the DP label histogram the round
    plan asks for (σ_h, already charged) is drawn and kept with the prior (from which
    :func:`apply_label_prior` computes it) and returned, to be sent with the reply; in a
    non-private run the prior is set from the exact counts. Afterwards both are local
    tensors, kept with the local experts."""
    if not priors or not _counts_for(priors[0], train_set):
        return None
    labels = train_set.tensors[1]
    if plan.prior_noise:
        counts = noisy_label_counts(labels, len(priors[0].log_prior), plan.prior_noise,
                                    secret_generator())
        priors[0].keep_release(counts, plan.prior_noise)
        return counts
    if not plan.private and config.label_prior_share > 0 and not priors[0].is_set:
        counts = label_counts(labels, len(priors[0].log_prior)).float()
        priors[0].set_counts(counts, pseudo_count=1.0)
    return None


def _counts_for(prior: LabelPrior, train_set) -> bool:
    """Whether ``train_set``'s targets are what ``prior`` counts: windows of next-token
    targets (N, L) for a window prior (``tmoe``'s unigram prior, pretraining data), one
    label per record otherwise."""
    return (train_set.tensors[1].dim() == 2) == prior.per_window


def apply_label_prior(priors: list[LabelPrior], config: FedMoEConfig,
                      federation: FederationPrior | None, num_train: int) -> None:
    """Compute the client's prior from its kept DP release (a no-op before it has one), by
    ``label-prior-shrinkage``: ``federation`` shrinks the noisy counts towards the
    federation's distribution the message carries (:func:`shrink_to_federation`; until the
    server has one, the counts as they are), ``james-stein`` towards their own mean,
    ``none`` takes them as they are. Post-processing of the release and public values."""
    if not priors or not priors[0].released:
        return
    prior = priors[0]
    counts, sigma = prior.counts, float(prior.noise)
    if config.label_prior_shrinkage == "federation" and federation is not None:
        size = histogram_size(counts, num_train, prior.per_window)
        prior.set_counts(shrink_to_federation(counts, sigma, size, federation),
                         pseudo_count=federation_pseudo_counts(federation))
    elif config.label_prior_shrinkage == "james-stein":
        prior.set_counts(shrink_counts(counts, sigma), pseudo_count=sigma)
    else:
        prior.set_counts(counts, pseudo_count=sigma)


def _federation_error(priors: list[LabelPrior], plan: RoundPlan) -> str:
    """Why the message's federation label prior cannot apply to this model ("" if it can)."""
    if plan.federation is None or not priors:
        return ""
    classes = len(priors[0].log_prior)
    if len(plan.federation.mean) != classes:
        return (f"the message's federation label prior has {len(plan.federation.mean)} "
                f"classes, this client's model {classes}")
    return ""


def personal_model(
    config: FedMoEConfig, node: NodeSettings, store: ClientStore, global_state: dict,
    server_round: int = 1,
) -> torch.nn.Module:
    """The run's model with the global shared+gate tensors and this client's local experts.

    A client's first local experts are initialised from a seed of its own partition, so a
    run is reproducible; after that they live only in the client's store.
    """
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 100_003 + node.partition_id)
        model = method_model(config, server_round)
    local = store.load_local()
    if local is not None:
        merge_state_dict(model, _with_release_buffers(model, local), {Role.LOCAL})
    merge_state_dict(model, global_state)
    return model


def _with_release_buffers(model: torch.nn.Module, local: dict) -> dict:
    """Local state written before the label prior kept its DP release (a state dir of an
    earlier fedmoe) has ``log_prior`` but no ``counts``/``noise``: those take the model's
    initial values (no release kept), so the stored prior stays exactly as it was."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if (isinstance(module, LabelPrior) and f"{prefix}log_prior" in local
                and f"{prefix}counts" not in local and f"{prefix}noise" not in local):
            local = {**local, f"{prefix}counts": module.counts.clone(),
                     f"{prefix}noise": module.noise.clone()}
    return local
