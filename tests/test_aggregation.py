"""Reply validation and robust aggregation: the rules against independent oracles, and a
Hypothesis fuzz of :meth:`FedMoE.aggregate_train` with malformed replies mixed into good
ones (it never raises, never yields a non-finite model, and drops exactly the bad ones)."""

import math

import numpy as np
import pytest
import scipy.stats
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import ARRAYS, METRICS, ReplyError, TrainReport, to_arrays
from fedmoe.roles import split_state_dict
from fedmoe.models import model_for
from server.aggregation import aggregate, as_dtypes, check_update, ema_step, server_step
from server.strategy import FedMoE
from tests.helpers import SMALL, LocalGrid

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ the rules, unit level
def _replies(n, shape=(3, 4), seed=1):
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=shape).astype(np.float32),
             "b": rng.normal(size=(5,)).astype(np.float32)} for _ in range(n)]


def test_fedavg_is_the_example_weighted_mean():
    replies, weights = _replies(4), [1.0, 2.0, 3.0, 10.0]
    out = aggregate(replies, weights, "fedavg")
    for key in ("w", "b"):
        manual = sum(w * r[key].astype(np.float64) for r, w in zip(replies, weights)) / 16.0
        np.testing.assert_allclose(out[key], manual, rtol=1e-6)
        assert out[key].dtype == np.float32


def test_median_is_coordinatewise_and_ignores_weights():
    replies = _replies(5)
    out = aggregate(replies, [1, 1, 1, 1, 1000], "median")
    for key in ("w", "b"):
        flat = np.stack([r[key] for r in replies]).reshape(5, -1)
        manual = [sorted(col)[2] for col in flat.T]  # the middle of five, per coordinate
        np.testing.assert_allclose(out[key].ravel(), manual, rtol=1e-6)


@pytest.mark.parametrize("n,beta", [(10, 0.2), (7, 0.3), (3, 0.2), (5, 0.0)])
def test_trimmed_mean_matches_scipy(n, beta):
    replies = _replies(n, seed=n)
    out = aggregate(replies, [1.0] * n, "trimmed-mean", trim_fraction=beta)
    for key in ("w", "b"):
        oracle = scipy.stats.trim_mean(np.stack([r[key] for r in replies]).astype(np.float64),
                                       beta, axis=0)
        np.testing.assert_allclose(out[key], oracle, rtol=1e-5)


def test_robust_rules_resist_one_scaled_reply_fedavg_does_not():
    honest = [{"w": np.full((4,), 1.0 + 0.01 * i, np.float32)} for i in range(6)]
    attacker = {"w": np.full((4,), 100.0, np.float32)}
    replies = [*honest, attacker]
    assert np.all(aggregate(replies, [1.0] * 7, "fedavg")["w"] > 10)
    for method in ("median", "trimmed-mean"):
        assert np.all(np.abs(aggregate(replies, [1.0] * 7, method)["w"] - 1.03) < 0.05)


def test_check_update_norm_zero_and_zeroed_model():
    base = {"w": np.ones((10,), np.float32)}
    moved = {"w": base["w"] + np.float32(0.5)}
    assert check_update(moved, base, 10.0) == pytest.approx(0.5 * math.sqrt(10))
    with pytest.raises(ReplyError, match="exceeds max-update-norm=1"):
        check_update(moved, base, 1.0)
    with pytest.raises(ReplyError, match="exactly zero"):
        check_update({"w": base["w"].copy()}, base, 10.0)
    with pytest.raises(ReplyError, match="all arrays are zero"):
        check_update({"w": np.zeros(10, np.float32)}, base, 100.0)
    huge = {"w": np.full((10,), np.finfo(np.float32).max, np.float32)}  # finite, norm = inf
    with pytest.raises(ReplyError, match="exceeds"):
        check_update(huge, base, 1e6)
    assert check_update({}, {}, 1.0) == 0.0  # method 'local': nothing is shared


