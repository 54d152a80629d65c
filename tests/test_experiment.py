"""fedmoe experiment: a tiny grid end to end, resuming, and malformed grid files."""

import dataclasses
import json
import math
import os
import textwrap
import warnings

import numpy as np
import pytest

from fedmoe.cli import main
from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.methods import result_keys
from simulations.experiment import CSV, REPORT, ROW, GridError, load_grid, parse_grid, read_csv
from simulations.report import ACCURACY_PLOT, ROUNDS_PLOT, SPREAD_PLOT, mean_std, report_markdown

TINY = """
[experiment]
clients = 3
seeds = [1]

[base]
num-server-rounds = 1

[grid]
method = ["fedavg", "local"]
target-epsilon = [8.0]
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_tiny_grid_runs_end_to_end_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["experiment", str(tiny), "--out", str(out)]) == 0
    rows = read_csv(out / CSV)
    assert [r["method"] for r in rows] == ["fedavg", "local"]
    for row in rows:
        assert row["seed"] == "1" and row["clients"] == "3" and row["num-server-rounds"] == "1"
        assert 0 <= float(row["personalized_accuracy"]) <= 1
        assert float(row["personalized_accuracy_worst_decile"]) <= float(row["personalized_accuracy"])
        assert 0 < float(row["epsilon_max"]) <= 8.0
        assert len(json.loads(row["epsilon_per_client"])) == 3
        assert row["privacy"] == "dp" and row["rounds"] == "1"
    fedavg, local = rows
    assert float(local["upload_bytes_per_client_round"]) == 0  # nothing leaves the client
    assert float(fedavg["upload_bytes_per_client_round"]) > 4 * 4810
    assert local["global_accuracy"] == ""  # no global model to score
    report = (out / REPORT).read_text()
    assert "| fedavg |" in report and "| local |" in report and "ε=8" in report
    for plot in (ACCURACY_PLOT, ROUNDS_PLOT, SPREAD_PLOT):
        assert (out / plot).stat().st_size > 1000
    assert "[2/2]" in capsys.readouterr().err

    # re-running skips both finished runs; an interrupted run (no row.json) is redone
    runs = sorted((out / "runs").iterdir())
    marks = {p.name: (p / ROW).stat().st_mtime_ns for p in runs}
    os.remove(runs[1] / ROW)
    (runs[1] / "leftover").write_text("from the killed run")
    assert main(["experiment", str(tiny), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 already finished, 1 to run" in err
    assert (runs[0] / ROW).stat().st_mtime_ns == marks[runs[0].name]
    assert (runs[1] / ROW).is_file() and not (runs[1] / "leftover").exists()
    assert len(read_csv(out / CSV)) == 2


@pytest.mark.parametrize("body, names", [
    ("[grid]\nmethod = ['fedavg', 'fedprox']", ["method must be one of", "method=fedprox"]),
    ("[grid]\nlearning-rat = [0.1]", ["unknown run-config key 'learning-rat'", "[grid]"]),
    ("[base]\nlearning-rate = 'fast'", ["learning-rate must be of type float"]),
    ("[base]\nseed = 3", ["'seed'", "seeds"]),
    ("[experiment]\nseeds = []", ["seeds must be a non-empty list"]),
    ("[experiment]\nclient = 3", ["unknown key(s) ['client']"]),
    ("[experiment]\nengine = 'ray'", ["engine must be one of"]),
    ("[grid]\ntarget-epsilon = 8.0", ["[grid] target-epsilon must be a non-empty list"]),
    ("[grid]\nsplit = [{partitioner = 'iid'}]", ["[grid] split[0] needs a name"]),
    ("[base]\nlearning-rate = 0.1\n[grid]\nlearning-rate = [0.2]",
     ["'learning-rate' is set in both [base] and [grid] learning-rate"]),
    ("[grid]\nmethod = ['fedavg']\n[method.fedavg]\nmethod = 'local'", ["'method'"]),
    ("[method.fedprox]\nlearning-rate = 0.1", ["[method.fedprox]: unknown method"]),
    ("[grids]\nmethod = ['local']", ["unknown table(s) ['grids']"]),
    ("[grid]\nmethod = ['local', 'local']", ["same run config"]),
    ("[experiment]\nclients = 3\n[base]\nmin-available-clients = 4",
     ["min-available-clients=4 exceeds [experiment] clients = 3"]),
    ("[grid\nmethod = 1", ["not valid TOML"]),
])
def test_malformed_grid_is_one_clear_error_naming_the_key(tmp_path, capsys, body, names):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(body))
    with pytest.raises(GridError) as err:
        load_grid(path)
    for name in names:
        assert name in str(err.value)
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("fedmoe: error:") and names[0] in message
    assert not out.exists()  # nothing started


def test_bundles_method_tables_and_seeds_expand_to_runs():
    grid = parse_grid({
        "experiment": {"seeds": [1, 2]},
        "grid": {"method": ["fedavg", "fedmoe"], "target-epsilon": [math.inf, 3.0],
                 "split": [{"name": "iid", "partitioner": "iid"},
                           {"name": "dir-0.1", "partitioner": "dirichlet",
                            "dirichlet-alpha": 0.1}]},
        "method": {"fedavg": {"learning-rate": 1.0, "mlp-width": 128}},
    })
    assert len(grid.runs) == 2 * 2 * 2 * 2
    fedavg = [r.config for r in grid.runs if r.config.method == "fedavg"]
    assert {(c.learning_rate, c.mlp_width) for c in fedavg} == {(1.0, 128)}
    assert {r.config.learning_rate for r in grid.runs if r.config.method == "fedmoe"} == {0.5}
    assert {(r.config.partitioner, r.config.dirichlet_alpha) for r in grid.runs} == {
        ("iid", 0.5), ("dirichlet", 0.1)}
    assert {r.config.seed for r in grid.runs} == {1, 2}
    assert len({r.run_id for r in grid.runs}) == len(grid.runs)


def test_report_mean_and_std_over_seeds():
    rows = [{"method": "fedavg", "target-epsilon": 8.0, "personalized_accuracy": v,
             "axis:split": "iid"} for v in (0.8, 0.9, 1.0)]
    rows.append({"method": "fedavg", "target-epsilon": math.inf, "personalized_accuracy": 0.95,
                 "axis:split": "iid"})
    assert mean_std([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    report = report_markdown(rows, ["method", "target-epsilon", "split"])
    assert "## split=iid" in report
    assert "| method | ε=∞ (non-private) | ε=8 |" in report
    assert "| fedavg | 0.950 ± 0.000 (n=1) | 0.900 ± 0.100 (n=3) |" in report


def test_plots_of_a_partial_grid_draw_empty_panels_without_a_matplotlib_warning(tmp_path):
    """A grid's report is rewritten after every run: while setting "iid" has only its
    ε = 3 run, its ε = 8 panel (the one that carries the legend) has no line."""
    from simulations.report import plot_all

    def row(split, eps, acc):
        return {"method": "fedmoe", "target-epsilon": eps, "axis:split": split,
                "personalized_accuracy": acc, "round_accuracy": json.dumps([acc / 2, acc]),
                "client_accuracy": json.dumps([acc - 0.1, acc + 0.1])}

    rows = [row("dirichlet-0.5", 8.0, 0.9), row("iid", 3.0, 0.8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_all(rows, ["method", "target-epsilon", "split"], tmp_path)
    for plot in (ACCURACY_PLOT, ROUNDS_PLOT, SPREAD_PLOT):
        assert (tmp_path / plot).stat().st_size > 1000


def test_inline_grid_turns_a_client_exception_into_an_error_reply(tmp_path):
    from flwr.app import Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp

    from simulations.inline import FIRST_NODE_ID, InlineGrid

    broken = ClientApp()

    @broken.train()
    def train(msg, context):
        raise RuntimeError(f"partition {context.node_config['partition-id']} is on fire")

    grid = InlineGrid(2, tmp_path, client_app=broken)
    assert grid.get_node_ids() == [FIRST_NODE_ID, FIRST_NODE_ID + 1]
    msg = Message(RecordDict(), dst_node_id=FIRST_NODE_ID + 1, message_type=MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "partition 1 is on fire" in reply.error.reason
    assert grid.time.messages == {MessageType.TRAIN: 1}
    assert grid.contexts[FIRST_NODE_ID + 1].node_config["state-dir"] == str(tmp_path / "partition-1")


@pytest.mark.slow
def test_worker_processes_and_flower_engine_give_the_same_rows(tiny, tmp_path):
    """--jobs 2 (spawned workers) and engine = "flower" (Ray) give the same row for the
    same run. The Ray grid holds one of the two runs (fedavg): each Ray run starts Ray
    anew (~40 s on a busy machine), and the engine, not the method, is what differs."""
    assert main(["experiment", str(tiny), "--out", str(tmp_path / "jobs"), "--jobs", "2"]) == 0
    flower = tmp_path / "flower.toml"
    flower.write_text(TINY.replace("clients = 3", "clients = 3\nengine = \"flower\"")
                      .replace('method = ["fedavg", "local"]', 'method = ["fedavg"]'))
    assert main(["experiment", str(flower), "--out", str(tmp_path / "ray")]) == 0
    jobs, ray = read_csv(tmp_path / "jobs" / CSV), read_csv(tmp_path / "ray" / CSV)
    assert [r["method"] for r in jobs] == ["fedavg", "local"]  # both workers ran one each
    assert [r["method"] for r in ray] == ["fedavg"]
    jobs = [r for r in jobs if r["method"] == "fedavg"]
    assert [r["run"] for r in jobs] == [r["run"] for r in ray]  # same config, same id
    for a, b in zip(jobs, ray, strict=True):
        assert a["upload_bytes_per_client_round"] == b["upload_bytes_per_client_round"]
        assert a["epsilon_per_client"] == b["epsilon_per_client"]  # same plans, same ledgers
        assert b["client_seconds"] == ""  # not visible through Ray


def test_a_failing_run_does_not_end_the_grid(tiny, tmp_path, monkeypatch, capsys):
    import simulations.experiment as experiment

    real = experiment.run_one

    def flaky(run, run_dir, engine="inline", threads=1, seeded_noise=False):
        if run.config.method == "fedavg":
            raise RuntimeError("partition exploded")
        return real(run, run_dir, engine, threads, seeded_noise)

    monkeypatch.setattr(experiment, "run_one", flaky)
    out = tmp_path / "out"
    assert main(["experiment", str(tiny), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed" in err and "method=fedavg" in err and "partition exploded" in err
    assert [r["method"] for r in read_csv(out / CSV)] == ["local"]  # the other run is kept
    monkeypatch.setattr(experiment, "run_one", real)
    assert main(["experiment", str(tiny), "--out", str(out)]) == 0  # retried, local skipped
    assert "1 already finished, 1 to run" in capsys.readouterr().err


def test_a_variant_axis_labels_the_rows_instead_of_the_method():
    from simulations.report import report_markdown

    rows = [{"method": m, "axis:variant": v, "target-epsilon": "8.0",
             "personalized_accuracy": str(a)}
            for m, v, a in [("fedavg", "fedavg-linear", 0.9), ("fedavg", "fedavg-mlp", 0.8),
                            ("fedmoe", "fedmoe", 0.95)]]
    text = report_markdown(rows, ["target-epsilon", "variant"])
    assert "## all runs" in text and "variant=" not in text  # one setting, not three
    table = text.split("**Mean personalised accuracy", 1)[1]
    assert "| fedavg-linear | 0.900" in table and "| fedavg-mlp | 0.800" in table
    # the registry's names first (fedmoe), then other variants in order of appearance
    assert table.index("| fedmoe |") < table.index("| fedavg-linear") < table.index("| fedavg-mlp")


@pytest.mark.slow
def test_killing_the_grid_process_leaves_no_worker_running(tmp_path):
    """SIGKILL of `fedmoe experiment --jobs 2` (no handler can run): its workers notice the
    parent is gone and exit; the runs in progress have no row.json and are redone later."""
    import signal
    import subprocess
    import sys
    import time

    grid = tmp_path / "slow.toml"
    grid.write_text(TINY.replace("num-server-rounds = 1", "num-server-rounds = 50"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.cli", "experiment", str(grid),
                             "--out", str(out), "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[1]) == proc.pid and "spawn_main" in open(
                        f"/proc/{entry}/cmdline").read().replace("\0", " "):
                    found.append(int(entry))
        return found

    try:
        deadline = time.time() + 300  # spawning two torch workers is slow on a busy machine
        while len(workers := children()) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(workers) == 2, "the grid never started its two workers"
        while len(list(out.glob("runs/*"))) < 2 and time.time() < deadline:
            time.sleep(0.5)  # both workers are inside a run
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 300
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and
                                         open(f"/proc/{w}/stat").read().rsplit(")", 1)[1]
                                         .split()[0] != "Z" for w in workers):
        time.sleep(0.5)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")
             and open(f"/proc/{w}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    for w in alive:  # never leave them behind, even when the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive, f"orphaned grid workers still running: {alive}"
    assert not list(out.glob(f"runs/*/{ROW}"))


def test_report_names_the_split_the_accuracies_were_scored_on():
    from simulations.report import scored_on, summary_table
    row = {"method": "fedavg", "target-epsilon": "8.0", "seed": "1",
           "personalized_accuracy": "0.5"}
    validation = [dict(row, **{"evaluate-on": "validation"})]
    assert "validation split" in report_markdown(validation, ["method"])
    assert "validation split" in summary_table(validation, ["method"])
    assert "test split" in report_markdown([dict(row, **{"evaluate-on": "test"})], ["method"])
    assert "see the evaluate-on column" in scored_on(
        [dict(row, **{"evaluate-on": "test"}), *validation])


def test_results_page_keeps_its_text_outside_the_report_markers(tmp_path):
    from simulations.experiment import write_csv
    from simulations.report import REPORT_BEGIN, REPORT_END
    from simulations.report import main as report_main
    rows = [{"axis:method": m, "method": m, "target-epsilon": 8.0, "seed": s,
             "personalized_accuracy": a, "evaluate-on": "test", "round_accuracy": "[]",
             "client_accuracy": "[]"}
            for m, s, a in [("fedavg", 1, 0.5), ("fedavg", 2, 0.7), ("local", 1, 0.4)]]
    write_csv(tmp_path / CSV, rows)
    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\nHow we chose.\n\n{REPORT_BEGIN}\nold\n{REPORT_END}\n\nEnd.\n")
    assert report_main([str(tmp_path), "--results-md", str(page), "--command", "CMD"]) == 0
    text = page.read_text()
    assert text.startswith("# Results\n\nHow we chose.") and text.endswith("End.\n")
    assert "old" not in text and "Produced by `CMD`" in text
    assert "0.600 ± 0.141 (n=2)" in text  # fedavg at ε=8: mean, sample std of 0.5, 0.7


def test_inline_runs_repeat_exactly_with_seeded_noise_and_not_without(tiny, tmp_path):
    """A finished grid run again into another folder gives the same rows: its DP noise
    comes from seeds derived from each run's id (fedmoe.privacy.dp.simulation_noise)."""
    import json

    from simulations.experiment import run_grid

    def norms(out, grid):  # every client's update norm in every round, per run
        return [[c["update_norm"] for r in json.loads(
                    (out / "runs" / run.run_id / "results.json").read_text())["rounds"]
                 for c in r["clients"]] for run in grid.runs]

    grid = load_grid(tiny)
    assert grid.seeded_noise  # the default for the inline engine
    first, again = run_grid(grid, tmp_path / "a"), run_grid(grid, tmp_path / "b")
    keys = ("personalized_accuracy", "global_accuracy", "client_accuracy")
    assert [{k: r[k] for k in keys} for r in first] == [{k: r[k] for k in keys} for r in again]
    assert norms(tmp_path / "a", grid) == norms(tmp_path / "b", grid)
    unseeded = parse_grid({**grid.source, "experiment": {**grid.source["experiment"],
                                                        "seeded-noise": False}})
    run_grid(unseeded, tmp_path / "c")
    trained = [n for n in norms(tmp_path / "c", unseeded)[0] if n is not None]
    assert trained and trained != [n for n in norms(tmp_path / "a", grid)[0] if n is not None]


