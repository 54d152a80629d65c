"""Book-keeping DP-SGD: exact per-sample clipping with one backward pass.

Opacus' hooks mode materialises every per-sample gradient; its ghost-clipping mode avoids
that but runs two backward passes. Book-keeping (Bu et al., 2023) needs one: the forward
records each layer's input, one backward pass computes only the gradients with respect to
the layers' *outputs* (never the weight gradients autograd would otherwise form), and
then, layer by layer,

1. the per-sample gradient norms come from the inputs and output-gradients alone
   (ghost norms: ``||Σ_t a_t g_tᵀ||² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')``),
2. the clipped sum of per-sample gradients is formed directly as ``Σ_b c_b A_bᵀ G_b``.

Noise is then added exactly as Opacus' ``DPOptimizer`` does: ``(Σ_b clipped_b + N(0,
σ²C²)) / E[B]``. Supported layers: ``nn.Linear`` and fedmoe's sparse
:class:`~fedmoe.models.experts.GroupedLinear` — every parameter of the model must belong to
one of them, and each runs at most once per forward (the digits models; not ``tmoe``,
whose embeddings and LayerNorms are left to Opacus' modes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from fedmoe.models.experts import GroupedLinear

SUPPORTED = (nn.Linear, GroupedLinear)


def check_supported(model: nn.Module) -> None:
    """Raise ValueError naming any layer book-keeping cannot handle."""
    bad = sorted({type(m).__name__ for m in model.modules()
                  if any(True for _ in m.parameters(recurse=False))
                  and not isinstance(m, SUPPORTED)})
    if bad:
        raise ValueError(f"book-keeping clipping supports only nn.Linear and GroupedLinear "
                         f"layers; this model also has {bad}: use grad-sample-mode "
                         "'hooks' or 'ghost'")


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
        self.layers = [m for m in model.modules() if isinstance(m, SUPPORTED)]
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
            for (module, inputs, _), g in zip(used, backprops, strict=True):
                norms_sq = norms_sq + _norm_sq(module, inputs, g, batch_size)
            factors = (self.clip / (norms_sq.sqrt() + 1e-6)).clamp(max=1.0)
            for (module, inputs, _), g in zip(used, backprops, strict=True):
                _accumulate_clipped(module, inputs, g, factors, sums)
        with torch.no_grad():
            for p, total in sums.items():
                total.add_(torch.empty_like(total).normal_(0.0, self.sigma * self.clip,
                                                           generator=self.generator))
                p.add_(total, alpha=-self.lr / self.expected_batch_size)
        return losses.detach()


def _norm_sq(module, inputs, g, batch: int) -> torch.Tensor:
    """Squared per-sample gradient norm of ``module``'s parameters, (B,): the same
    ghost-norm samplers Opacus' ghost clipping uses (Opacus' for ``nn.Linear``,
    fedmoe's for ``GroupedLinear``), so both modes share one norm computation."""
    sampler = GradSampleModuleFastGradientClipping.NORM_SAMPLERS[type(module)]
    norms = sampler(module, list(inputs), g)
    return sum(n.reshape(batch) ** 2 for n in norms.values())


def _accumulate_clipped(module, inputs, g, factors: torch.Tensor, sums: dict) -> None:
    """Add ``Σ_b factor_b · (per-sample gradient of sample b)`` of ``module`` to ``sums``."""
    if isinstance(module, GroupedLinear):
        x, experts, samples, _ = inputs
        x, row = x.to(g.dtype), factors[samples]
        scale_x = module.in_features <= module.out_features  # scale the narrower side
        if scale_x:
            x = x * row.unsqueeze(-1)
        else:
            g = g * row.unsqueeze(-1)
        counts = torch.bincount(experts, minlength=module.num_experts).tolist()
        weight, bias = sums[module.weight], sums[module.bias]
        for e, (xc, gc, rc) in enumerate(zip(torch.split(x, counts), torch.split(g, counts),
                                             torch.split(row, counts), strict=True)):
            weight[e].addmm_(xc.T, gc)
            bias[e].add_(gc.T @ rc if scale_x else gc.sum(0))
        return
    batch = len(factors)
    a = inputs[0].to(g.dtype).reshape(batch, -1, module.in_features)
    scaled = g.reshape(batch, -1, module.out_features) * factors.view(-1, 1, 1)
    if module.weight.requires_grad:
        sums[module.weight] += torch.einsum("bto,bti->oi", scaled, a)
    if module.bias is not None and module.bias.requires_grad:
        sums[module.bias] += scaled.sum(dim=(0, 1))
