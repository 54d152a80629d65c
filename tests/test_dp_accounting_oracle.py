"""fedmoe's reported ε against an independent accountant: Google's dp-accounting
(https://github.com/google/differential-privacy/tree/main/python/dp_accounting), which
shares no code with Opacus. Histories are what a fedmoe ledger holds: DP-SGD rounds of
Poisson-subsampled Gaussian steps, composed with the label histogram (one q = 1 step).

- RDP: dp-accounting's ``RdpAccountant`` computes the composed RDP curve of the sampled
  Gaussian mechanism at the integer orders; converted to (ε, δ) with Balle et al. 2020,
  Theorem 21 (written out here from the paper, the conversion Opacus uses), it bounds
  fedmoe's ε from above (fedmoe also searches fractional orders) and closely. dp-accounting's own conversion is a different, looser bound at large ε:
  fedmoe's ε is never above it.
- PRV: dp-accounting's ``PLDAccountant`` (privacy-loss distributions, Koskela et al. /
  Doroshenko et al.) is a second numerical accountant of the same exact ε; Opacus' PRV is
  an estimate with ε error 0.01 plus its discretisation, so the two agree within that.
"""

import math

import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

from fedmoe.privacy import epsilon  # noqa: E402
from fedmoe.privacy.accountant import RDP_ALPHAS  # noqa: E402
from fedmoe.privacy.label_prior import prior_segment  # noqa: E402

HISTORIES = [
    [(1.1, 0.1, 200)],  # the reference run: 20 rounds of 10 steps at q = 0.1
    [(0.8, 0.05, 1000)],
    [(2.0, 0.25, 40), (1.5, 0.25, 40)],  # σ changed between runs of a lifetime budget
    [(*prior_segment(4.3), ), (1.05, 0.1, 200)],  # the label histogram, then DP-SGD
    [(5.0, 0.1, 200)],  # ε ≈ 1
    [(0.6, 0.02, 5000)],  # long, small q
]


def _event(history):
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history])


def _balle_theorem_21(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """(ε, δ) from RDP: min over α of rdp(α) + log((α-1)/α) - (log δ + log α)/(α-1)
    (Balle, Barthe, Gaboardi, Hsu, Sato, AISTATS 2020, Theorem 21)."""
    eps = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


#: Integer orders: dp-accounting computes those in closed form (its fractional-order series
#: can fail to converge and then drops the order), Opacus likewise.
INTEGER_ORDERS = [a for a in RDP_ALPHAS if float(a).is_integer()]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-4])
def test_rdp_epsilon_matches_dp_accounting(history, delta):
    oracle = rdp_privacy_accountant.RdpAccountant(orders=INTEGER_ORDERS)
    oracle.compose(_event(history))
    bound = _balle_theorem_21(np.array(INTEGER_ORDERS, dtype=float), np.asarray(oracle._rdp),
                              delta)
    got = epsilon(history, delta, "rdp")
    # fedmoe minimises over these orders and fractional ones: at most the integer-order
    # optimum (how much lower is checked against PLD below)
    assert got <= bound * (1 + 1e-9)
    if got > 0.5:  # where ε is moderate the optimum lies at an integer order or near one
        assert got >= bound * (0.85 if got > 20 else 0.97)
    assert got <= oracle.get_epsilon(delta) * (1 + 1e-9)  # dp-accounting's own conversion
    # an upper bound on the true ε: not below the (near-exact) PLD accountant's value
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(_event(history))
    assert got >= pld.get_epsilon(delta) * 0.99


@pytest.mark.parametrize("history", HISTORIES[:4])
def test_prv_epsilon_matches_dp_accounting_pld(history):
    delta = 1e-5
    oracle = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    oracle.compose(_event(history))
    expected = oracle.get_epsilon(delta)
    got = epsilon(history, delta, "prv")
    assert math.isfinite(got)
    assert got == pytest.approx(expected, abs=0.02 + 0.02 * expected)
    # and PRV is below RDP's bound, as an exact accountant must be
    assert got <= epsilon(history, delta, "rdp") + 0.02
