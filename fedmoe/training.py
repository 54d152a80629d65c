"""Local training and evaluation of a fedmoe model on one client's data."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmoe.privacy import make_private


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean per-sample training loss over the round's steps
    steps: int  # DP-SGD steps taken (= what the ledger charged)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def per_sample_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, balance_coef: float
) -> torch.Tensor:
    """Cross-entropy plus the per-sample balance loss, one value per sample: (B,)."""
    logits, balance = model(x)  # (B, C), (B,)
    return F.cross_entropy(logits, y, reduction="none") + balance_coef * balance


def train_dp_round(
    model: nn.Module,
    train_set: TensorDataset,
    *,
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float,
    balance_coef: float,
    generator: torch.Generator | None = None,
) -> TrainResult:
    """Run exactly ``steps`` DP-SGD steps on ``model`` in place (wrapped, then released).

    ``steps`` is what the ledgers charged for the round; the Poisson loader is restarted as
    often as needed. An empty Poisson batch still takes a noise-only step: skipping it
    would reveal that the batch was empty.
    """
    model.train()
    private = make_private(
        model,
        train_set,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        learning_rate=learning_rate,
        generator=generator,
    )
    total, count, taken = 0.0, 0, 0
    # Opacus' backward hooks fire on module outputs because inputs need no grad: harmless.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        while taken < steps:
            for x, y in private.loader:
                private.optimizer.zero_grad(set_to_none=True)
                losses = per_sample_loss(private.module, x, y, balance_coef)  # (B,)
                loss = losses.mean() if len(losses) else losses.sum()
                loss.backward()
                private.optimizer.step()
                taken += 1
                total += float(losses.detach().sum())
                count += len(losses)
                if taken == steps:
                    break
    finally:
        private.module._close()  # remove Opacus hooks: `model` is plain again
    return TrainResult(loss=total / count if count else math.nan, steps=taken)


@torch.no_grad()
def evaluate(model: nn.Module, test_set: TensorDataset, *, use_local: bool = True) -> EvalResult:
    """Accuracy and cross-entropy on ``test_set``, routing with or without local experts."""
    model.eval()
    model.set_use_local(use_local)
    try:
        correct, loss, n = 0, 0.0, 0
        for x, y in DataLoader(test_set, batch_size=256):
            logits, _ = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == y).sum())
            n += len(y)
    finally:
        model.set_use_local(True)
    return EvalResult(loss=loss / max(n, 1), accuracy=correct / max(n, 1), num_examples=n)