def test_seeded_noise_needs_the_inline_engine():
    raw = {"experiment": {"engine": "flower", "seeded-noise": True},
           "grid": {"method": ["fedavg"]}}
    with pytest.raises(GridError, match="seeded-noise = true needs engine"):
        parse_grid(raw)
    assert not parse_grid({**raw, "experiment": {"engine": "flower"}}).seeded_noise


def test_a_baseline_run_does_not_depend_on_the_keys_only_fedmoe_models_read(tmp_path):
    """Every key of fedmoe.methods.MOE_MODEL_KEYS changed at once: a baseline's run id and
    its whole result (accuracies, every client's update norm, ε) stay the same, so its
    finished runs stay valid when a fedmoe default changes; fedmoe's own id changes."""
    from fedmoe.methods import MOE_MODEL_KEYS
    from simulations.experiment import run_grid

    changed = {"gate": "attention", "dispatch": "sparse", "hidden-dim": 32,
               "expert-hidden-dim": 8, "num-shared-experts": 3, "num-local-experts": 1,
               "top-k": 1, "balance-coef": 0.1, "z-loss-coef": 0.01, "local-pull": 0.5,
               "expert-noise-limit": 1.0, "num-groups": 3, "group-top-k": 2,
               "expert-depth": 1, "num-layers": 2, "num-heads": 2,
               "num-always-on-experts": 0, "label-prior-share": 0.1,
               "label-prior-shrinkage": "none", "score-scale": False,
               "unigram-prior": False}
    assert set(changed) == MOE_MODEL_KEYS
    source = {"experiment": {"clients": 3, "seeds": [1]},
              "base": {"num-server-rounds": 2, "partitioner": "dirichlet"},
              "grid": {"method": ["fedavg", "fedper", "local"], "target-epsilon": [8.0]}}
    plain = parse_grid(source)
    other = parse_grid({**source, "base": {**source["base"], **changed}})
    assert [r.run_id for r in plain.runs] == [r.run_id for r in other.runs]
    assert other.runs[0].config.gate == "attention" and not other.runs[0].config.score_scale
    keys = ("personalized_accuracy", "global_accuracy", "client_accuracy", "epsilon_per_client")
    rows = [[{k: r[k] for k in keys} for r in run_grid(g, tmp_path / name)]
            for g, name in ((plain, "plain"), (other, "other"))]
    assert rows[0] == rows[1]
    norms = [[json.loads((tmp_path / name / "runs" / run.run_id / "results.json").read_text())
              ["rounds"] for run in g.runs] for g, name in ((plain, "plain"), (other, "other"))]
    assert [[[c.get("update_norm") for c in r["clients"]] for r in run] for run in norms[0]] \
        == [[[c.get("update_norm") for c in r["clients"]] for r in run] for run in norms[1]]
    fedmoe = parse_grid({**source, "grid": {"method": ["fedmoe"], "target-epsilon": [8.0]}})
    fedmoe_other = parse_grid({**source, "base": {**source["base"], "score-scale": False},
                               "grid": {"method": ["fedmoe"], "target-epsilon": [8.0]}})
    assert fedmoe.runs[0].run_id != fedmoe_other.runs[0].run_id


