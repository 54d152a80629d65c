"""Opacus wiring for one round of DP-SGD on a fresh model instance.

We assemble Opacus' own parts — ``GradSampleModule`` (per-sample gradients),
``DPOptimizer`` (per-sample clipping + Gaussian noise) and ``DPDataLoader`` (Poisson
sampling) — instead of ``PrivacyEngine.make_private``, because ``make_private`` infers the
sample rate as ``1/len(loader)`` while fedmoe fixes q in the run config and accounts it in
its own :class:`~fedmoe.privacy.ledger.PrivacyLedger`. Each round wraps a *new* model
object, so Opacus hooks are never added twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import Dataset


@dataclass
class PrivateTraining:
    """The three Opacus parts of one DP-SGD run; ``module`` wraps the caller's model."""

    module: GradSampleModule
    optimizer: DPOptimizer
    loader: DPDataLoader


def make_private(
    model: nn.Module,
    dataset: Dataset,
    *,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float,
    generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap ``model`` for DP-SGD over ``dataset`` with Poisson rate q and noise σ.

    Every trainable parameter (shared, gate and local alike) is clipped and noised
    together, so all that leaves the client is covered by one accounting.

    Sampling and noise draw from ``generator``, by default one seeded from the operating
    system's entropy (:func:`secret_generator`). Never seed them from the run config: the
    server knows it, and noise it can predict protects nothing.

    Raises
    ------
    ValueError
        If the model contains layers Opacus cannot compute per-sample gradients for.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-trainable with Opacus: {errors}")
    n = len(dataset)  # type: ignore[arg-type]
    generator = generator or secret_generator()
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=learning_rate),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=max(1, round(sample_rate * n)),
        loss_reduction="mean",
        generator=generator,
    )
    return PrivateTraining(module=module, optimizer=optimizer, loader=loader)


def secret_generator() -> torch.Generator:
    """A torch generator seeded from ``os.urandom`` (torch's default seed is a constant)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
