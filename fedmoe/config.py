"""One typed, validated configuration for a fedmoe run.

Flower hands every app a flat run config (``[tool.flwr.app.config]`` in ``pyproject.toml``
fused with ``--run-config`` overrides). :meth:`FedMoEConfig.from_run_config` is the only
place that reads those raw keys; everything else takes a :class:`FedMoEConfig`. The
node config a SuperNode operator sets (``--node-config``) is parsed here too, by
:meth:`NodeSettings.from_node_config`.

Keys are kebab-case (``learning-rate``), fields snake_case (``learning_rate``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
MODELS = ("moe", "lmoe", "hmoe", "mtmoe", "tmoe")
GATES = ("linear", "attention")
DISPATCHES = ("dense", "sparse")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "bookkeeping")
#: (dispatch, grad-sample-mode) that ``auto`` picks per model: the fastest correct pair in a
#: measured DP round of the model at its defaults (docs/benchmarks.md).
FASTEST = {"moe": ("dense", "bookkeeping"), "lmoe": ("dense", "bookkeeping"),
           "hmoe": ("dense", "bookkeeping"),
           "mtmoe": ("dense", "bookkeeping"), "tmoe": ("sparse", "bookkeeping")}
DATASETS = ("auto", "digits", "pystdlib", "synthetic", "node")
#: Kinds of users' own data files, ``dataset = "KIND:PATH"`` (:mod:`fedmoe.data.files`).
FILE_KINDS = ("csv", "npz", "images", "hf")
#: Input features and classes of the embedded classification sets (digits, synthetic).
EMBEDDED_SHAPE = (64, 10)
MAX_FEATURES = 10_000_000
MAX_CLASSES = 100_000
#: The data set each model trains on (``dataset = "auto"``).
MODEL_DATASET = {"moe": "digits", "lmoe": "digits", "hmoe": "digits", "mtmoe": "digits",
                 "tmoe": "pystdlib"}
PARTITIONERS = ("iid", "dirichlet", "pathological")
#: Ways of training and sharing a model (:mod:`fedmoe.methods`).
METHODS = ("fedmoe", "local", "fedavg", "fedper")
#: How a client turns its noisy label histogram into counts (``label-prior-shrinkage``).
PRIOR_SHRINKAGES = ("federation", "james-stein", "none")
#: What evaluation scores on: each client's own test split, or a validation split held
#: out of its training data (for tuning; the test split is then never touched).
EVALUATE_ON = ("test", "validation")
#: How the server combines the valid train replies (:mod:`server.aggregation`).
AGGREGATIONS = ("fedavg", "median", "trimmed-mean")
#: Update codecs (:mod:`fedmoe.compression`, which imports this name from here).
CODECS = ("none", "q8", "q4", "topk", "sign")

#: Keys whose value 0 means "the model's own": key -> (the value of every other model,
#: {model: its own value}). ``tmoe`` (a Transformer on 64-byte windows, ~76k parameters at
#: its defaults) takes a smaller step and one block (how these were chosen:
#: docs/results.md, section 8); the digits models keep 0.5 and 2 (which they ignore).
#: Resolved when the config is built, so a run's recorded config holds the values it used.
OWN_DEFAULTS: dict[str, tuple[float, dict[str, float]]] = {
    "learning_rate": (0.5, {"tmoe": 0.25}),
    "num_layers": (2, {"tmoe": 1}),
}

# Upper bounds: values past them cannot fit in memory or finish in reasonable time on the
# machines fedmoe targets (or make no sense for DP); the error says which and why.
MAX_ROUNDS = 10_000
MAX_CLIENTS = 100_000
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 1_000_000
#: DP-SGD steps one client may be planned for in a run (rounds × epochs × steps per epoch).
MAX_DP_STEPS = 1_000_000
MAX_LEARNING_RATE = 100.0
MAX_GRAD_NORM = 1e6
MAX_EPSILON = 10_000.0  # far past any meaningful guarantee; tests use it as "no limit"
MAX_NOISE_MULTIPLIER = 1e4
MAX_LOSS_COEF = 1e3
MAX_ALPHA = 1e6
MAX_COUNT = 1_024  # experts, groups, layers, heads, depth
MAX_SEQ_LEN = 8_192
MAX_WINDOWS = 10_000_000
MAX_SEED = 2**32 - 1
#: Run-config keys added after runs had been recorded, each with the value that means
#: "as before the key existed" (:meth:`FedMoEConfig.from_recorded`).
ADDED_KEYS: dict[str, Any] = {"score-scale": False, "server-momentum": 0.0,
                              "server-learning-rate": 1.0, "unigram-prior": False,
                              "ema-decay": 0.0, "feature-bounds": "", "pretrain-share": 0.0,
                              "feature-centring": False, "mlp-centring": False,
                              "centring-fold": False}
#: server-learning-rate's upper bound: a step 10x the aggregated update.
MAX_SERVER_LR = 10.0
MAX_NOISE_LIMIT = 1e6  # expert-noise-limit: above any ν = σ/(q n) a client can reach
MAX_WIDTH = 100_000  # mlp-width: at most 7.4M parameters on digits
MAX_SYNTHETIC = 10_000_000  # generated examples (about 2.6 GB of float32 features)
#: max-update-norm's upper bound: the mean of float32 updates bounded by it cannot overflow.
#: Honest updates are far below the default 1,000 (lmoe on digits: 1.7–3.3, measured).
MAX_UPDATE_NORM = 1e6
#: reply-timeout: a day; a server that waits longer for one round has lost its clients.
MAX_REPLY_TIMEOUT = 86_400.0
#: The largest model (trainable parameters) fedmoe builds: 50 M float32 parameters are
#: 200 MB of weights, and DP-SGD keeps several copies (gradients, per-sample norms or
#: gradients, the optimizer's) on every client.
MAX_PARAMETERS = 50_000_000
#: What :func:`parameter_count` returns for a model too large for torch to describe.
OVERFLOW = 2**63
#: Integer keys that count modules: (key, lowest valid value); each at most MAX_COUNT.
COUNT_KEYS = (("num_shared_experts", 1), ("num_local_experts", 0), ("top_k", 1),
              ("num_groups", 1), ("group_top_k", 1), ("expert_depth", 1), ("num_layers", 1),
              ("num_heads", 1), ("num_always_on_experts", 0))
#: Keys that set the model's size (named in the "model too large" error when changed).
SHAPE_KEYS = ("hidden-dim", "expert-hidden-dim", "num-shared-experts", "num-local-experts", "num-groups",
              "expert-depth", "num-layers", "num-always-on-experts", "seq-len")


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; the message says the fix."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def _float_literal(literal: str) -> float:
    """tomllib's ``parse_float`` for run configs: ``float(literal)``, except that a number
    written with digits that is too large for a float (``1e400``) is refused instead of
    becoming ``inf`` — which for ``target-epsilon`` would silently mean a non-private run.
    Only ``inf`` (``+inf``, ``-inf``) spelt out reads as infinity."""
    value = float(literal)
    if math.isinf(value) and literal.lstrip("+-") != "inf":
        raise ConfigError(
            f"the number {literal} is too large for a float: it would read as infinity "
            "(for target-epsilon that means a NON-PRIVATE run); write a number of "
            "magnitude below 1.8e308, or inf where infinity is meant")
    return value


def loads_toml(text: str) -> dict[str, Any]:
    """Parse TOML run-config text (a ``--run-config`` token or file, a grid file) the way
    fedmoe reads every run config: numbers too large for a float are refused
    (:func:`_float_literal`), never read as ``inf``.

    Raises
    ------
    ConfigError
        For such a number (naming it).
    tomllib.TOMLDecodeError
        For text that is not TOML.
    """
    import tomllib

    return tomllib.loads(text, parse_float=_float_literal)


def parse_range(spec: str) -> tuple[float, float] | None:
    """``feature-bounds`` ``"LOW:HIGH"`` -> (low, high), or None if ``spec`` is not two
    numbers joined by ``:`` (then it names a bounds file).

    Raises
    ------
    ValueError
        For two numbers that are not finite or with low ≥ high.
    """
    low, sep, high = spec.partition(":")
    try:
        bounds = float(low), float(high)
    except ValueError:
        return None
    if not sep:
        return None
    if not (math.isfinite(bounds[0]) and math.isfinite(bounds[1]) and bounds[0] < bounds[1]):
        raise ValueError(f"feature-bounds {spec!r}: LOW:HIGH needs finite numbers with "
                         "LOW < HIGH, e.g. '0:100'")
    return bounds


@dataclass(frozen=True)
class FedMoEConfig:
    """Everything a fedmoe run is parameterised by (defaults = ``[tool.flwr.app.config]``).

    Parameters
    ----------
    num_server_rounds : int (default: 20)
        Federated rounds the server plans for; σ is calibrated for all of them.
    fraction_train, fraction_evaluate : float (default: 1.0)
        Fraction of connected clients sampled for training / evaluation each round.
    min_available_clients : int (default: 2)
        The server waits until this many clients are connected.
    local_epochs : int (default: 1)
        DP-SGD epochs per round on each client.
    sample_rate : float (default: 0.1)
        Poisson sampling probability q of each example per step; an epoch is ``int(1/q)``
        steps and the expected batch is ``q * n_train``.
    batch_size : int (default: 0)
        Expected batch size instead of a sample rate: client i samples at
        ``q_i = min(1, batch-size / n_i)``. 0 means "use ``sample-rate``".
    learning_rate : float (default: 0)
        SGD step size; 0 = the model's own (:data:`OWN_DEFAULTS`: 0.5, ``tmoe`` 0.25),
        resolved when the config is built.
    max_grad_norm : float (default: 1.0)
        Per-sample clipping bound C.
    grad_sample_mode : str (default: "auto")
        How Opacus clips per sample: ``hooks`` (materialise per-sample gradients) or
        ``ghost`` (ghost clipping: per-sample norms only, then a second backward pass) or
        ``bookkeeping`` (one backward pass; any model whose layers have Opacus grad samplers);
        ``auto`` = the model's fastest (:data:`FASTEST`).
    target_epsilon : float (default: 8.0)
        Each client's ε budget; the server calibrates σ so that a client taking part in
        every planned round ends at or just under it.
    target_delta : float (default: 0.0)
        δ of every client's (ε, δ) guarantee. 0 means per client: the largest power of ten
        ≤ 1/(10·n_i) for its train set size n_i (see :func:`fedmoe.privacy.client_delta`).
    noise_multiplier : float (default: 0.0)
        σ given directly instead of calibrated; the results then show how many rounds
        each client's budget allows. 0 means "calibrate σ from target-epsilon".
    accountant : str (default: "rdp")
        ``rdp`` or ``prv`` (Opacus accountants).
    model : str (default: "lmoe")
        ``lmoe`` (linear class scores + top-k MoE over the scores: the model for DP on
        small data), ``moe`` (flat top-k on an MLP trunk), ``hmoe`` (hierarchical gating,
        deep experts), ``mtmoe`` (multi-task, one gate per task) or ``tmoe``
        (Transformer-MoE on text).
    gate : str (default: "linear")
        Router kind: ``linear`` or ``attention`` (query attends over learned expert keys).
    dispatch : str (default: "auto")
        Expert layout: ``dense`` (every expert on every token) or ``sparse`` (only routed
        tokens, own Opacus grad sampler); see :mod:`fedmoe.models.experts`. ``auto`` = the
        model's fastest (:data:`FASTEST`).
    hidden_dim, num_shared_experts, num_local_experts, top_k
        Model shape (``hmoe``: experts per group, local experts in one extra group, top-k
        inside a group; ``lmoe`` has no trunk and ignores ``hidden-dim``). Mapped onto
        each model's own config dataclass in one place, :func:`fedmoe.models.run_overrides`.
    expert_hidden_dim : int (default: 0)
        Hidden width of every expert; 0 = the model's own default (``lmoe`` 16, ``moe`` 64,
        ``hmoe`` 32, ...).
    balance_coef, z_loss_coef : float (default: 0.01, 0.001)
        Weights of the per-sample router balance loss and router z-loss.
    local_pull : float (default: 0.3)
        After every DP-SGD step each local expert moves this fraction of the way towards
        the average of its layer's shared experts (0 = off, 1 = a copy of it). It uses no
        data, so it costs no privacy; without it the DP noise on local experts, which no
        aggregation averages out, piles up round after round.
    expert_noise_limit : float (default: 0.05)
        Models with an expert switch (``lmoe``): a DP client trains its MoE experts and
        router only if the noise on its averaged clipped gradient per step, in units of
        the clipping bound, ν = σ / (q · n) (σ its noise multiplier, q its sample rate,
        n its training examples), is at most this; otherwise it freezes them (no clipping
        budget, no noise spent on them) and its model is the linear scores with its label
        prior. Decided once, at the client's first round, and kept with its local tensors.
        0 = never train the experts under DP; non-private runs always train them. How
        the default was chosen: docs/results.md.
    num_groups, group_top_k, expert_depth : int (default: 2, 1, 2)
        ``hmoe``: groups of shared experts, groups picked per token, layers per expert.
    num_layers, num_heads, num_always_on_experts, seq_len : int (default: 0, 4, 1, 64)
        ``tmoe``: blocks (0 = the model's own, 1; resolved when the config is built),
        attention heads, unrouted shared experts per block, window length.
    pretrain_rounds : int (default: 10)
        ``tmoe``: rounds 1..N are next-token pretraining, the rest fine-tune a classifier
        (indentation level of the next line).
    pretrain_share : float (default: 0)
        ``tmoe`` with both phases and σ calibrated (``noise-multiplier`` = 0): the share of
        each client's ε budget that its pretraining rounds would cost on their own (their σ
        calibrated to it, as ``label-prior-share`` does for the histogram); fine-tuning's σ
        is calibrated for what pretraining, the unigram histogram and earlier spend leave
        (composed, not subtracted: :func:`fedmoe.privacy.plan.plan_client`). 0 = one σ
        for every round. Other models ignore it.
    partial_labels : bool (default: true)
        ``mtmoe``: client p holds no labels for task ``p mod 3`` (when there are >= 2 clients).
    max_windows : int (default: 400)
        ``pystdlib``: at most this many text windows per client.
    dataset : str (default: "auto")
        ``digits``, ``synthetic`` or ``pystdlib``; ``auto`` picks the model's own (``tmoe``:
        pystdlib). Users' own data: ``csv:PATH``, ``npz:PATH``, ``images:DIR`` or ``hf:DIR``
        (:mod:`fedmoe.data.files`), split over the simulated clients like digits; or
        ``node``: every SuperNode reads its own file (``data-path`` in its node config), so
        ``num-features`` and ``num-classes`` must be given. Classification models only
        (``lmoe``, ``moe``, ``hmoe`` and the MLP methods).
    num_features, num_classes : int (default: 0, 0)
        The model's inputs and classes; 0 = the data set's own (digits and synthetic: 64
        and 10; a data file: read from it). Required with ``dataset = "node"``, where the
        server holds no data; each client checks that its file fits them.
    label_column : str (default: "label")
        The label column of a CSV file or saved Hugging Face dataset (a node's
        ``label-column`` node-config key overrides it for its own file).
    feature_bounds : str (default: "")
        Users' data files: each feature's public range, mapped to [0, 1] (values outside
        clipped) before training — ``"LOW:HIGH"`` for every feature (e.g. ``"0:100"``), or
        the path of a CSV file ``feature,low,high`` with a row per feature (column name;
        0-based index for files without names). Not for image folders (already [0, 1]).
        Public knowledge of the domain, not read from the data: no privacy cost
        (:func:`fedmoe.data.files.scale_to_bounds`). Empty: features as in the file (a
        warning names features beyond ±100).
    partitioner : str (default: "dirichlet")
        ``iid`` or ``dirichlet`` (flwr-datasets partitioners).
    dirichlet_alpha : float (default: 0.5)
    test_fraction : float (default: 0.2)
        Share of each client's partition held out as its own test split.
    seed : int (default: 42)
    run_dir : str (default: "")
        Run folder for ``results.json`` and plots; empty means ``runs/<timestamp>``.
    method : str (default: "fedmoe")
        What is trained and shared (:mod:`fedmoe.methods`): ``fedmoe`` (the ``model``,
        local experts kept), ``local`` (a dense MLP, nothing leaves the client),
        ``fedavg`` (a dense MLP, all of it aggregated), ``fedper`` (a dense MLP whose body
        is aggregated and whose head stays on the client). Every method runs the same
        DP-SGD, accountant and ledgers.
    mlp_width : int (default: 288)
        Hidden width of the baselines' MLP (in -> width -> classes: 75·width + 10
        parameters on 64 features; 288 gives 21,610, about the 21,710 shared + gate
        parameters of the default ``moe``; 64 is the 4,810-parameter MLP 64-64-10); 0 = a
        linear classifier (650 parameters; not for ``fedper``, which shares a body); 64
        more with the centring (``mlp-centring``).
    mlp_centring : bool (default: true)
        Whether the MLP baselines centre their inputs when ``feature-centring`` is on (it
        is the baselines' switch, ``feature-centring`` everyone's: a baseline centres only
        with both). A run recorded before this key existed reads it as false: its baseline
        did not centre, whatever its recorded ``feature-centring`` says (the baselines
        ignored that key then). fedmoe's models ignore it.
    evaluate_on : str (default: "test")
        ``test`` (each client's own test split) or ``validation``: a share
        ``validation-fraction`` of each client's training split is held out and scored
        instead, the client trains on the rest and the test split is never touched (for
        tuning hyperparameters).
    validation_fraction : float (default: 0.2)
    classes_per_client : int (default: 2)
        ``pathological`` partitioner: classes each client holds.
    synthetic_samples : int (default: 20000)
        ``synthetic``: examples in the generated data set (scikit-learn's
        ``make_classification``, 64 features, 10 classes), shared out by ``partitioner``.
    label_prior_share : float (default: 0.25)
        Models with a personal label prior (``lmoe``, ``moe``, ``hmoe``; ``tmoe``'s unigram
        prior, ``unigram-prior``): the share of each client's
        ε budget that its one DP label histogram would cost on its own (σ_h calibrated to
        it); the histogram gives the client's prior on the logits (logit adjustment, see
        :mod:`fedmoe.models.prior`). Composed with DP-SGD it costs less than this share.
        0 = no label prior. Other models and methods ignore it.
    label_prior_shrinkage : str (default: "federation")
        How a client turns its noisy label histogram into its prior. ``federation``: it
        also sends the (already released) histogram to the server, which estimates the
        federation's label distribution (:func:`fedmoe.privacy.label_prior.federation_prior`);
        each client shrinks its counts towards it by as much as its noise and its own
        label skew, estimated from its release, warrant (empirical Bayes,
        :func:`~fedmoe.privacy.label_prior.shrink_to_federation`): no tilt without label
        skew, its own counts under strong skew. ``none``: the noisy
        counts as they are; ``james-stein``: shrunk towards the client's own mean
        (:func:`~fedmoe.privacy.label_prior.shrink_counts`). All three are post-processing
        of the release (docs/results.md, section 3.3).
    score_scale : bool (default: true)
        Models with a personal label prior: a learned ``shared`` scale s of the class
        scores before the prior is added (:class:`fedmoe.models.prior.ScoreScale`), trained
        in DP-SGD like every shared tensor. DP-SGD's scores are too flat at small noise
        and too sharp at large noise for a fixed-weight prior; s calibrates them to it
        (docs/results.md, section 3.4). Other models and methods, and runs without a
        label prior (``label-prior-share = 0``), have no scale.
    feature_centring : bool (default: true)
        ``lmoe`` and the MLP baselines (``fedavg``, ``fedper``, ``local``; for them with
        ``mlp-centring``): the inputs are
        centred, x - μ, by a learned mean μ (:class:`fedmoe.models.centre.FeatureCentre`),
        trained in the same DP-SGD step on each sample's ½‖x - μ‖² and, where the method
        aggregates (``shared``: ``lmoe``, ``fedavg``, ``fedper``), averaged like every
        shared tensor; ``local`` keeps its own. DP-SGD's noise on a linear model's weights
        reaches its scores as ΔW·x, and each clipped gradient spends C on ‖x‖; centring
        removes the mean that every sample shares (docs/results.md, section 3.11). The
        other MoE models have no centring.
    centring_fold : bool (default: true)
        With the centring: after μ moves (the server's aggregate for a ``shared`` μ, the
        client's round for ``local``'s own), fold the move into the bias of the layer that
        reads x - μ, b <- b + W (μ_new - μ_read), so the model computes the function it
        was trained as rather than one shifted by its μ's noisy move
        (:class:`fedmoe.models.centre.CentreFold`; exact with a lossless
        ``download-codec``, up to its error on the μ the clients read otherwise;
        post-processing, docs/architecture.md,
        "Feature centring"; docs/results.md, section 3.12). Runs that differ only here
        share their DP noise draws in a grid.
    unigram_prior : bool (default: true)
        ``tmoe`` with pretraining rounds and ``label-prior-share`` > 0: a personal prior on
        the next-byte logits, the client's byte unigram distribution from its one DP
        histogram of its pretraining targets (each window adds its histogram scaled to unit
        L2 norm, so the release has sensitivity 1, like the label histogram; it takes the label prior's
        place and budget share, and shrinks by ``label-prior-shrinkage``). The trunk then
        learns what the context adds to each client's own byte statistics (docs/results.md,
        section 8). Other models ignore it.
    aggregation : str (default: "fedavg")
        How the server combines the valid train replies' ``shared`` and ``gate`` arrays:
        ``fedavg`` (mean weighted by ``num-examples``), ``median`` (coordinate-wise) or
        ``trimmed-mean`` (coordinate-wise, ``trim-fraction`` cut from each end; both
        unweighted). Post-processing of DP updates: no privacy cost.
    trim_fraction : float (default: 0.2)
        ``trimmed-mean``: share of the replies cut from each end per coordinate, [0, 0.5).
    server_momentum : float (default: 0.0)
        β of the server's momentum on the aggregated update (FedAvgM, Hsu et al. 2019,
        arXiv:1909.06335): with Δ_t = aggregate − global, v_t = β v_{t−1} + Δ_t and the new
        global arrays are global + ``server-learning-rate`` · v_t; [0, 1), 0 = none.
        Post-processing of DP updates: no privacy cost.
    server_learning_rate : float (default: 1.0)
        η of that step, (0, 10]; β = 0 and η = 1 is the aggregate itself.
    ema_decay : float (default: 0.5)
        γ of the exponential moving average of the global model over rounds, w̄_t =
        γ w̄_{t−1} + (1 − γ) w_t with w̄_1 = w_1 (parameter averaging; Polyak & Juditsky
        1992; the EMA of De et al. 2022, arXiv:2204.13650, for DP-SGD): w̄_t is what the
        clients evaluate each round and the run's final model (``global_model.pt``);
        training continues from w_t. [0, 1), 0 = the last global model. Post-processing
        of DP updates: no privacy cost. Chosen on a validation split (docs/results.md,
        section 3.6).
    max_update_norm : float (default: 1000.0)
        A train reply whose update (its arrays minus the round's global arrays, L2 norm
        over all of them) is longer than this is dropped; (0, 10⁶].
    min_train_replies : int (default: 1)
        Valid train replies a round needs; with fewer the global model stays as it was.
    reply_timeout : float (default: 600.0)
        Seconds the server waits for a round's replies (late ones are dropped) and for
        ``min-available-clients`` nodes to connect (then the run stops saying so).
    resume : bool (default: false)
        Continue the run in ``run-dir`` from its checkpoint (the config must be the
        checkpoint's); ``fedmoe simulate --resume DIR`` sets it.
    upload_codec, download_codec : str (default: "none")
        How the update travels client → server and server → client
        (:mod:`fedmoe.compression`): ``none``, ``q8``/``q4`` (8-/4-bit stochastic
        quantisation, per-tensor scale), ``topk`` (the ``codec-topk-fraction`` largest
        entries of each tensor) or ``sign`` (1 bit per entry, per-tensor scale). Applied
        after DP noise: no privacy cost.
    codec_topk_fraction : float (default: 0.01)
        ``topk``: share of each tensor's entries kept, (0, 1].
    error_feedback : bool (default: True)
        Upload: keep what the codec dropped (the residual, in the client's state dir) and
        add it to the next update.

    Non-private runs: ``target-epsilon = inf`` trains with plain SGD on the same Poisson
    batches (no clipping, no noise, no ledger charge); such runs are reported as ε=∞.
    A client with its own ``epsilon-budget`` still trains privately within it.
    """

    num_server_rounds: int = 20
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_clients: int = 2
    local_epochs: int = 1
    sample_rate: float = 0.1
    batch_size: int = 0
    learning_rate: float = 0.0
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "auto"
    target_epsilon: float = 8.0
    target_delta: float = 0.0
    noise_multiplier: float = 0.0
    accountant: str = "rdp"
    model: str = "lmoe"
    gate: str = "linear"
    dispatch: str = "auto"
    hidden_dim: int = 64
    expert_hidden_dim: int = 0
    num_shared_experts: int = 2
    num_local_experts: int = 2
    top_k: int = 2
    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    local_pull: float = 0.3
    expert_noise_limit: float = 0.05
    num_groups: int = 2
    group_top_k: int = 1
    expert_depth: int = 2
    num_layers: int = 0
    num_heads: int = 4
    num_always_on_experts: int = 1
    seq_len: int = 64
    pretrain_rounds: int = 10
    pretrain_share: float = 0.0
    partial_labels: bool = True
    max_windows: int = 400
    dataset: str = "auto"
    num_features: int = 0
    num_classes: int = 0
    label_column: str = "label"
    feature_bounds: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 42
    run_dir: str = ""
    method: str = "fedmoe"
    mlp_width: int = 288
    mlp_centring: bool = True
    evaluate_on: str = "test"
    validation_fraction: float = 0.2
    classes_per_client: int = 2
    synthetic_samples: int = 20000
    label_prior_share: float = 0.25
    label_prior_shrinkage: str = "federation"
    score_scale: bool = True
    feature_centring: bool = True
    centring_fold: bool = True
    unigram_prior: bool = True
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    server_momentum: float = 0.0
    server_learning_rate: float = 1.0
    ema_decay: float = 0.5
    max_update_norm: float = 1000.0
    min_train_replies: int = 1
    reply_timeout: float = 600.0
    resume: bool = False
    upload_codec: str = "none"
    download_codec: str = "none"
    codec_topk_fraction: float = 0.01
    error_feedback: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        self._resolve_own_defaults()
        errors = self._with_ranges(_finite_errors(self))
        if not errors:
            errors = [_given(self, msg) for ok, msg in self._range_checks() if not ok]
            errors += self._method_errors()
        if not errors:
            errors = self._cost_errors()
        if not errors:
            errors = self._model_errors()
        if errors:
            raise ConfigError("invalid run config: " + "; ".join(errors))

    def _with_ranges(self, errors: list[str]) -> list[str]:
        """Each "<key> must be a finite number" of ``errors`` followed by what that key's
        range check says (its valid values: the fix), where it has one."""
        if not errors:
            return errors
        checks = [msg for _, msg in self._range_checks()] + self._method_errors()
        ranges = {msg.split(" ", 1)[0]: msg.split(" ", 1)[1] for msg in checks
                  if " must be " in msg}
        out = []
        for error in errors:
            key = error.split(" ", 1)[0]
            if key in ranges:
                where = ranges[key].removeprefix("must be ").removeprefix("finite and ")
                error = error.replace(" must be a finite number,",
                                      f" must be a finite number {where},")
            out.append(error)
        return out

    def _resolve_own_defaults(self) -> None:
        """Replace each :data:`OWN_DEFAULTS` key given as 0 by the model's own value, and
        remember which (so that :meth:`replace` with another model takes that model's)."""
        own = []
        for name, (value, per_model) in OWN_DEFAULTS.items():
            if getattr(self, name) == 0:
                resolved = per_model.get(self.model, value)
                object.__setattr__(self, name, type(getattr(self, name))(resolved))
                own.append(name)
        object.__setattr__(self, "_own", tuple(own))

    def _range_checks(self) -> list[tuple[bool, str]]:
        """(ok, message) for every key's range; every numeric key has an upper bound."""
        return [
            (1 <= self.num_server_rounds <= MAX_ROUNDS,
             f"num-server-rounds must be in [1, {MAX_ROUNDS:,}] (σ is calibrated for every "
             f"planned round; got {self.num_server_rounds:,})"),
            (0.0 < self.fraction_train <= 1.0, "fraction-train must be in (0, 1]"),
            (0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]"),
            (1 <= self.min_available_clients <= MAX_CLIENTS,
             f"min-available-clients must be in [1, {MAX_CLIENTS:,}]"),
            (1 <= self.local_epochs <= MAX_LOCAL_EPOCHS,
             f"local-epochs must be in [1, {MAX_LOCAL_EPOCHS}]"),
            (0.0 < self.sample_rate <= 1.0, "sample-rate must be in (0, 1], e.g. 0.1"),
            (0 <= self.batch_size <= MAX_BATCH_SIZE,
             f"batch-size must be in [0, {MAX_BATCH_SIZE:,}] (0 = use sample-rate)"),
            (0.0 < self.learning_rate <= MAX_LEARNING_RATE,
             f"learning-rate must be in (0, {MAX_LEARNING_RATE:g}] (0 = the model's own)"),
            (0.0 < self.max_grad_norm <= MAX_GRAD_NORM,
             f"max-grad-norm must be in (0, {MAX_GRAD_NORM:g}]"),
            (
                self.grad_sample_mode in ("auto", *GRAD_SAMPLE_MODES),
                f"grad-sample-mode must be one of {('auto', *GRAD_SAMPLE_MODES)}",
            ),
            (self.target_epsilon > 0.0
             and (self.target_epsilon <= MAX_EPSILON or math.isinf(self.target_epsilon)),
             f"target-epsilon must be in (0, {MAX_EPSILON:g}], or inf for a non-private run"),
            (
                0.0 <= self.target_delta < 1.0,
                "target-delta must be in [0, 1), below 1/n_train (0 = per client, automatic)",
            ),
            (
                0.0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER,
                f"noise-multiplier must be finite and >= 0, at most {MAX_NOISE_MULTIPLIER:g} "
                "(0 = calibrate from target-epsilon)",
            ),
            (self.accountant in ACCOUNTANTS, f"accountant must be one of {ACCOUNTANTS}"),
            (self.model in MODELS, f"model must be one of {MODELS}"),
            (self.gate in GATES, f"gate must be one of {GATES}"),
            (
                self.dispatch in ("auto", *DISPATCHES),
                f"dispatch must be one of {('auto', *DISPATCHES)}",
            ),
            (self.expert_hidden_dim >= 0, "expert-hidden-dim must be >= 0 (0 = the model's own; "
             "its upper bound is the model's parameter count)"),
            (self.model != "lmoe" or self.hidden_dim <= MAX_WIDTH,
             f"hidden-dim must be <= {MAX_WIDTH:,} (model 'lmoe' has no trunk and does not use "
             "it: its experts' width is expert-hidden-dim)"),
            (self.hidden_dim >= 1, "hidden-dim must be >= 1 (its upper bound is the model's "
             "parameter count)"),
            *[(low <= getattr(self, name) <= MAX_COUNT,
               f"{_key(name)} must be in [{low}, {MAX_COUNT}]"
               + (" (0 = the model's own)" if name in OWN_DEFAULTS else ""))
              for name, low in COUNT_KEYS],
            (0.0 <= self.balance_coef <= MAX_LOSS_COEF,
             f"balance-coef must be in [0, {MAX_LOSS_COEF:g}]"),
            (0.0 <= self.z_loss_coef <= MAX_LOSS_COEF,
             f"z-loss-coef must be in [0, {MAX_LOSS_COEF:g}]"),
            (0.0 <= self.local_pull <= 1.0, "local-pull must be in [0, 1]"),
            (0.0 <= self.expert_noise_limit <= MAX_NOISE_LIMIT,
             f"expert-noise-limit must be in [0, {MAX_NOISE_LIMIT:g}] (0 = experts never "
             "train under DP)"),
            (0 <= self.pretrain_rounds <= MAX_ROUNDS,
             f"pretrain-rounds must be in [0, {MAX_ROUNDS:,}]"),
            (2 <= self.seq_len <= MAX_SEQ_LEN, f"seq-len must be in [2, {MAX_SEQ_LEN:,}]"),
            (2 <= self.max_windows <= MAX_WINDOWS,
             f"max-windows must be in [2, {MAX_WINDOWS:,}]"),
            (self.dataset in DATASETS or self.is_file_data,
             f"dataset must be one of {DATASETS}, or a data file KIND:PATH with KIND one of "
             f"{FILE_KINDS} (e.g. 'csv:/data/clinic.csv')"),
            (
                self.dataset in ("auto", MODEL_DATASET.get(self.model))
                or self.dataset == "synthetic" and MODEL_DATASET.get(self.model) == "digits"
                or (self.dataset == "node" or self.is_file_data)
                and MODEL_DATASET.get(self.model) == "digits" and self.model != "mtmoe",
                f"model '{self.model}' trains on dataset "
                f"'{MODEL_DATASET.get(self.model)}' (or 'auto'"
                f"{', synthetic, node or a data file' if self.model in ('moe', 'lmoe', 'hmoe') else ''}); "
                f"got dataset={self.dataset!r}",
            ),
            (0 <= self.num_features <= MAX_FEATURES,
             f"num-features must be in [0, {MAX_FEATURES:,}] (0 = the data set's own)"),
            (self.num_classes == 0 or 2 <= self.num_classes <= MAX_CLASSES,
             f"num-classes must be 0 (the data set's own) or in [2, {MAX_CLASSES:,}]"),
            (self.dataset != "node" or (self.num_features > 0 and self.num_classes > 0),
             "dataset 'node' (each SuperNode reads its own data-path) needs num-features and "
             "num-classes: the server holds no data to read them from"),
            (self.data not in ("digits", "synthetic")
             or self.num_features in (0, EMBEDDED_SHAPE[0])
             and self.num_classes in (0, EMBEDDED_SHAPE[1]),
             f"{self.data} has {EMBEDDED_SHAPE[0]} features and {EMBEDDED_SHAPE[1]} classes: "
             "leave num-features and num-classes at 0"),
            (bool(self.label_column.strip()), "label-column must name a column, e.g. 'label'"),
            (not self.feature_bounds or self.dataset == "node" or self.is_file_data,
             f"feature-bounds scales users' data files; dataset '{self.data}' is built in "
             "(already scaled): leave feature-bounds empty"),
            *self._bounds_checks(),
            (self.partitioner in PARTITIONERS, f"partitioner must be one of {PARTITIONERS}"),
            (0.0 < self.dirichlet_alpha <= MAX_ALPHA,
             f"dirichlet-alpha must be in (0, {MAX_ALPHA:g}] (larger is closer to IID; "
             "use partitioner='iid' for an even split)"),
            (0.0 < self.test_fraction < 1.0, "test-fraction must be in (0, 1)"),
            (0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}]"),
        ]

    def _cost_errors(self) -> list[str]:
        """Refuse runs whose DP step count cannot finish: every client runs
        ``rounds × local-epochs × int(1/q)`` DP-SGD steps and σ is calibrated for all."""
        if self.batch_size:  # q depends on each client's size: checked when sizes are known
            return []
        steps = self.num_server_rounds * self.local_epochs * int(1.0 / self.sample_rate)
        if steps > MAX_DP_STEPS:
            return [
                f"num-server-rounds={self.num_server_rounds:,} × local-epochs="
                f"{self.local_epochs} × {int(1.0 / self.sample_rate):,} steps per epoch "
                f"(sample-rate={self.sample_rate:g}) is {steps:,} DP-SGD steps per client, "
                f"over the {MAX_DP_STEPS:,} fedmoe allows (it would run for days and σ would "
                "be calibrated so large that nothing is learnt); use fewer rounds or epochs, "
                "or a larger sample-rate"
            ]
        return []

    def _method_errors(self) -> list[str]:
        """Checks of the method, evaluation-split and generated-data keys."""
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}"),
            (0 <= self.mlp_width <= MAX_WIDTH,
             f"mlp-width must be in [0, {MAX_WIDTH:,}] (0 = a linear classifier)"),
            (self.mlp_width > 0 or self.method != "fedper",
             "method 'fedper' needs a body to share: mlp-width must be >= 1"),
            (self.evaluate_on in EVALUATE_ON, f"evaluate-on must be one of {EVALUATE_ON}"),
            (0.0 < self.validation_fraction < 1.0, "validation-fraction must be in (0, 1)"),
            (1 <= self.classes_per_client <= MAX_COUNT,
             f"classes-per-client must be in [1, {MAX_COUNT:,}]"),
            (100 <= self.synthetic_samples <= MAX_SYNTHETIC,
             f"synthetic-samples must be in [100, {MAX_SYNTHETIC:,}]"),
            (0.0 <= self.label_prior_share <= 0.5,
             "label-prior-share must be in [0, 0.5] (0 = no label prior)"),
            (0.0 <= self.pretrain_share < 1.0,
             "pretrain-share must be in [0, 1) (0 = one σ for every round)"),
            (self.label_prior_shrinkage in PRIOR_SHRINKAGES,
             f"label-prior-shrinkage must be one of {PRIOR_SHRINKAGES}"),
            *self._server_checks(),
            (self.upload_codec in CODECS, f"upload-codec must be one of {CODECS}"),
            (self.download_codec in CODECS, f"download-codec must be one of {CODECS}"),
            (0.0 < self.codec_topk_fraction <= 1.0,
             "codec-topk-fraction must be in (0, 1] (share of each tensor's entries kept)"),
            (
                self.method == "fedmoe" or MODEL_DATASET.get(self.model) == "digits",
                f"method '{self.method}' trains an MLP classifier on digits or synthetic "
                f"data; model '{self.model}' trains on '{MODEL_DATASET.get(self.model)}': "
                "use model = \"moe\" (the default) with this method",
            ),
            (
                self.method == "fedmoe" or self.model != "mtmoe",
                f"method '{self.method}' is single-task; model 'mtmoe' is multi-task",
            ),
        ]
        return [msg for ok, msg in checks if not ok]

    def _bounds_checks(self) -> list[tuple[bool, str]]:
        """A ``feature-bounds`` range LOW:HIGH is checked here; a bounds file when the data
        is read (:func:`fedmoe.data.files.feature_bounds`), also before anything starts."""
        try:
            parse_range(self.feature_bounds)
        except ValueError as err:
            return [(False, str(err))]
        return []

    def _server_checks(self) -> list[tuple[bool, str]]:
        """(ok, message) for the aggregation, reply-validation and waiting keys."""
        return [
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}"),
            (0.0 <= self.trim_fraction < 0.5, "trim-fraction must be in [0, 0.5)"),
            (0.0 <= self.server_momentum < 1.0,
             "server-momentum must be in [0, 1) (0 = no momentum; β ≥ 1 never forgets)"),
            (0.0 < self.server_learning_rate <= MAX_SERVER_LR,
             f"server-learning-rate must be in (0, {MAX_SERVER_LR:g}] (1 = the aggregate)"),
            (0.0 <= self.ema_decay < 1.0,
             "ema-decay must be in [0, 1) (0 = no averaging: the last global model; "
             "γ ≥ 1 would never move from round 1's model)"),
            (0.0 < self.max_update_norm <= MAX_UPDATE_NORM,
             f"max-update-norm must be in (0, {MAX_UPDATE_NORM:g}]"),
            (1 <= self.min_train_replies <= MAX_CLIENTS,
             f"min-train-replies must be in [1, {MAX_CLIENTS:,}] (at most the clients "
             "sampled in a round)"),
            (0.0 < self.reply_timeout <= MAX_REPLY_TIMEOUT,
             f"reply-timeout must be in (0, {MAX_REPLY_TIMEOUT:g}] seconds"),
        ]

    @property
    def private(self) -> bool:
        """False for a non-private run (``target-epsilon = inf``)."""
        return math.isfinite(self.target_epsilon)

    def _model_errors(self) -> list[str]:
        """The model's own config dataclass checks its shape, and the parameter count the
        shape implies (computed without allocating: see :func:`parameter_count`) must fit."""
        from fedmoe.models import model_config, run_overrides

        try:
            model_config(self.model, **run_overrides(self))
        except ValueError as err:  # the model's field names are the run config's keys
            return [f"model '{self.model}': " + str(err).replace("_", "-")]
        count = parameter_count(self)
        if count > MAX_PARAMETERS:
            defaults = {_key(f.name): f.default for f in fields(self)} | {
                _key(k): per_model.get(self.model, v) for k, (v, per_model) in OWN_DEFAULTS.items()}
            shape = ", ".join(f"{k}={getattr(self, k.replace('-', '_')):,}" for k in SHAPE_KEYS
                              if getattr(self, k.replace("-", "_")) != defaults[k])
            return [
                f"model '{self.model}' with {shape or 'these settings'} has "
                f"{_approx(count)} parameters ({_approx_bytes(count)} as float32, before DP-SGD's "
                f"per-sample gradients and optimizer copies); fedmoe refuses models over "
                f"{_approx(MAX_PARAMETERS)} parameters ({_bytes(4 * MAX_PARAMETERS)}). Use a "
                "smaller hidden-dim or fewer experts/layers"
            ]
        return []

    @property
    def is_file_data(self) -> bool:
        """Whether ``dataset`` names a user's data file (``KIND:PATH``)."""
        kind, sep, path = self.dataset.partition(":")
        return bool(sep) and kind in FILE_KINDS and bool(path.strip())

    @property
    def data(self) -> str:
        """The data set this run trains on (``dataset``, or the model's own for ``auto``)."""
        return MODEL_DATASET.get(self.model, "digits") if self.dataset == "auto" else self.dataset

    @property
    def expert_dispatch(self) -> str:
        """The expert layout this run uses (``dispatch``, or the model's fastest for auto)."""
        return FASTEST[self.model][0] if self.dispatch == "auto" else self.dispatch

    @property
    def clipping(self) -> str:
        """The Opacus grad-sample mode this run uses (resolving ``auto``)."""
        return FASTEST[self.model][1] if self.grad_sample_mode == "auto" else self.grad_sample_mode

    def warnings(self) -> list[str]:
        """Settings that are valid but almost certainly not what was meant, each with the
        fix (``fedmoe simulate`` and ``fedmoe deploy check`` print them before anything
        starts, a deployment's ServerApp logs them; nothing is refused).

        - ``ema-decay`` so close to 1 that the released average is still mostly the first
          round's model at the end: w_1's weight in w̄_T is γ^(T−1) over the T rounds of
          a phase (``tmoe`` restarts the average when fine-tuning starts).
        - ``pretrain-share`` > 0 where it does nothing (:meth:`pretrain_share_unused`).
        """
        notes = []
        if self.pretrain_share and (why := self.pretrain_share_unused()):
            notes.append(f"pretrain-share={self.pretrain_share:g} has no effect: {why}")
        phases = ([self.pretrain_rounds, self.num_server_rounds - self.pretrain_rounds]
                  if self.phase(1) != self.phase(self.num_server_rounds)
                  else [self.num_server_rounds])
        rounds = min(phases)
        if rounds > 1 and self.ema_decay ** (rounds - 1) > 0.5:
            notes.append(
                f"ema-decay={self.ema_decay:g}: after {rounds} round(s) the released model "
                f"is still {self.ema_decay ** (rounds - 1):.0%} the first round's (its weight "
                f"in the average is ema-decay^{rounds - 1}); use ema-decay ≤ "
                f"{math.floor(1000 * 0.5 ** (1 / (rounds - 1))) / 1000:.3f} for {rounds} "
                "rounds, or more rounds")
        return notes

    def pretrain_share_unused(self) -> str | None:
        """Why ``pretrain-share`` cannot apply to this run (one σ for every round), or
        None where it does: ``tmoe``, σ calibrated, both phases with rounds (a client
        with an ε=∞ budget trains without noise in either case)."""
        if self.model != "tmoe":
            return f"it splits tmoe's rounds, and the model is {self.model!r}"
        if self.noise_multiplier > 0:
            return (f"noise-multiplier={self.noise_multiplier:g} is given, so every round "
                    "trains at it; leave noise-multiplier at 0 to calibrate σ per phase")
        if not 0 < self.pretrain_rounds < self.num_server_rounds:
            return (f"the run has one phase only (pretrain-rounds={self.pretrain_rounds} of "
                    f"num-server-rounds={self.num_server_rounds}); give both phases rounds")
        return None

    def phase(self, server_round: int) -> str:
        """``pretrain`` (next-token) or ``finetune`` for ``tmoe``; ``train`` otherwise."""
        if self.model != "tmoe":
            return "train"
        return "pretrain" if server_round <= self.pretrain_rounds else "finetune"

    # ------------------------------------------------------------------ conversion
    @classmethod
    def keys(cls) -> list[str]:
        """The run-config keys this config understands, in declaration order."""
        return [_key(f.name) for f in fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedMoEConfig:
        """Build from a flat Flower run config; missing keys take their defaults.

        Raises
        ------
        ConfigError
            For an unknown key (with the valid keys listed) or a bad value.
        """
        by_key = {_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(k for k in run_config if k not in by_key)
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; valid keys are: {', '.join(by_key)}"
            )
        return cls(**{by_key[k]: v for k, v in run_config.items()})

    @classmethod
    def from_recorded(cls, run_config: Mapping[str, Any]) -> FedMoEConfig:
        """Build from a run config a finished run recorded (its ``results.json``): a key
        added to fedmoe after the run was made is absent there and takes the value that
        reproduces how the run was made (:data:`ADDED_KEYS`), not today's default.

        Raises
        ------
        ConfigError
            As :meth:`from_run_config`.
        """
        return cls.from_run_config({**ADDED_KEYS, **run_config})

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The flat kebab-case mapping Flower records and TOML accept."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> FedMoEConfig:
        """A copy with ``changes``; keys that took the model's own value (:data:`OWN_DEFAULTS`)
        and are not changed take the new model's own value."""
        own = {name: 0 for name in getattr(self, "_own", ()) if name not in changes}
        return dataclasses.replace(self, **own, **changes)


@dataclass(frozen=True)
class NodeSettings:
    """What a data holder's SuperNode says about itself (``--node-config``).

    Parameters
    ----------
    partition_id, num_partitions : int
        Which partition of the embedded dataset this node holds (the simulation engine
        sets both).
    client_id : str (default: "")
        The stable id the server's privacy ledger knows this client by. Empty means
        ``partition-<partition-id>``.
    state_dir : str (default: "")
        Folder for the client's durable state (local experts, privacy ledger). Empty
        means a per-run folder under the system's temp dir (simulation); a deployment
        sets a persistent one so its ledger outlives runs.
    epsilon_budget : float (default: 0.0)
        The client's own ε budget; 0 means "accept the run's ``target-epsilon``".
        The client enforces ``min`` of the two. With a persistent ``state-dir`` it is a
        lifetime budget: every run's rounds are charged to the same ledger.
    data_path : str (default: "")
        The node's own data file (``KIND:PATH`` or a path whose kind is told from its name:
        ``.csv``, ``.npz``, a saved Hugging Face dataset folder, an image folder); see
        :mod:`fedmoe.data.files`. Empty means the run's ``dataset`` (simulation). With a
        data path, ``partition-id`` and ``num-partitions`` may be left out.
    label_column : str (default: "")
        The label column of the node's CSV or saved dataset; empty = the run's
        ``label-column`` (default ``label``).
    delta : float (default: 0.0)
        The δ this node's ledger is pinned to: the client opens its ledger at this δ and
        refuses a server that plans another. 0 = take the server's δ when the ledger is
        created (simulation); a deployment should pin it.
    accountant : str (default: "")
        The accountant (``rdp`` or ``prv``) this node's ledger is pinned to, likewise;
        empty = take the server's when the ledger is created.
    """

    partition_id: int = 0
    num_partitions: int = 1
    client_id: str = ""
    state_dir: str = ""
    epsilon_budget: float = 0.0
    data_path: str = ""
    label_column: str = ""
    delta: float = 0.0
    accountant: str = ""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.num_partitions < 1 or not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"node config: partition-id must be in [0, num-partitions); got "
                f"partition-id={self.partition_id}, num-partitions={self.num_partitions}"
            )
        if not 0 <= self.epsilon_budget <= MAX_EPSILON:  # NaN fails this too
            raise ConfigError(f"node config: epsilon-budget must be finite, in [0, "
                              f"{MAX_EPSILON:g}] (0 = use the run's)")
        if self.data_path and not self.client_id:
            raise ConfigError("node config: a node with its own data-path needs a client-id, "
                              "the stable name the server's ledger knows it by; add "
                              "client-id='hospital-a' to --node-config")
        if not 0.0 <= self.delta < 1.0:  # NaN fails this too
            raise ConfigError(f"node config: delta must be in [0, 1), below 1/n of the node's "
                              f"train set (0 = the server's); got {self.delta!r}")
        if self.accountant not in ("", *ACCOUNTANTS):
            raise ConfigError(f"node config: accountant must be one of {ACCOUNTANTS} (or "
                              f"empty: the server's); got {self.accountant!r}")

    def pin_error(self, delta: float, accountant: str) -> str:
        """Why a round planned at (δ, accountant) breaks this node's pinned ones; "" if not."""
        wrong = []
        if self.delta and delta != self.delta:
            wrong.append(f"δ={delta:g} but this node's ledger is pinned to δ={self.delta:g}")
        if self.accountant and accountant != self.accountant:
            wrong.append(f"accountant {accountant!r} but this node's ledger is pinned to "
                         f"{self.accountant!r}")
        if not wrong:
            return ""
        return ("the server asks for " + " and ".join(wrong) + " (delta/accountant in its "
                "--node-config); the server must plan this client at its pinned values")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        by_key = {_key(f.name): f.name for f in fields(cls)}
        missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
        if missing and not node_config.get("data-path"):
            raise ConfigError(
                f"node config lacks {missing}; start the SuperNode with "
                "--node-config 'partition-id=0 num-partitions=10' (simulated partitions), or "
                "give the node its own data: --node-config \"data-path='/data/mine.csv'\""
            )
        # SuperNodes may carry other, unrelated keys: take ours, ignore the rest.
        return cls(**{by_key[k]: v for k, v in node_config.items() if k in by_key})

    @property
    def client(self) -> str:
        """This client's stable id (``client-id``, else ``partition-<partition-id>``)."""
        return self.client_id or f"partition-{self.partition_id}"

    def budget(self, run_target: float) -> float:
        """The ε this client will spend at most."""
        return min(run_target, self.epsilon_budget) if self.epsilon_budget > 0 else run_target