def test_a_baseline_crossed_with_a_fedmoe_only_axis_runs_once_and_reports_every_cell(tmp_path):
    """method × score-scale: fedmoe runs twice, the baseline once (its two cells are one run
    config for it), and the CSV has all four cells, each under its own labels."""
    from simulations.experiment import run_grid

    grid = parse_grid({"experiment": {"clients": 3, "seeds": [1]},
                       "base": {"num-server-rounds": 1},
                       "grid": {"method": ["fedmoe", "fedavg"], "score-scale": [False, True]}})
    assert len({r.run_id for r in grid.runs}) == 3
    rows = run_grid(grid, tmp_path / "out")
    assert [(r["axis:method"], r["axis:score-scale"]) for r in rows] == [
        ("fedmoe", "false"), ("fedmoe", "true"), ("fedavg", "false"), ("fedavg", "true")]
    assert [r["score-scale"] for r in rows] == [False, True, False, True]
    assert rows[2]["personalized_accuracy"] == rows[3]["personalized_accuracy"]
    assert rows[2]["run"] == rows[3]["run"] != rows[0]["run"]
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 3
    assert len(read_csv(tmp_path / "out" / CSV)) == 4
    with pytest.raises(GridError, match="same run config"):
        parse_grid({"experiment": {"clients": 3, "seeds": [1]},
                    "grid": {"method": ["fedavg"], "score-scale": [True, True]}})


