"""Book-keeping DP-SGD: exact per-sample clipping with one backward pass.

Opacus' hooks mode materialises every per-sample gradient; its ghost-clipping mode avoids
that but runs two backward passes. Book-keeping (Bu et al., 2023) needs one: the forward
records each layer's input, one backward pass computes only the gradients with respect to
the layers' *outputs* (never the weight gradients autograd would otherwise form), and
then, layer by layer,

1. the per-sample gradient norms come from the inputs and output-gradients alone
   (ghost norms: ``||Σ_t a_t g_tᵀ||² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')``),
2. the clipped sum of per-sample gradients is formed directly, e.g. ``Σ_b c_b A_bᵀ G_b``.

Noise is then added exactly as Opacus' ``DPOptimizer`` does: ``(Σ_b clipped_b + N(0,
σ²C²)) / E[B]``.

Which layers: every layer type Opacus has a registered grad sampler for (its own, and
fedmoe's :class:`~fedmoe.models.experts.GroupedLinear`). ``nn.Linear``, ``nn.Embedding``
and ``GroupedLinear`` get their norms from their registered ghost-norm samplers (the same
routines ghost clipping runs; see :mod:`fedmoe.privacy.norms`) and their clipped sums from
a direct rule (:data:`_CLIPPED_SUMS`). Any other layer (``nn.LayerNorm``, convolutions,
...) has its per-sample gradients materialised by its grad sampler: cheap for the small
layers this applies to. Each layer must run at most once per forward (no tied parameters).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from torch import nn

from fedmoe.models.experts import GroupedLinear
from fedmoe.privacy import norms as _norms  # noqa: F401  (registers the Linear/Embedding samplers)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def check_supported(model: nn.Module) -> None:
    """Raise ValueError naming any layer book-keeping cannot handle."""
    layers = [m for m in model.modules() if _has_parameters(m)]
    bad = sorted({type(m).__name__ for m in layers
                  if type(m) not in GradSampleModule.GRAD_SAMPLERS})
    if bad:
        raise ValueError(f"book-keeping clipping needs a registered Opacus grad sampler for "
                         f"every layer; {bad} has none: use grad-sample-mode 'hooks' with "
                         "a model Opacus supports")
    odd = sorted({type(m).__name__ for m in layers if isinstance(m, nn.Embedding)
                  and (m.padding_idx is not None or m.max_norm is not None or m.sparse)})
    if odd:
        raise ValueError(f"book-keeping clipping does not support {odd} with padding_idx, "
                         "max_norm or sparse gradients: use grad-sample-mode 'hooks'")


class BookKeeping:
    """One-backward DP-SGD steps for ``model`` (see the module docstring).

    Parameters
    ----------
    model : nn.Module
    max_grad_norm, noise_multiplier, expected_batch_size, learning_rate
        As for Opacus' ``DPOptimizer`` with mean loss reduction, and plain SGD.
    generator : torch.Generator
        The noise source (seed it from the OS, never from the run config).
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, noise_multiplier: float,
                 expected_batch_size: int, learning_rate: float,
                 generator: torch.Generator) -> None:
        check_supported(model)
        self.model, self.clip, self.sigma = model, max_grad_norm, noise_multiplier
        self.expected_batch_size, self.lr, self.generator = (
            expected_batch_size, learning_rate, generator)
        self.layers = [m for m in model.modules() if _has_parameters(m)]
        self._calls: list[tuple[nn.Module, tuple, torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def _record(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self._calls.append((module, tuple(i.detach() if torch.is_tensor(i) else i
                                              for i in inputs), output))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def step(self, per_sample_loss: Callable[[nn.Module], torch.Tensor],
             batch_size: int) -> torch.Tensor:
        """One DP-SGD step on one Poisson batch; returns its per-sample losses (B,)."""
        self._calls = []
        sums = {p: torch.zeros_like(p) for p in self.model.parameters() if p.requires_grad}
        losses = torch.zeros(0)
        if batch_size:
            losses = per_sample_loss(self.model)
            calls, self._calls = self._calls, []
            seen = [id(m) for m, _, _ in calls]
            if len(seen) != len(set(seen)):
                raise ValueError("book-keeping: a layer ran twice in one forward (tied "
                                 "parameters); use grad-sample-mode 'hooks'")
            used = [c for c in calls if c[2].requires_grad]
            outputs = [out for _, _, out in used]
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            backprops = [torch.zeros_like(o) if g is None else g
                         for o, g in zip(outputs, grads, strict=True)]
            norms_sq = torch.zeros(batch_size, dtype=losses.dtype)
            materialised = []  # per-sample gradients of layers without a direct rule
            for (module, inputs, _), g in zip(used, backprops, strict=True):
                layer_sq, per_sample = _norm_sq(module, inputs, g, batch_size)
                norms_sq = norms_sq + layer_sq
                materialised.append(per_sample)
            factors = (self.clip / (norms_sq.sqrt() + 1e-6)).clamp(max=1.0)
            for (module, inputs, _), g, per_sample in zip(used, backprops, materialised,
                                                          strict=True):
                if per_sample is None:
                    _CLIPPED_SUMS[type(module)](module, inputs, g, factors, sums)
                else:
                    for p, grads in per_sample.items():
                        sums[p] += torch.einsum("b,b...->...", factors, grads)
        with torch.no_grad():
            for p, total in sums.items():
                total.add_(torch.empty_like(total).normal_(0.0, self.sigma * self.clip,
                                                           generator=self.generator))
                p.add_(total, alpha=-self.lr / self.expected_batch_size)
        return losses.detach()


def _norm_sq(module, inputs, g, batch: int):
    """Squared per-sample gradient norm (B,) of ``module``'s trainable parameters, and its
    per-sample gradients where they had to be materialised (else None).

    Layer types with a ghost-norm sampler and a direct clipped-sum rule use the sampler
    Opacus' ghost clipping registers for them; others their registered grad sampler."""
    if type(module) in _CLIPPED_SUMS:
        sampler = GradSampleModuleFastGradientClipping.NORM_SAMPLERS[type(module)]
        norms = sampler(module, list(inputs), g)
        if any(p.requires_grad and p not in norms for p in module.parameters(recurse=False)):
            raise ValueError(f"book-keeping: the norm sampler of {type(module).__name__} gave "
                             "no norm for a trainable parameter (unsupported input shape?); "
                             "use grad-sample-mode 'hooks'")
        # a frozen tensor is not clipped, noised or updated: its norm must not count
        return sum(n.reshape(batch) ** 2 for p, n in norms.items() if p.requires_grad), None
    sampler = GradSampleModule.GRAD_SAMPLERS[type(module)]
    grads = {p: gs for p, gs in sampler(module, list(inputs), g).items() if p.requires_grad}
    return sum(gs.reshape(batch, -1).pow(2).sum(-1) for gs in grads.values()), grads


def _linear_sum(module: nn.Linear, inputs, g, factors: torch.Tensor, sums: dict) -> None:
    batch = len(factors)
    a = inputs[0].to(g.dtype).reshape(batch, -1, module.in_features)
    scaled = g.reshape(batch, -1, module.out_features) * factors.view(-1, 1, 1)
    if module.weight.requires_grad:
        sums[module.weight] += torch.einsum("bto,bti->oi", scaled, a)
    if module.bias is not None and module.bias.requires_grad:
        sums[module.bias] += scaled.sum(dim=(0, 1))


def _grouped_linear_sum(module: GroupedLinear, inputs, g, factors: torch.Tensor,
                        sums: dict) -> None:
    x, experts, samples, _ = inputs
    train_weight, train_bias = module.weight.requires_grad, module.bias.requires_grad
    if not (train_weight or train_bias):
        return
    x, row = x.to(g.dtype), factors[samples]
    scale_x = module.in_features <= module.out_features  # scale the narrower side
    if scale_x:
        x = x * row.unsqueeze(-1)
    else:
        g = g * row.unsqueeze(-1)
    counts = torch.bincount(experts, minlength=module.num_experts).tolist()
    for e, (xc, gc, rc) in enumerate(zip(torch.split(x, counts), torch.split(g, counts),
                                         torch.split(row, counts), strict=True)):
        if train_weight:
            sums[module.weight][e].addmm_(xc.T, gc)
        if train_bias:
            sums[module.bias][e].add_(gc.T @ rc if scale_x else gc.sum(0))


def _embedding_sum(module: nn.Embedding, inputs, g, factors: torch.Tensor,
                   sums: dict) -> None:
    if not module.weight.requires_grad:
        return
    batch = len(factors)
    scaled = g.reshape(batch, -1, module.embedding_dim) * factors.view(-1, 1, 1)
    sums[module.weight].index_add_(0, inputs[0].reshape(-1),
                                   scaled.reshape(-1, module.embedding_dim))


#: ``rule(module, inputs, output_grads, factors, sums)`` adds ``Σ_b factor_b · (per-sample
#: gradient of sample b)`` of each of the module's *trainable* parameters to ``sums``,
#: without forming per-sample gradients (a frozen tensor has no entry in ``sums`` and is
#: skipped). Each type here also has a registered ghost-norm sampler.
_CLIPPED_SUMS = {nn.Linear: _linear_sum, GroupedLinear: _grouped_linear_sum,
                 nn.Embedding: _embedding_sum}
