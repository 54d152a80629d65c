"""Privacy accounting and DP-SGD noise, each checked against an independent oracle."""

import math
import sqlite3

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import gammaln, logsumexp

from fedmoe.privacy import (
    AccountingError,
    BudgetExceededError,
    LedgerBook,
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


def oracle_exact_gaussian(sigma: float, steps: int, delta: float) -> float:
    """Balle & Wang (2018): the exact (ε, δ) of ``steps`` Gaussian mechanisms (q=1), i.e.
    one Gaussian of noise σ/√steps, from δ(ε) = Φ(-εs + 1/2s) - e^ε Φ(-εs - 1/2s)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    s = sigma / math.sqrt(steps)
    return brentq(lambda e: norm.cdf(-e * s + 1 / (2 * s))
                  - math.exp(e) * norm.cdf(-e * s - 1 / (2 * s)) - delta, 0, 500)


def test_published_rdp_value():
    # σ=1.5, q=0.04, 90 epochs (2250 steps), δ=1e-5: ε ≈ 7.33 with Opacus' RDP accountant
    assert epsilon([(1.5, 0.04, 90 * 25)], 1e-5, "rdp") == pytest.approx(7.33, abs=0.005)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_prv_matches_the_exact_gaussian_mechanism(sigma, steps):
    exact = oracle_exact_gaussian(sigma, steps, 1e-5)
    prv = epsilon([(sigma, 1.0, steps)], 1e-5, "prv")
    assert exact - 1e-6 <= prv <= exact + 0.02  # PRV is an upper bound within its ε error
    assert epsilon([(sigma, 1.0, steps)], 1e-5, "rdp") > prv  # RDP is looser


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_opacus_composition_of_rounds_equals_one_long_run(accountant):
    """R rounds of S steps = one run of R·S steps, in Opacus' own accountants (our
    ``epsilon`` merges equal segments, so this checks the property it relies on)."""
    from opacus.accountants import create_accountant

    def opacus_eps(history):
        acc = create_accountant(mechanism=accountant)
        acc.history = list(history)
        return acc.get_epsilon(delta=1e-5)

    rounds, steps = 6, 25
    split = opacus_eps([(1.1, 0.05, steps)] * rounds)
    assert split == pytest.approx(opacus_eps([(1.1, 0.05, rounds * steps)]), rel=1e-3)
    assert epsilon([(1.1, 0.05, steps)] * rounds, 1e-5, accountant) == pytest.approx(split, rel=1e-3)
    ledger = PrivacyLedger(budget=100.0, delta=1e-5, accountant=accountant)
    for r in range(rounds):
        ledger.charge(LedgerEntry(r + 1, 1.1, 0.05, steps))
    assert ledger.spent() == pytest.approx(split, rel=1e-3)
    assert epsilon([(1.1, 0.05, steps)] * 2, 1e-5, accountant) < split


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.1, 100), (0.05, 60), (0.25, 8)])
def test_calibrated_sigma_never_overshoots(target, q, steps):
    sigma = calibrate_noise(target, 1e-4, q, steps)
    eps = epsilon([(sigma, q, steps)], 1e-4)
    assert eps <= target
    assert eps >= target - 0.01  # and is not wastefully large
    assert epsilon([(sigma * 0.97, q, steps)], 1e-4) > eps


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_agrees_with_opacus_get_noise_multiplier():
    from opacus.accountants.utils import get_noise_multiplier

    for target, q, steps in [(8.0, 0.1, 200), (2.0, 0.05, 400)]:
        theirs = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.01)
        ours = calibrate_noise(target, 1e-5, q, steps)
        assert epsilon([(ours, q, steps)], 1e-5) <= target
        assert ours == pytest.approx(theirs, rel=0.02)  # same target, different search


def test_calibration_after_a_prior_spend_fills_only_what_is_left():
    prior = [(1.0, 0.1, 50)]
    sigma = calibrate_noise(6.0, 1e-5, 0.1, 100, prior=prior)
    assert 6.0 - 0.01 <= epsilon([*prior, (sigma, 0.1, 100)], 1e-5) <= 6.0
    assert sigma > calibrate_noise(6.0, 1e-5, 0.1, 100)
    with pytest.raises(ValueError, match="leaves no room"):
        calibrate_noise(0.5, 1e-5, 0.1, 100, prior=prior)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_segment_at_infinite_sigma_costs_nothing_and_bad_ones_are_refused(accountant):
    """σ = ∞ releases nothing: its RDP α/(2σ²) is 0 at every order, so the history's ε is
    that of the rest (the subsampled oracle's limit: it falls to 0 as σ grows). NaN or
    negative σ, or q outside (0, 1], is an error — neither accountant terminated on them."""
    rest = [(1.0, 0.1, 100)]
    assert epsilon([(math.inf, 0.1, 50)], 1e-5, accountant) == 0.0
    assert epsilon([(math.inf, 0.1, 50), *rest], 1e-5, accountant) == epsilon(rest, 1e-5,
                                                                                accountant)
    # the limit the rule takes (down to the conversion's floor at the oracle's orders)
    assert oracle_subsampled(1e4, 0.1, 50, 1e-5) < min(0.01, oracle_subsampled(10, 0.1, 50, 1e-5))
    sigma = calibrate_noise(3.0, 1e-5, 0.1, 100, accountant, prior=[(math.inf, 0.1, 10)])
    assert sigma == calibrate_noise(3.0, 1e-5, 0.1, 100, accountant)
    for bad in [(math.nan, 0.1, 10), (-1.0, 0.1, 10), (1.0, 0.0, 10), (1.0, 1.5, 10),
                (1.0, math.nan, 10)]:
        with pytest.raises(AccountingError, match="σ must be a number ≥ 0 and q in"):
            epsilon([bad], 1e-5, accountant)


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
    before = ledger.to_dict("a")
    assert not ledger.can_afford(_entry(4))
    with pytest.raises(BudgetExceededError, match="over this client's budget"):
        ledger.charge(_entry(4))
    assert ledger.to_dict("a") == before


def test_ledger_book_persists_and_validates(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with LedgerBook(path) as book:
        book.open("a", budget=8.0, delta=1e-4, accountant="rdp")
        book.charge("a", _entry(1, 0.8))
        after = book.charge("a", _entry(2, 1.2))
    with LedgerBook(path) as book:
        ledger = book.get("a")
        assert [e.noise_multiplier for e in ledger.entries] == [0.8, 1.2]
        assert ledger.spent() == pytest.approx(after, rel=1e-12)
        assert book.trajectory("a")[-1] == (2, pytest.approx(after, rel=1e-12))
        assert book.get("nobody") is None and book.clients() == ["a"]
        with pytest.raises(LedgerError, match="δ=0.0001 with 'rdp'.*cannot be mixed"):
            book.open("a", budget=8.0, delta=1e-5, accountant="rdp")
        with pytest.raises(LedgerError, match="cannot be mixed"):
            book.open("a", budget=8.0, delta=1e-4, accountant="prv")
        with pytest.raises(BudgetExceededError):
            book.open("a", budget=after, delta=1e-4, accountant="rdp")
            book.charge("a", _entry(3))
        assert len(book.get("a").entries) == 2  # a refused charge writes nothing


def test_ledger_file_of_another_kind_is_a_clear_error_and_is_kept(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)  # torn / foreign file
    with pytest.raises(LedgerError, match=r"ledger.sqlite: not a readable.*restored from a backup"):
        LedgerBook(path)
    assert path.read_bytes().startswith(b"SQLite format 3")
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(LedgerError, match="schema version 7"):
        LedgerBook(other)
    folder = tmp_path / "folder.sqlite"
    (folder / "inside").mkdir(parents=True)
    for read_only in (False, True):  # sqlite itself only says "disk I/O error"
        with pytest.raises(LedgerError, match="folder.sqlite: is a folder .* not a privacy "
                                              "ledger file"):
            LedgerBook(folder, read_only=read_only)
    assert [p.name for p in folder.iterdir()] == ["inside"]


def test_invalid_dp_parameters_are_refused():
    for bad in [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0), (float("inf"), 0.1, 1)]:
        with pytest.raises(LedgerError, match="invalid DP round"):
            LedgerEntry(1, *bad)


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


# ----------------------------------------------------------------------------- δ rule
def _oracle_delta(n: int) -> float:
    """Largest power of ten ≤ 1/(10 n), exactly (fractions), then at most 1e-3."""
    from fractions import Fraction

    k = 1
    while Fraction(1, 10**k) > Fraction(1, 10 * n):
        k += 1
    return min(1e-3, 10.0**-k)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 99, 100, 101, 999, 1000, 1001, 9999, 10_000,
                               10_001, 123_456, 10**6, 10**6 + 1])
def test_default_delta_rule_against_an_exact_oracle(n):
    from fedmoe.config import FedMoEConfig
    from fedmoe.privacy import client_delta

    delta = client_delta(FedMoEConfig(), n)
    assert delta == _oracle_delta(n)
    assert delta < 1 / n and delta <= 1e-3
    assert delta <= 1 / (10 * n) or delta == 1e-3


@given(st.integers(1, 10**9))
@settings(max_examples=200, deadline=None)
def test_default_delta_rule_property(n):
    from fedmoe.config import FedMoEConfig
    from fedmoe.privacy import client_delta

    assert client_delta(FedMoEConfig(), n) == _oracle_delta(n)


def test_one_example_client_gets_1e_3_not_0_1():
    from fedmoe.config import FedMoEConfig
    from fedmoe.privacy import client_delta

    assert [client_delta(FedMoEConfig(), n) for n in (1, 5, 50, 100, 101, 1000)] == [
        1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4]


@pytest.mark.parametrize("delta,n", [(0.5, 480), (0.5, 957), (1 / 480, 480), (0.01, 100),
                                     (2e-3, 500)])
def test_plan_refuses_delta_not_below_one_over_n_naming_the_client(delta, n):
    from fedmoe.config import FedMoEConfig
    from fedmoe.privacy import PlanError, plan_client

    with pytest.raises(PlanError, match=rf"client 'hospital-a': δ={delta:g} is not below 1/n"):
        plan_client(FedMoEConfig(target_delta=delta), "hospital-a", num_train=n, budget=8.0)


# ----------------------------------------------------------------- simulation noise seeding
def test_simulation_noise_seeds_in_order_restores_after_and_is_os_noise_outside():
    from fedmoe.privacy.dp import secret_generator, simulation_noise

    def draw():
        return torch.randn(4, generator=secret_generator())

    with simulation_noise(5):
        first, second = draw(), draw()
        with simulation_noise(5):  # nested: its own sequence, then back to the outer one
            assert torch.equal(draw(), first)
        third = draw()
    assert torch.equal(second, torch.randn(4, generator=torch.Generator().manual_seed(6)))
    assert torch.equal(third, torch.randn(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(draw(), draw())  # outside: seeded from the OS each time
    for bad in (-1, 2 ** 63, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            with simulation_noise(bad):
                pass


def test_only_simulations_and_tests_can_seed_the_noise():
    """The name appears nowhere in the library, the ClientApp or the ServerApp but where
    it is defined: a deployment cannot run with predictable noise."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for folder in ("fedmoe", "clients", "server")
                   for p in (root / folder).rglob("*.py")
                   if "simulation_noise" in p.read_text())
    assert users == ["fedmoe/privacy/dp.py"]
