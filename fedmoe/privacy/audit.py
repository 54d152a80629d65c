"""One-run privacy audit: an empirical lower bound on ε that a broken DP pipeline fails.

Method: Steinke, Nasr & Jagielski, *Privacy Auditing with One (1) Training Run*, NeurIPS
2023 (arXiv:2305.08846). ``m`` canaries are each included in the training data
independently with probability 1/2 (``S ∈ {-1, +1}^m``); one training run; every canary
gets a score; the auditor guesses "included" for the ``k+`` highest scores and "excluded"
for the ``k-`` lowest (abstaining on the rest) and counts its ``v`` correct guesses out of
``r = k+ + k-``. If the training is (ε, δ)-DP with respect to each canary then (their
Theorem 3 with Algorithm 2, the paper's own code path):

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v-i) - f(v)) / i,
    f(u) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ u].

The audit reports the largest ε at which this p-value is below ``1 - confidence``: with
that confidence the run is *not* (ε', δ)-DP for any ε' ≤ it. (Rejecting (ε, δ) rejects
every smaller ε' too, since (ε', δ)-DP implies (ε, δ)-DP.) The paper picks ``k+, k-``
after looking at the scores; here the choice is over a fixed grid (:data:`GUESS_GRID`) with
a Bonferroni correction (each candidate is tested at ``(1 - confidence) / len(grid)``), so
the reported confidence holds for the maximum.

Canaries ("Dirac" gradient canaries, the paper's white-box setting): the model is wrapped
in :class:`CanaryModel`, which adds one audit-only parameter per canary (a bias-free
``nn.Linear(m, 1)``). Canary record ``i`` is a copy of a real record whose model loss is
masked to zero and whose per-sample loss is ``s · w_i``: its per-sample gradient is exactly
``s · e_i`` (norm ``s``), orthogonal to every other record's. The DP engine (any
``grad-sample-mode``, any dispatch) clips and noises it with everything else, so a correct
pipeline lets it move ``w_i`` by at most C per sampled step under N(0, σ²C²) noise; with
``s = canary_norm × C`` ≫ C a pipeline that does not clip lets it move by ``s``. The score
is the released update's projection on the canary's clipped-gradient direction ``e_i``:
``w_i(start) - w_i(end)``.

Two audits:

- :func:`audit_white_box`: one client's DP-SGD over the planned rounds, scored from its
  full parameter vector (what the client's training releases, before any aggregation);
- :func:`audit_server_view`: a federation of ``num_clients`` in process; client 0 holds the
  canaries, the canary block is a ``shared`` tensor, every client trains and replies with
  its ``shared`` + ``gate`` arrays, the server's FedAvg rule aggregates them (Flower's
  ``aggregate_arrayrecords``, weighted by ``num-examples``, as :mod:`server.strategy`), and
  the canaries are scored from the aggregated arrays only: what the server sees.

Canary insertion never changes the accounted (σ, q, steps, δ): the client is planned from
its data *without* canaries (:func:`~fedmoe.privacy.plan.plan_client`) and trains with that
plan on its data plus the included canaries (DP under Poisson sampling at rate q holds for
any data set size; only the normalisation E[B] = q·n of the update differs, which is
post-processing; an excluded canary is replaced by a null record of zero gradient, so
E[B] does not even depend on which canaries are in). Its FedAvg weight is its canary-free
train size too.

A deliberately broken pipeline, for showing that the audit can fail, is selected by
``breakage`` (:data:`BREAKAGES`): ``no-noise`` trains with σ = 0 (clipping on),
``no-clipping`` with per-sample clipping off but the planned noise σ·C. Only the audit
functions take it (keyword-only); no run-config key, client or server path reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.data import load_client_data
from fedmoe.methods import has_label_prior, method_model
from fedmoe.privacy.accountant import epsilon as accountant_epsilon
from fedmoe.privacy.dp import secret_generator
from fedmoe.privacy.plan import ClientPlan, plan_client
from fedmoe.roles import Role, merge_state_dict, set_role, split_state_dict

#: The deliberately broken pipelines the audit can run (``none`` = the real one).
BREAKAGES = ("none", "no-noise", "no-clipping")

#: Candidate (k+, k-) as fractions of the canaries: guess "in" for the top k+ scores and
#: "out" for the bottom k-. Every candidate is tested at (1 - confidence) / len(grid).
GUESS_GRID: tuple[tuple[float, float], ...] = tuple(
    (pos, neg) for pos in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    for neg in (0.0, 0.1, 0.3, 0.5)
)

#: A canary's per-sample gradient norm, in units of C (any value ≥ 1 gives the same clipped
#: contribution C in a correct pipeline; a large one exposes missing clipping).
DEFAULT_CANARY_NORM = 1000.0

#: "No clipping" clips at this many times C (no per-sample gradient reaches it).
_NO_CLIP_FACTOR = 1e9


# --------------------------------------------------------------------------- the bound
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on P[≥ ``v`` correct of ``r`` guesses] among ``m`` canaries under an
    (ε, δ)-DP mechanism (Steinke et al. 2023, Theorem 3; their Algorithm 2).

    Parameters
    ----------
    m : int
        Canaries, each included independently with probability 1/2.
    r : int
        Guesses made (abstentions excluded), 0 ≤ r ≤ m.
    v : int
        Correct guesses, 0 ≤ v ≤ r.
    eps, delta : float
        The DP claim tested, ε ≥ 0 and 0 ≤ δ ≤ 1.

    Returns
    -------
    float
        The p-value in [0, 1].

    Raises
    ------
    ValueError
        For counts or parameters out of range.
    """
    if not (0 <= v <= r <= m and eps >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need 0 <= v <= r <= m, eps >= 0, 0 <= delta <= 1; got m={m}, r={r}, "
                         f"v={v}, eps={eps}, delta={delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of ε-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], ..., P[B = 0]
    # (f(v-i) - f(v)) / i = P[v-i <= B <= v-1] / i, i = 1..v
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest ε (to 1e-6) whose (ε, δ) claim ``v`` correct of ``r`` guesses rejects at
    level ``significance`` (p-value below it); 0 when even ε = 0 is not rejected.

    Raises
    ------
    ValueError
        If ``significance`` is not in (0, 1), or as :func:`p_value`.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:  # p → ≥ P[B = r] → 1 as ε grows
        low, high = high, 2.0 * high
        if high > 1e4:
            return low
    while high - low > 1e-6:
        mid = (low + high) / 2.0
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < significance else (low, mid)
    return low


@dataclass(frozen=True)
class AuditBound:
    """An audited lower bound: with probability ≥ ``confidence`` the run is not
    (ε', δ)-DP for any ε' ≤ ``epsilon`` (0 = nothing shown)."""

    epsilon: float
    confidence: float
    delta: float
    canaries: int  # m
    included: int  # canaries that were in the training data
    guesses: int  # r = k+ + k- of the best candidate
    correct: int  # v
    k_pos: int
    k_neg: int
    #: the most this audit could show at all (every guess of the best candidate correct):
    #: the one-run bound cannot exceed it, whatever the pipeline does
    ceiling: float = math.nan


def bound_from_scores(scores: Sequence[float], included: Sequence[bool], delta: float, *,
                      confidence: float = 0.95, tie_seed: int = 0) -> AuditBound:
    """The ε lower bound from canary ``scores`` (higher = more likely included) and the
    truth ``included``, maximised over :data:`GUESS_GRID` with a Bonferroni correction.

    Ties are broken by a random order drawn from ``tie_seed`` (independent of the truth).

    Raises
    ------
    ValueError
        If the lengths differ, there are no canaries, a score is not finite, or
        ``confidence`` is not in (0, 1).
    """
    scores, truth = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or len(truth) != m:
        raise ValueError(f"need one score per canary, got {m} scores for {len(truth)} canaries")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tie = np.random.default_rng(tie_seed).permutation(m)
    order = np.lexsort((tie, -scores))  # highest score first, ties in random order
    ranked = truth[order]
    significance = (1.0 - confidence) / len(GUESS_GRID)  # Bonferroni over the candidates
    best = AuditBound(0.0, confidence, delta, m, int(truth.sum()), 0, 0, 0, 0)
    ceiling = 0.0
    for k_pos, k_neg in guess_counts(m):
        v = int(ranked[:k_pos].sum()) + int((~ranked[m - k_neg:]).sum() if k_neg else 0)
        eps = epsilon_lower_bound(m, k_pos + k_neg, v, delta, significance)
        ceiling = max(ceiling, epsilon_lower_bound(m, k_pos + k_neg, k_pos + k_neg, delta,
                                                   significance))
        if eps > best.epsilon:
            best = AuditBound(eps, confidence, delta, m, int(truth.sum()), k_pos + k_neg, v,
                              k_pos, k_neg)
    return replace(best, ceiling=ceiling)


def guess_counts(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) candidates of :data:`GUESS_GRID` for ``m`` canaries (each at least one
    guess, at most ``m``)."""
    counts = {(round(pos * m), round(neg * m)) for pos, neg in GUESS_GRID}
    return sorted((p, n) for p, n in counts if 0 < p + n <= m)


# --------------------------------------------------------------------------- canaries
class _CanaryTask:
    """The wrapped model's task, with the loss of canary records masked to zero."""

    def __init__(self, task) -> None:
        self.task = task
        self.kind = task.kind

    def loss(self, outputs, y: torch.Tensor) -> torch.Tensor:
        inner, keep = outputs
        return torch.where(keep, self.task.loss(inner, y), 0.0)

    def __getattr__(self, name: str):
        return getattr(self.task, name)


class CanaryModel(nn.Module):
    """``model`` plus one audit-only parameter per canary (Dirac gradient canaries).

    Input: the model's own input (B, ...) 2-D, with one trailing column: 0 for a real
    record, ``i + 1`` for canary ``i``, -1 for a null record (the stand-in of an excluded
    canary). A real record's per-sample gradient is the model's (zero on the canary
    block); canary ``i``'s is exactly ``norm · e_i`` on the block; a null record's is zero.

    Parameters
    ----------
    model : nn.Module
        A fedmoe model (forward gives ``(outputs, aux)``, ``model.task`` its task).
    num_canaries : int
    norm : float
        Each canary's per-sample gradient norm ``s`` (before clipping).
    role : Role
        Of the canary block: ``shared`` to have the server see it aggregated.
    """

    def __init__(self, model: nn.Module, num_canaries: int, norm: float,
                 role: Role = Role.LOCAL) -> None:
        super().__init__()
        self.model, self.num_canaries, self.norm = model, num_canaries, float(norm)
        self.canary = set_role(nn.Linear(num_canaries, 1, bias=False), role)
        nn.init.zeros_(self.canary.weight)
        self.task = _CanaryTask(model.task)

    def forward(self, x: torch.Tensor):
        x, ids = x[:, :-1].contiguous(), x[:, -1].long()  # (B, ...), (B,)
        outputs, aux = self.model(x)
        keep, active = ids == 0, ids > 0
        onehot = F.one_hot((ids - 1).clamp(0, self.num_canaries - 1), self.num_canaries)
        onehot = onehot.to(aux.dtype) * active.to(aux.dtype).unsqueeze(-1) * self.norm  # (B, m)
        dirac = self.canary(onehot).squeeze(-1)  # (B,): norm · w_i for canary i, else 0
        return (outputs, keep), torch.where(keep, aux, 0.0) + dirac

    def canary_weights(self) -> torch.Tensor:
        """The canary block as a vector (m,)."""
        return self.canary.weight.detach().reshape(-1).clone()


def with_canaries(train: TensorDataset, included: np.ndarray,
                  generator: torch.Generator) -> TensorDataset:
    """``train`` with an id column (0) plus one record per canary: a copy of a random real
    record (its loss is masked) with id ``i + 1`` if canary ``i`` is included, else with
    id -1 (a null record, zero gradient). The data set size, and with it the update's
    normalisation E[B] = q·n, is then the same whatever the inclusion vector.

    Parameters
    ----------
    train : TensorDataset
        (x (N, ...) 2-D, y (N, ...)).
    included : ndarray of bool (m,)
    generator : torch.Generator
        Picks the placeholder records.
    """
    x, y = train.tensors
    ids = torch.as_tensor(np.where(included, np.arange(1, len(included) + 1), -1))
    pick = torch.randint(0, len(x), (len(ids),), generator=generator)
    x_all = torch.cat([x, x[pick]])
    id_col = torch.cat([torch.zeros(len(x), dtype=torch.long), ids]).to(x.dtype)
    return TensorDataset(torch.cat([x_all, id_col.unsqueeze(1)], dim=1),
                         torch.cat([y, y[pick]]))


def _plain(data: TensorDataset) -> TensorDataset:
    """A client's data with the id column of real records only (no canaries)."""
    x, y = data.tensors
    return TensorDataset(torch.cat([x, torch.zeros(len(x), 1, dtype=x.dtype)], dim=1), y)


# --------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class AuditResult:
    """One audit run: the claim, the plan it trained with, and the audited bound."""

    kind: str  # "white-box" (client's parameters) or "server" (aggregated shared+gate)
    model: str
    dispatch: str
    clipping: str
    breakage: str
    target_epsilon: float
    claimed_epsilon: float  # the accountant's ε of the audited DP-SGD history
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps per round, as planned and accounted
    steps_taken: int  # what the canary client actually ran, all rounds
    rounds: int
    num_clients: int
    canary_norm: float  # in units of C
    bound: AuditBound

    def to_dict(self) -> dict:
        return asdict(self)


def check_audit(config: FedMoEConfig, *, canaries: int, num_clients: int = 1,
                breakage: str = "none", confidence: float = 0.95,
                canary_norm: float = DEFAULT_CANARY_NORM) -> None:
    """Refuse what the audit cannot audit, before anything runs.

    Raises
    ------
    ConfigError
        For a non-private run, a method other than ``fedmoe``, or a setting out of range
        (canaries 10–100,000, clients 1–1,000, confidence in (0, 1), canary norm ≥ 1).
    """
    if not 1 <= num_clients <= 1000:
        raise ConfigError(f"--clients must be in [1, 1000], got {num_clients}")
    if not math.isfinite(config.target_epsilon) and config.noise_multiplier == 0:
        raise ConfigError("the audit needs a private run: a finite target-epsilon (or a "
                          "noise-multiplier); target-epsilon=inf trains without DP")
    if config.method != "fedmoe":
        raise ConfigError(f"the audit runs method 'fedmoe' (the MoE models); got method "
                          f"{config.method!r}")
    if not 10 <= canaries <= 100_000:
        raise ConfigError(f"--canaries must be in [10, 100000], got {canaries}")
    if breakage not in BREAKAGES:
        raise ConfigError(f"breakage must be one of {BREAKAGES}, got {breakage!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if not canary_norm >= 1:
        raise ConfigError(f"canary norm must be >= 1 (in units of C), got {canary_norm}")


def _phases(config: FedMoEConfig) -> list[str]:
    return [config.phase(r) for r in range(1, config.num_server_rounds + 1)]


def client_plan(config: FedMoEConfig, partition_id: int, num_partitions: int) -> ClientPlan:
    """The plan the server makes for this client, from its data *without* canaries: its
    largest train split over the run's phases, its ε budget, its label histogram."""
    num_train = max(len(load_client_data(config, partition_id, num_partitions, phase).train)
                    for phase in set(_phases(config)))
    return plan_client(config, f"partition-{partition_id}", num_train=num_train,
                       budget=config.target_epsilon, label_prior=has_label_prior(config))


def _dp_parameters(plan: ClientPlan, server_round: int, max_grad_norm: float,
                   breakage: str) -> tuple[float, float]:
    """(noise multiplier, clipping bound) handed to DP-SGD in ``server_round``: the plan's,
    or a broken pair. The noise's standard deviation is their product."""
    sigma = plan.noise_at(server_round)
    if breakage == "no-noise":
        return 0.0, max_grad_norm
    if breakage == "no-clipping":  # clip nowhere, keep the planned noise σ·C
        return sigma / _NO_CLIP_FACTOR, max_grad_norm * _NO_CLIP_FACTOR
    return sigma, max_grad_norm


class _Client:
    """One client of an audit run: its plan, its canaries (if any), its model state."""

    def __init__(self, config: FedMoEConfig, partition_id: int, num_partitions: int,
                 included: np.ndarray | None, canaries: int, norm: float, role: Role,
                 generator: torch.Generator) -> None:
        self.config, self.partition_id, self.num_partitions = config, partition_id, num_partitions
        self.plan = client_plan(config, partition_id, num_partitions)
        self.included, self.generator = included, generator
        self.model = self._build(1, canaries, norm, role)
        self.steps_taken = 0

    def _build(self, server_round: int, canaries: int, norm: float, role: Role) -> CanaryModel:
        with torch.random.fork_rng():  # the client's own initialisation, as clients/app.py
            torch.manual_seed(self.config.seed * 100_003 + self.partition_id)
            return CanaryModel(method_model(self.config, server_round), canaries, norm, role)

    def train_round(self, server_round: int, breakage: str) -> None:
        from fedmoe.training import train_dp_round

        if self.config.model == "tmoe":  # the round's phase (pretraining or fine-tuning)
            self.model.model.set_phase(self.config.phase(server_round))
        data = load_client_data(self.config, self.partition_id, self.num_partitions,
                                self.config.phase(server_round)).train
        data = (_plain(data) if self.included is None
                else with_canaries(data, self.included, self.generator))
        sigma, clip = _dp_parameters(self.plan, server_round, self.config.max_grad_norm,
                                     breakage)
        result = train_dp_round(
            self.model, data, steps=self.plan.steps, sample_rate=self.plan.sample_rate,
            noise_multiplier=sigma, max_grad_norm=clip,
            learning_rate=self.config.learning_rate, grad_sample_mode=self.config.clipping,
            generator=self.generator, local_pull=self.config.local_pull)
        self.steps_taken += result.steps


def _inclusion(canaries: int, generator: torch.Generator) -> np.ndarray:
    """S: each canary in with probability 1/2, independently."""
    return (torch.rand(canaries, generator=generator) < 0.5).numpy()


def _result(kind: str, config: FedMoEConfig, plan: ClientPlan, breakage: str,
            steps_taken: int, num_clients: int, canary_norm: float,
            bound: AuditBound) -> AuditResult:
    history = plan.segments(config.num_server_rounds)
    claimed = accountant_epsilon(history, plan.delta, plan.accountant)
    return AuditResult(kind, config.model, config.expert_dispatch, config.clipping, breakage,
                       config.target_epsilon, claimed, plan.delta, plan.accountant,
                       plan.noise_multiplier, plan.sample_rate, plan.steps, steps_taken,
                       config.num_server_rounds, num_clients, canary_norm, bound)


def audit_white_box(
    config: FedMoEConfig, *, canaries: int = 1000, num_partitions: int = 10,
    partition_id: int = 0, breakage: str = "none", confidence: float = 0.95,
    canary_norm: float = DEFAULT_CANARY_NORM, generator: torch.Generator | None = None,
) -> AuditResult:
    """Audit one client's DP-SGD over the run's planned rounds with Dirac canaries scored
    from its whole parameter vector (see the module docstring).

    The client trains alone (its shared and gate tensors stay its own between rounds),
    with exactly the σ, q and steps per round the server plans for it without canaries.
    ``generator`` drives inclusion, placeholders, Poisson sampling and noise (default: the
    OS's entropy; tests seed it).

    Returns
    -------
    AuditResult
        ``claimed_epsilon`` is the accountant's ε of the DP-SGD history audited (the
        label histogram a model with a prior also releases is not part of it).

    Raises
    ------
    ConfigError
        For a non-private run, a method other than ``fedmoe``, or an audit setting out of
        range; :class:`~fedmoe.privacy.plan.PlanError` if the client cannot be planned.
    """
    check_audit(config, canaries=canaries, num_clients=num_partitions, breakage=breakage,
                confidence=confidence, canary_norm=canary_norm)
    generator = generator or secret_generator()
    tie_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    included = _inclusion(canaries, generator)
    client = _Client(config, partition_id, num_partitions, included, canaries,
                     canary_norm * config.max_grad_norm, Role.LOCAL, generator)
    start = client.model.canary_weights()
    for server_round in range(1, config.num_server_rounds + 1):
        client.train_round(server_round, breakage)
    scores = (start - client.model.canary_weights()).double().numpy()
    bound = bound_from_scores(scores, included, client.plan.delta, confidence=confidence,
                              tie_seed=tie_seed)
    return _result("white-box", config, client.plan, breakage, client.steps_taken, 1,
                   canary_norm, bound)


def audit_server_view(
    config: FedMoEConfig, *, canaries: int = 1000, num_clients: int = 3,
    breakage: str = "none", confidence: float = 0.95,
    canary_norm: float = DEFAULT_CANARY_NORM, generator: torch.Generator | None = None,
) -> AuditResult:
    """Audit what the server sees: ``num_clients`` clients train each round from the
    aggregated ``shared`` + ``gate`` arrays (local experts stay with each client), the
    server aggregates their replies with FedAvg weighted by ``num-examples``, and client
    0's canaries are scored from the aggregated canary block (a ``shared`` tensor) only.

    Only client 0 holds canaries; ``breakage`` applies to every client (a broken release
    code path is broken everywhere). Each client trains with its own plan.

    Raises
    ------
    ConfigError
        As :func:`audit_white_box`, or for fewer than 1 client.
    """
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedmoe.records import ARRAYS, METRICS, WEIGHT_KEY, from_arrays, to_arrays

    check_audit(config, canaries=canaries, num_clients=num_clients, breakage=breakage,
                confidence=confidence, canary_norm=canary_norm)
    generator = generator or secret_generator()
    tie_seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    included = _inclusion(canaries, generator)
    norm = canary_norm * config.max_grad_norm
    clients = [_Client(config, p, num_clients, included if p == 0 else None, canaries, norm,
                       Role.SHARED, generator) for p in range(num_clients)]
    global_state = split_state_dict(clients[0].model)  # the server's initial model
    start = global_state["canary.weight"].reshape(-1).clone()
    for server_round in range(1, config.num_server_rounds + 1):
        replies = []
        for client in clients:
            merge_state_dict(client.model, global_state)
            client.train_round(server_round, breakage)
            weight = client.plan.num_train  # the canary-free size: see the module docstring
            replies.append(RecordDict({ARRAYS: to_arrays(split_state_dict(client.model)),
                                       METRICS: MetricRecord({WEIGHT_KEY: weight})}))
        global_state = from_arrays(aggregate_arrayrecords(replies, WEIGHT_KEY))
    scores = (start - global_state["canary.weight"].reshape(-1)).double().numpy()
    plan = clients[0].plan
    bound = bound_from_scores(scores, included, plan.delta, confidence=confidence,
                              tie_seed=tie_seed)
    return _result("server", config, plan, breakage, clients[0].steps_taken, num_clients,
                   canary_norm, bound)