def _check_types(obj: Any) -> None:
    """Coerce int→float where a float is declared; reject every other type mismatch."""
    expected = {"int": int, "float": float, "str": str, "bool": bool}
    for f in fields(obj):
        want = expected[f.type] if isinstance(f.type, str) else f.type
        value = getattr(obj, f.name)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))
            continue
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(
                f"{_key(f.name)} must be of type {want.__name__}, got {value!r} "
                f"({type(value).__name__}); e.g. --run-config \"{_key(f.name)}="
                f"{_example(want)}\""
            )


def _example(kind: type) -> str:
    return {int: "3", float: "0.5", str: "'name'", bool: "true"}[kind]


def _given(obj: Any, message: str) -> str:
    """``message`` ("<key> must ...") with the value that was given, unless it says it: a
    "got", or a value quoted right after the key ("model 'tmoe' trains on ...", whose
    wrong value may be another key's)."""
    first, _, rest = message.partition(" ")
    name = first.replace("-", "_")
    if "got " in message or rest.startswith("'") or not hasattr(obj, name):
        return message
    value = getattr(obj, name)
    return f"{message}; got {value:,}" if isinstance(value, int) and not isinstance(
        value, bool) else f"{message}; got {value!r}"


def _finite_errors(obj: Any) -> list[str]:
    """Every float field must be a finite number (NaN and ±inf pass no range check), except
    ``target-epsilon = inf``, which asks for a non-private run."""
    return [
        f"{_key(f.name)} must be a finite number, got {getattr(obj, f.name)!r}"
        for f in fields(obj)
        if f.type in ("float", float) and not math.isfinite(getattr(obj, f.name))
        and not (f.name == "target_epsilon" and getattr(obj, f.name) == math.inf)
    ]


@lru_cache(maxsize=64)
def _count(model: str, overrides: tuple[tuple[str, Any], ...]) -> int:
    import torch

    from fedmoe.models import build_model

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, whatever the size
            module = build_model(model, **dict(overrides))
    except (RuntimeError, OverflowError, TypeError):  # a size torch cannot describe (> 2^63)
        return OVERFLOW
    return sum(p.numel() for p in module.parameters())


def parameter_count(config: FedMoEConfig) -> int:
    """The number of parameters of ``config``'s model, counted on torch's ``meta`` device
    (no memory is allocated, so any size can be counted; a count past 2^63 is
    :data:`OVERFLOW`)."""
    from fedmoe.models import run_overrides

    return _count(config.model, tuple(sorted(run_overrides(config).items())))


def _approx(count: int) -> str:
    if count >= OVERFLOW:
        return f"more than {OVERFLOW:.2e}"
    return f"{count:,}" if count < 10**6 else f"{count:.2e}"


def _approx_bytes(count: int) -> str:
    return ("more than " if count >= OVERFLOW else "") + _bytes(4 * min(count, OVERFLOW))


def _bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if size < 1000 or unit == "EB":
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} EB"
