"""Privacy accounting and DP-SGD noise, each checked against an independent oracle."""

import math

import numpy as np
import pytest
import torch
from scipy.special import gammaln, logsumexp

from fedmoe.privacy import (
    BudgetExceededError,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    calibrate_noise,
    epsilon,
    make_private,
    secret_generator,
    steps_per_epoch,
)


# ----------------------------------------------------------------------------- oracles
def rdp_to_dp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. (2020) Prop. 12 conversion, written out here independently."""
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.nanmin(eps))


def oracle_gaussian(sigma: float, steps: int, delta: float) -> float:
    """No subsampling: RDP of the Gaussian mechanism is exactly α/(2σ²) per step."""
    orders = np.linspace(1.01, 2000, 400_000)
    return rdp_to_dp(steps * orders / (2 * sigma**2), orders, delta)


def oracle_subsampled(sigma: float, q: float, steps: int, delta: float) -> float:
    """Mironov, Talwar & Zhang (2019): exact RDP of the sampled Gaussian at integer α,
    A_α = Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²))."""
    orders = np.arange(2, 513)
    rdp = []
    for a in orders:
        k = np.arange(a + 1)
        log_terms = (gammaln(a + 1) - gammaln(k + 1) - gammaln(a - k + 1)
                     + (a - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma**2))
        rdp.append(logsumexp(log_terms) / (a - 1))
    return rdp_to_dp(steps * np.array(rdp), orders.astype(float), delta)


# ----------------------------------------------------------------------------- accountant
@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_unsubsampled_epsilon_matches_gaussian_rdp(sigma, steps):
    ours = epsilon([(sigma, 1.0, steps)], 1e-5)
    oracle = oracle_gaussian(sigma, steps, 1e-5)
    # ours searches a finite grid of orders: never below the continuous optimum, and close
    assert oracle - 1e-6 <= ours <= oracle * 1.03


@pytest.mark.parametrize("sigma,q,steps", [(0.9, 0.1, 100), (1.5, 0.05, 400), (0.7, 0.2, 20)])
def test_subsampled_epsilon_matches_independent_rdp(sigma, q, steps):
    ours = epsilon([(sigma, q, steps)], 1e-4)
    oracle = oracle_subsampled(sigma, q, steps, 1e-4)
    # ours also tries fractional orders, so it may only be tighter, and only slightly
    assert 0.95 * oracle <= ours <= oracle + 1e-6


def test_prv_agrees_with_rdp_and_is_tighter():
    history = [(1.0, 0.1, 200)]
    rdp, prv = epsilon(history, 1e-5, "rdp"), epsilon(history, 1e-5, "prv")
    assert prv <= rdp
    assert prv >= 0.6 * rdp


def test_composition_across_rounds_equals_one_long_run():
    rounds = [(0.9, 0.1, 10)] * 5
    assert epsilon(rounds, 1e-4) == pytest.approx(epsilon([(0.9, 0.1, 50)], 1e-4), rel=1e-9)
    assert epsilon(rounds[:2], 1e-4) < epsilon(rounds, 1e-4)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.1, 100), (0.05, 60), (0.25, 8)])
def test_calibrated_sigma_never_overshoots(target, q, steps):
    sigma = calibrate_noise(target, 1e-4, q, steps)
    eps = epsilon([(sigma, q, steps)], 1e-4)
    assert eps <= target
    assert eps >= target - 0.05  # and is not wastefully large
    assert epsilon([(sigma * 0.97, q, steps)], 1e-4) > eps


def test_steps_per_epoch_matches_opacus_loader():
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.zeros(137, 3))
    for q in (0.1, 0.07, 0.3, 1.0):
        assert len(DPDataLoader(ds, sample_rate=q)) == steps_per_epoch(q)


# ----------------------------------------------------------------------------- ledger
def _entry(r, sigma=1.0):
    return LedgerEntry(server_round=r, noise_multiplier=sigma, sample_rate=0.1, steps=10)


def test_ledger_refuses_over_budget_and_stays_unchanged():
    budget = epsilon([(1.0, 0.1, 30)], 1e-4) + 1e-6  # exactly three rounds
    ledger = PrivacyLedger(budget=budget, delta=1e-4)
    for r in (1, 2, 3):
        ledger.charge(_entry(r))
    before = ledger.to_dict()
    assert not ledger.can_afford(_entry(4))
    with pytest.raises(BudgetExceededError, match="over this client's budget"):
        ledger.charge(_entry(4))
    assert ledger.to_dict() == before


def test_ledger_round_trips_through_json_and_disk(tmp_path):
    ledger = PrivacyLedger(budget=8.0, delta=1e-4, accountant="rdp")
    ledger.charge(_entry(1, 0.8))
    ledger.charge(_entry(2, 1.2))
    path = tmp_path / "ledger.json"
    ledger.save(path)
    again = PrivacyLedger.load(path)
    assert again == ledger
    assert again.spent() == ledger.spent()
    assert not list(tmp_path.glob(".ledger.json.*"))  # no temp file left behind


def test_ledger_rejects_unknown_version():
    data = PrivacyLedger(budget=1.0, delta=1e-5).to_dict() | {"version": 99}
    with pytest.raises(LedgerError, match="version"):
        PrivacyLedger.from_dict(data)


def test_corrupt_ledger_file_is_a_clear_error_and_is_kept(tmp_path):
    path = tmp_path / "privacy_ledger.json"
    path.write_text('{"version": 1, "budget": 8.0, "delta"')  # torn write by another tool
    with pytest.raises(LedgerError, match=r"privacy_ledger.json: .*not valid JSON.*restored from a backup"):
        PrivacyLedger.load(path)
    assert path.read_text().startswith('{"version": 1')  # nothing overwritten


# ----------------------------------------------------------------------------- noise
def test_dp_optimizer_noise_has_planned_scale():
    """With zero gradients, one step's update is pure noise: std = lr·σ·C / E[B]."""
    n, q, sigma, clip, lr = 200, 0.1, 1.3, 0.7, 1.0
    model = torch.nn.Linear(500, 200, bias=False)
    torch.nn.init.zeros_(model.weight)
    ds = torch.utils.data.TensorDataset(torch.zeros(n, 500), torch.zeros(n))
    private = make_private(model, ds, sample_rate=q, noise_multiplier=sigma, max_grad_norm=clip,
                           learning_rate=lr)
    x, _ = next(iter(private.loader))
    private.module(x).sum().backward()  # zero input -> zero per-sample gradients
    private.optimizer.step()
    update = -model.weight.detach().flatten().numpy()
    expected = lr * sigma * clip / round(q * n)
    assert abs(update.mean()) < 4 * expected / math.sqrt(update.size)
    assert update.std() == pytest.approx(expected, rel=0.02)
    private.module._close()


def test_secret_generator_is_not_torch_default():
    a, b = secret_generator(), secret_generator()
    assert torch.rand(4, generator=a).tolist() != torch.rand(4, generator=b).tolist()
