"""Task losses and metrics against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedmoe.models.tasks import MISSING, Classification, LanguageModel, MultiTask


def pytest_approx(value):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


def test_multitask_loss_is_uncertainty_weighted_and_skips_missing_labels():
    logits = [torch.randn(3, 10), torch.randn(3, 2)]
    log_vars = torch.tensor([[0.5, -1.0]] * 3)
    y = torch.tensor([[4, 1], [MISSING, 0], [7, MISSING]])
    loss = MultiTask(["digit", "parity"]).loss((logits, log_vars), y)
    for i in range(3):
        expected = 0.0
        for t, s in enumerate((0.5, -1.0)):
            if y[i, t] != MISSING:
                ce = F.cross_entropy(logits[t][i : i + 1], y[i : i + 1, t]).item()
                expected += 0.5 * math.exp(-s) * ce + 0.5 * s
        assert loss[i].item() == pytest_approx(expected)


def test_multitask_metrics_per_task_count_only_labelled_samples():
    logits = [torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])]
    y = torch.tensor([[0], [0], [MISSING]])
    task = MultiTask(["parity"])
    summary = task.summarize(task.sums((logits, torch.zeros(3, 1)), y))
    assert summary["task-parity-accuracy"] == 0.5 and summary["accuracy"] == 0.5
    assert summary["task-parity-loss"] == pytest_approx(
        F.cross_entropy(logits[0][:2], y[:2, 0]).item())


def test_language_model_loss_is_the_per_sample_mean_token_nll_and_perplexity_its_exp():
    logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    per_sample = LanguageModel().loss(logits, y)
    for i in range(2):
        assert per_sample[i].item() == pytest_approx(F.cross_entropy(logits[i], y[i]).item())
    summary = LanguageModel().summarize(LanguageModel().sums(logits, y))
    assert summary["perplexity"] == pytest_approx(math.exp(F.cross_entropy(
        logits.reshape(-1, 7), y.reshape(-1)).item()))


def test_classification_summary():
    task = Classification()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    summary = task.summarize(task.sums(logits, torch.tensor([0, 1, 1])))
    assert summary["accuracy"] == 2 / 3
