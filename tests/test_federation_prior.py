"""``label-prior-shrinkage = "federation"``: the server's empirical-Bayes estimate of the
clients' label distributions from their DP label histograms, and each client's shrinkage
towards it — against independent oracles (a known generative model, numerical
integration of the posterior), and through the ClientApp and the strategy (the release
sent is exactly the one charged; a malformed one is dropped; it survives a checkpoint)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord

from clients.app import app
from clients.state import ClientStore
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.privacy.label_prior import (
    FEDERATION_PSEUDO_COUNT,
    FederationPrior,
    federation_prior,
    federation_pseudo_counts,
    overdispersion,
    shrink_to_federation,
)
from fedmoe.records import HISTOGRAM, ReplyError, RoundPlan, read_histogram
from server.checkpoint import restore_strategy, strategy_state
from server.strategy import FedMoE
from tests.helpers import SMALL, LocalGrid, context, message
from tests.test_label_prior import to_arrays_initial

CLASSES = 10


def _federation(seed: int, clients: int, n: int, concentration, sigma: float,
                classes: int = CLASSES, base: float = 5.0):
    """Clients whose label shares are Dirichlet(A_i·π̄) around π̄ (variance of class k's
    share: π̄_k(1 − π̄_k)/(A_i + 1)), A_i = ``concentration`` (one value, or one per
    client), their exact counts (multinomial), and the Gaussian release of those at σ."""
    rng = np.random.default_rng(seed)
    mean = rng.dirichlet(np.full(classes, base))
    a = np.broadcast_to(np.asarray(concentration, dtype=np.float64), (clients,))
    shares = np.stack([rng.dirichlet(ai * mean) for ai in a])  # (m, C)
    counts = np.stack([rng.multinomial(n, s) for s in shares]).astype(np.float64)
    noisy = counts + rng.normal(0.0, sigma, size=counts.shape)
    return mean, counts, noisy


def _overdispersion_oracle(counts, sigma, n, mean) -> float:
    """ρ by the moment equation, one class at a time in plain Python (not the library's
    vectorised expression): Σ_k [(c̃_k − nπ̄_k)² − σ² − nπ̄_k(1 − π̄_k)] / Σ_k n²π̄_k(1 − π̄_k)."""
    top = bottom = 0.0
    for c_k, m_k in zip(counts, mean):
        v_k = m_k * (1 - m_k)
        top += (c_k - n * m_k) ** 2 - sigma ** 2 - n * v_k
        bottom += n * n * v_k
    return min(max(top / bottom, 0.0), 1.0)


def test_the_federation_mean_recovers_the_known_distribution():
    mean, _, noisy = _federation(0, clients=2000, n=200, concentration=1.0, sigma=8.0)
    prior = federation_prior(list(torch.tensor(noisy)))
    assert np.allclose(prior.mean, mean, atol=0.02)  # ~4 standard errors at A = 1
    assert prior.clients == 2000


def test_the_mean_of_a_sparse_vocabulary_keeps_absent_classes_near_zero():
    """256 classes of which 200 no client holds (a byte vocabulary), 10 releases at σ = 2:
    summing before the positive part leaves those classes the positive part of the summed
    noise (~6 % of π̄ here); clipping each release first (the estimate before) gave them
    the positive part of every client's noise, about three times as much (18 %)."""
    rng = np.random.default_rng(3)
    held = np.zeros(256)
    held[:56] = rng.dirichlet(np.full(56, 1.0))
    counts = np.stack([rng.multinomial(700, held) for _ in range(10)]).astype(np.float64)
    noisy = counts + rng.normal(0.0, 2.0, size=counts.shape)
    prior = federation_prior(list(torch.tensor(noisy)))
    absent = float(np.sum(np.asarray(prior.mean)[56:]))
    clipped_first = np.clip(noisy, 0, None).sum(0)
    assert absent < 0.08 and 2.5 * absent < float(clipped_first[56:].sum() / clipped_first.sum())


@pytest.mark.parametrize("concentration", [1.0, 10.0, 1e6])  # strong skew ... none
def test_a_clients_overdispersion_recovers_its_known_concentration(concentration):
    """On average over clients of one concentration A, ρ_i is 1/(A + 1), up to the
    (n − 1)/n of the multinomial error and the clip at 0 (which biases it up where the
    truth is 0: hence the absolute tolerance)."""
    mean, _, noisy = _federation(0, clients=400, n=200, concentration=concentration,
                                 sigma=8.0, classes=64)
    prior = federation_prior(list(torch.tensor(noisy)))
    pbar = torch.tensor(prior.mean, dtype=torch.float64)
    rho = [overdispersion(torch.tensor(c), 8.0, 200, pbar) for c in noisy]
    assert np.mean(rho) == pytest.approx(1 / (concentration + 1), rel=0.1, abs=0.01)
    for c, r in zip(noisy[:20], rho[:20]):  # the library's estimate is the moment equation
        assert r == pytest.approx(_overdispersion_oracle(c, 8.0, 200, prior.mean), abs=1e-9)