def test_server_momentum_is_fedavgm_against_a_naive_loop():
    """Hsu et al. 2019: v_t = β v_{t-1} + Δ_t, x_t = x_{t-1} + η v_t with Δ_t the
    aggregate minus the global model, over several rounds, in plain float64 Python."""
    beta, eta = 0.9, 0.3
    rng = np.random.default_rng(5)
    x = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    naive_x, naive_v = x["w"].astype(np.float64).ravel().tolist(), [0.0] * 12
    velocity: dict = {}
    for _ in range(4):
        combined = {"w": (x["w"] + rng.normal(size=(3, 4))).astype(np.float32)}
        delta = (combined["w"].astype(np.float64) - x["w"].astype(np.float64)).ravel()
        naive_v = [beta * v + d for v, d in zip(naive_v, delta, strict=True)]
        naive_x = [float(a) + eta * v for a, v in zip(x["w"].ravel(), naive_v, strict=True)]
        x = server_step(x, combined, velocity, beta, eta)
        assert x["w"].dtype == np.float32
        np.testing.assert_allclose(velocity["w"].ravel(), naive_v, rtol=1e-12)
        np.testing.assert_allclose(x["w"].ravel(), naive_x, rtol=1e-6)


def test_no_momentum_and_step_one_is_the_aggregate_bit_for_bit():
    replies = _replies(3)
    combined = aggregate(replies, [1.0, 2.0, 3.0], "fedavg")
    velocity: dict = {}
    out = server_step(replies[0], combined, velocity, 0.0, 1.0)
    assert all(out[k] is combined[k] for k in combined) and not velocity
    # β = 0 with another step: x + η Δ, no memory of earlier rounds
    out = server_step(replies[0], combined, velocity, 0.0, 0.5)
    for key in combined:
        np.testing.assert_allclose(out[key], 0.5 * (replies[0][key] + combined[key]), rtol=1e-6)


def test_ema_is_the_moving_average_of_the_global_models_against_a_naive_loop():
    """w̄_1 = w_1, w̄_t = γ w̄_{t-1} + (1 − γ) w_t, in plain float64 Python; the cast back
    gives the global arrays' dtype, and the last model is not the average."""
    gamma = 0.5
    rng = np.random.default_rng(7)
    models = [{"w": rng.normal(size=(2, 3)).astype(np.float32),
               "b": rng.normal(size=(3,)).astype(np.float32)} for _ in range(5)]
    average: dict = {}
    naive = {k: [float(v) for v in models[0][k].ravel()] for k in models[0]}
    for t, model in enumerate(models):
        ema_step(average, model, gamma)
        if t:
            naive = {k: [gamma * a + (1 - gamma) * float(v)
                         for a, v in zip(naive[k], model[k].ravel(), strict=True)]
                     for k in model}
        for key in model:
            assert average[key].dtype == np.float64
            np.testing.assert_allclose(average[key].ravel(), naive[key], rtol=1e-12)
    cast = as_dtypes(average, models[-1])
    assert all(cast[k].dtype == np.float32 for k in cast)
    assert not np.allclose(cast["w"], models[-1]["w"])
    # the weights: round t counts (1 − γ) γ^(T−t), round 1 γ^(T−1); they sum to 1
    weights = [gamma ** 4] + [(1 - gamma) * gamma ** (4 - t) for t in range(1, 5)]
    np.testing.assert_allclose(average["w"], sum(w * m["w"].astype(np.float64)
                                                for w, m in zip(weights, models, strict=True)),
                               rtol=1e-12)


