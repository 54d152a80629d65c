import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedmoe.cli import main as cli_main
from fedmoe.config import OWN_DEFAULTS, ConfigError, FedMoEConfig, NodeSettings

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_the_dataclass_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == {f.name.replace("_", "-"): f.default for f in dataclasses.fields(FedMoEConfig)}
    assert list(table) == FedMoEConfig.keys()
    # what a run records: the model's own values resolved (0 means "the model's own")
    assert FedMoEConfig.from_run_config(table) == FedMoEConfig()
    assert FedMoEConfig().to_run_config() == {**table, **{k.replace("_", "-"): v for k, (v, _)
                                                          in OWN_DEFAULTS.items()}}


@pytest.mark.parametrize("model", ["lmoe", "moe", "hmoe", "mtmoe", "tmoe"])
def test_zero_takes_the_models_own_settings(model):
    own = (0.25, 1) if model == "tmoe" else (0.5, 2)
    config = FedMoEConfig(model=model)
    assert (config.learning_rate, config.num_layers) == own
    assert isinstance(config.num_layers, int) and isinstance(config.learning_rate, float)
    given = FedMoEConfig(model=model, learning_rate=0.2, num_layers=3)
    assert (given.learning_rate, given.num_layers) == (0.2, 3)
    # another model through replace(): what was the model's own becomes the new model's own,
    # what was given stays
    other = "tmoe" if model != "tmoe" else "moe"
    moved = FedMoEConfig(model=model, learning_rate=0.2).replace(model=other)
    assert moved.learning_rate == 0.2
    assert moved.num_layers == FedMoEConfig(model=other).num_layers
    assert FedMoEConfig.from_run_config(config.to_run_config()) == config


@pytest.mark.parametrize("key", ["learning-rate", "num-layers"])
def test_negative_own_settings_are_refused(key):
    with pytest.raises(ConfigError, match=f"{key} must be in"):
        FedMoEConfig.from_run_config({key: -1})


def test_round_trip_and_int_to_float():
    cfg = FedMoEConfig.from_run_config({"learning-rate": 1, "num-server-rounds": 3})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert FedMoEConfig.from_run_config(cfg.to_run_config()) == cfg


def test_unknown_key_is_named_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['learning_rate'\].*learning-rate"):
        FedMoEConfig.from_run_config({"learning_rate": 0.1})


@pytest.mark.parametrize("key,value,message", [
    ("sample-rate", 1.5, "sample-rate must be in"),
    ("target-epsilon", -1.0, "target-epsilon must be"),
    ("top-k", 5, r"model 'lmoe': LMoEConfig: top-k=5 exceeds the number of experts, 4 \(2 "
                 r"shared \+ 2 local\)"),
    ("model", "gpt", "model must be one of"),
    ("gate", "mlp", "gate must be one of"),
    ("dataset", "pystdlib", "model 'lmoe' trains on dataset 'digits'.*; got dataset='pystdlib'$"),
    ("group-top-k", 4, None),
    ("target-delta", 1.0, "target-delta must be in"),
    ("noise-multiplier", -0.5, "noise-multiplier must be finite and >= 0"),
    ("batch-size", -1, r"batch-size must be in \[0, 1,000,000\]"),
    ("accountant", "moments", "accountant must be one of"),
    ("num-server-rounds", 0, r"num-server-rounds must be in \[1, 10,000\]"),
    ("local-pull", 1.5, "local-pull must be in \\[0, 1\\]"),
])
def test_out_of_range_values_are_explained(key, value, message):
    if message is None:  # group-top-k only matters to hmoe: another model ignores it
        FedMoEConfig.from_run_config({key: value})
        with pytest.raises(ConfigError, match="group-top-k exceeds the 3 groups"):
            FedMoEConfig.from_run_config({key: value, "model": "hmoe"})
        return
    with pytest.raises(ConfigError, match=message):
        FedMoEConfig.from_run_config({key: value})


def test_a_message_about_another_key_quotes_the_value_given_for_the_wrong_one():
    """The model is not wrong here, the dataset is: the message must not end "got 'tmoe'"."""
    with pytest.raises(ConfigError, match=r"trains on dataset 'pystdlib' .*; got "
                                          r"dataset='node'$") as err:
        FedMoEConfig.from_run_config({"dataset": "node", "num-features": 30,
                                      "num-classes": 2, "model": "tmoe"})
    assert "got 'tmoe'" not in str(err.value)


@pytest.mark.parametrize("key,value", [("num-server-rounds", "ten"), ("local-epochs", 1.5),
                                       ("seed", True), ("model", 3)])
def test_wrong_types_are_explained(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be of type"):
        FedMoEConfig.from_run_config({key: value})


def test_node_settings():
    node = NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 5, "other": "x"})
    assert node.budget(8.0) == 8.0
    assert NodeSettings(0, 1, epsilon_budget=3.0).budget(8.0) == 3.0
    with pytest.raises(ConfigError, match="partition-id must be in"):
        NodeSettings.from_node_config({"partition-id": 5, "num-partitions": 5})
    with pytest.raises(ConfigError, match="--node-config"):
        NodeSettings.from_node_config({})
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="epsilon-budget must be finite"):
            NodeSettings(0, 1, epsilon_budget=bad)