def test_an_atypical_client_is_shrunk_less_than_a_typical_one():
    """One client drawn far from π̄ (A = 1) among typical ones (A = 1000): its ρ is the
    largest, and its shrunk counts are closer to its true counts than both its release and
    the federation's distribution; the typical clients' are pulled to π̄."""
    concentration = [1.0] + [1000.0] * 19
    mean, counts, noisy = _federation(5, clients=20, n=300, concentration=concentration,
                                      sigma=5.0, classes=32)
    prior = federation_prior(list(torch.tensor(noisy)))
    pbar = torch.tensor(prior.mean, dtype=torch.float64)
    rho = [overdispersion(torch.tensor(c), 5.0, 300, pbar) for c in noisy]
    assert rho[0] == max(rho) and rho[0] > 10 * max(rho[1:])
    shrunk = [shrink_to_federation(torch.tensor(c), 5.0, 300, prior).numpy() for c in noisy]
    own = np.mean((shrunk[0] - counts[0]) ** 2)
    assert own < 0.1 * np.mean((300 * pbar.numpy() - counts[0]) ** 2)
    # it keeps its own counts: moved from its release by a small part of the way to π̄
    assert np.abs(shrunk[0] - noisy[0]).sum() < 0.2 * np.abs(300 * pbar.numpy() - noisy[0]).sum()
    typical = np.mean([(s - c) ** 2 for s, c in zip(shrunk[1:], counts[1:])])
    assert typical < 0.5 * np.mean((noisy[1:] - counts[1:]) ** 2)


def test_shrinkage_is_the_posterior_mean_by_numerical_integration():
    """For each class, ĉ is E[θ | c̃] for θ ~ N(nπ̄, n²ρv), c̃ | θ ~ N(θ, σ² + nv),
    v = π̄(1 − π̄), ρ the moment estimate: computed here on a grid, not from the closed form."""
    prior = FederationPrior((0.5, 0.3, 0.2), 10)
    n, sigma = 150, 6.0
    counts = torch.tensor([90.0, 20.0, 37.0])
    got = shrink_to_federation(counts, sigma, n, prior)
    rho = _overdispersion_oracle(counts.tolist(), sigma, n, prior.mean)
    assert 0 < rho < 1
    for k, share in enumerate(prior.mean):
        v = share * (1 - share)
        theta = np.linspace(-200, 400, 600_001)
        log_prior = -0.5 * (theta - n * share) ** 2 / (n ** 2 * rho * v)
        noise = sigma ** 2 + n * v
        log_like = -0.5 * (float(counts[k]) - theta) ** 2 / noise
        weight = np.exp(log_prior + log_like - (log_prior + log_like).max())
        assert float(got[k]) == pytest.approx(float((weight * theta).sum() / weight.sum()),
                                              abs=1e-6)


def test_without_skew_it_is_the_federation_and_without_noise_the_client():
    flat = FederationPrior(tuple([0.1] * 10), 5)
    counts = torch.tensor([14.0, 7.0, 9.0, 12.0, 5.0, 9.0, 13.0, 11.0, 8.0, 12.0])  # n = 100
    assert torch.allclose(shrink_to_federation(counts, 5.0, 100, flat),
                          torch.full((10,), 10.0, dtype=torch.float64))
    skewed = torch.tensor([40.0, 0.0, 0.0, 12.0, 5.0, 9.0, 30.0, 1.0, 2.0, 4.0]) * 100
    exact = shrink_to_federation(skewed, 0.0, int(skewed.sum()), flat)
    assert torch.allclose(exact, skewed.double(), rtol=1e-3, atol=1.0)  # of n = 10,300


