"""Checkpoint and resume: a run folder is a unit that loses nothing.

A server that dies after round 2 of 4 and is resumed ends with the ledgers (server's and
clients') of an uninterrupted run and a results.json of 4 rounds; a round charged but not
finished stays charged and is not run again; an existing run folder is refused unless
resumed with the same config; a second writer is locked out; a checkpoint of another
format or version is one clear error."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.cli import main as cli_main
from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.storage import RunFolderBusy
from server import checkpoint as ckpt
from server.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from server import strategy as strategy_module
from server.strategy import FedMoE
from simulations.inline import run_inline

ROOT = Path(__file__).resolve().parents[1]
# 3 clients, 2 sampled a round (the sampling RNG must come back), 4 rounds, the label prior
CONFIG = FedMoEConfig(num_server_rounds=4, fraction_train=0.67, target_epsilon=4.0)


class Crash(Exception):
    """Stands in for the server process dying."""


def _crash_at(monkeypatch, server_round, *, after_charge=False):
    """Make the server 'die' when it configures ``server_round`` (before or after the
    round is charged)."""
    original = FedMoE.configure_train

    def configure_train(self, rnd, arrays, config, grid):
        if rnd == server_round and not after_charge:
            raise Crash(rnd)
        messages = list(original(self, rnd, arrays, config, grid))
        if rnd == server_round:
            raise Crash(rnd)
        return messages

    monkeypatch.setattr(FedMoE, "configure_train", configure_train)


def _run_until_crash(monkeypatch, config, server_round, *, after_charge=False):
    """Run ``config`` on 3 inline clients until the server dies at ``server_round``
    (:func:`_crash_at`); the patch is undone afterwards."""
    with monkeypatch.context() as patch:
        _crash_at(patch, server_round, after_charge=after_charge)
        with pytest.raises(Crash):
            run_inline(config, 3)


def ledgers(folder: Path) -> dict[str, list[tuple]]:
    """client -> its ledger's entries (round, σ, q, steps) and ε, read-only."""
    with LedgerBook(folder / LEDGER_FILE, read_only=True) as book:
        return {c: [(e.server_round, e.noise_multiplier, e.sample_rate, e.steps)
                    for e in book.get(c).entries] + [round(book.get(c).spent(), 12)]
                for c in book.clients()}


def client_ledgers(run_dir: Path) -> dict[str, dict]:
    return {p.name: ledgers(p) for p in sorted((run_dir / "clients").iterdir())}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run of CONFIG on 3 inline clients (its folder and results): the
    reference both resume tests compare with. Ledgers do not depend on the engine (σ, q,
    steps and the seeded sampling are planned by the server), so the command-line test's
    Ray run is held to it as well."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    return run_dir, run_inline(CONFIG.replace(run_dir=str(run_dir)), 3).results


@pytest.mark.slow
def test_resume_after_round_2_equals_an_uninterrupted_run(tmp_path, monkeypatch, clean):
    clean_dir, clean = clean
    run_dir = tmp_path / "crashed"
    config = CONFIG.replace(run_dir=str(run_dir))
    _run_until_crash(monkeypatch, config, 3)
    assert load_checkpoint(run_dir).server_round == 2 and not (run_dir / "results.json").exists()
    resumed = run_inline(config.replace(resume=True), 3).results
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    assert [r["sampled"] for r in resumed["rounds"]] == [2, 2, 2, 2]
    assert ledgers(run_dir) == ledgers(clean_dir)
    assert client_ledgers(run_dir) == client_ledgers(clean_dir)
    for entries in ledgers(run_dir).values():  # no round charged twice (a client's first
        rounds = [e[0] for e in entries[:-1]]  # round also carries its label histogram)
        assert rounds.count(rounds[0]) == 2
        assert all(rounds.count(r) == 1 for r in set(rounds) - {rounds[0]})
    # the rounds before the crash are reported as they were, with the same clients
    for a, b in zip(clean["rounds"], resumed["rounds"], strict=True):
        assert [c["client"] for c in a["clients"]] == [c["client"] for c in b["clients"]]
    assert load_checkpoint(run_dir).finished
    with pytest.raises(CheckpointError, match="that run is finished"):
        run_inline(config.replace(resume=True), 3)


