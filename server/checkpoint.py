"""The server's checkpoint: after every finished round, everything a run needs to continue.

``<run folder>/checkpoint.npz`` (next to ``results.json`` and ``ledger.sqlite``), written
atomically (temp file, fsync, rename) after each round's evaluation, holds:

- the round that finished and the global ``shared`` + ``gate`` arrays after it;
- the run config, the checkpoint format (:data:`FORMAT`) and the fedmoe version;
- the strategy's state: every client's plan (σ, q, steps, δ: calibrated once per run), what
  each client declared, exclusions, the clients sent their label histogram (and, with
  ``label-prior-shrinkage = "federation"``, the histograms they released), the per-round
  history (what ``results.json`` reports) and the sampling RNG's state, the server
  optimiser's momentum (``server-momentum``) per global array, and the moving average of
  the global arrays (``ema-decay``), the model the run releases;
- Flower's run id (the simulated clients' state folder is named by it) and the number of
  simulated clients.

The privacy ledger is not copied into it: ``ledger.sqlite`` is already durable, charged
write-ahead when a round is sent. A resumed run continues after the last finished round;
a round the ledger charged after that (the server died mid-round) stays charged — sent is
spent — and is not run again (see :func:`resume_point`), so no round is charged twice and
none that was charged is forgotten.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.config import ADDED_KEYS, ConfigError, FedMoEConfig
from fedmoe.data.files import changed_inputs, changed_message
from fedmoe.methods import unread_keys
from fedmoe.privacy import LEDGER_FILE, ClientPlan, LedgerBook
from fedmoe.records import ClientInfo, EvalReport, TrainReport
from fedmoe.reporting import RESULTS
from fedmoe.storage import write_atomic
from server.strategy import FedMoE, RoundRecord

CHECKPOINT = "checkpoint.npz"
#: Checkpoint layout version; a checkpoint of another layout is refused, never guessed at.
FORMAT = 1
#: Run-config keys that may differ between a run and its resumption.
NOT_COMPARED = ("resume", "run-dir")


class CheckpointError(ConfigError):
    """A run folder cannot be (re)used as asked; the message names the fix."""


def fedmoe_version() -> str:
    try:
        return version("fedmoe")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint (see the module docstring)."""

    server_round: int
    arrays: dict[str, np.ndarray]
    config: dict[str, Any]
    strategy: dict[str, Any]
    run_id: int | None
    num_clients: int | None
    engine: str | None
    finished: bool
    wall_seconds: float
    velocity: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    average: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: run-config key -> SHA-256 of the file it names (:func:`~fedmoe.data.files.input_fingerprints`)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------- writing, reading