@pytest.mark.parametrize("concentration", [0.5, 1e6])
def test_shrunk_counts_are_closer_to_the_clients_counts_than_the_release(concentration):
    mean, counts, noisy = _federation(1, clients=50, n=150, concentration=concentration,
                                      sigma=12.5)  # σ_h at ε = 1
    prior = federation_prior(list(torch.tensor(noisy)))
    shrunk = torch.stack([shrink_to_federation(torch.tensor(c), 12.5, 150, prior)
                          for c in noisy]).numpy()
    raw, ours = np.mean((noisy - counts) ** 2), np.mean((shrunk - counts) ** 2)
    assert ours < raw
    if concentration > 1e3:  # no skew: almost all of the noise is gone
        assert ours < 0.2 * raw


def test_the_edge_cases_of_the_estimate():
    # no summed count above 0: π̄ is uniform
    assert federation_prior([torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, 0.0])]).mean \
        == (0.5, 0.5)
    # π̄ on one class: nothing to spread around (ρ = 0), the estimate is n·π̄
    one = FederationPrior((1.0, 0.0, 0.0), 2)
    assert overdispersion(torch.tensor([3.0, 4.0, 5.0]), 1.0, 12, torch.tensor(one.mean)) == 0.0
    assert torch.equal(shrink_to_federation(torch.tensor([3.0, 4.0, 5.0]), 1.0, 12, one),
                       torch.tensor([12.0, 0.0, 0.0], dtype=torch.float64))
    # exact counts (σ = 0) of a class the federation does not hold (v = 0): kept as they are
    assert torch.equal(shrink_to_federation(torch.tensor([3.0, 4.0, 5.0]), 0.0, 12, one),
                       torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64))
    # a client holding one class of a balanced federation: (n − 1)/n of the way to 1; with
    # noise that pushes the moment estimate past 1 (here 1.026) it is clipped at 1
    flat = torch.full((4,), 0.25, dtype=torch.float64)
    assert overdispersion(torch.tensor([1000.0, 0.0, 0.0, 0.0]), 0.0, 1000, flat) \
        == pytest.approx(0.999)
    assert overdispersion(torch.tensor([1010.0, -5.0, -3.0, -2.0]), 1.0, 1000, flat) == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="≥ 2 histograms"):
        federation_prior([torch.ones(3)])
    with pytest.raises(ValueError, match="finite"):
        federation_prior([torch.ones(3), torch.tensor([1.0, math.nan, 1.0])])
    with pytest.raises(ValueError, match="one length"):
        federation_prior([torch.ones(3), torch.ones(4)])
    with pytest.raises(ValueError, match="sum"):
        FederationPrior((0.5, 0.6), 2)
    with pytest.raises(ValueError, match="≥ 2 clients"):
        FederationPrior((0.5, 0.5), 1)
    prior = FederationPrior((0.5, 0.5), 2)
    with pytest.raises(ValueError, match="shape"):
        shrink_to_federation(torch.ones(3), 1.0, 10, prior)
    for sigma, n in ((-1.0, 10), (1.0, 0.5), (math.inf, 10)):
        with pytest.raises(ValueError, match="σ ≥ 0"):
            shrink_to_federation(torch.ones(2), sigma, n, prior)


def test_pseudo_counts_follow_the_federation_with_a_floor():
    # balanced labels: ½ per class (as the uniform add-½ before) plus Perks' 1/C
    flat = federation_pseudo_counts(FederationPrior(tuple([0.1] * 10), 3))
    assert torch.allclose(flat, torch.full((10,), 0.6, dtype=torch.float64))
    # a class the federation puts at 0 keeps 1/C; the rest follows π̄; total C/2 + 1
    alpha = federation_pseudo_counts(FederationPrior((0.75, 0.25, 0.0, 0.0), 3))
    assert torch.allclose(alpha, torch.tensor([1.75, 0.75, 0.25, 0.25], dtype=torch.float64))
    assert float(alpha.sum()) == pytest.approx(4 / 2 + 1)


def _cross_entropy(true_share: np.ndarray, counts: torch.Tensor, pseudo) -> float:
    """H(π_i, π̂) in nats of the prior π̂ ∝ max(counts, 0) + pseudo against the client's
    true label shares π_i (known here from the generative model)."""
    smoothed = counts.clamp(min=0).numpy() + np.asarray(pseudo, dtype=np.float64)
    return float(-(true_share * np.log(smoothed / smoothed.sum())).sum())