def test_a_resumed_run_continues_the_server_momentum(tmp_path, monkeypatch):
    """The server optimiser's velocity is part of the checkpoint: the resumed round 3
    starts from the velocity the crashed run had after round 2, not from zero."""
    run_dir = tmp_path / "momentum"
    config = CONFIG.replace(run_dir=str(run_dir), num_server_rounds=3, server_momentum=0.9,
                            server_learning_rate=0.5)
    steps: list[tuple[dict, dict]] = []  # (velocity before, after) per server step
    step = strategy_module.server_step

    def spy(global_arrays, combined, velocity, momentum, learning_rate):
        before = {k: v.copy() for k, v in velocity.items()}
        out = step(global_arrays, combined, velocity, momentum, learning_rate)
        steps.append((before, {k: v.copy() for k, v in velocity.items()}))
        return out

    monkeypatch.setattr(strategy_module, "server_step", spy)
    _run_until_crash(monkeypatch, config, 3)
    assert len(steps) == 2 and not steps[0][0]  # rounds 1, 2; round 1 starts at zero
    after_2 = steps[-1][1]
    assert after_2 and all(np.any(v) for v in after_2.values())
    saved = load_checkpoint(run_dir).velocity
    assert saved.keys() == after_2.keys()
    for key, value in after_2.items():
        np.testing.assert_array_equal(saved[key], value)
    steps.clear()
    run_inline(config.replace(resume=True), 3)
    assert len(steps) == 1  # round 3 only
    for key, value in after_2.items():
        np.testing.assert_array_equal(steps[0][0][key], value)


def test_a_resumed_run_continues_the_moving_average(tmp_path, monkeypatch):
    """The moving average of the global models (ema-decay) is part of the checkpoint: the
    resumed round 3 folds its model into the average the crashed run had after round 2,
    and the resumed run's final model is that average, not a fresh one."""
    run_dir = tmp_path / "average"
    config = CONFIG.replace(run_dir=str(run_dir), num_server_rounds=3, ema_decay=0.5)
    steps: list[tuple[dict, dict]] = []  # (average before, after) per round
    models: list[dict] = []  # the global model each round folded in
    step = strategy_module.ema_step

    def spy(average, arrays, decay):
        before = {k: v.copy() for k, v in average.items()}
        models.append({k: np.asarray(v).copy() for k, v in arrays.items()})
        step(average, arrays, decay)
        steps.append((before, {k: v.copy() for k, v in average.items()}))

    monkeypatch.setattr(strategy_module, "ema_step", spy)
    _run_until_crash(monkeypatch, config, 3)
    assert len(steps) == 2 and not steps[0][0]  # rounds 1, 2; round 1 starts the average
    after_2 = steps[-1][1]
    checkpoint = load_checkpoint(run_dir)
    saved = checkpoint.average
    assert saved.keys() == after_2.keys() and saved
    for key, value in after_2.items():
        np.testing.assert_array_equal(saved[key], value)
        np.testing.assert_array_equal(checkpoint.arrays[key], models[-1][key])  # w_2, not w̄_2
    assert any(not np.allclose(checkpoint.arrays[k], saved[k]) for k in saved)
    steps.clear()
    run_inline(config.replace(resume=True), 3)
    assert len(steps) == 1  # round 3 only
    for key, value in after_2.items():
        np.testing.assert_array_equal(steps[0][0][key], value)
    final = torch.load(run_dir / "global_model.pt", weights_only=True)
    for key, value in steps[0][1].items():
        np.testing.assert_allclose(final[key].numpy(), value, rtol=1e-6, atol=1e-7)


def test_a_round_charged_when_the_server_died_stays_spent_and_is_not_rerun(tmp_path,
                                                                          monkeypatch):
    run_dir = tmp_path / "run"
    config = CONFIG.replace(run_dir=str(run_dir), num_server_rounds=3, fraction_train=1.0)
    _run_until_crash(monkeypatch, config, 2, after_charge=True)
    charged = ledgers(run_dir)
    assert all(2 in [e[0] for e in entries[:-1]] for entries in charged.values())
    results = run_inline(config.replace(resume=True), 3).results
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    lost = results["rounds"][1]
    assert lost["clients"] == [] and len(lost["rejected"]) == 3
    assert all("its charge stands (sent = spent)" in why for why in lost["rejected"])
    after = ledgers(run_dir)
    for client, entries in after.items():
        rounds = [e[0] for e in entries[:-1]]
        assert rounds.count(2) == 1 and rounds.count(3) == 1  # round 2 kept, never re-charged
        assert entries[:-1][:len(charged[client]) - 1] == charged[client][:-1]


