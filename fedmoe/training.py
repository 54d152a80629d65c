"""Local training and evaluation of a fedmoe model on one client's data.

Model-agnostic: the model's forward gives ``(outputs, aux)`` and its ``task``
(:mod:`fedmoe.models.tasks`) turns outputs and labels into per-sample losses and metrics.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmoe.models.centre import begin_local_round, end_local_round
from fedmoe.models.layers import expert_usage, pull_local_experts, set_use_local
from fedmoe.privacy import make_private, secret_generator
from fedmoe.roles import unwrap


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean per-sample training loss over the round's steps
    steps: int  # DP-SGD steps taken (= what the ledger charged)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    #: task-specific metrics: ``perplexity`` (language model), ``task-<name>-accuracy``
    #: (multi-task)
    details: dict[str, float] = field(default_factory=dict)
    #: share of routing weight per expert over the test split (all MoE layers, in order)
    expert_usage: list[float] = field(default_factory=list)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The task loss plus the model's router losses, one value per sample: (B,).

    ``model`` may be wrapped by Opacus; its task is the wrapped model's."""
    outputs, aux = model(x)
    return unwrap(model).task.loss(outputs, y) + aux


def train_dp_round(
    model: nn.Module,
    train_set: TensorDataset,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float,
    grad_sample_mode: str = "hooks",
    generator: torch.Generator | None = None,
    local_pull: float = 0.0,
    fold_centre: bool = False,
) -> TrainResult:
    """Run exactly ``steps`` DP-SGD steps on ``model`` in place (wrapped, then released).

    ``steps`` is what the ledgers charged for the round; the Poisson loader is restarted as
    often as needed. An empty Poisson batch still takes a noise-only step: skipping it
    would reveal that the batch was empty. After each step the local experts are pulled
    towards their layer's shared experts by ``local_pull``
    (:func:`~fedmoe.models.layers.pull_local_experts`): a function of the parameters alone,
    i.e. post-processing of the DP iterate, free in privacy. With ``fold_centre``
    (``centring-fold``) a ``local`` centre's move during the round is folded into its
    reader's bias afterwards (:func:`~fedmoe.models.centre.end_local_round`), also
    post-processing.
    """
    model.train()
    begin_local_round(model)
    private = make_private(
        model,
        train_set,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        learning_rate=learning_rate,
        mode=grad_sample_mode,
        generator=generator,
    )
    total, count, taken = 0.0, 0, 0
    # Opacus' backward hooks fire on module outputs because inputs need no grad: harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        while taken < steps:
            for x, y in private.loader:
                losses = private.step(lambda m: per_sample_loss(m, x, y), len(x))  # noqa: B023
                if local_pull:
                    pull_local_experts(model, local_pull)
                taken += 1
                total += float(losses.sum())
                count += len(losses)
                if taken == steps:
                    break
    finally:
        private.close()  # remove Opacus hooks: `model` is plain again
    if fold_centre:
        end_local_round(model)
    return TrainResult(loss=total / count if count else math.nan, steps=taken)


def train_plain_round(
    model: nn.Module,
    train_set: TensorDataset,
    *,
    steps: int,
    sample_rate: float,
    learning_rate: float,
    generator: torch.Generator | None = None,
    local_pull: float = 0.0,
    fold_centre: bool = False,
) -> TrainResult:
    """The non-private counterpart of :func:`train_dp_round` (``target-epsilon = inf``):
    the same ``steps`` Poisson batches at rate q and plain SGD on the batch's mean loss —
    no clipping, no noise. An empty batch takes no step (nothing to hide)."""
    from opacus.data_loader import DPDataLoader

    model.train()
    begin_local_round(model)
    loader = DPDataLoader(train_set, sample_rate=sample_rate,
                          generator=generator or secret_generator())
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    total, count, taken = 0.0, 0, 0
    while taken < steps:
        for x, y in loader:
            if len(x):
                optimizer.zero_grad(set_to_none=True)
                losses = per_sample_loss(model, x, y)
                losses.mean().backward()
                optimizer.step()
                total += float(losses.detach().sum())
                count += len(losses)
            if local_pull:
                pull_local_experts(model, local_pull)
            taken += 1
            if taken == steps:
                break
    if fold_centre:
        end_local_round(model)
    return TrainResult(loss=total / count if count else math.nan, steps=taken)


@torch.no_grad()
def evaluate(model: nn.Module, test_set: TensorDataset, *, use_local: bool = True) -> EvalResult:
    """The task's metrics on ``test_set``, routing with or without local experts, and the
    routing weight each expert received."""
    model.eval()
    set_use_local(model, use_local)
    task, sums, n = model.task, {}, 0
    loader = DataLoader(test_set, batch_size=256)

    def run() -> None:
        nonlocal n
        for x, y in loader:
            outputs, _ = model(x)
            for key, value in task.sums(outputs, y).items():
                sums[key] = sums.get(key, 0.0) + value
            n += len(x)

    try:
        usage = expert_usage(model, run)
    finally:
        set_use_local(model, True)
    summary = task.summarize(sums)
    details = {k: v for k, v in summary.items() if k not in ("accuracy", "loss")}
    return EvalResult(loss=summary["loss"], accuracy=summary["accuracy"], num_examples=n,
                      details=details, expert_usage=usage)
