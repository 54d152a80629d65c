"""The one-run privacy audit (fedmoe.privacy.audit): its bound against independent oracles
and simulated mechanisms of known ε, its canaries against a naive per-sample gradient, and
the audit of the real pipeline — which must stay at or below the accountant's ε — and of
deliberately broken ones (σ = 0; no clipping), which it must catch, for every model."""

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.data import load_client_data
from fedmoe.methods import has_label_prior
from fedmoe.privacy import plan_client
from fedmoe.privacy.audit import (
    BREAKAGES,
    CanaryModel,
    audit_server_view,
    audit_white_box,
    bound_from_scores,
    epsilon_lower_bound,
    p_value,
    with_canaries,
)
from tests.test_models import CASES, naive_per_sample_grads

MODELS = ["moe", "lmoe", "hmoe", "mtmoe", "tmoe"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train several times faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- oracles
def binomial_tail(r: int, v: int, eps: float) -> Fraction:
    """P[Binomial(r, e^ε/(1+e^ε)) ≥ v], summed term by term in exact rationals."""
    q = Fraction(1 / (1 + math.exp(-eps)))
    return sum((math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1)),
               Fraction(0))


def oracle_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 3 of Steinke, Nasr & Jagielski (2023) as stated there:
    f(v) + 2mδ · max_{i=1..v} (f(v-i) - f(v)) / i, with f the binomial tail."""
    f_v = binomial_tail(r, v, eps)
    alpha = max((binomial_tail(r, v - i, eps) - f_v) / i for i in range(1, v + 1))
    return min(1.0, float(f_v + 2 * m * Fraction(delta) * alpha))


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (50, 20, 15, 0.5, 0.0), (50, 20, 20, 2.0, 0.0), (100, 60, 40, 1.0, 1e-3),
    (200, 40, 39, 3.0, 1e-5), (30, 30, 1, 0.0, 0.01),
])
def test_p_value_matches_theorem_3_in_exact_arithmetic(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(oracle_p_value(m, r, v, eps, delta),
                                                         rel=1e-9, abs=1e-15)


def test_lower_bound_is_where_the_p_value_crosses_the_significance():
    m, r, v, delta, beta = 1000, 40, 39, 1e-5, 0.05
    eps = epsilon_lower_bound(m, r, v, delta, beta)
    assert eps > 0
    assert oracle_p_value(m, r, v, eps, delta) < beta <= oracle_p_value(m, r, v, eps + 1e-4,
                                                                       delta)
    # chance-level guessing shows nothing
    assert epsilon_lower_bound(m, r, r // 2, delta, beta) == 0.0


def _mechanism_bounds(eps0, delta0, m, trials, seed, beta=0.05):
    """ε lower bounds from ``trials`` runs of an (ε0, δ0)-DP mechanism: for each canary,
    with probability δ0 its bit S_i outright, else randomised response at ε0; the auditor
    guesses every canary from what it sees."""
    rng = np.random.default_rng(seed)
    keep = 1 / (1 + math.exp(-eps0))
    cache, bounds = {}, []
    for _ in range(trials):
        leak = rng.random(m) < delta0
        correct = leak | (rng.random(m) < keep)
        v = int(correct.sum())
        if v not in cache:
            cache[v] = epsilon_lower_bound(m, m, v, delta0, beta)
        bounds.append(cache[v])
    return np.array(bounds)


@pytest.mark.parametrize("eps0,delta0", [(1.0, 0.0), (2.0, 1e-3), (0.5, 1e-2)])
def test_bound_holds_for_mechanisms_of_known_epsilon(eps0, delta0):
    """The confidence is real: an (ε0, δ0)-DP mechanism exceeds ε0 in at most 5% of runs."""
    bounds = _mechanism_bounds(eps0, delta0, m=200, trials=600, seed=1)
    assert (bounds > eps0).mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 600)


def test_bound_finds_most_of_a_pure_mechanisms_epsilon():
    """Power: randomised response at ε0 = 2 over 2,000 canaries is audited close to ε0."""
    bounds = _mechanism_bounds(2.0, 0.0, m=2000, trials=20, seed=2)
    assert np.median(bounds) > 1.6


def test_bound_from_scores_perfect_and_random_guessing():
    rng = np.random.default_rng(0)
    truth = rng.random(1000) < 0.5
    perfect = bound_from_scores(truth.astype(float), truth, 1e-6)
    assert perfect.correct == perfect.guesses and perfect.epsilon > 4
    assert perfect.epsilon <= perfect.ceiling
    noise = bound_from_scores(rng.normal(size=1000), truth, 1e-6)
    assert noise.epsilon < 0.5
    with pytest.raises(ValueError, match="one score per canary"):
        bound_from_scores([1.0, 2.0], [True], 1e-6)
    with pytest.raises(ValueError, match="finite"):
        bound_from_scores([1.0, math.nan], [True, False], 1e-6)


# ----------------------------------------------------------------------------- canaries
def test_canary_gradients_are_diracs_and_real_records_are_untouched():
    """Naive per-sample gradients (one backward pass per record, no Opacus): a canary's
    is exactly norm·e_i on the canary block and zero elsewhere; a null record's is zero;
    a real record's equals the bare model's."""
    model, (x, y), _, _ = CASES["moe"]()
    wrapped = CanaryModel(model, num_canaries=5, norm=7.0).double()
    included = np.array([True, False, True, False, False])
    data = with_canaries(TensorDataset(x, y), included, torch.Generator().manual_seed(0))
    grads = naive_per_sample_grads(wrapped, *data.tensors)
    bare = naive_per_sample_grads(model, x, y)
    for b in range(len(x)):  # real records
        assert torch.count_nonzero(grads[b]["canary.weight"]) == 0
        for name, g in bare[b].items():
            assert torch.equal(grads[b][f"model.{name}"], g), name
    for i, b in enumerate(range(len(x), len(x) + 5)):  # canaries, in order, then nulls
        expected = torch.zeros(1, 5, dtype=torch.float64)
        if included[i]:
            expected[0, i] = 7.0
        assert torch.equal(grads[b]["canary.weight"], expected)
        assert all(torch.count_nonzero(g) == 0 for n, g in grads[b].items()
                   if n != "canary.weight")


def small(model: str, eps: float, rounds: int = 2, **kw) -> FedMoEConfig:
    """A small, fast run: ``rounds`` of 10 steps; δ = 1e-6 (the one-run bound needs
    m·δ ≪ 1)."""
    shape = {"hidden_dim": 16, "seq_len": 16, "max_windows": 60, "num_layers": 1,
             "num_heads": 2, "sample_rate": 0.1, "learning_rate": 0.5}  # tmoe's own: q = 1
    if model != "moe":
        shape["expert_hidden_dim"] = 8
    return FedMoEConfig(model=model, num_server_rounds=rounds, target_epsilon=eps,
                        target_delta=1e-6, **shape | kw)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("extra", [{}, {"batch_size": 16}])
def test_canaries_do_not_change_the_accounted_plan(extra):
    """σ, q, steps and δ of the audited client are those planned for it without canaries
    (q = batch-size / n would move if canaries counted in n), and it ran exactly the
    accounted steps."""
    config = small("moe", 1.0, **extra)
    result = audit_white_box(config, canaries=200, generator=seeded())
    n = len(load_client_data(config, 0, 10).train)
    plan = plan_client(config, "c", num_train=n, budget=1.0,
                       label_prior=has_label_prior(config))
    assert (result.noise_multiplier, result.sample_rate, result.steps, result.delta) == (
        plan.noise_multiplier, plan.sample_rate, plan.steps, plan.delta)
    if extra:
        assert result.sample_rate == pytest.approx(16 / n)
    assert result.steps_taken == config.num_server_rounds * plan.steps


# ----------------------------------------------------------------------------- the audit
@pytest.mark.parametrize("breakage", ["no-noise", "no-clipping"])
@pytest.mark.parametrize("model", MODELS)
def test_a_broken_pipeline_is_caught_for_every_model(model, breakage):
    result = audit_white_box(small(model, 1.0), canaries=1000, breakage=breakage,
                             generator=seeded())
    assert result.claimed_epsilon <= 1.0
    assert result.bound.epsilon > 3 * result.claimed_epsilon, result.bound


@pytest.mark.parametrize("eps", [1.0, 8.0])
@pytest.mark.parametrize("model", MODELS)
def test_the_real_pipeline_stays_within_its_claim(model, eps):
    result = audit_white_box(small(model, eps, rounds=1), canaries=1000, generator=seeded())
    assert result.bound.epsilon <= result.claimed_epsilon <= eps


#: The most ε that 1,000 canaries can show at δ = 1e-6 (the bound's ceiling is 5.04): a
#: claim of ε = 8 is above it, so "bound <= claim" can fail only at a claim this low. The
#: mode matrices below therefore audit at ε = 1, where a leak would show; ε = 8 is audited
#: once per model in the default mode (test_the_real_pipeline_stays_within_its_claim).
AUDITABLE_EPSILON = 1.0


def test_one_thousand_canaries_cannot_show_epsilon_8():
    """Why the mode matrices audit at ε = 1 only (see AUDITABLE_EPSILON)."""
    truth = np.random.default_rng(0).random(1000) < 0.5
    ceiling = bound_from_scores(truth.astype(float), truth, 1e-6).ceiling
    assert AUDITABLE_EPSILON < ceiling < 8.0


@pytest.mark.slow
@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
@pytest.mark.parametrize("model", MODELS)
def test_the_real_pipeline_stays_within_its_claim_in_every_mode(model, dispatch, clipping):
    config = small(model, AUDITABLE_EPSILON, rounds=1, dispatch=dispatch,
                   grad_sample_mode=clipping)
    result = audit_white_box(config, canaries=1000, generator=seeded(1))
    assert (result.dispatch, result.clipping) == (dispatch, clipping)
    assert result.bound.epsilon <= result.claimed_epsilon <= AUDITABLE_EPSILON


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["no-noise", "no-clipping"])
@pytest.mark.parametrize("clipping", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_a_broken_pipeline_is_caught_in_every_mode(dispatch, clipping, breakage):
    config = small("moe", 1.0, dispatch=dispatch, grad_sample_mode=clipping)
    result = audit_white_box(config, canaries=1000, breakage=breakage, generator=seeded(1))
    assert result.bound.epsilon > 3 * result.claimed_epsilon


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_server_view_audit(breakage):
    """What the server sees (the aggregate of 3 clients' shared+gate arrays): within the
    claim for the real pipeline, far above it for a broken one."""
    result = audit_server_view(small("moe", 1.0), canaries=1000, num_clients=3,
                               breakage=breakage, generator=seeded())
    assert result.kind == "server" and result.num_clients == 3
    if breakage == "none":
        assert result.bound.epsilon <= result.claimed_epsilon
    else:
        assert result.bound.epsilon > 3 * result.claimed_epsilon


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_server_view_audit_every_model(model):
    real = audit_server_view(small(model, AUDITABLE_EPSILON), canaries=1000,
                             generator=seeded(2))
    assert real.bound.epsilon <= real.claimed_epsilon
    broken = audit_server_view(small(model, AUDITABLE_EPSILON), canaries=1000,
                               breakage="no-clipping", generator=seeded(2))
    assert broken.bound.epsilon > 3 * broken.claimed_epsilon


def test_audit_refuses_what_it_cannot_audit():
    with pytest.raises(ConfigError, match="private run"):
        audit_white_box(small("moe", math.inf))
    with pytest.raises(ConfigError, match="canaries"):
        audit_white_box(small("moe", 1.0), canaries=3)
    with pytest.raises(ConfigError, match="breakage"):
        audit_white_box(small("moe", 1.0), breakage="no-accounting")
    with pytest.raises(ConfigError, match="method 'fedmoe'"):
        audit_white_box(small("moe", 1.0, method="fedavg"))


def test_the_broken_pipelines_break_exactly_one_thing():
    """no-noise: σ = 0 with the planned C; no-clipping: a bound no gradient reaches, with
    the planned noise standard deviation σ·C; none: the plan's (σ, C)."""
    from fedmoe.privacy.audit import _dp_parameters

    plan = plan_client(small("moe", 1.0), "c", num_train=100, budget=1.0)
    sigma = plan.noise_multiplier
    assert _dp_parameters(plan, 1, 0.7, "none") == (sigma, 0.7)
    assert _dp_parameters(plan, 1, 0.7, "no-noise") == (0.0, 0.7)
    noise, clip = _dp_parameters(plan, 1, 0.7, "no-clipping")
    assert clip >= 1e9 * 0.7 and noise * clip == pytest.approx(sigma * 0.7, rel=1e-12)


def test_a_normal_run_cannot_reach_the_broken_pipeline():
    """No run-config key selects a breakage, and neither the ClientApp nor the ServerApp
    imports the audit module that alone can break the pipeline."""
    with pytest.raises(ConfigError):
        FedMoEConfig.from_run_config({"breakage": "no-noise"})
    code = ("import sys, clients.app, server.app; "
            "sys.exit('fedmoe.privacy.audit' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ----------------------------------------------------------------------------- the command
def test_audit_command_writes_table_json_and_plot_and_never_overwrites(tmp_path, capsys):
    import json

    from fedmoe.cli import main

    out = tmp_path / "audit"
    argv = ["audit", "--run-config", "num-server-rounds=1 target-delta=1e-6 hidden-dim=16",
            "--canaries", "100", "--clients", "2", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "audit.json").read_text())
    assert [r["kind"] for r in rows] == ["white-box", "server"]
    assert all(r["bound"]["epsilon"] <= r["claimed_epsilon"] for r in rows)
    assert "claimed ε (accountant)" in (out / "audit.md").read_text()
    assert (out / "audit.png").stat().st_size > 0
    before = (out / "audit.json").read_text()
    assert main(argv) == 2  # an earlier audit is never overwritten
    assert "earlier audit" in capsys.readouterr().err
    assert (out / "audit.json").read_text() == before


@pytest.mark.parametrize("argv,message", [
    (["--canaries", "5"], "--canaries must be in"),
    (["--clients", "0"], "--clients must be in"),
    (["--models", "moe,nope"], "model must be one of"),
    (["--epsilons", "1,x"], "is not a number"),
    (["--epsilons", "inf"], "finite ε"),
    (["--confidence", "1.5"], "confidence must be in"),
    (["--run-config", "method='fedavg'"], "method 'fedmoe'"),
])
def test_audit_command_refuses_bad_input_before_anything_runs(tmp_path, capsys, argv,
                                                                message):
    from fedmoe.cli import main

    out = tmp_path / "never"
    assert main(["audit", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
