"""Opacus wiring for one round of DP-SGD on a fresh model instance.

We assemble Opacus' own parts — ``GradSampleModule`` (per-sample gradients),
``DPOptimizer`` (per-sample clipping + Gaussian noise) and ``DPDataLoader`` (Poisson
sampling) — instead of ``PrivacyEngine.make_private``, because ``make_private`` infers the
sample rate as ``1/len(loader)`` while fedmoe fixes q in the run config and accounts it in
its own :class:`~fedmoe.privacy.ledger.PrivacyLedger`. Each round wraps a *new* model
object, so Opacus hooks are never added twice.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import Dataset

from fedmoe.config import GRAD_SAMPLE_MODES
from fedmoe.privacy.bookkeeping import BookKeeping

# How per-sample gradients are clipped (fedmoe.config.GRAD_SAMPLE_MODES): ``hooks``
# materialises them (Opacus' default); ``ghost`` computes only their norms (ghost
# clipping), then a second backward pass with the clipping factors gives the clipped sum;
# ``bookkeeping`` needs one backward pass (fedmoe.privacy.bookkeeping; Linear and
# GroupedLinear layers only).


@dataclass
class PrivateTraining:
    """The Opacus parts of one DP-SGD run; ``module`` wraps the caller's model."""

    module: nn.Module  # the GradSampleModule (hooks, ghost) or the model (bookkeeping)
    optimizer: DPOptimizer | None
    loader: DPDataLoader
    mode: str = "hooks"
    bookkeeping: BookKeeping | None = None

    def step(self, per_sample_loss: Callable[[nn.Module], torch.Tensor],
             batch_size: int) -> torch.Tensor:
        """One DP-SGD step on one Poisson batch: per-sample losses (B,) of the wrapped module,
        backward as the mode needs, per-sample clipping, noise, update. Returns the losses.

        An empty batch still takes the step, noise only: skipping it would reveal that the
        batch was empty. (Ghost mode then skips the forward pass: its two-pass backward
        has nothing to clip.)
        """
        if self.bookkeeping is not None:
            return self.bookkeeping.step(per_sample_loss, batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        if self.mode == "ghost" and batch_size == 0:
            losses = torch.zeros(0)
            for p in self.module.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        else:
            losses = per_sample_loss(self.module)
            if self.mode == "hooks":
                (losses.mean() if len(losses) else losses.sum()).backward()
            else:
                DPTensorFastGradientClipping(self.module, self.optimizer, losses,
                                             "mean").backward()
        self.optimizer.step()
        return losses.detach()

    def close(self) -> None:
        """Remove the hooks: the caller's model is plain again."""
        if self.bookkeeping is not None:
            self.bookkeeping.close()
        else:
            self.module._close()


def make_private(
    model: nn.Module,
    dataset: Dataset,
    *,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float,
    mode: str = "hooks",
    generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap ``model`` for DP-SGD over ``dataset`` with Poisson rate q and noise σ, clipping
    per sample in ``mode`` (:data:`GRAD_SAMPLE_MODES`); take each step with
    :meth:`PrivateTraining.step`.

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
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad-sample mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-trainable with Opacus: {errors}")
    n = len(dataset)  # type: ignore[arg-type]
    generator = generator or secret_generator()
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    dp_kwargs = {
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "expected_batch_size": max(1, round(sample_rate * n)),
        "loss_reduction": "mean",
        "generator": generator,
    }
    if mode == "bookkeeping":
        engine = BookKeeping(model, max_grad_norm=max_grad_norm,
                             noise_multiplier=noise_multiplier,
                             expected_batch_size=dp_kwargs["expected_batch_size"],
                             learning_rate=learning_rate, generator=generator)
        return PrivateTraining(module=model, optimizer=None, loader=loader, mode=mode,
                               bookkeeping=engine)
    if mode == "hooks":
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=learning_rate),
                                **dp_kwargs)
    else:
        module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm,
            use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(module.parameters(), lr=learning_rate), **dp_kwargs)
    return PrivateTraining(module=module, optimizer=optimizer, loader=loader, mode=mode)


#: Inside :func:`simulation_noise` only: the seeds the next generators take (else None).
_simulation_seeds: Iterator[int] | None = None


def secret_generator() -> torch.Generator:
    """A torch generator seeded from ``os.urandom`` (torch's default seed is a constant);
    inside :func:`simulation_noise`, from its seed sequence instead."""
    if _simulation_seeds is not None:
        return torch.Generator().manual_seed(next(_simulation_seeds))
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


@contextlib.contextmanager
def simulation_noise(seed: int) -> Iterator[None]:
    """**Simulations only.** Within the block every generator :func:`secret_generator`
    hands out — Poisson sampling, DP-SGD noise, the label histogram's noise — is seeded
    ``seed, seed + 1, ...`` in the order asked for, so an in-process simulation (the
    inline engine: clients called one after the other) can be repeated exactly.

    Noise an adversary can predict protects nothing: a deployment must never run inside
    this block. The ClientApp and the ServerApp never call it (tested); ``fedmoe
    experiment`` uses it for its inline runs (``[experiment] seeded-noise``), seeded from
    each run's noise id (``simulations.experiment.Run.noise_id``: the run's id less the keys
    that change only what the server releases), and tests use it for figures that must not
    move with the noise.

    Raises
    ------
    ValueError
        If ``seed`` is not an integer in [0, 2⁶³).
    """
    global _simulation_seeds
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    previous, _simulation_seeds = _simulation_seeds, itertools.count(seed)
    try:
        yield
    finally:
        _simulation_seeds = previous
