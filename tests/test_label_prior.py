"""The personal label prior: its DP histogram release (against the exact Gaussian mechanism)
and the model component (against a hand-computed prior)."""

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedmoe.models import build_model
from fedmoe.models.layers import set_use_local
from fedmoe.models.prior import LabelPrior, label_priors
from fedmoe.privacy import epsilon
from fedmoe.privacy.label_prior import noisy_label_counts, prior_noise_multiplier, prior_segment
from fedmoe.roles import FEDERATED_ROLES, Role, split_state_dict, tensor_roles


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The tight ε of the Gaussian mechanism with sensitivity 1 and noise σ at δ
    (Balle & Wang, ICML 2018, Theorem 8): δ(ε) = Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ)."""
    def gap(eps):
        return (norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta)
    return brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize("budget,share,delta", [(8.0, 0.1, 1e-4), (3.0, 0.1, 1e-4),
                                                (1.0, 0.1, 1e-3), (1.0, 0.25, 1e-5)])
def test_histogram_noise_is_calibrated_and_bounds_the_exact_gaussian(budget, share, delta):
    sigma = prior_noise_multiplier(budget, share, delta)
    accounted = epsilon([prior_segment(sigma)], delta)
    assert accounted <= share * budget + 1e-9  # never over the share
    assert accounted >= share * budget - 0.01 * share * budget - 0.01
    exact = exact_gaussian_epsilon(sigma, delta)
    # RDP is an upper bound on the mechanism's true ε, and not a loose one here.
    assert exact <= accounted <= 1.6 * exact


def test_histogram_sensitivity_is_one_record_one_count():
    """Neighbouring data sets (one record added) with the same noise differ by e_y."""
    labels = torch.tensor([0, 1, 1, 3, 3, 3])
    a = noisy_label_counts(labels, 5, 2.0, torch.Generator().manual_seed(7))
    b = noisy_label_counts(torch.cat([labels, torch.tensor([4])]), 5, 2.0,
                           torch.Generator().manual_seed(7))
    assert torch.allclose(b - a, torch.tensor([0.0, 0, 0, 0, 1]), atol=1e-5)


def test_histogram_noise_has_the_stated_scale():
    labels = torch.tensor([2] * 50 + [5] * 30)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([noisy_label_counts(labels, 8, 3.0, gen) for _ in range(4000)])
    exact = torch.bincount(labels, minlength=8).float()
    assert torch.allclose(draws.mean(0), exact, atol=0.25)  # 4 standard errors: 4·3/√4000
    assert torch.allclose(draws.std(0), torch.full((8,), 3.0), rtol=0.06)


@pytest.mark.parametrize("bad", [dict(share=0.0), dict(share=1.0), dict(budget=math.inf),
                                 dict(budget=0.0)])
def test_histogram_noise_refuses_bad_arguments(bad):
    with pytest.raises(ValueError):
        prior_noise_multiplier(**({"budget": 8.0, "share": 0.1, "delta": 1e-4} | bad))


def test_noisy_counts_refuse_bad_labels_and_sigma():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="labels must be in"):
        noisy_label_counts(torch.tensor([0, 10]), 10, 1.0, gen)
    with pytest.raises(ValueError, match="noise multiplier"):
        noisy_label_counts(torch.tensor([0]), 10, 0.0, gen)


def test_prior_from_counts_matches_hand_computation():
    prior = LabelPrior(4)
    prior.set_counts(torch.tensor([10.0, -3.0, 0.0, 5.0]), pseudo_count=2.0)
    smoothed = torch.tensor([12.0, 2.0, 2.0, 7.0])  # negative noisy counts clamp to 0
    assert torch.allclose(prior.log_prior, torch.log(smoothed / smoothed.sum()))
    flat = LabelPrior(4)  # a fully shrunk histogram: uniform, yet recorded as set
    assert not flat.is_set
    flat.set_counts(torch.full((4,), 7.5), pseudo_count=2.0)
    assert flat.is_set and torch.allclose(flat.log_prior, torch.full((4,), math.log(0.25)))
    logits = torch.randn(3, 4)
    assert torch.allclose(prior(logits), logits + prior.log_prior)
    prior.use_local = False
    assert torch.equal(prior(logits), logits)


@pytest.mark.parametrize("name", ["moe", "lmoe", "hmoe"])
def test_classifier_prior_is_local_and_switched_with_the_local_experts(name):
    model = build_model(name, num_local_experts=0).eval()
    roles = tensor_roles(model)
    assert roles["prior.log_prior"] == Role.LOCAL
    assert "prior.log_prior" not in split_state_dict(model, FEDERATED_ROLES)
    x = torch.randn(5, 64)
    plain, _ = model(x)
    (prior,) = label_priors(model)
    prior.set_counts(torch.tensor([9.0, 0, 0, 3, 0, 0, 0, 0, 0, 1]), pseudo_count=1.0)
    personal, _ = model(x)
    assert torch.allclose(personal, plain + prior.log_prior, atol=1e-6)
    set_use_local(model, False)
    assert torch.allclose(model(x)[0], plain, atol=1e-6)


# ----------------------------------------------------------------- through the apps
from flwr.app import ConfigRecord  # noqa: E402

from clients.app import app  # noqa: E402
from clients.state import ClientStore  # noqa: E402
from fedmoe.config import FedMoEConfig  # noqa: E402
from fedmoe.privacy import LEDGER_FILE, LedgerBook  # noqa: E402
from fedmoe.records import ARRAYS, BAD_MESSAGE, METRICS, RoundPlan, TrainReport  # noqa: E402
from server.strategy import FedMoE  # noqa: E402
from tests.helpers import SMALL, LocalGrid, context, message  # noqa: E402


def _plan(prior_noise=4.0, server_round=1):
    return RoundPlan(server_round, 1.5, 0.25, 4, 1e-4, "rdp", prior_noise)


def test_client_releases_its_histogram_once_charged_before_training(tmp_path):
    ctx = context(state_dir=str(tmp_path))
    reply = app(message(plan=_plan()), ctx)
    assert not reply.has_error(), reply.error
    report = TrainReport.from_record(reply.content.metric_records[METRICS])
    expected = [(4.0, 1.0, 1), (1.5, 0.25, 4)]  # the histogram, then the round
    assert report.epsilon == pytest.approx(epsilon(expected, 1e-4), rel=1e-12)
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:
        assert book.get("partition-0").history == expected
    assert not any("prior" in k for k in reply.content.array_records[ARRAYS].keys())
    stored = ClientStore(tmp_path).load_local()["prior.log_prior"]
    assert stored.abs().sum() > 0 and torch.isfinite(stored).all()
    # a later round charges DP-SGD only and keeps the prior as it was
    reply = app(message(plan=_plan(0.0, server_round=2)), ctx)
    assert not reply.has_error(), reply.error
    assert torch.equal(ClientStore(tmp_path).load_local()["prior.log_prior"], stored)
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:
        assert book.get("partition-0").history == [*expected, (1.5, 0.25, 4)]


def test_client_refuses_a_second_histogram_without_charging(tmp_path):
    ctx = context(state_dir=str(tmp_path))
    assert not app(message(plan=_plan()), ctx).has_error()
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:
        before = book.get("partition-0").history
    reply = app(message(plan=_plan(server_round=2)), ctx)
    assert reply.has_error() and reply.error.code == BAD_MESSAGE
    assert "already holds its label prior" in reply.error.reason
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:
        assert book.get("partition-0").history == before


@pytest.mark.parametrize("share", [0.1, 0.0])
def test_server_charges_the_histogram_once_and_both_ledgers_agree(tmp_path, share):
    config = SMALL.replace(label_prior_share=share)
    grid = LocalGrid(3)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        assert strategy.label_prior is (share > 0)
        strategy.start(grid, to_arrays_initial(config), num_rounds=config.num_server_rounds)
        for client, plan in strategy.plans.items():
            rounds = [plan.entry(r).segment for r in (1, 2, 3)]
            if share:
                assert plan.prior_noise == pytest.approx(
                    prior_noise_multiplier(config.target_epsilon, share, plan.delta))
                rounds = [prior_segment(plan.prior_noise), *rounds]
            else:
                assert plan.prior_noise == 0
            assert book.get(client).history == rounds
            spent = book.get(client).spent()
            assert spent == pytest.approx(epsilon(rounds, plan.delta), rel=1e-12)
            # σ is calibrated for what the histogram leaves: the run ends at the budget
            assert config.target_epsilon - 0.01 <= spent <= config.target_epsilon + 1e-9
        assert all(not r.mismatches for r in strategy.history)


def to_arrays_initial(config: FedMoEConfig):
    from fedmoe.models import model_for
    from fedmoe.records import to_arrays

    return to_arrays(split_state_dict(model_for(config)))


# ------------------------------------------------------------------ windows of targets
def test_window_targets_count_each_record_at_unit_l2_norm():
    """(N, L) targets: each record adds its histogram / ‖histogram‖₂ (naive loop), so
    adding one record moves the counts by an L2 norm of exactly 1, the sensitivity the
    Gaussian release is calibrated for, whatever the window holds; the mass lies in
    [N, N·√L] and the window histogram's size is the release's own total."""
    from fedmoe.privacy.label_prior import histogram_size, label_counts
    gen = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 7, (9, 5), generator=gen)
    naive = [0.0] * 7
    for row in windows.tolist():
        hist = [row.count(k) for k in range(7)]
        norm = math.sqrt(sum(v * v for v in hist))
        for k in range(7):
            naive[k] += hist[k] / norm
    counts = label_counts(windows, 7)
    torch.testing.assert_close(counts, torch.tensor(naive, dtype=torch.float64))
    assert 9 <= counts.sum().item() <= 9 * math.sqrt(5)
    assert float(counts.max()) <= 9  # no count above N: the server's plausibility bound
    for extra in (torch.randint(0, 7, (1, 5), generator=gen), torch.full((1, 5), 4),
                  torch.tensor([[0, 1, 2, 3, 4]])):
        moved = label_counts(torch.cat([windows, extra]), 7) - counts
        assert float(moved.norm()) == pytest.approx(1.0)
    assert histogram_size(counts, 9, per_window=True) == pytest.approx(float(counts.sum()))
    assert histogram_size(counts, 9, per_window=False) == 9
    assert histogram_size(-counts, 9, per_window=True) == 1.0
    # one label per record: the plain class counts, as before
    labels = torch.tensor([0, 2, 2, 6])
    assert label_counts(labels, 7).tolist() == [1, 0, 2, 0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, L\)"):
        label_counts(torch.zeros(2, 2, 2, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="labels must be in"):
        label_counts(torch.tensor([[0, 7]]), 7)