def test_keys_added_later_leave_the_ids_of_runs_recorded_before_as_they_were():
    """A key of fedmoe.methods.ID_NEUTRAL_KEYS at its "as before" value is not part of a
    run's id (the grid seeds its noise from the id: a recorded grid repeats exactly), and
    a key only tmoe reads is no part of another model's id."""
    from fedmoe.methods import ID_NEUTRAL_KEYS, result_keys

    before = {"ema_decay": 0.0, "feature_centring": False}  # today's non-neutral defaults
    keys = result_keys(FedMoEConfig(**before))
    assert not set(ID_NEUTRAL_KEYS) & set(keys)
    assert result_keys(FedMoEConfig(**before, unigram_prior=False)) == keys  # lmoe
    assert result_keys(FedMoEConfig()) == {**keys, "ema-decay": 0.5,  # today's defaults
                                           "feature-centring": True, "centring-fold": True}
    moving = result_keys(FedMoEConfig(**before, server_momentum=0.9,
                                      server_learning_rate=0.5))
    assert moving == {**keys, "server-momentum": 0.9, "server-learning-rate": 0.5}
    scaled = result_keys(FedMoEConfig(**before, dataset="csv:/x.csv",
                                      feature_bounds="0:255"))
    assert scaled["feature-bounds"] == "0:255"  # a run with bounds is another run
    text = result_keys(FedMoEConfig(model="tmoe"))
    assert text["unigram-prior"] is True
    assert "unigram-prior" not in result_keys(FedMoEConfig(model="tmoe", unigram_prior=False))
    for model in ("tmoe", "moe", "hmoe", "mtmoe"):  # lmoe's key: in no other model's id
        assert "feature-centring" not in result_keys(FedMoEConfig(model=model))
    assert "mlp-centring" not in result_keys(FedMoEConfig(mlp_centring=False))  # fedmoe's
    for method in ("fedavg", "fedper", "local"):  # the baselines read both (and centre)
        centred = result_keys(FedMoEConfig(method=method))
        assert centred["feature-centring"] is True and "mlp-centring" not in centred
        # either switch off: one run, the id of a baseline recorded before either key
        plain = [result_keys(FedMoEConfig(method=method, feature_centring=f, mlp_centring=m))
                 for f, m in ((False, True), (True, False), (False, False))]
        assert all(k == plain[0] for k in plain) and "feature-centring" not in plain[0]
        assert plain[0] == {k: v for k, v in centred.items()
                            if k not in ("feature-centring", "centring-fold")}
    assert result_keys(FedMoEConfig(model="tmoe", pretrain_share=0.3))["pretrain-share"] == 0.3


