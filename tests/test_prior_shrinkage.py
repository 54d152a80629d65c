"""James–Stein shrinkage of the DP label histogram (fedmoe.privacy.label_prior.shrink_counts),
checked against its closed form and, by Monte-Carlo, against the risk of the raw release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmoe.privacy.label_prior import shrink_counts


def test_closed_form_on_a_hand_example():
    c = torch.tensor([10.0, 14.0, 6.0, 10.0, 20.0, 0.0])  # mean 10, ‖c − c̄‖² = 0+16+16+0+100+100
    sigma = 3.0
    factor = 1 - (6 - 3) * 9 / 232
    expected = 10 + factor * (c.double() - 10)
    np.testing.assert_allclose(shrink_counts(c, sigma).double().numpy(), expected.numpy(),
                               rtol=1e-6)


def test_pure_noise_is_flattened_and_strong_skew_is_kept():
    flat = torch.full((10,), 20.0) + torch.tensor([3, -2, 1, 0, -1, 2, -3, 1, 0, -1.0])
    out = shrink_counts(flat, sigma=5.0)  # spread 30 < 7·25: the positive part is 0
    np.testing.assert_allclose(out.numpy(), np.full(10, float(flat.mean())), rtol=1e-6)
    skew = torch.tensor([180.0, 15, 0, 0, 3, 0, 0, 2, 0, 0])
    out = shrink_counts(skew, sigma=2.0)
    assert float((out - skew).abs().max()) < 0.01 * float(skew.max())
    assert out.sum().item() == pytest.approx(skew.sum().item(), rel=1e-6)  # the mean is kept


@pytest.mark.parametrize("mu", [
    [20.0] * 10,                                   # IID-like: no skew
    [40, 30, 20, 20, 15, 10, 5, 5, 3, 2],          # Dirichlet-like
    [150, 50, 0, 0, 0, 0, 0, 0, 0, 0],             # pathological: two classes
])
@pytest.mark.parametrize("sigma", [1.9, 4.6, 12.5])  # σ_h of share 0.25 at ε = 8, 3, 1
def test_risk_no_worse_than_the_raw_release(mu, sigma):
    """E‖ĉ − μ‖² ≤ E‖c − μ‖² = Cσ² for every μ (C ≥ 4), estimated over 4,000 draws from the
    paired differences (margin: 4 standard errors); where μ is flat, far below it."""
    rng = np.random.default_rng(0)
    mu = np.asarray(mu, dtype=np.float64)
    draws = mu + rng.normal(0.0, sigma, size=(4_000, len(mu)))
    shrunk = np.stack([shrink_counts(torch.from_numpy(d), sigma).numpy() for d in draws])
    loss = ((shrunk - mu) ** 2).sum(axis=1)
    raw = ((draws - mu) ** 2).sum(axis=1)
    assert raw.mean() == pytest.approx(len(mu) * sigma ** 2, rel=0.06)  # the oracle's risk
    diff = loss - raw
    assert diff.mean() <= 4 * diff.std() / math.sqrt(len(diff))
    if np.ptp(mu) == 0:  # no skew: shrinkage removes most of the noise
        assert loss.mean() < 0.5 * len(mu) * sigma ** 2


def test_small_class_counts_are_returned_unchanged_and_bad_input_refused():
    c = torch.tensor([3.0, 9.0, -1.0])
    assert torch.equal(shrink_counts(c, 2.0), c)
    with pytest.raises(ValueError, match="finite"):
        shrink_counts(torch.tensor([1.0, float("nan"), 2.0, 3.0]), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        shrink_counts(torch.ones(5), 0.0)