@pytest.mark.parametrize("argv,message", [
    (["--run-config", "bogus-key=1"], "unknown run-config key"),
    (["--run-config", "sample-rate=2.0"], "sample-rate must be in"),
    (["--rounds", "0"], "num-server-rounds must be in [1, 10,000]"),
    (["--clients", "2", "--run-config", "min-available-clients=3"], "would wait forever"),
    (["--clients", "99", "--run-config", "model='tmoe'"], "one client per standard-library"),
    (["--run-config", "model='tmoe' dataset='digits'"], "model 'tmoe' trains on dataset"),
])
def test_cli_rejects_bad_config_before_starting(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["simulate", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing started, nothing written


# ---------------------------------------------------------------- bounds on every key
import dataclasses
import math
import re

from fedmoe.config import MAX_PARAMETERS, parameter_count
from fedmoe.models import build_model, run_overrides

FLOAT_KEYS = [f.name.replace("_", "-") for f in dataclasses.fields(FedMoEConfig) if f.type == "float"]
INT_KEYS = [f.name.replace("_", "-") for f in dataclasses.fields(FedMoEConfig) if f.type == "int"]


def test_the_key_lists_cover_the_numeric_keys():
    assert {"max-grad-norm", "learning-rate", "dirichlet-alpha", "balance-coef"} <= set(FLOAT_KEYS)
    assert {"hidden-dim", "num-server-rounds", "min-available-clients", "seed"} <= set(INT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_key_refuses_non_finite_values(key, value):
    if key == "target-epsilon" and value == math.inf:  # the one allowed: a non-private run
        assert not FedMoEConfig.from_run_config({key: value}).private
        return
    with pytest.raises(ConfigError, match=f"{key} must be a finite number") as err:
        FedMoEConfig.from_run_config({key: value})
    # the message gives the fix: the key's valid range, as its range check words it
    assert re.search(rf"{key} must be a finite number (in|>|<|at)[^,]*[\])0-9]", str(err.value)), \
        str(err.value)


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_key_has_an_upper_bound(key):
    with pytest.raises(ConfigError, match=key):
        FedMoEConfig.from_run_config({key: 10**12})


@pytest.mark.parametrize("key", [k for k in FLOAT_KEYS if k not in ("local-pull", "test-fraction",
                                                                     "fraction-train",
                                                                     "fraction-evaluate",
                                                                     "sample-rate",
                                                                     "target-delta")])
def test_every_unit_free_float_key_has_an_upper_bound(key):
    with pytest.raises(ConfigError, match=key):
        FedMoEConfig.from_run_config({key: 1e300})


def moe_parameters(h: int) -> int:
    """The default ``moe`` by hand: trunk 64→H, head H→10, linear router H→4, four experts
    H→64→H (each layer weights + bias), the score scale (one)."""
    trunk, head, router = 64 * h + h, h * 10 + 10, h * 4 + 4
    expert = h * 64 + 64 + 64 * h + h
    return trunk + head + router + 4 * expert + 1


@pytest.mark.parametrize("model", ["moe", "lmoe", "hmoe", "mtmoe", "tmoe"])
def test_parameter_count_is_the_built_models(model):
    config = FedMoEConfig(model=model, hidden_dim=32, num_heads=2)
    built = build_model(config.model, **run_overrides(config))
    assert parameter_count(config) == sum(p.numel() for p in built.parameters())


def test_model_too_large_is_refused_with_its_size_without_building_it():
    assert parameter_count(FedMoEConfig(model="moe")) == moe_parameters(64) == 38_351
    h = 1_000_000_000
    count = moe_parameters(h)
    with pytest.raises(ConfigError) as err:
        FedMoEConfig(model="moe", hidden_dim=h)
    message = str(err.value)
    assert f"{count:.2e} parameters" in message and "hidden-dim=1,000,000,000" in message
    assert f"{4 * count / 1e12:.3g} TB" in message  # float32 bytes
    assert f"{MAX_PARAMETERS:.2e}" in message
    # the largest hidden-dim under the cap is accepted, the next one refused
    largest = (MAX_PARAMETERS - 270) // 595
    FedMoEConfig(model="moe", hidden_dim=largest)
    with pytest.raises(ConfigError, match="parameters"):
        FedMoEConfig(model="moe", hidden_dim=largest + 1)


@pytest.mark.parametrize("overrides,message", [
    ({"top-k": 5}, r"top-k=5 exceeds the number of experts, 4 \(2 shared \+ 2 local\)"),
    ({"top-k": 4, "num-local-experts": 0}, r"top-k=4 exceeds the number of experts, 2 \(2 shared"),
    ({"model": "mtmoe", "top-k": 7}, r"top-k=7 exceeds the number of experts, 4"),
    ({"model": "tmoe", "top-k": 6}, r"top-k=6 exceeds the number of routed experts, 4"),
    ({"model": "hmoe", "top-k": 3}, r"top-k=3 exceeds the experts of a group: 2 per shared group"),
])
def test_top_k_error_says_how_many_experts_there_are(overrides, message):
    with pytest.raises(ConfigError, match=message):
        FedMoEConfig.from_run_config(overrides)


def test_rounds_that_cannot_finish_are_refused_with_the_step_count():
    with pytest.raises(ConfigError, match=r"num-server-rounds must be in \[1, 10,000\]"):
        FedMoEConfig(num_server_rounds=1_000_000)
    # 10,000 rounds × 200 epochs × 10 steps = 20,000,000 DP steps
    with pytest.raises(ConfigError, match="20,000,000 DP-SGD steps per client"):
        FedMoEConfig(num_server_rounds=10_000, local_epochs=200)
    FedMoEConfig(num_server_rounds=10_000)  # 100,000 steps: allowed
