import tomllib
from pathlib import Path

import pytest

from fedmoe.cli import main as cli_main
from fedmoe.config import ConfigError, FedMoEConfig, NodeSettings

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_the_dataclass_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == FedMoEConfig().to_run_config()
    assert list(table) == FedMoEConfig.keys()


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
    ("top-k", 5, r"model 'moe': MoEConfig: top-k=5 exceeds the number of experts, 4 \(2 shared "
                 r"\+ 2 local\)"),
    ("model", "gpt", "model must be one of"),
    ("gate", "mlp", "gate must be one of"),
    ("dataset", "pystdlib", "model 'moe' trains on dataset 'digits'"),
    ("group-top-k", 4, None),
    ("target-delta", 1.0, "target-delta must be in"),
    ("noise-multiplier", -0.5, "noise-multiplier must be finite and >= 0"),
    ("batch-size", -1, "batch-size must be >= 0"),
    ("accountant", "moments", "accountant must be one of"),
    ("num-server-rounds", 0, "num-server-rounds must be >= 1"),
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


@pytest.mark.parametrize("argv,message", [
    (["--run-config", "bogus-key=1"], "unknown run-config key"),
    (["--run-config", "sample-rate=2.0"], "sample-rate must be in"),
    (["--rounds", "0"], "num-server-rounds must be >= 1"),
    (["--clients", "2", "--run-config", "min-available-clients=3"], "would wait forever"),
    (["--clients", "99", "--run-config", "model='tmoe'"], "one client per standard-library"),
    (["--run-config", "model='tmoe' dataset='digits'"], "model 'tmoe' trains on dataset"),
])
def test_cli_rejects_bad_config_before_starting(argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["simulate", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing started, nothing written
