"""Bad input gets one clear error before anything starts (exit code 2, one line on stderr,
nothing written), for every kind of bad value: a property test over every numeric key,
and the real command line in a subprocess for each kind of fault."""

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe.cli import build_config, main as cli_main, parse_overrides
from fedmoe.config import (
    MAX_DP_STEPS,
    MAX_PARAMETERS,
    ConfigError,
    FedMoEConfig,
    parameter_count,
)
from simulations.runner import preflight

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = {f.name.replace("_", "-"): f.type for f in dataclasses.fields(FedMoEConfig)
           if f.type in ("int", "float")}

EXTREME_FLOATS = st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -1e308, 0.0, -0.0,
                                  1e-300, -1.0, 0.5, 1.0, 2.0, 1e6])
EXTREME_INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 64, 10**6, 10**9, 10**12, 2**63, -(2**63),
                                10**30])
VALUES = st.one_of(EXTREME_FLOATS, EXTREME_INTS, st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(min_value=-(10**20), max_value=10**20))


def _valid_invariants(config: FedMoEConfig) -> None:
    """What a config that passed validation guarantees to everything after it."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "float" and not (f.name == "target_epsilon" and value == math.inf):
            assert math.isfinite(value), f.name  # ε = ∞ is the non-private mode
    assert 1 <= config.num_server_rounds and config.learning_rate > 0
    assert parameter_count(config) <= MAX_PARAMETERS
    if not config.batch_size:
        steps = config.num_server_rounds * config.local_epochs * int(1 / config.sample_rate)
        assert steps <= MAX_DP_STEPS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(NUMERIC)), VALUES, min_size=1, max_size=3))
def test_numeric_values_are_refused_with_a_config_error_or_valid(overrides):
    """Finite, infinite, NaN, huge, negative, for every numeric key and in combination:
    ConfigError (the CLI's exit 2) or a config that keeps every invariant — never another
    exception."""
    try:
        config = FedMoEConfig.from_run_config(overrides)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    _valid_invariants(config)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({
    "dirichlet-alpha": st.one_of(st.floats(min_value=1e-3, max_value=1e3), EXTREME_FLOATS),
    "test-fraction": st.one_of(st.floats(min_value=0.01, max_value=0.99), EXTREME_FLOATS),
    "partitioner": st.sampled_from(["iid", "dirichlet"]),
    "batch-size": st.one_of(st.integers(0, 10**7), EXTREME_INTS),
    "seed": st.integers(0, 3),
}), st.integers(1, 400))
def test_pre_flight_refuses_with_a_config_error_or_passes(overrides, clients):
    """The cheap pre-flight (client count, data split, run folder) after a valid config:
    a ConfigError, or every client has a train and a test example."""
    try:
        config = FedMoEConfig.from_run_config(overrides)
    except ConfigError:
        return
    config = config.replace(run_dir=tempfile.mkdtemp(prefix="fedmoe-pre-"))
    try:
        checked = preflight(config, clients)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    from fedmoe.data import MIN_CLIENT_EXAMPLES, check_split

    sizes = check_split(checked, clients)
    assert len(sizes) == clients
    assert all(train >= 1 and test >= 1 and train + test >= MIN_CLIENT_EXAMPLES
               for train, test in sizes)


# ------------------------------------------------------------------ --run-config parsing
@pytest.mark.parametrize("text,named", [
    ("target-epsilon=", "'target-epsilon='"),
    ("learning-rate=0.5 oops", "'oops'"),
    ("learning-rate = 0.5", "'learning-rate' '=' '0.5'"),
    ("model=hmoe", "model='hmoe'"),
    ("seed=1 seed=2", "seed is given twice"),
])
def test_every_run_config_token_is_read_or_named(text, named):
    with pytest.raises(ConfigError) as err:
        parse_overrides([text])
    assert named in str(err.value)


FLOAT_KEYS = sorted(k for k, t in NUMERIC.items() if t == "float")


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("literal", ["1e400", "-2e308", "+1.8e309", "17976931348623159e292"])
def test_a_number_too_large_for_a_float_is_refused_not_read_as_infinity(key, literal):
    """Flower (and tomllib) read 1e400 as inf, which for target-epsilon means a
    non-private run: fedmoe refuses the literal, naming it, for every float key."""
    with pytest.raises(ConfigError, match=f"the number {literal.replace('+', '[+]')} is too "
                                          "large for a float"):
        parse_overrides([f"{key}={literal}"])


def test_infinity_spelt_out_and_the_largest_float_still_read():
    assert parse_overrides(["target-epsilon=inf"]) == {"target-epsilon": math.inf}
    assert parse_overrides(["target-epsilon=+inf"]) == {"target-epsilon": math.inf}
    assert parse_overrides(["max-grad-norm=1.7976931348623157e308"]) == {
        "max-grad-norm": 1.7976931348623157e308}


def test_a_run_config_file_or_grid_file_with_such_a_number_is_refused(tmp_path):
    from simulations.experiment import GridError, load_grid

    file = tmp_path / "eps.toml"
    file.write_text("learning-rate = 0.5\ntarget-epsilon = 1e400\n")
    with pytest.raises(ConfigError, match="eps.toml.*the number 1e400 is too large"):
        parse_overrides([str(file)])
    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\nnum-server-rounds = 2\n[grid]\ntarget-epsilon = [8.0, 1e400]\n")
    with pytest.raises(GridError, match="grid.toml: the number 1e400 is too large"):
        load_grid(grid)
    file.write_text("target-epsilon = inf\n")
    assert parse_overrides([str(file)]) == {"target-epsilon": math.inf}


@pytest.mark.parametrize("text", [
    "[tool.flwr.app.config]\nserver-momentum = 0.9\n",
    "learning-rate = 0.5\n[extra]\nseed = 3\n",
])
def test_a_run_config_file_with_a_table_header_says_to_drop_it(tmp_path, text):
    """A pyproject-style header would turn every key into 'tool.flwr.app.config.<key>',
    refused as unknown without saying why: the message names the table and the fix."""
    file = tmp_path / "rc.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=r"rc.toml.*table\(s\).*drop the table header"):
        parse_overrides([str(file)])


def test_pyproject_defaults_read_the_same_with_fedmoe_strict_numbers():
    import tomllib

    from fedmoe.config import loads_toml

    text = (ROOT / "pyproject.toml").read_text()
    assert loads_toml(text) == tomllib.loads(text)


def test_run_config_reads_quoted_strings_and_several_items():
    assert parse_overrides(["model='hmoe' run-dir=\"a b\"", "seed=3"]) == {
        "model": "hmoe", "run-dir": "a b", "seed": 3}


def test_rounds_flag_and_key_must_agree():
    args = lambda **kw: type("A", (), {"run_config": None, "rounds": None, "out": None} | kw)()  # noqa: E731
    assert build_config(args(run_config=["num-server-rounds=3"], rounds=3)).num_server_rounds == 3
    assert build_config(args(run_config=["num-server-rounds=3"])).num_server_rounds == 3
    with pytest.raises(ConfigError, match="--rounds 5 and num-server-rounds=3 in --run-config "
                                          "disagree"):
        build_config(args(run_config=["num-server-rounds=3"], rounds=5))
    with pytest.raises(ConfigError, match="--out b and run-dir='a'"):
        build_config(args(run_config=["run-dir='a'"], out="b"))


# ------------------------------------------------------------------ the run folder
def test_out_that_is_a_file_or_unwritable_is_refused_first(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for out, message in [(existing, "is a file, not a folder"),
                         (existing / "sub", f"its parent {existing} is a file"),
                         (Path("/proc/fedmoe-cannot-write"), "cannot write there")]:
        assert cli_main(["simulate", "--out", str(out), "--rounds", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert existing.read_text() == "keep me"


def test_a_failed_probe_leaves_no_folder_behind(tmp_path):
    from simulations.runner import check_run_dir

    check_run_dir(tmp_path / "new" / "run")  # creatable: created
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


# ------------------------------------------------------------------ the real command line
def fedmoe(*argv: str, timeout: float = 120) -> tuple[int, str, float]:
    """Run ``python -m fedmoe.cli`` with this worktree's code: (exit code, stderr, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedmoe.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    return done.returncode, done.stderr, time.monotonic() - start


CASES = [
    (["--run-config", "target-epsilon="], "cannot read 'target-epsilon='", None),
    (["--run-config", "learning-rate=0.5 oops"], "cannot read 'oops'", None),
    (["--rounds", "5", "--run-config", "num-server-rounds=3"], "disagree", None),
    (["--run-config", "model='moe' hidden-dim=1000000000"],
     "5.95e+11 parameters (2.38 TB as float32", None),
    (["--run-config", "min-available-clients=1000000000"],
     "min-available-clients must be in [1, 100,000]", None),
    (["--rounds", "1000000"], "num-server-rounds must be in [1, 10,000]", None),
    (["--run-config", "max-grad-norm=inf"], "max-grad-norm must be a finite number", None),
    (["--run-config", "top-k=5"], "exceeds the number of experts, 4", None),
    (["--clients", "30", "--run-config", "dirichlet-alpha=0.1"],
     "use a larger dirichlet-alpha", "afford"),
    (["--clients", "100"], "Dirichlet split of digits (1,797 examples) over 100 clients",
     "afford"),
    (["--clients", "1000", "--run-config", "partitioner='iid'"],
     "at most 179 clients fit", "alpha"),
    (["--clients", "10000"], "at most 179 clients fit", "afford"),
    (["--clients", "179", "--run-config", "partitioner='iid' test-fraction=0.95"],
     "test-fraction=0.95 leaves 179 client(s) with no training example", "alpha"),
    # a number too large for a float would read as inf: target-epsilon=inf is non-private
    (["--run-config", "target-epsilon=1e400"], "the number 1e400 is too large for a float",
     None),
    (["--run-config", "target-epsilon=-1e999"], "the number -1e999 is too large", None),
]


def _check_refusal(code: int, err: str, out: Path, message: str, absent: str | None) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmoe: error: "), err
    assert message in lines[0]
    if absent:
        assert absent not in lines[0]
    assert not out.exists()  # nothing started, nothing written


@pytest.mark.parametrize("argv,message,absent", CASES)
def test_cli_refuses_before_anything_starts(tmp_path, capsys, argv, message, absent):
    out = tmp_path / "run"
    code = cli_main(["simulate", "--out", str(out), *argv])
    _check_refusal(code, capsys.readouterr().err, out, message, absent)


#: One case per stage of the command line that can refuse (each message of every case is
#: checked in-process above; a subprocess costs seconds, so only the stages are repeated
#: there): reading --run-config, the config's own checks, the data-set preflight (cheap
#: and Dirichlet), and the shortcut flags against --run-config.
STAGES = {"parse": 1, "config": 3, "preflight": 11, "preflight-dirichlet": 9, "flags": 2}


def test_every_stage_that_refuses_has_a_command_line_case():
    """The subprocess cases keep covering each stage: parse errors, config checks (numeric
    bounds, model size), preflight of the data set, and flag/--run-config conflicts."""
    picked = {name: CASES[i] for name, i in STAGES.items()}
    assert "cannot read" in picked["parse"][1]
    assert "parameters" in picked["config"][1]
    assert "clients fit" in picked["preflight"][1]
    assert "Dirichlet split" in picked["preflight-dirichlet"][1]
    assert "disagree" in picked["flags"][1]


@pytest.mark.parametrize("argv,message,absent", [
    CASES[STAGES["parse"]], CASES[STAGES["config"]], CASES[STAGES["preflight"]],
    pytest.param(*CASES[STAGES["preflight-dirichlet"]], marks=pytest.mark.slow),
    pytest.param(*CASES[STAGES["flags"]], marks=pytest.mark.slow),
])
def test_real_command_line_refuses_before_anything_starts(tmp_path, argv, message, absent):
    out = tmp_path / "run"
    code, err, seconds = fedmoe("simulate", "--out", str(out), *argv)
    _check_refusal(code, err, out, message, absent)
    assert seconds < 60  # before Ray or any data set is started (a run takes longer)


def test_a_finished_run_folder_is_never_overwritten(tmp_path):
    """A second simulate into a folder with results.json is refused before anything starts,
    and the earlier results stay byte-identical."""
    from fedmoe.privacy import LEDGER_FILE, LedgerBook

    run = tmp_path / "run"
    run.mkdir()
    LedgerBook(run / LEDGER_FILE).close()  # the earlier run's (valid) ledger
    (run / "results.json").write_text('{"earlier": true}')
    with pytest.raises(ConfigError, match="holds the results of an earlier run"):
        preflight(FedMoEConfig(run_dir=str(run)), 3)
    assert (run / "results.json").read_text() == '{"earlier": true}'