@pytest.mark.parametrize("key,value,match", [
    ("aggregation", "mean", "aggregation must be one of"),
    ("ema-decay", 1.0, "ema-decay must be in"),
    ("ema-decay", -0.1, "ema-decay must be in"),
    ("ema-decay", math.nan, "ema-decay"),
    ("ema-decay", math.inf, "ema-decay"),
    ("ema-decay", "0.5", "ema-decay"),
    ("trim-fraction", 0.5, "trim-fraction must be in"),
    ("server-momentum", 1.0, "server-momentum must be in"),
    ("server-momentum", -0.1, "server-momentum must be in"),
    ("server-momentum", math.nan, "server-momentum"),
    ("server-momentum", "0.9", "server-momentum"),
    ("server-learning-rate", 0.0, "server-learning-rate must be in"),
    ("server-learning-rate", -1.0, "server-learning-rate must be in"),
    ("server-learning-rate", 11.0, "server-learning-rate must be in"),
    ("server-learning-rate", math.inf, "server-learning-rate"),
    ("max-update-norm", 0.0, "max-update-norm must be in"),
    ("max-update-norm", 1e7, "max-update-norm must be in"),
    ("min-train-replies", 0, "min-train-replies must be in"),
    ("reply-timeout", 0.0, "reply-timeout must be in"),
    ("reply-timeout", 1e6, "reply-timeout must be in"),
])
def test_server_keys_are_bounded(key, value, match):
    with pytest.raises(ConfigError, match=match):
        FedMoEConfig.from_run_config({key: value})


@pytest.mark.parametrize("gamma, rounds, warned", [
    (0.99, 20, True), (0.97, 20, True), (0.96, 20, False), (0.5, 20, False), (0.0, 20, False),
    (0.75, 2, True), (0.5, 2, False), (0.93, 10, True),  # 0.5^(1/9) = 0.92587: "≤ 0.925"
    (0.999, 1, False),  # one round: w̄_1 = w_1 for any γ
])
def test_an_ema_decay_that_keeps_the_first_model_warns_with_the_largest_useful(gamma, rounds,
                                                                               warned):
    """Valid, and not refused, but the released model is still mostly w_1: γ^(T−1) > ½."""
    notes = FedMoEConfig(ema_decay=gamma, num_server_rounds=rounds).warnings()
    assert bool(notes) == warned == (rounds > 1 and gamma ** (rounds - 1) > 0.5)
    if warned:
        [note] = notes
        bound = math.floor(1000 * 0.5 ** (1 / (rounds - 1))) / 1000  # rounded down
        assert f"ema-decay={gamma:g}" in note and f"≤ {bound:.3f}" in note
        assert FedMoEConfig(ema_decay=bound, num_server_rounds=rounds).warnings() == []


def test_tmoe_warns_for_the_shorter_phase_the_average_restarts_in():
    config = FedMoEConfig(model="tmoe", ema_decay=0.95, num_server_rounds=30, pretrain_rounds=5)
    [note] = config.warnings()  # 0.95^4 = 0.81 in the 5 pretraining rounds
    assert "after 5 round(s)" in note and "81%" in note


def test_simulate_prints_the_config_warnings_before_it_starts(tmp_path, capsys):
    from simulations.runner import preflight

    preflight(FedMoEConfig(ema_decay=0.99, run_dir=str(tmp_path / "run")), 3)
    assert "fedmoe: warning: ema-decay=0.99" in capsys.readouterr().err


# ------------------------------------------------------------------ the fuzz
@pytest.fixture(scope="module")
def first_round(tmp_path_factory):
    """A strategy after configure_train of round 1 with 2 clients, and its messages."""
    config = SMALL.replace(max_update_norm=1000.0)
    book = LedgerBook(tmp_path_factory.mktemp("server") / LEDGER_FILE)
    strategy = FedMoE(config, book=book)
    arrays = to_arrays(split_state_dict(model_for(config)))
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), LocalGrid(2)))
    yield strategy, arrays, sent
    book.close()


BAD_KINDS = ("nan", "inf", "shape", "empty", "float64", "int8", "extra", "missing", "bytes",
             "negative", "zero-count", "huge-count", "huge-norm", "max-float", "zero-update",
             "zeroed", "metric-nan", "metric-missing", "no-arrays", "error", "steps")


def _message(sent, arrays, num_examples, steps, **metrics):
    report = TrainReport(num_examples=num_examples, epsilon=0.5, steps=steps).to_record()
    for key, value in metrics.items():
        if value is None:
            del report[key]
        else:
            report[key] = value
    content = RecordDict({METRICS: report})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=sent)