def test_the_published_grids_keep_the_ids_they_were_recorded_with():
    """docs/results.md section 4 says its grid repeats exactly: its runs' ids (the seeds of
    their DP noise) must not move when a key is added. The id below is the one the grid
    recorded (its α = 0.5, ε = 1 fedmoe runs re-run to the digit with it). The id moves
    when a default does (centring-fold's, in this release: fedmoe's run with the key off
    keeps the recorded id and the new one keeps its noise draws); then the grid is re-run."""
    from pathlib import Path

    from simulations.experiment import load_grid

    grids = Path(__file__).parents[1] / "simulations" / "grids"
    recorded = {"fedmoe": "50716caed26b", "local": "1b005baae246", "fedavg": "bd71576a92e4",
                "fedper": "68f653f62413"}  # the baselines' since the release before
    for name in ("full.toml", "full_centred.toml"):
        for method, run_id in recorded.items():
            run, = [r for r in load_grid(grids / name).runs if dict(r.labels) == {
                "split": "dirichlet-0.5", "target-epsilon": "1", "method": method}
                and r.config.seed == 1]
            # full_centred.toml centres the baselines too: their runs are other runs
            if method == "fedmoe":
                assert run.run_id == "f717eff49847"  # centring-fold on, this release
                before = dataclasses.replace(run, config=run.config.replace(
                    centring_fold=False))
                assert before.run_id == run_id and before.noise_id == run.noise_id
            else:
                assert (run.run_id == run_id) is (name == "full.toml")


