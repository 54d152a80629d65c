"""What a model is trained and scored on: per-sample losses and evaluation metrics.

Every fedmoe model's forward returns ``(outputs, aux)`` — ``aux`` (B,) its per-sample router
losses — and names its :class:`Task` in ``model.task``. The task turns ``outputs`` and the
labels into a per-sample loss (B,) for DP-SGD (never a batch-level term) and into metric
sums for evaluation. Three kinds:

- :class:`Classification`: logits (B, C), labels (B,);
- :class:`MultiTask`: per-task logits plus per-task log-variances, labels (B, T) with -1
  for a label the client does not hold; adaptive uncertainty weighting;
- :class:`LanguageModel`: next-token logits (B, L, V), targets (B, L).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Label of a task a client holds no label for (multi-task).
MISSING = -1


class Classification:
    """Cross-entropy; metrics: accuracy and mean loss.

    ``outputs`` are logits (B, C), or while a label-prior classifier with a learned score
    scale trains a :class:`~fedmoe.models.prior.Calibrated` pair, whose per-sample loss is
    the sum of its two cross-entropies (each trains its own parameters).
    """

    kind = "classify"

    def loss(self, outputs, y: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, tuple):  # Calibrated(logits, calibrated)
            return sum(F.cross_entropy(o, y, reduction="none") for o in outputs)
        return F.cross_entropy(outputs, y, reduction="none")

    def sums(self, outputs, y: torch.Tensor) -> dict[str, float]:
        if isinstance(outputs, tuple):  # scored as the model predicts: calibrated
            outputs = outputs.calibrated
        return {
            "loss": float(F.cross_entropy(outputs, y, reduction="sum")),
            "correct": float((outputs.argmax(dim=-1) == y).sum()),
            "count": float(len(y)),
        }

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("count", 0.0), 1.0)
        return {"accuracy": sums.get("correct", 0.0) / n, "loss": sums.get("loss", 0.0) / n}


class MultiTask:
    """Several classification tasks, weighted by learned uncertainty (Kendall et al., 2018).

    Per sample: ``Σ_t present_t · (½·exp(-s_t)·CE_t + ½·s_t)`` where ``s_t`` is the task's
    learned log-variance. A task without a label in a sample contributes nothing. Metrics:
    accuracy and cross-entropy per task (``task-<name>-accuracy``, ``task-<name>-loss``),
    the mean accuracy over tasks (``accuracy``) and the mean cross-entropy (``loss``).
    """

    kind = "multitask"

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)

    def loss(self, outputs, y: torch.Tensor) -> torch.Tensor:
        logits, log_vars = outputs  # list of T (B, C_t), (B, T)
        total = torch.zeros(len(y), dtype=log_vars.dtype, device=log_vars.device)
        for t, task_logits in enumerate(logits):
            present = y[:, t] != MISSING
            ce = F.cross_entropy(task_logits, y[:, t].clamp(min=0), reduction="none")
            s = log_vars[:, t]
            total = total + present.to(ce.dtype) * (0.5 * torch.exp(-s) * ce + 0.5 * s)
        return total

    def sums(self, outputs, y: torch.Tensor) -> dict[str, float]:
        logits, _ = outputs
        sums: dict[str, float] = {}
        for t, (name, task_logits) in enumerate(zip(self.names, logits, strict=True)):
            present = y[:, t] != MISSING
            labels = y[present, t]
            sums[f"{name}-correct"] = float((task_logits[present].argmax(-1) == labels).sum())
            sums[f"{name}-count"] = float(present.sum())
            sums[f"{name}-loss"] = float(F.cross_entropy(task_logits[present], labels,
                                                         reduction="sum")) if len(labels) else 0.0
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        accuracies, loss, count = [], 0.0, 0.0
        for name in self.names:
            n = sums.get(f"{name}-count", 0.0)
            if n:
                out[f"task-{name}-accuracy"] = sums[f"{name}-correct"] / n
                out[f"task-{name}-loss"] = sums[f"{name}-loss"] / n
                accuracies.append(out[f"task-{name}-accuracy"])
                loss, count = loss + sums[f"{name}-loss"], count + n
        out["accuracy"] = sum(accuracies) / len(accuracies) if accuracies else 0.0
        out["loss"] = loss / count if count else 0.0
        return out


class LanguageModel:
    """Next-token cross-entropy, averaged over a sample's own positions.

    Metrics: ``loss`` (mean negative log-likelihood per token, nats), ``perplexity``
    (its exponential) and ``accuracy`` (next-token accuracy).
    """

    kind = "lm"

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(outputs.transpose(1, 2), y, reduction="none")  # (B, L)
        return nll.mean(dim=1)

    def sums(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {
            "loss": float(F.cross_entropy(outputs.transpose(1, 2), y, reduction="sum")),
            "correct": float((outputs.argmax(dim=-1) == y).sum()),
            "count": float(y.numel()),
        }

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("count", 0.0), 1.0)
        loss = sums.get("loss", 0.0) / n
        return {"accuracy": sums.get("correct", 0.0) / n, "loss": loss,
                "perplexity": math.exp(min(loss, 700.0))}
