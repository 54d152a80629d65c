"""Opacus' PRV accountant never takes the process down: histories whose PRV grid would be
too large (small σ, very large ε) or whose δ is below PRV's floating-point floor are
refused before Opacus allocates anything, with the reason; calibration brackets with RDP
and never probes PRV where it cannot price; the guard's grid size and δ floor agree with
Opacus' own."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant

from fedmoe.config import FedMoEConfig
from fedmoe.privacy import AccountingError, PlanError, calibrate_noise, epsilon, plan_client
from fedmoe.privacy.accountant import PRV_MAX_POINTS, check_prv, prv_grid_points

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("history,delta", [
    ([(1.0, 0.1, 20)], 1e-5), ([(0.7, 0.05, 40)], 1e-4), ([(2.0, 0.25, 8)], 1e-3),
    ([(1.0, 0.1, 20), (1.5, 0.2, 10)], 1e-5),
])
def test_grid_size_is_the_one_opacus_builds(history, delta):
    """The oracle: the discretised PRV Opacus itself builds for this history."""
    acc = PRVAccountant()
    acc.history = list(history)
    dprv = acc._get_dprv(eps_error=0.01, delta_error=delta / 1000)
    assert prv_grid_points(history, delta) == len(dprv.pmf)


def test_delta_floor_is_exactly_where_opacus_raises():
    history = [(1.0, 0.1, 200)]
    points = prv_grid_points(history, 1e-14)
    floor = float(np.finfo(np.longdouble).eps) * points / (1 - 1e-3)
    for delta in (floor * 0.5, floor * 0.9):
        with pytest.raises(AccountingError, match=f"δ={delta:g} is too small"):
            check_prv(history, delta)
        acc = PRVAccountant()
        acc.history = list(history)
        with pytest.raises(ValueError, match="Floating point errors will dominate"):
            acc.get_epsilon(delta=delta)
    check_prv(history, floor * 2)  # above it both agree that ε can be computed
    assert np.isfinite(epsilon(history, floor * 2, "prv"))


@pytest.mark.parametrize("history,delta", [
    ([(0.05, 0.1, 10)], 1e-5), ([(0.1, 0.1, 200)], 1e-5), ([(0.08, 0.5, 50)], 1e-4),
    ([(0.3, 0.1, 10_000)], 1e-5), ([(1.0, 0.1, 200)], 1e-18), ([(1.0, 0.1, 200)], 1e-15),
    ([(4.0, 1.0, 10)], 1e-19),
])
def test_unaffordable_or_unreliable_prv_histories_are_refused_up_front(history, delta):
    with pytest.raises(AccountingError, match="accountant='rdp'"):
        epsilon(history, delta, "prv")
    assert np.isfinite(epsilon(history, max(delta, 1e-12), "rdp"))  # RDP still works


def test_a_heterogeneous_history_counts_every_segment():
    one = prv_grid_points([(1.0, 0.1, 2000)], 1e-5)
    segments = [(1.0 + i / 100, 0.1, 2000 // 8) for i in range(8)]
    assert one <= PRV_MAX_POINTS < prv_grid_points(segments, 1e-5) * len(segments)
    with pytest.raises(AccountingError, match="× 8 segment"):
        check_prv(segments, 1e-5)


def test_prv_calibration_never_overshoots_and_is_tighter_than_rdp():
    for target, q, steps in [(8.0, 0.1, 200), (2.0, 0.05, 100)]:
        sigma = calibrate_noise(target, 1e-5, q, steps, "prv")
        eps = epsilon([(sigma, q, steps)], 1e-5, "prv")
        assert target - 0.01 <= eps <= target
        assert sigma <= calibrate_noise(target, 1e-5, q, steps, "rdp")


# Planning the listed inputs of issue 10 (and others of their kind) in a subprocess whose
# address space is capped: a PlanError naming the cause, never a MemoryError or a crash.
PLAN_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from fedmoe.config import FedMoEConfig
from fedmoe.privacy import PlanError, plan_client
config = FedMoEConfig.from_run_config(eval(sys.argv[1]))
try:
    plan = plan_client(config, "hospital-a", num_train=480, budget=config.target_epsilon)
    print("planned", plan.noise_multiplier, plan.rounds_allowed)
except PlanError as err:
    print("refused", err)
"""


@pytest.mark.parametrize("overrides,match", [
    ({"noise-multiplier": 0.05}, "σ is too small or ε too large"),
    ({"noise-multiplier": 0.05, "local-epochs": 3}, "σ is too small or ε too large"),
    ({"target-epsilon": 1000.0}, "σ is too small or ε too large"),
    ({"target-epsilon": 300.0, "num-server-rounds": 50}, "σ is too small or ε too large"),
    ({"target-delta": 1e-18, "noise-multiplier": 1.0}, "δ=1e-18 is too small"),
    ({"target-delta": 1e-16}, "δ=1e-16 is too small"),
])
def test_planning_refuses_prv_settings_under_a_memory_cap(overrides, match):
    run_config = {"accountant": "prv", **overrides}
    out = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, repr(run_config)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused client 'hospital-a'"), out.stdout
    assert match in out.stdout and "accountant='rdp'" in out.stdout


def test_a_small_sigma_prv_can_price_is_planned_with_no_round_allowed():
    """σ=0.1, one round of 10 steps: PRV prices it (ε ≈ 60 > 8), so the plan allows 0
    rounds — a budget refusal, not an accounting one."""
    plan = plan_client(FedMoEConfig(accountant="prv", noise_multiplier=0.1), "c",
                       num_train=480, budget=8.0)
    assert plan.rounds_allowed == 0
    assert epsilon([plan.entry(1).segment], plan.delta, "prv") > 8.0


def test_plan_with_prv_and_ordinary_settings_still_works():
    config = FedMoEConfig(accountant="prv", num_server_rounds=3, sample_rate=0.25,
                          target_epsilon=4.0)
    plan = plan_client(config, "c", num_train=480, budget=4.0)
    assert plan.rounds_allowed >= 3
    assert epsilon([plan.entry(1).segment] * 3, plan.delta, "prv") <= 4.0
    with pytest.raises(PlanError, match="client 'c'"):
        plan_client(FedMoEConfig(accountant="prv", noise_multiplier=0.05), "c", num_train=480,
                    budget=4.0)