@pytest.mark.parametrize("classes, base, n, sigma, better", [
    (256, 0.05, 400, 2.0, True),    # a sparse byte vocabulary: most classes rare everywhere
    (10, 5.0, 150, 1.9, False),     # digits-like balanced labels: the same prior as before
])
def test_smoothing_towards_the_federation_fits_the_clients_labels(classes, base, n, sigma,
                                                                  better):
    """Against the clients' true label shares (an oracle the estimate never sees), the
    prior smoothed towards π̄ has a lower cross-entropy than the uniform add-½ on a sparse
    vocabulary — for typical and atypical clients alike — and no worse on balanced labels."""
    rng = np.random.default_rng(3)
    mean = rng.dirichlet(np.full(classes, base))
    concentration = [2.0] * 5 + [200.0] * 15  # five atypical clients among typical ones
    shares = np.stack([rng.dirichlet(a * mean + 1e-12) for a in concentration])
    counts = np.stack([rng.multinomial(n, sh / sh.sum()) for sh in shares]).astype(np.float64)
    noisy = counts + rng.normal(0.0, sigma, size=counts.shape)
    prior = federation_prior(list(torch.tensor(noisy)))
    alpha = federation_pseudo_counts(prior).numpy()
    ours, uniform = [], []
    for share, release in zip(shares, noisy):
        share = share / share.sum()
        shrunk = shrink_to_federation(torch.tensor(release), sigma, n, prior)
        ours.append(_cross_entropy(share, shrunk, alpha))
        uniform.append(_cross_entropy(share, shrunk, FEDERATION_PSEUDO_COUNT))
    ours, uniform = np.array(ours), np.array(uniform)
    if better:
        assert ours.mean() < uniform.mean() - 0.05
        assert ours[:5].mean() < uniform[:5].mean() and ours[5:].mean() < uniform[5:].mean()
    else:
        assert abs(ours.mean() - uniform.mean()) < 0.01


# ------------------------------------------------------------------------ on the wire
def test_round_plans_carry_the_federation_both_ways_and_refuse_a_malformed_one():
    prior = FederationPrior((0.25, 0.75), 3)
    for plan in (RoundPlan(4, federation=prior),
                 RoundPlan(4, 1.5, 0.25, 4, 1e-4, "rdp", 0.0, prior), RoundPlan(4)):
        assert RoundPlan.from_record(plan.to_record()) == plan
    record = RoundPlan(4, federation=prior).to_record()
    record["federation-label-mean"] = [0.9, 0.9]
    with pytest.raises(ReplyError, match="federation label prior"):
        RoundPlan.from_record(record)


def _release_round(tmp_path, shrinkage="federation", partition=0, clients=3):
    config = SMALL.replace(label_prior_shrinkage=shrinkage)
    plan = RoundPlan(1, 1.5, 0.25, 4, 1e-4, "rdp", 4.0)
    ctx = context(partition, clients, state_dir=str(tmp_path))
    return config, ctx, app(message(plan=plan, config=config), ctx)


def test_the_client_sends_exactly_the_release_it_was_charged_for(tmp_path):
    config, ctx, reply = _release_round(tmp_path)
    assert not reply.has_error(), reply.error
    sent = torch.tensor(reply.content.metric_records[HISTOGRAM]["counts"])
    kept = ClientStore(tmp_path).load_local()
    assert torch.equal(sent, kept["prior.counts"]) and float(kept["prior.noise"]) == 4.0
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:  # the release is charged
        assert book.get("partition-0").history[0] == (4.0, 1.0, 1)
    # before the server has an estimate the prior is the release as it is (pseudo-count σ_h)
    smoothed = sent.clamp(min=0) + 4.0
    assert torch.allclose(kept["prior.log_prior"], (smoothed / smoothed.sum()).log())
    later = app(message(plan=RoundPlan(2, 1.5, 0.25, 4, 1e-4, "rdp"), config=config), ctx)
    assert HISTOGRAM not in later.content.metric_records  # released once, sent once


def test_without_federation_shrinkage_no_histogram_leaves_the_client(tmp_path):
    _, _, reply = _release_round(tmp_path, shrinkage="none")
    assert not reply.has_error() and HISTOGRAM not in reply.content.metric_records


