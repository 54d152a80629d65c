"""``pretrain-share``: ``tmoe``'s pretraining rounds at their own σ, checked against an
independent accountant (Google's dp-accounting), a naive per-round loop and a real run's
two ledgers."""

import math

import numpy as np
import pytest

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy import LEDGER_FILE, LedgerBook, epsilon, plan_client
from fedmoe.privacy.label_prior import prior_segment
from fedmoe.privacy.plan import PlanError, rounds_allowed

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


@pytest.mark.parametrize("config,why", [
    (TMOE.replace(noise_multiplier=1.5), "noise-multiplier=1.5 is given"),
    (FedMoEConfig(), "the model is 'lmoe'"),
    (TMOE.replace(pretrain_rounds=20), "pretrain-rounds=20 of num-server-rounds=20"),
    (TMOE.replace(pretrain_rounds=0), "pretrain-rounds=0 of num-server-rounds=20"),
])
def test_where_the_share_cannot_apply_it_is_ignored_and_the_run_warned(config, why):
    plan = plan_client(config.replace(pretrain_share=0.3), "c", num_train=256, budget=8.0,
                       label_prior=config.model == "tmoe")
    assert plan.pretrain_noise == 0 and plan.noise_at(1) == plan.noise_at(20)
    warned = [w for w in config.replace(pretrain_share=0.3).warnings() if "pretrain-share" in w]
    assert len(warned) == 1 and "has no effect" in warned[0] and why in warned[0]
    assert not [w for w in TMOE.replace(pretrain_share=0.3).warnings() if "pretrain-share" in w]
    assert not [w for w in config.warnings() if "pretrain-share" in w]  # 0: nothing to say


def test_a_share_that_leaves_fine_tuning_no_budget_is_refused_naming_the_share(tmp_path):
    """Pretraining at (nearly) all of ε and the unigram histogram leave fine-tuning no σ,
    where one σ for every round would fit: a plan error that names pretrain-share (the
    server excludes the client with it), and `fedmoe simulate` refuses it before anything
    starts, writing nothing. A budget that earlier spend has used up is not the share's
    fault: no error, no round."""
    from simulations.runner import preflight

    with pytest.raises(PlanError, match=r"pretrain-share=0\.999999: .* lower pretrain-share"):
        _plan(0.999999)
    with pytest.raises(PlanError, match=r"pretrain-share=1e-06: .* raise pretrain-share"):
        _plan(1e-6)  # pretraining's ε is too little for any σ
    config = TMOE.replace(pretrain_share=0.999999, num_server_rounds=4, pretrain_rounds=2,
                          max_windows=40, run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"pretrain-share=0\.999999: .* training examples"):
        preflight(config, 2)
    assert not (tmp_path / "run").exists()
    preflight(config.replace(pretrain_share=0.3), 2)  # a share that fits passes
    spent = _plan(0.3, prior=((0.6, 0.5, 400),))
    assert spent.rounds_allowed == 0


def test_with_earlier_spend_the_share_is_of_what_is_left():
    """A lifetime ledger's earlier spend ε₀: the pretraining rounds bring it to
    ε₀ + s·(ε − ε₀), the run to ε; without earlier spend that is s·ε."""
    prior = ((2.5, 0.1, 200),)  # ε₀ ≈ 2.4
    plan = _plan(0.3, prior=prior)
    before = epsilon(list(prior), plan.delta)
    assert 1.0 < before < 4.0 and plan.prior_noise == 0  # no second histogram
    pretraining = epsilon([*prior, *plan.segments(10)], plan.delta)
    target = before + 0.3 * (8.0 - before)
    assert target - 0.011 <= pretraining <= target + 1e-9  # calibration's tolerance 0.01
    assert epsilon([*prior, *plan.segments(20)], plan.delta) == pytest.approx(8.0, abs=0.01)


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