def test_an_existing_run_folder_is_refused_unless_resumed_with_the_same_config(tmp_path,
                                                                            monkeypatch):
    run_dir = tmp_path / "run"
    config = CONFIG.replace(run_dir=str(run_dir))
    _run_until_crash(monkeypatch, config, 2)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match="holds an unfinished run .*--resume"):
        run_inline(config, 3)
    other = config.replace(resume=True, target_epsilon=3.0, model="moe")
    with pytest.raises(CheckpointError, match=r"differs .* in 2 key\(s\): model .*; "
                                              r"target-epsilon \(run folder: 4.0, now: 3.0\)"):
        run_inline(other, 3)
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # nothing was touched by the refusals
    # the CLI: exit 2, with the keys
    code = cli_main(["simulate", "--resume", str(run_dir), "--run-config",
                     "target-epsilon=3.0"])
    assert code == 2
    code = cli_main(["simulate", "--out", str(run_dir), "--clients", "3"])
    assert code == 2
    code = cli_main(["simulate", "--resume", str(run_dir), "--clients", "4"])
    assert code == 2
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_resume_after_its_data_or_bounds_file_changed_is_refused(tmp_path, monkeypatch):
    """The checkpoint records the SHA-256 of the files the run config names; a file edited
    between the crash and the resume would silently change what the rest trains on."""
    rng = np.random.default_rng(0)
    data, bounds = tmp_path / "data.csv", tmp_path / "bounds.csv"
    rows = [f"{a:.4f},{b:.4f},{y}" for (a, b), y in zip(rng.normal(size=(150, 2)) * 50,
                                                         np.arange(150) % 2)]
    data.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    bounds.write_text("feature,low,high\na,-200,200\nb,-200,200\n")
    run_dir = tmp_path / "run"
    config = CONFIG.replace(run_dir=str(run_dir), dataset=f"csv:{data}",
                            feature_bounds=str(bounds))
    _run_until_crash(monkeypatch, config, 2)
    assert set(load_checkpoint(run_dir).inputs) == {"dataset", "feature-bounds"}
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    resume = config.replace(resume=True)
    original = data.read_bytes(), bounds.read_bytes()
    for path, key in ((data, "dataset"), (bounds, "feature-bounds")):
        path.write_bytes(path.read_bytes().replace(b"-200", b"-300") if path == bounds
                         else path.read_bytes().replace(b",1\n", b",0\n", 1))
        with pytest.raises(CheckpointError, match=f"changed since the run started \\({key} = "):
            run_inline(resume, 3)
        assert cli_main(["simulate", "--resume", str(run_dir)]) == 2
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
        data.write_bytes(original[0]), bounds.write_bytes(original[1])
    results = run_inline(resume, 3).results  # the files as they were: it resumes
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage,match", [
    ("format", "checkpoint format 99, this fedmoe reads format 1"),
    ("version", "written by fedmoe 0.0.0-other"),
    ("config", "its run config is not valid for this fedmoe"),
    ("truncate", "not a readable fedmoe checkpoint"),
])
def test_a_checkpoint_of_another_version_or_damaged_is_one_clear_error(tmp_path, monkeypatch,
                                                                      damage, match, capsys):
    run_dir = tmp_path / "run"
    config = CONFIG.replace(run_dir=str(run_dir), num_server_rounds=2)
    _run_until_crash(monkeypatch, config, 1)
    path = run_dir / CHECKPOINT
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        with np.load(path) as data:
            arrays = dict(data)
        meta = json.loads(bytes(arrays["meta"]).decode())
        if damage == "format":
            meta["format"] = 99
        elif damage == "version":
            meta["fedmoe"] = "0.0.0-other"
        else:
            meta["config"]["no-such-key"] = 1
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=match):
        run_inline(config.replace(resume=True), 3)
    assert cli_main(["simulate", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fedmoe: error:" in err


def test_a_second_writer_is_locked_out(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from fedmoe.storage import run_folder_lock\n"
         f"with run_folder_lock({str(run_dir)!r}):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(60)\n"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"another fedmoe process \\(pid {holder.pid}\\)"):
            run_inline(CONFIG.replace(run_dir=str(run_dir)), 3)
        assert cli_main(["simulate", "--out", str(run_dir), "--clients", "3"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run_dir.iterdir()) == [".fedmoe.lock"]
    # the holder died (SIGKILL): the lock went with it, nothing to clean up
    run_inline(CONFIG.replace(run_dir=str(run_dir), num_server_rounds=1), 3)


# ------------------------------------------------------------------ the real command line
#: Runs ``fedmoe simulate`` and SIGKILLs its own process when the server is about to
#: configure round KILL_AT (after round KILL_AT - 1 finished and was checkpointed).
KILLER = """
import os, signal, sys
from server import strategy as strategy_module
from server.strategy import FedMoE
original = FedMoE.configure_train
def configure_train(self, server_round, *args, **kwargs):
    if server_round == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, server_round, *args, **kwargs)
FedMoE.configure_train = configure_train
from fedmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""
ARGS = ["--clients", "3", "--run-config",
        "num-server-rounds=4 fraction-train=0.67 target-epsilon=4.0"]


def _simulate(*args, killer=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT": "3"}
    command = ["-c", KILLER] if killer else ["-m", "fedmoe.cli"]
    return subprocess.run([sys.executable, *command, "simulate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _client_ledgers(out: Path) -> dict[str, dict]:
    [run] = [p for p in (out / "clients").iterdir() if p.is_dir()]  # the (last) run id's
    return {p.name: ledgers(p) for p in sorted(run.iterdir())}


@pytest.mark.slow
@pytest.mark.usefixtures("system_temp_dir")
def test_sigkill_after_round_2_of_4_then_resume_equals_an_uninterrupted_run(tmp_path, clean):
    """The uninterrupted reference is the inline run of the same config (``clean``): a
    third Ray run would only repeat what the engine-independent ledgers already fix."""
    clean_dir, clean_results = clean
    out = tmp_path / "killed"
    killed = _simulate("--out", str(out), *ARGS, killer=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(out).server_round == 2 and not (out / "results.json").exists()
    resumed = _simulate("--resume", str(out))  # config and --clients from the checkpoint
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
    assert results["privacy"]["stopped"] is None
    # the same run config as the reference (ARGS spell CONFIG), bar folder and resume flag
    own = ("run-dir", "resume")
    assert {k: v for k, v in results["config"].items() if k not in own} == {
        k: v for k, v in clean_results["config"].items() if k not in own}
    assert ledgers(out) == ledgers(clean_dir)  # the server's: same rounds, σ, q, steps, ε
    assert _client_ledgers(out) == client_ledgers(clean_dir)  # each client's own
    # the same clients sampled each round as the uninterrupted run
    assert [sorted(c["client"] for c in r["clients"]) for r in results["rounds"]] == [
        sorted(c["client"] for c in r["clients"]) for r in clean_results["rounds"]]
    for entries in ledgers(out).values():
        rounds = [e[0] for e in entries[:-1]]
        assert all(rounds.count(r) == 1 for r in set(rounds) - {rounds[0]})


def test_a_key_the_model_does_not_read_never_blocks_a_resume():
    """A digits run folder written before ``unigram-prior`` (a tmoe key) existed resumes
    under today's defaults; a tmoe one does not, its model would differ."""
    digits = FedMoEConfig().to_run_config()
    del digits["unigram-prior"]
    assert ckpt.config_differences(digits, FedMoEConfig(resume=True)) == []
    text = FedMoEConfig(model="tmoe").to_run_config()
    del text["unigram-prior"]
    assert ckpt.config_differences(text, FedMoEConfig(model="tmoe", resume=True)) == [
        "unigram-prior (run folder: False, now: True)"]
    assert ckpt.config_differences(text, FedMoEConfig(model="tmoe", unigram_prior=False,
                                                      resume=True)) == []