def test_the_client_computes_its_prior_from_the_federation_it_is_sent(tmp_path):
    config, ctx, _ = _release_round(tmp_path)
    kept = ClientStore(tmp_path).load_local()
    prior = FederationPrior((0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.03, 0.02), 3)
    reply = app(message(plan=RoundPlan(2, 1.5, 0.25, 4, 1e-4, "rdp", federation=prior),
                        config=config), ctx)
    assert not reply.has_error(), reply.error
    num_train = _num_train(config, ctx)
    expected = shrink_to_federation(kept["prior.counts"], 4.0, num_train, prior)
    expected = expected.clamp(min=0) + federation_pseudo_counts(prior)  # per class, not one value
    assert federation_pseudo_counts(prior).unique().numel() > 1
    got = ClientStore(tmp_path).load_local()["prior.log_prior"]
    assert torch.allclose(got, (expected / expected.sum()).log().float(), atol=1e-6)
    wrong = FederationPrior((0.5, 0.5), 3)  # another model's classes: refused, uncharged
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:
        before = book.get("partition-0").history
    bad = app(message(plan=RoundPlan(3, 1.5, 0.25, 4, 1e-4, "rdp", federation=wrong),
                      config=config), ctx)
    assert bad.has_error() and "2 classes" in bad.error.reason
    with LedgerBook(tmp_path / LEDGER_FILE, read_only=True) as book:
        assert book.get("partition-0").history == before


def _num_train(config, ctx) -> int:
    from fedmoe.config import NodeSettings
    from fedmoe.data import load_client_data

    node = NodeSettings.from_node_config(ctx.node_config)
    return len(load_client_data(config, node.partition_id, node.num_partitions).train)


def test_the_server_estimates_from_the_releases_and_sends_the_estimate(tmp_path):
    config = SMALL.replace(label_prior_shrinkage="federation")
    grid = LocalGrid(3)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        arrays = to_arrays_initial(config)
        sent = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        assert all(RoundPlan.from_record(m.content["config"]).federation is None for m in sent)
        replies = grid.send_and_receive(sent)
        strategy.aggregate_train(1, replies)
        assert len(strategy.label_histograms) == 3
        clients = sorted(strategy.label_histograms)
        expected = federation_prior([torch.tensor(strategy.label_histograms[c])
                                     for c in clients])
        assert strategy.federation == expected
        evaluate = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
        nxt = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
        for msg in [*evaluate, *nxt]:
            assert RoundPlan.from_record(msg.content["config"]).federation == expected
        # the checkpoint keeps the releases: a resumed server sends the same estimate
        fresh = FedMoE(config, book=book)
        restore_strategy(fresh, strategy_state(strategy))
        assert fresh.federation == expected


@pytest.mark.parametrize("counts,why", [
    ([1.0] * 3, "must be 10 finite counts"),
    ([math.nan] * 10, "must be 10 finite counts"),
    ([1e6] + [0.0] * 9, "no DP release"),
    ("oops", "'counts' list"),
])
def test_a_malformed_release_drops_the_reply_with_its_reason(tmp_path, counts, why):
    config = SMALL.replace(label_prior_shrinkage="federation")
    grid = LocalGrid(2)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        sent = list(strategy.configure_train(1, to_arrays_initial(config), ConfigRecord(), grid))
        replies = list(grid.send_and_receive(sent))
        replies[0].content[HISTOGRAM] = MetricRecord({"counts": counts} if counts != "oops"
                                                     else {"other": [1.0]})
        strategy.aggregate_train(1, replies)
        assert len(strategy.label_histograms) == 1 and strategy.federation is None
        assert any(why in r for r in strategy.history[-1].rejected), strategy.history[-1].rejected


def test_read_histogram_bounds_are_twelve_sigmas_around_zero_and_n():
    from flwr.app import RecordDict

    def content(values):
        return RecordDict({HISTOGRAM: MetricRecord({"counts": values})})

    assert read_histogram(RecordDict({}), 3, 10, 1.0) is None
    assert read_histogram(content([-11.9, 21.9, 5.0]), 3, 10, 1.0) is not None
    for values in ([-12.1, 0.0, 0.0], [0.0, 22.1, 0.0]):
        with pytest.raises(ReplyError, match="no DP release"):
            read_histogram(content(values), 3, 10, 1.0)


def test_client_state_from_before_the_kept_release_still_loads_with_its_prior(tmp_path):
    """A state dir written by an earlier fedmoe has the prior's log π but not the release
    buffers: the client keeps that prior and trains on (nothing new to release)."""
    config, ctx, _ = _release_round(tmp_path)
    store = ClientStore(tmp_path)
    old = {k: v for k, v in store.load_local().items() if k not in ("prior.counts",
                                                                   "prior.noise")}
    store.save_local(old)
    reply = app(message(plan=RoundPlan(2, 1.5, 0.25, 4, 1e-4, "rdp",
                                       federation=FederationPrior((0.1,) * 10, 3)),
                        config=config), ctx)
    assert not reply.has_error(), reply.error
    kept = store.load_local()
    assert torch.equal(kept["prior.log_prior"], old["prior.log_prior"])  # not recomputed
    assert float(kept["prior.noise"]) == 0.0