def test_every_committed_grid_runs_its_baselines_as_recorded_unless_it_says_centred():
    """Baselines centre their inputs by default (``feature-centring``) since this release;
    every grid recorded before runs them on the raw features, as its results were made
    (their run ids, and so their noise draws, are the ones recorded)."""
    from pathlib import Path

    from simulations.experiment import load_grid

    for path in sorted((Path(__file__).parents[1] / "simulations" / "grids").glob("*.toml")):
        centred = {r.config.feature_centring for r in load_grid(path).runs
                   if r.config.method != "fedmoe"}
        assert centred <= ({True} if "centred" in path.stem else {False}), path.name


def test_runs_that_differ_only_in_ema_decay_share_their_noise_not_their_id():
    """ema-decay changes what the server releases, not what clients train: two runs that
    differ only in it are different runs (ids) with the same DP noise draws (noise ids),
    so a grid's paired difference is the average's effect alone; at 0 (no averaging) the
    id is that of a run recorded before the key existed."""
    raw = {"experiment": {"clients": 3, "seeds": [1]},
           "base": {"num-server-rounds": 1, "centring-fold": False},  # as before it existed
           "grid": {"ema-decay": [0.0, 0.5, 0.9]}}
    none, half, most = parse_grid(raw).runs
    assert len({none.run_id, half.run_id, most.run_id}) == 3
    assert none.noise_id == half.noise_id == most.noise_id == none.run_id
    assert "ema-decay" not in result_keys(none.config)
    other = parse_grid({**raw, "grid": {"ema-decay": [0.5], "learning-rate": [0.25]}}).runs[0]
    assert other.noise_id != half.noise_id  # a key that changes training changes the noise
    # where the average reaches training, γ stays in the noise id: a lossy download codec
    # (train messages are encoded against the averaged evaluate message) and tmoe's switch
    # to fine-tuning (it starts from the averaged pretrained model)
    for base in ({"download-codec": "q8"},
                 {"model": "tmoe", "num-server-rounds": 2, "pretrain-rounds": 1}):
        a, b = parse_grid({**raw, "base": {**raw["base"], **base}}).runs[:2]
        assert a.noise_id != b.noise_id
    text = parse_grid({**raw, "base": {"model": "tmoe", "num-server-rounds": 2,
                                       "pretrain-rounds": 2}}).runs  # no switch
    assert text[0].noise_id == text[1].noise_id