def _build(kind, sent, base, steps, declared, rng):
    """A reply of ``kind`` ("good" or one of BAD_KINDS); its arrays are the global ones
    moved by a small random update."""
    values = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in base.items()}
    key = sorted(values)[int(rng.integers(len(values)))]
    count, extra = int(rng.integers(1, declared + 1)), {}
    if kind == "error":
        return Message(Error(code=0, reason="ClientAppException: boom"), reply_to=sent), None
    if kind == "nan":
        values[key].flat[0] = np.nan
    elif kind == "inf":
        values[key].flat[-1] = -np.inf
    elif kind == "shape":
        values[key] = np.zeros((*values[key].shape, 2), np.float32)
    elif kind == "empty":
        values[key] = np.zeros((0,), np.float32)
    elif kind == "float64":
        values[key] = values[key].astype(np.float64)
    elif kind == "int8":
        values[key] = values[key].astype(np.int8)
    elif kind == "extra":
        values["moe.local_experts.0.fc1.bias"] = np.zeros(64, np.float32)
    elif kind == "missing":
        del values[key]
    elif kind == "negative":
        count = -int(rng.integers(1, 10**6))
    elif kind == "zero-count":
        count = 0
    elif kind == "huge-count":
        count = declared + int(rng.integers(1, 10**12))
    elif kind == "huge-norm":
        values[key] = values[key] + np.float32(1e4)
    elif kind == "max-float":
        values[key] = np.full(values[key].shape, np.finfo(np.float32).max, np.float32)
    elif kind == "zero-update":
        values = {k: v.copy() for k, v in base.items()}
    elif kind == "zeroed":
        values = {k: np.zeros_like(v) for k, v in base.items()}
    elif kind == "metric-nan":
        extra = {"epsilon": float("nan")}
    elif kind == "metric-missing":
        extra = {"num-examples": None}
    elif kind == "steps":
        steps += 1
    record = ArrayRecord({k: Array(v) for k, v in values.items()})
    if kind == "bytes":
        array = record[key]
        record[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                            data=array.data[:-3])
    if kind == "no-arrays":
        record = None
    return _message(sent, record, count, steps, **extra), (values if kind == "good" else None,
                                                           count)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(("good",) * 4 + BAD_KINDS), min_size=1, max_size=12),
       seed=st.integers(0, 2**32 - 1), method=st.sampled_from(("fedavg", "median",
                                                                "trimmed-mean")))
def test_fuzz_aggregate_never_raises_stays_finite_and_drops_exactly_the_bad(first_round, kinds,
                                                                           seed, method):
    strategy, arrays, sent = first_round
    strategy.config = strategy.config.replace(aggregation=method)
    rng = np.random.default_rng(seed)
    base = {k: a.numpy() for k, a in arrays.items()}
    steps = int(sent[0].content["config"]["steps"])
    server_round = len(strategy.history) + 1  # a fresh record each example
    strategy._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
    strategy._global, strategy._sent = base, {}
    replies, good = [], []
    for i, kind in enumerate(kinds):
        target = sent[i % len(sent)]
        declared = strategy.declared[strategy.clients[target.metadata.dst_node_id]].num_train
        msg, built = _build(kind, target, base, steps, declared, rng)
        replies.append(msg)
        if kind == "good":
            good.append(built)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    record = strategy.history[-1]
    bad = len(kinds) - len(good)
    assert record.failures["invalid"] + record.failures["error"] == bad, record.rejected
    assert len(record.rejected) == bad
    if not good:
        assert aggregated is None and not record.aggregated
        return
    assert aggregated is not None and record.aggregated
    stack = {k: np.stack([g[k].astype(np.float64) for g, _ in good]) for k in base}
    weights = np.array([c for _, c in good], dtype=np.float64)
    for key, value in aggregated.items():
        out = value.numpy()
        assert out.dtype == np.float32 and np.all(np.isfinite(out))
        if method == "fedavg":
            oracle = np.average(stack[key], axis=0, weights=weights)
        elif method == "median":
            oracle = np.median(stack[key], axis=0)
        else:
            oracle = scipy.stats.trim_mean(stack[key], strategy.config.trim_fraction, axis=0)
        np.testing.assert_allclose(out, oracle, rtol=1e-5, atol=1e-6)