def save_checkpoint(
    run_dir: Path, strategy: FedMoE, server_round: int, arrays: dict[str, np.ndarray], *,
    run_id: int | None, num_clients: int | None = None, engine: str | None = None,
    finished: bool = False, wall_seconds: float = 0.0, inputs: dict[str, str] | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoint.npz`` atomically (a crash leaves the old one or the new).
    ``inputs``: the fingerprints of the files the run config names, which a resume checks."""
    keys, moving, averaged = list(arrays), sorted(strategy.velocity), sorted(strategy.average)
    meta = {
        "format": FORMAT, "fedmoe": fedmoe_version(), "round": server_round,
        "config": strategy.config.to_run_config(), "strategy": strategy_state(strategy),
        "run_id": run_id, "num_clients": num_clients, "engine": engine, "finished": finished,
        "keys": keys, "velocity_keys": moving, "average_keys": averaged,
        "wall_seconds": wall_seconds, "inputs": dict(inputs or {}),
    }
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)},
             **{f"v{i}": strategy.velocity[k] for i, k in enumerate(moving)},
             **{f"m{i}": strategy.average[k] for i, k in enumerate(averaged)})
    path = Path(run_dir) / CHECKPOINT
    write_atomic(path, buffer.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and check ``<run_dir>/checkpoint.npz``.

    Raises
    ------
    CheckpointError
        If it is missing, unreadable, of another format or fedmoe version, or its config
        is not one this fedmoe accepts: one message naming the file and the reason.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no {CHECKPOINT} there, nothing to resume "
                              "(a run writes one after each finished round)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this "
                                      f"fedmoe reads format {FORMAT}; it cannot be resumed")
            arrays = {k: data[f"a{i}"] for i, k in enumerate(meta["keys"])}
            # written before server-momentum existed: no velocity (none was kept then)
            velocity = {k: data[f"v{i}"] for i, k in enumerate(meta.get("velocity_keys", []))}
            # written before ema-decay existed: no average (the run released its last model)
            average = {k: data[f"m{i}"] for i, k in enumerate(meta.get("average_keys", []))}
        checkpoint = Checkpoint(int(meta["round"]), arrays, dict(meta["config"]),
                                dict(meta["strategy"]), meta["run_id"], meta["num_clients"],
                                meta["engine"], bool(meta["finished"]),
                                float(meta["wall_seconds"]), velocity, average,
                                # written before inputs were fingerprinted: nothing to compare
                                {str(k): str(v) for k, v in meta.get("inputs", {}).items()})
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable fedmoe checkpoint ({err}); it cannot be "
                              "resumed") from None
    if meta["fedmoe"] != fedmoe_version():
        raise CheckpointError(f"{path}: written by fedmoe {meta['fedmoe']}, this is fedmoe "
                              f"{fedmoe_version()}; resume it with the version that wrote it")
    try:
        FedMoEConfig.from_recorded(checkpoint.config)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its run config is not valid for this fedmoe ({err})") \
            from None
    return checkpoint


def config_differences(saved: dict[str, Any], config: FedMoEConfig) -> list[str]:
    """``key (run folder: X, now: Y)`` for every run-config key that differs (a key added
    to fedmoe after the checkpoint was written counts as its :data:`ADDED_KEYS` value),
    except keys the run's method and model do not read (:func:`fedmoe.methods.unread_keys`:
    a digits run resumes whatever ``unigram-prior`` says)."""
    saved = {**ADDED_KEYS, **saved}
    now = config.to_run_config()
    unread = unread_keys(config) if saved.get("method") == config.method and saved.get(
        "model") == config.model else frozenset()
    return [f"{key} (run folder: {saved.get(key)!r}, now: {now.get(key)!r})"
            for key in sorted(set(saved) | set(now))
            if key not in NOT_COMPARED and key not in unread
            and saved.get(key) != now.get(key)]


def differences_message(run_dir: Path | str, differ: list[str]) -> str:
    """The refusal of a resume whose config differs (``differ``: :func:`config_differences`)."""
    return (f"--resume {run_dir}: the run config differs from the run folder's in "
            f"{len(differ)} key(s): {'; '.join(differ)}. A run continues with its own config "
            "(σ was calibrated for it, its checkpoint holds its state); give these keys the "
            "run folder's values (a key added since that run was written: the value shown "
            "for the run folder), or start a new run with --out")


def prepare_run_folder(
    run_dir: Path, config: FedMoEConfig, *, num_clients: int | None = None,
    engine: str | None = None,
) -> Checkpoint | None:
    """Check that ``config`` may write into ``run_dir``; return the checkpoint to resume.

    A fresh run needs a folder that holds no run (no results, checkpoint or ledger); a
    resumed run (``config.resume``) needs a checkpoint of an unfinished run with the same
    config (every key but ``resume`` and ``run-dir``) and, for a simulation, the same
    number of clients and engine (``inline`` or ``flower``: each keeps its simulated
    clients' ledgers elsewhere; deployments pass None). Reads only.

    Raises
    ------
    CheckpointError
        Naming what the folder holds and the fix.
    """
    run_dir = Path(run_dir)
    if not config.resume:
        held = [n for n in (RESULTS, CHECKPOINT, LEDGER_FILE) if (run_dir / n).exists()]
        if not held:
            return None
        if (run_dir / RESULTS).exists() and not _resumable(run_dir):
            raise CheckpointError(
                f"--out {run_dir}: holds the results of an earlier run ({RESULTS}); fedmoe does "
                "not overwrite a finished run. Choose a new --out")
        raise CheckpointError(
            f"--out {run_dir}: holds an unfinished run ({', '.join(held)}); continue it with "
            f"`fedmoe simulate --resume {run_dir}` (run config resume=true), or choose a new "
            "--out")
    checkpoint = load_checkpoint(run_dir)
    differ = config_differences(checkpoint.config, config)
    if differ:
        raise CheckpointError(differences_message(run_dir, differ))
    if changed := changed_inputs(checkpoint.inputs, config):
        raise CheckpointError(
            f"--resume {run_dir}: the contents of the file(s) the run config names changed "
            f"since the run started ({changed_message(changed, config)}). The "
            "rest of the run would train on other data than its first rounds, planned for "
            "the old; put the file(s) back as they were, or start a new run with --out")
    if num_clients is not None and checkpoint.num_clients not in (None, num_clients):
        raise CheckpointError(f"--resume {run_dir}: that run simulated {checkpoint.num_clients} "
                              f"clients, not {num_clients}; give --clients "
                              f"{checkpoint.num_clients} (or leave it out)")
    if engine is not None and checkpoint.engine not in (None, engine):
        raise CheckpointError(f"--resume {run_dir}: that run was simulated by the "
                              f"{checkpoint.engine!r} engine, whose clients' ledgers this "
                              f"{engine!r} engine cannot continue; resume it with that engine")
    if checkpoint.finished:
        raise CheckpointError(f"--resume {run_dir}: that run is finished ({RESULTS}); nothing "
                              "to resume")
    return checkpoint


def _resumable(run_dir: Path) -> bool:
    try:
        return not load_checkpoint(run_dir).finished
    except CheckpointError:
        return False


# ---------------------------------------------------------------------- strategy state
def strategy_state(strategy: FedMoE) -> dict[str, Any]:
    """The strategy's state as JSON-able data (node ids are not kept: a resumed run asks
    every node who it is again, which costs no privacy)."""
    version_, internal, gauss = strategy._rng.getstate()
    return {
        "plans": {c: dataclasses.asdict(p) for c, p in strategy.plans.items()},
        "declared": {c: dataclasses.asdict(i) for c, i in strategy.declared.items()},
        "excluded": dict(strategy.excluded),
        "histograms": sorted(strategy._histograms),
        "label_histograms": dict(strategy.label_histograms),
        "history": [_record_state(r) for r in strategy.history],
        "rng": [version_, list(internal), gauss],
    }


def restore_strategy(strategy: FedMoE, state: dict[str, Any],
                     velocity: dict[str, np.ndarray] | None = None,
                     average: dict[str, np.ndarray] | None = None) -> None:
    """Put ``state`` (:func:`strategy_state`), the server optimiser's ``velocity``
    (:attr:`Checkpoint.velocity`) and the moving ``average`` of the global arrays
    (:attr:`Checkpoint.average`) back into a fresh strategy."""
    strategy.velocity = {k: np.asarray(v, dtype=np.float64) for k, v in (velocity or {}).items()}
    strategy.average = {k: np.asarray(v, dtype=np.float64) for k, v in (average or {}).items()}
    strategy.plans = {c: ClientPlan(**{**p, "prior": tuple(map(tuple, p["prior"]))})
                      for c, p in state["plans"].items()}
    strategy.declared = {c: ClientInfo(**{**i, "history": tuple(map(tuple, i["history"]))})
                         for c, i in state["declared"].items()}
    strategy.excluded = dict(state["excluded"])
    strategy._histograms = set(state["histograms"])
    strategy.label_histograms = {c: list(map(float, v))
                                 for c, v in state["label_histograms"].items()}
    strategy._update_federation()
    strategy.history = [_restore_record(r) for r in state["history"]]
    version_, internal, gauss = state["rng"]
    strategy._rng = random.Random()
    strategy._rng.setstate((version_, tuple(internal), gauss))


def _record_state(record: RoundRecord) -> dict[str, Any]:
    state = dataclasses.asdict(record)
    state["mismatches"] = {c: list(v) for c, v in record.mismatches.items()}
    return state


def _restore_record(state: dict[str, Any]) -> RoundRecord:
    return RoundRecord(**{
        **state,
        "train": {c: TrainReport(**r) for c, r in state["train"].items()},
        "evaluate": {c: EvalReport(**r) for c, r in state["evaluate"].items()},
        "mismatches": {c: tuple(v) for c, v in state["mismatches"].items()},
    })


def resume_point(checkpoint: Checkpoint, strategy: FedMoE, book: LedgerBook) -> int:
    """The first round a resumed run sends, after recording any round lost mid-way.

    A round the server ledger charged after the checkpoint's round was sent, so it is spent
    (the client may have trained on it and released its update) but never finished: it is
    kept in the ledger, listed in the history with every client charged for it, and not
    run again. Charging it again would double-count a release that may never have
    happened; running it without a charge could under-count one that did. A label
    histogram charged in it counts as sent.
    """
    lost: dict[int, list[str]] = {}
    for client in book.clients():
        rounds = [e.server_round for e in book.get(client).entries
                  if e.server_round > checkpoint.server_round]
        for server_round in set(rounds):
            lost.setdefault(server_round, []).append(client)
            if rounds.count(server_round) > 1:  # its histogram went with that round
                strategy._histograms.add(client)
    for server_round in sorted(lost):
        record = RoundRecord(server_round, sampled=len(lost[server_round]),
                             phase=strategy.config.phase(server_round))
        record.rejected = [f"{c}: the server stopped during this round; its charge stands "
                           "(sent = spent), the round is not run again"
                           for c in sorted(lost[server_round])]
        record.epsilon = strategy.ledger_epsilons(set(book.clients()))
        strategy.history.append(record)
    return max([checkpoint.server_round, *lost]) + 1