def test_a_grid_run_draws_its_noise_from_its_noise_id(tmp_path):
    """End to end: two runs that differ only in ema-decay train the same round 1 with the
    same noise draws (every client's update norm equal), and the released models differ
    from round 2 on; a learning-rate change draws other noise."""
    import json

    from simulations.experiment import run_grid

    raw = {"experiment": {"clients": 3, "seeds": [1]}, "base": {"num-server-rounds": 2},
           "grid": {"ema-decay": [0.0, 0.5]}}
    grid = parse_grid(raw)
    run_grid(grid, tmp_path / "out")

    def rounds(run):
        return json.loads((tmp_path / "out" / "runs" / run.run_id / "results.json")
                          .read_text())["rounds"]

    none, half = (rounds(r) for r in grid.runs)
    norms = [[c["update_norm"] for c in r["clients"]] for r in none]
    assert norms == [[c["update_norm"] for c in r["clients"]] for r in half]
    assert none[0]["clients"] == half[0]["clients"]  # round 1: w̄_1 = w_1, all equal
    assert none[1]["clients"] != half[1]["clients"]  # round 2 evaluates the average


@pytest.mark.parametrize("table", [{"server-momentum": "abc"}, {"server-momentum": 0.5},
                                   {"learning-rate": -1.0}])
def test_a_method_table_no_run_uses_is_refused_whatever_it_holds(table):
    """A [method.*] table for a method no cell trains was never checked against a run: it
    is refused (valid values or not), naming the table and the fix."""
    raw = {"experiment": {"clients": 3, "seeds": [1]}, "base": {"num-server-rounds": 1},
           "grid": {"method": ["local"]}, "method": {"fedavg": table}}
    with pytest.raises(GridError, match=r"\[method\.fedavg\] applies to no run"):
        parse_grid(raw)


