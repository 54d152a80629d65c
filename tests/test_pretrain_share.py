"""``pretrain-share``: ``tmoe``'s pretraining rounds at their own σ, checked against an
independent accountant (Google's dp-accounting), a naive per-round loop and a real run's
two ledgers."""

import math

import numpy as np
import pytest

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy import LEDGER_FILE, LedgerBook, epsilon, plan_client
from fedmoe.privacy.label_prior import prior_segment
from fedmoe.privacy.plan import rounds_allowed

TMOE = FedMoEConfig(model="tmoe", pretrain_rounds=10, num_server_rounds=20)


def _plan(share, budget=8.0, config=TMOE, num_train=256, **kw):
    return plan_client(config.replace(pretrain_share=share), "c", num_train=num_train,
                       budget=budget, label_prior=True, **kw)


@pytest.mark.parametrize("budget", [8.0, 3.0])
@pytest.mark.parametrize("share", [0.2, 0.5])
def test_pretraining_alone_costs_its_share_and_the_run_its_budget_by_dp_accounting(share, budget):
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    from tests.test_dp_accounting_oracle import INTEGER_ORDERS, _balle_theorem_21, _event

    def oracle(history):
        accountant = rdp_privacy_accountant.RdpAccountant(orders=INTEGER_ORDERS)
        accountant.compose(_event(history))
        return _balle_theorem_21(np.array(INTEGER_ORDERS, float), np.asarray(accountant._rdp),
                                 plan.delta)

    assert dp_accounting
    plan = _plan(share, budget)
    steps = plan.steps * 10
    assert plan.pretrain_rounds == 10 and plan.pretrain_noise > plan.noise_multiplier > 0
    pretraining = [(plan.pretrain_noise, plan.sample_rate, steps)]
    # σ_p alone spends the share: fedmoe's ε is at most it, and the independent
    # integer-order bound (at most 3 % above fedmoe's fractional-order optimum) agrees
    assert epsilon(pretraining, plan.delta) <= share * budget + 1e-9
    assert oracle(pretraining) == pytest.approx(share * budget, rel=0.03)
    assert oracle(pretraining) >= epsilon(pretraining, plan.delta) * (1 - 1e-9)
    run = [prior_segment(plan.prior_noise), *pretraining,
           (plan.noise_multiplier, plan.sample_rate, steps)]
    assert plan.segments(20) == run[1:]
    assert budget * 0.97 <= oracle(run) and epsilon(run, plan.delta) <= budget + 1e-9
    assert epsilon(run, plan.delta) >= budget - 0.01  # calibrated: the run ends at the budget


def test_every_round_carries_its_phase_sigma():
    plan = _plan(0.3)
    assert [plan.noise_at(r) for r in (1, 10, 11, 20, 25)] == \
        [plan.pretrain_noise] * 2 + [plan.noise_multiplier] * 3
    assert [plan.entry(r).noise_multiplier for r in (10, 11)] == \
        [plan.pretrain_noise, plan.noise_multiplier]
    assert plan.rounds_allowed == 20
    # 0 (the default) is one σ for every round, as before the key existed
    same = _plan(0.0)
    assert same.pretrain_noise == 0 and same.noise_at(1) == same.noise_at(20)
    assert same.segments(20) == [(same.noise_multiplier, same.sample_rate, same.steps * 20)]


@pytest.mark.parametrize("prior_epsilon", [0.0, 2.0, 7.5])
def test_rounds_allowed_follows_the_schedule_like_a_naive_loop(prior_epsilon):
    """Rounds 1..P at σ_p, then σ: the most rounds that fit, counted one round at a time."""
    plan = _plan(0.3)
    q, steps, delta = plan.sample_rate, plan.steps, plan.delta
    prior = []
    if prior_epsilon:  # an earlier run's spend, of about prior_epsilon
        sigma = 0.5
        while epsilon([(sigma, q, 100)], delta) > prior_epsilon:
            sigma *= 1.05
        prior = [(sigma, q, 100)]
    naive, k = 0, 1
    while k <= 60:
        rounds = [(plan.noise_at(r), q, steps) for r in range(1, k + 1)]
        if epsilon([*prior, *rounds], delta) > 8.0 + 1e-9:
            break
        naive, k = k, k + 1
    got = rounds_allowed(8.0, delta, "rdp", (plan.noise_multiplier, q, steps), prior,
                         start=20, cap=60, pretrain=(plan.pretrain_noise, 10))
    assert got == naive


def test_a_given_sigma_and_other_models_ignore_the_share():
    fixed = _plan(0.3, config=TMOE.replace(noise_multiplier=1.5))
    assert fixed.pretrain_noise == 0 and fixed.noise_at(1) == fixed.noise_at(20) == 1.5
    moe = plan_client(FedMoEConfig(pretrain_share=0.3), "c", num_train=256, budget=8.0)
    assert moe.pretrain_noise == 0
    only_pretraining = _plan(0.3, config=TMOE.replace(pretrain_rounds=20))
    assert only_pretraining.pretrain_noise == 0


def test_a_share_that_leaves_fine_tuning_nothing_plans_no_round():
    """Pretraining at 0.95 of a tiny budget leaves no σ for fine-tuning: the plan says so
    (the server excludes the client, "cannot pay for one round"), it does not overspend."""
    plan = _plan(0.95, budget=0.3, num_train=256)
    assert plan.rounds_allowed == 0 or epsilon(
        [prior_segment(plan.prior_noise), *plan.segments(20)], plan.delta) <= 0.3 + 1e-9


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, "half"])
def test_bad_shares_are_refused_with_the_range(bad):
    with pytest.raises(ConfigError, match="pretrain-share"):
        FedMoEConfig.from_run_config({"model": "tmoe", "pretrain-share": bad})


def test_a_run_charges_each_phase_at_its_sigma_and_both_ledgers_agree(tmp_path):
    from tests.helpers import LocalGrid
    from tests.test_label_prior import to_arrays_initial
    from server.strategy import FedMoE

    config = FedMoEConfig(model="tmoe", num_server_rounds=3, pretrain_rounds=1,
                          max_windows=40, target_epsilon=8.0, pretrain_share=0.3)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        strategy.start(LocalGrid(2), to_arrays_initial(config), num_rounds=3)
        assert len(strategy.plans) == 2
        for client, plan in strategy.plans.items():
            assert plan.pretrain_noise > plan.noise_multiplier > 0
            expected = [prior_segment(plan.prior_noise),
                        (plan.pretrain_noise, plan.sample_rate, plan.steps),
                        *[(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 2]
            assert book.get(client).history == expected
            assert 8.0 - 0.01 <= book.get(client).spent() <= 8.0 + 1e-9
        assert all(not r.mismatches for r in strategy.history)
