"""fedmoe's cached RDP ε equals Opacus' RDP accountant on the same history (oracle)."""

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import create_accountant

from fedmoe.privacy.accountant import RDP_ALPHAS, epsilon

segment = st.tuples(st.floats(0.3, 20.0), st.floats(0.001, 1.0), st.integers(1, 3000))


@settings(max_examples=25, deadline=None)
@given(st.lists(segment, min_size=1, max_size=3), st.sampled_from([1e-3, 1e-5, 1e-8]))
def test_cached_rdp_epsilon_is_opacus_epsilon(history, delta):
    acc = create_accountant(mechanism="rdp")
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = acc.get_epsilon(delta=delta, alphas=RDP_ALPHAS)
    assert epsilon(history, delta) == pytest.approx(expected, rel=1e-12)