@pytest.mark.parametrize("split, names", [
    # a data file that is not there
    ('dataset = "csv:{tmp}/missing.csv"', ["missing.csv", "no such file"]),
    # a split no seed can draw: 60 clients on digits at α = 0.01
    ('partitioner = "dirichlet"\ndirichlet-alpha = 0.01', ["dirichlet-alpha=0.01", "fewer clients"]),
    # a pathological split asking for more classes than the data holds
    ('partitioner = "pathological"\nclasses-per-client = 11', ["classes-per-client"]),
])
def test_a_run_that_cannot_start_stops_the_grid_before_any_run(tmp_path, capsys, split, names):
    # Before, each such run failed on its own (a missing file: every run of the grid, one by
    # one) or, worse, "finished" with every client excluded and no accuracy, and was then
    # skipped as done by every later invocation.
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(f"""
        [experiment]
        clients = 60
        seeds = [1, 2]
        [base]
        num-server-rounds = 1
        {split.format(tmp=tmp_path)}
        [grid]
        method = ["fedavg", "fedmoe"]
        target-epsilon = [8.0]
    """))
    out = tmp_path / "out"
    assert main(["experiment", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot start (nothing was run" in err and "method=fedavg" in err
    assert all(name in err for name in names), err
    assert not out.exists()  # nothing written, nothing started


def test_a_grid_stopped_by_a_bad_run_keeps_the_runs_it_finished(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["experiment", str(tiny), "--out", str(out)]) == 0
    rows = {p: p.read_bytes() for p in (out / "runs").glob(f"*/{ROW}")}
    assert len(rows) == 2
    grid = tmp_path / "more.toml"
    grid.write_text(TINY.replace('target-epsilon = [8.0]', 'target-epsilon = [8.0]\n'
                                 'dataset = ["auto", "csv:/nonexistent/x.csv"]'))
    assert main(["experiment", str(grid), "--out", str(out)]) == 2
    assert "nonexistent/x.csv" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (out / "runs").glob(f"*/{ROW}")} == rows
    assert len(read_csv(out / CSV)) == 2


def test_a_data_file_warning_is_given_once_for_the_whole_grid(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = ["f0,f1,label"] + [f"{rng.uniform(0, 900):.1f},{rng.uniform():.3f},{i % 2}"
                              for i in range(200)]
    (tmp_path / "wide.csv").write_text("\n".join(rows) + "\n")
    from simulations.experiment import check_inputs

    grid = load_grid_text(tmp_path, f"""
        [experiment]
        clients = 3
        seeds = [1, 2, 3]
        [base]
        num-server-rounds = 1
        dataset = "csv:{tmp_path / 'wide.csv'}"
        [grid]
        method = ["fedavg", "local"]
        target-epsilon = [8.0, 1.0]
    """)
    lines: list[str] = []
    check_inputs(grid.runs, lines.append)
    assert len(grid.runs) == 12
    assert len(lines) == 1 and "feature-bounds" in lines[0] and "f0" in lines[0]


def load_grid_text(tmp_path, text):
    path = tmp_path / "g.toml"
    path.write_text(textwrap.dedent(text))
    return load_grid(path)


@pytest.mark.parametrize("keys, epsilon, names", [
    # a δ no client can have: every client excluded, nothing trained
    ("target-delta = 0.1", "8.0", ["δ=0.1", "Lower target-delta"]),
    # a σ so small that one round costs more than the budget
    ("noise-multiplier = 0.01", "1.0", ["noise-multiplier=0.01", "for any client"]),
    # a budget too small for any round
    ("", "0.001", ["target-epsilon=0.001", "raise target-epsilon"]),
])
def test_a_run_no_client_could_train_in_stops_the_grid_before_any_run(tmp_path, capsys, keys,
                                                                      epsilon, names):
    # Before, these runs "finished" with every client excluded (the untrained model's
    # accuracy in the report, exit 0) and were skipped as done by later invocations.
    grid = tmp_path / "grid.toml"
    grid.write_text(textwrap.dedent(f"""
        [experiment]
        clients = 3
        seeds = [1]
        [base]
        num-server-rounds = 1
        {keys}
        [grid]
        method = ["fedavg", "fedmoe"]
        target-epsilon = [{epsilon}]
    """))
    out = tmp_path / "out"
    assert main(["experiment", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and all(name in err for name in names), err
    assert "'preflight'" not in err
    assert not out.exists()


def test_clients_a_budget_cannot_pay_for_are_a_warning_when_others_can():
    from simulations.runner import _check_plans

    config = FedMoEConfig().replace(batch_size=32, noise_multiplier=1.0, target_epsilon=2.0,
                                    num_server_rounds=1)
    notes: list[str] = []
    _check_plans(config, 2, [(30, 8), (3000, 750)], notes.append)  # q = 1 against q ≈ 0.01
    assert len(notes) == 1 and "clients of 30 training examples" in notes[0], notes
    with pytest.raises(ConfigError, match="for any client .training sizes 30–300."):
        _check_plans(config, 2, [(30, 8), (300, 75)], notes.append)


def test_a_run_in_which_every_client_was_excluded_is_not_kept_as_a_result(tiny, tmp_path,
                                                                          monkeypatch, capsys):
    import simulations.inline as inline

    real = inline.run_inline

    def excluded(config, clients):
        result = real(config, clients)
        result.results["stopped"] = ("every client is excluded before round 1 (reasons in "
                                     "results.json's excluded), e.g. its data file vanished")
        return result

    monkeypatch.setattr(inline, "run_inline", excluded)
    out = tmp_path / "out"
    assert main(["experiment", str(tiny), "--out", str(out), "--jobs", "1"]) == 1
    assert "no client took part" in capsys.readouterr().err
    assert not list((out / "runs").glob(f"*/{ROW}"))


@pytest.mark.parametrize("evaluate_on", ["test", "validation"])
def test_preflight_plans_the_training_sizes_the_clients_will_have(evaluate_on):
    from fedmoe.data import check_split, load_client_data
    from simulations.runner import _train_sizes

    config = FedMoEConfig().replace(evaluate_on=evaluate_on, seed=3)
    loaded = {len(load_client_data(config, i, 10, config.phase(1)).train) for i in range(10)}
    assert _train_sizes(config, 10, check_split(config, 10)) == loaded
