"""``fedmoe experiment GRID.toml --out DIR``: a resumable grid of federations, one table.

A grid file is TOML::

    [experiment]                 # how the grid runs (all optional)
    clients = 10                 # simulated clients per run
    seeds = [1, 2, 3]            # every cell runs once per seed (the seed also changes the split)
    engine = "inline"            # "inline" (simulations.inline, default) or "flower" (Ray)
    jobs = 1                     # worker processes (--jobs overrides)
    threads = 1                  # torch threads per worker
    seeded-noise = true          # inline runs: DP noise seeded from the run's id, so a run
                                 # repeats exactly (simulation only; default true inline)

    [base]                       # run-config keys every run shares
    num-server-rounds = 20

    [grid]                       # axes: every combination of values is one cell
    method = ["fedmoe", "local", "fedavg", "fedper"]
    target-epsilon = [inf, 8.0, 3.0, 1.0]           # inf = non-private (ε=∞)
    split = [                                       # an axis of bundles: a name and keys
      {name = "dirichlet-0.1", partitioner = "dirichlet", dirichlet-alpha = 0.1},
      {name = "iid", partitioner = "iid"},
    ]

    [method.fedavg]              # keys that apply to one method's runs (its tuned values)
    learning-rate = 1.0

A run-config key may appear in only one of ``[base]``, ``[grid]`` (directly or in a bundle)
and a ``[method.*]`` table; ``seed`` and ``run-dir`` are set by the runner. Every run's
config is validated before the first one starts: a malformed file is one
:class:`GridError` naming the table and key. Before the first run starts, too, every
unfinished run's inputs are checked as ``fedmoe simulate`` checks them (data file, data
split, client counts: :func:`check_inputs`): a grid with a run that cannot start runs
nothing and says which runs and why.

``DIR`` gets

- ``runs/<id>/``: each run's folder (``results.json``, plots, ledgers, the clients' state
  on disk, and ``row.json`` once it has finished). ``<id>`` is a hash of the run's full
  config: a re-run skips every run whose ``row.json`` exists, and restarts (from scratch)
  one that was interrupted, so a killed grid loses at most the runs in progress;
- ``results.csv``: one row per run (cell and seed): every run-config key, then the
  metrics (:data:`METRICS`);
- ``report.md``: mean ± std over seeds per method and ε, one table per setting of the
  other axes; ``accuracy_vs_epsilon.png``, ``accuracy_per_round.png``,
  ``client_spread.png``.

Both files are rewritten after every finished run. A run that raises is reported and left
unfinished (the others go on; the command then exits with code 1), so the next invocation
retries it.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.config import METHODS, ConfigError, FedMoEConfig, loads_toml
from fedmoe.methods import noise_keys, result_keys
from fedmoe.storage import write_atomic

ROW, CSV, REPORT = "row.json", "results.csv", "report.md"
ENGINES = ("inline", "flower")
EXPERIMENT_KEYS = {"clients": int, "seeds": list, "engine": str, "jobs": int, "threads": int,
                   "seeded-noise": bool}
TABLES = ("experiment", "base", "grid", "method")
#: Keys the runner sets itself.
RESERVED = ("seed", "run-dir")

#: Metric columns of ``results.csv``, after the run-config keys.
METRICS = (
    "personalized_accuracy",  # mean over clients of each one's accuracy on its own test split
    "personalized_accuracy_worst_decile",  # mean of the worst ceil(10 %) of clients
    "global_accuracy",  # without local tensors (empty for methods where that means nothing)
    "epsilon_max",  # max over clients of ε spent (inf: non-private)
    "epsilon_per_client",  # JSON list, client order
    "upload_bytes_per_client_round",  # mean serialised bytes of a train reply's update
    "download_bytes_per_client_round",  # mean serialised bytes of the global tensors sent
    "rounds",  # rounds that trained
    "wall_seconds",
    "client_seconds",  # inside the client handlers (inline engine; empty for flower)
    "privacy",  # "dp" or "non-private"
    "stopped",  # why training stopped early, if it did
    "round_accuracy",  # JSON list: mean personalised accuracy after each round
    "client_accuracy",  # JSON list: each client's final personalised accuracy
)


class GridError(ConfigError):
    """A grid file is malformed; the message names the table and key, and the fix."""


# ----------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Run:
    """One federation of the grid: a cell (a value on every axis) and a seed."""

    labels: tuple[tuple[str, str], ...]  # (axis, value label) per axis, grid order
    config: FedMoEConfig
    clients: int

    @property
    def run_id(self) -> str:
        """Hash of everything that determines the run's result (for a baseline, the keys
        only fedmoe's models read are left out: :func:`fedmoe.methods.result_keys`)."""
        return self._hash(result_keys(self.config))

    @property
    def noise_id(self) -> str:
        """Hash of what determines the run's training trajectory
        (:func:`fedmoe.methods.noise_keys`): the seed of its DP noise under
        ``seeded-noise``. It equals :attr:`run_id` unless a release-only key (``ema-decay``)
        is set or ``centring-fold`` is on (:data:`fedmoe.methods.NOISE_NEUTRAL_KEYS`), so
        runs that differ only in one share their noise draws."""
        return self._hash(noise_keys(self.config))

    def _hash(self, keys: dict[str, Any]) -> str:
        keys.pop("run-dir")
        blob = json.dumps({"config": keys, "clients": self.clients}, sort_keys=True,
                          default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels) + f" seed={self.config.seed}"


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: its runs, in order, and how to run them."""

    runs: tuple[Run, ...]
    axes: tuple[str, ...]
    engine: str = "inline"
    jobs: int = 1
    threads: int = 1
    source: dict[str, Any] = field(default_factory=dict)
    #: inline runs draw their DP noise from seeds derived from :attr:`Run.noise_id`
    #: (:func:`fedmoe.privacy.dp.simulation_noise`): a run repeats exactly
    seeded_noise: bool = True


def load_grid(path: Path) -> Grid:
    """Parse and validate a grid file; every run's config is built (and so checked) here.

    Raises
    ------
    GridError
        For unreadable TOML, an unknown table or key, a malformed value, a key set twice,
        or a run config that does not validate (with the cell it belongs to).
    """
    try:
        raw = loads_toml(Path(path).read_text())
    except FileNotFoundError as err:
        raise GridError(f"grid file {path} does not exist") from err
    except ConfigError as err:
        raise GridError(f"grid file {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"grid file {path} is not valid TOML: {err}") from err
    return parse_grid(raw, str(path))


def parse_grid(raw: dict[str, Any], name: str = "grid") -> Grid:
    """:func:`load_grid` on an already parsed TOML document."""
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise GridError(f"{name}: unknown table(s) {unknown}; a grid file has {list(TABLES)}")
    for table in TABLES:
        if table in raw and not isinstance(raw[table], dict):
            raise GridError(f"{name}: '{table}' must be a table ([{table}])")
    exp = _experiment(raw.get("experiment", {}), name)
    valid_keys = set(FedMoEConfig.keys())
    owner: dict[str, str] = {}  # run-config key -> where it is set

    def check(key: str, where: str) -> None:
        if key in RESERVED:
            raise GridError(f"{name}: {where} sets '{key}'; the runner sets it "
                            f"({'[experiment] seeds' if key == 'seed' else '--out'})")
        if key not in valid_keys:
            raise GridError(f"{name}: {where} has unknown run-config key '{key}'; valid keys: "
                            f"{', '.join(sorted(valid_keys))}")

    def claim(key: str, where: str) -> None:
        check(key, where)
        if key in owner and owner[key] != where:
            raise GridError(f"{name}: '{key}' is set in both {owner[key]} and {where}; "
                            "set it in one place")
        owner[key] = where

    base = raw.get("base", {})
    for key in base:
        claim(key, "[base]")
    axes: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
    for axis, values in raw.get("grid", {}).items():
        axes.append((axis, _axis(axis, values, name, claim)))
    per_method = raw.get("method", {})
    for method, keys in per_method.items():
        if method not in METHODS:
            raise GridError(f"{name}: [method.{method}]: unknown method; one of {METHODS}")
        if not isinstance(keys, dict):
            raise GridError(f"{name}: [method.{method}] must be a table of run-config keys")
        for key in keys:  # several [method.*] tables may set the same key
            where = f"[method.{method}]"
            check(key, where)
            if key == "method" or (key in owner and not owner[key].startswith("[method.")):
                raise GridError(f"{name}: '{key}' is set in both "
                                f"{owner.get(key, '[method.*]')} and {where}; set it in one "
                                "place")
            owner.setdefault(key, where)

    runs = []
    for combo in itertools.product(*[values for _, values in axes]):
        labels = tuple((axis, label) for (axis, _), (label, _) in zip(axes, combo, strict=True))
        keys = dict(base)
        for _, bundle in combo:
            keys |= bundle
        keys |= per_method.get(keys.get("method", "fedmoe"), {})
        for seed in exp["seeds"]:
            try:
                config = FedMoEConfig.from_run_config(keys | {"seed": seed})
            except ConfigError as err:
                cell = " ".join(f"{k}={v}" for k, v in labels) or "(the only cell)"
                raise GridError(f"{name}: cell {cell}, seed {seed}: {err}") from err
            if config.min_available_clients > exp["clients"]:
                raise GridError(f"{name}: min-available-clients={config.min_available_clients}"
                                f" exceeds [experiment] clients = {exp['clients']}: the server "
                                "would wait forever; lower min-available-clients")
            runs.append(Run(labels, config, exp["clients"]))
    used = {r.config.method for r in runs}
    for method in per_method:
        if method not in used:  # its keys were never checked against a run: say so
            raise GridError(f"{name}: [method.{method}] applies to no run (no cell has method "
                            f"= '{method}'); remove the table or put '{method}' on the "
                            "method axis")
    configs = [json.dumps([r.config.to_run_config(), r.clients], sort_keys=True, default=str)
               for r in runs]
    if len(set(configs)) != len(configs):
        raise GridError(f"{name}: two cells give the same run config (an axis repeats a "
                        "value, or a bundle sets nothing new); make every cell distinct")
    return Grid(tuple(runs), tuple(a for a, _ in axes), exp["engine"], exp["jobs"],
                exp["threads"], raw, exp["seeded-noise"])


def _experiment(table: dict[str, Any], name: str) -> dict[str, Any]:
    unknown = sorted(set(table) - set(EXPERIMENT_KEYS))
    if unknown:
        raise GridError(f"{name}: [experiment] has unknown key(s) {unknown}; valid: "
                        f"{sorted(EXPERIMENT_KEYS)}")
    exp = {"clients": 10, "seeds": [1, 2, 3], "engine": "inline", "jobs": 1, "threads": 1}
    for key, value in table.items():
        want = EXPERIMENT_KEYS[key]
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise GridError(f"{name}: [experiment] {key} must be a {want.__name__}, got "
                            f"{value!r}")
        exp[key] = value
    seeds = exp["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                            for s in seeds) or len(set(seeds)) != len(seeds):
        raise GridError(f"{name}: [experiment] seeds must be a non-empty list of distinct "
                        f"integers >= 0, e.g. [1, 2, 3]; got {seeds!r}")
    for key in ("clients", "jobs", "threads"):
        if exp[key] < 1:
            raise GridError(f"{name}: [experiment] {key} must be >= 1, got {exp[key]}")
    if exp["engine"] not in ENGINES:
        raise GridError(f"{name}: [experiment] engine must be one of {ENGINES}, got "
                        f"{exp['engine']!r}")
    if exp["engine"] == "flower" and table.get("seeded-noise"):
        raise GridError(f"{name}: [experiment] seeded-noise = true needs engine = \"inline\": "
                        "Flower's engine runs the clients in Ray workers, which draw their "
                        "own noise from the OS")
    exp.setdefault("seeded-noise", exp["engine"] == "inline")
    return exp


def _axis(axis: str, values: Any, name: str,
          claim: Callable[[str, str], None]) -> list[tuple[str, dict[str, Any]]]:
    """An axis as (label, run-config keys) per value: a list of plain values of one
    run-config key, or a list of bundles (tables, each with a ``name``)."""
    where = f"[grid] {axis}"
    if not isinstance(values, list) or not values:
        raise GridError(f"{name}: {where} must be a non-empty list of values, e.g. "
                        f"{axis} = [1, 2]")
    if all(isinstance(v, dict) for v in values):
        out = []
        for i, bundle in enumerate(values):
            label = bundle.get("name")
            if not isinstance(label, str) or not label:
                raise GridError(f"{name}: {where}[{i}] needs a name = \"...\" (its label "
                                "in the report)")
            keys = {k: v for k, v in bundle.items() if k != "name"}
            for key in keys:
                claim(key, where)
            out.append((label, keys))
        labels = [label for label, _ in out]
        if len(set(labels)) != len(labels):
            raise GridError(f"{name}: {where}: bundle names repeat: {labels}")
        return out
    if any(isinstance(v, (dict, list)) for v in values):
        raise GridError(f"{name}: {where} mixes tables and values; use all plain values of "
                        f"'{axis}' or all bundles (tables with a name)")
    claim(axis, where)
    return [(_label(v), {axis: v}) for v in values]


def _label(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------- runs
def run_one(run: Run, run_dir: Path, engine: str = "inline", threads: int = 1,
            seeded_noise: bool = False) -> dict[str, Any]:
    """Run one federation from scratch in ``run_dir`` and return its ``results.csv`` row
    (also written to ``run_dir/row.json``, which marks the run finished; a run in which
    every client was excluded before its first round raises instead, so it is reported
    as failed and retried, not kept as a result). With
    ``seeded_noise`` (inline only) its DP noise comes from seeds derived from the run's
    :attr:`Run.noise_id`, so running it again gives the same row."""
    import logging
    import warnings

    import torch

    import server.app  # noqa: F401  (imported first: importing Flower resets its log level)

    torch.set_num_threads(threads)  # tiny models: more threads only contend (see benchmarks)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("opacus").setLevel(logging.ERROR)  # "First batch is empty": handled
    warnings.filterwarnings("ignore")
    if run_dir.exists():  # interrupted before: its ledgers and local experts are stale
        shutil.rmtree(run_dir)
    config = run.config.replace(run_dir=str(run_dir))
    if engine == "inline":
        from simulations.inline import run_inline

        from fedmoe.privacy.dp import simulation_noise

        with simulation_noise(int(run.noise_id, 16)) if seeded_noise else nullcontext():
            inline = run_inline(config, run.clients)
        results, wall, client = inline.results, inline.wall_seconds, inline.client_time.total
    else:
        results, wall, client = _run_flower(config, run.clients), None, None
        wall = results["wall_seconds"]
    stopped = str(results.get("stopped") or "")
    if stopped.startswith("every client is excluded before round 1"):  # trained nothing:
        raise RuntimeError(f"no client took part: {stopped}")  # not a result to keep
    row = result_row(run, results, wall_seconds=wall, client_seconds=client)
    write_atomic(run_dir / ROW, json.dumps(row, default=str).encode())
    return row


def _run_flower(config: FedMoEConfig, clients: int) -> dict[str, Any]:
    """One run in Flower's simulation engine (Ray), as ``fedmoe simulate`` does."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app
    from simulations.runner import keep_client_state

    captured: dict[str, Any] = {}

    class Capture:
        def started(self, config: FedMoEConfig, run_dir: Path) -> None: ...
        def round_finished(self, record: Any) -> None: ...

        def finished(self, results: dict[str, Any], results_path: Path) -> None:
            captured["results"], captured["path"] = results, results_path

    run_simulation(server_app=make_server_app(config, Capture()), client_app=client_app,
                   num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if "results" not in captured:
        raise RuntimeError("the Flower simulation ended without results")
    keep_client_state(captured["results"]["run_id"], captured["path"].parent)
    return captured["results"]


def result_row(run: Run, results: dict[str, Any], *, wall_seconds: float,
               client_seconds: float | None) -> dict[str, Any]:
    """A ``results.csv`` row: the run's labels, every run-config key, the metrics."""
    from fedmoe.methods import method_spec

    clients = results["final"]["clients"]
    personal = [c["personalized_accuracy"] for c in clients]
    worst = sorted(personal)[:max(1, math.ceil(len(personal) / 10))] if personal else []
    eps = [math.inf if c["epsilon"] is None else c["epsilon"] for c in clients]
    uploads = [c["upload_bytes"] for r in results["rounds"] for c in r["clients"]
               if c.get("upload_bytes") is not None]
    downloads = [c["download_bytes"] for r in results["rounds"] for c in r["clients"]
                 if c.get("download_bytes") is not None]
    trained = [r for r in results["rounds"] if r["clients"] and any(
        c.get("upload_bytes") is not None for c in r["clients"])]
    global_only = method_spec(run.config.method).global_only
    row: dict[str, Any] = {"run": run.run_id, **{f"axis:{k}": v for k, v in run.labels}}
    row |= run.config.to_run_config()
    row.pop("run-dir")
    row["clients"] = run.clients
    row |= {
        "personalized_accuracy": _mean(personal),
        "personalized_accuracy_worst_decile": _mean(worst),
        "global_accuracy": (_mean([c["global_accuracy"] for c in clients]) if global_only
                            else None),
        "epsilon_max": max(eps) if eps else None,
        "epsilon_per_client": json.dumps([_num(e) for e in eps]),
        "upload_bytes_per_client_round": _mean(uploads),
        "download_bytes_per_client_round": _mean(downloads),
        "rounds": len(trained),
        "wall_seconds": round(wall_seconds, 3),
        "client_seconds": None if client_seconds is None else round(client_seconds, 3),
        "privacy": results["privacy"]["mode"],
        "stopped": results["privacy"]["stopped"] or "",
        "round_accuracy": json.dumps([r["personalized_accuracy_mean"] for r in results["rounds"]]),
        "client_accuracy": json.dumps(personal),
    }
    return row


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _num(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


# -------------------------------------------------------------------------- driver
def run_grid(
    grid: Grid, out: Path, *, jobs: int | None = None, echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished run of ``grid`` into ``out``; rewrite the CSV, report and plots
    after each; return all rows (finished earlier or now), in grid order."""
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    jobs = jobs or grid.jobs
    pending_runs = [run for run in grid.runs if not (out / "runs" / run.run_id / ROW).is_file()]
    check_inputs(pending_runs, echo)  # before anything is written or started
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "grid.json", json.dumps(grid.source, indent=2, default=str).encode())
    rows: dict[str, dict[str, Any]] = {}
    pending: list[Run] = []
    queued: set[str] = set()
    for run in grid.runs:
        done = out / "runs" / run.run_id / ROW
        if done.is_file():
            rows[run.run_id] = json.loads(done.read_text())
        elif run.run_id not in queued:  # a baseline shared by several cells runs once
            queued.add(run.run_id)
            pending.append(run)
    total = len({run.run_id for run in grid.runs})
    echo(f"fedmoe experiment: {total} runs ({len(rows)} already finished, {len(pending)} to "
         f"run) · engine {grid.engine} · {jobs} job(s) · results in {out}")
    started, finished = time.time(), 0

    def done(run: Run, row: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        rows[run.run_id] = row
        write_outputs(out, _cell_rows(grid, rows), grid.axes)
        elapsed = time.time() - started
        eta = elapsed / finished * (len(pending) - finished)
        echo(f"[{len(rows)}/{total}] {run.describe()} · acc {_fmt(row['personalized_accuracy'])}"
             f" · ε {_fmt_eps(row['epsilon_max'])} · {row['wall_seconds']:.1f} s · elapsed "
             f"{_duration(elapsed)} · ETA {_duration(eta)}")

    def failed(run: Run, err: BaseException) -> None:
        nonlocal finished
        finished += 1
        failures.append(f"{run.describe()} (runs/{run.run_id}): {type(err).__name__}: {err}")
        echo(f"[failed] {failures[-1]} · it is retried when the grid is run again")

    failures: list[str] = []
    if jobs == 1:
        for run in pending:
            try:
                row = run_one(run, out / "runs" / run.run_id, grid.engine, grid.threads,
                              grid.seeded_noise)
            except Exception as err:  # noqa: BLE001  (one broken run must not end the grid)
                failed(run, err)
                continue
            done(run, row)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked torch/Ray state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(run_one, run, out / "runs" / run.run_id, grid.engine,
                                   grid.threads, grid.seeded_noise): run for run in pending}
            for future in as_completed(futures):
                try:
                    row = future.result()
                except Exception as err:  # noqa: BLE001
                    failed(futures[future], err)
                    continue
                done(futures[future], row)
    if not pending or (rows and failures):
        write_outputs(out, _cell_rows(grid, rows), grid.axes)
    if failures:
        raise GridRunError(failures)
    return _cell_rows(grid, rows)


def check_inputs(runs: Sequence[Run], echo: Callable[[str], None]) -> None:
    """Check every run's inputs as ``fedmoe simulate`` does before it starts
    (:func:`simulations.runner.check_inputs`: data file, data split, client counts, DP
    steps, every client size's DP plan), so that a grid with a missing file or an impossible split
    stops before its first run rather than failing (or finishing without a client) run by
    run. Each distinct warning is echoed once.

    Raises
    ------
    GridError
        Listing each distinct problem once, with the runs it stops (up to three named).
    """
    from simulations.runner import check_inputs as check_run

    problems: dict[str, list[Run]] = {}
    warned: set[str] = set()

    def warn(note: str) -> None:
        if note not in warned:
            warned.add(note)
            echo(f"fedmoe: warning: {note}")

    for run in runs:
        try:
            check_run(run.config, run.clients, warn, "[experiment] clients")
        except ConfigError as err:
            problems.setdefault(str(err), []).append(run)
    if problems:
        lines = []
        for why, stopped in problems.items():
            named = "; ".join(r.describe() for r in stopped[:3])
            more = f" and {len(stopped) - 3} more" if len(stopped) > 3 else ""
            lines.append(f"{why} — in {len(stopped)} run(s): {named}{more}")
        raise GridError(f"{sum(map(len, problems.values()))} run(s) of the grid cannot start "
                        "(nothing was run; fix the grid file and run it again):\n"
                        + "\n".join(lines))


def _cell_rows(grid: Grid, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished cell × seed, in grid order. A baseline run shared by cells that
    differ only in keys it does not read (:data:`fedmoe.methods.MOE_MODEL_KEYS`) ran once;
    each of those cells' rows has the run's results under the cell's own labels and keys."""
    out = []
    for run in grid.runs:
        if run.run_id in rows:
            keys = run.config.to_run_config()
            keys.pop("run-dir")
            out.append(rows[run.run_id] | {f"axis:{k}": v for k, v in run.labels} | keys)
    return out


def _die_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """Worker initialiser: exit as soon as the grid's process is gone (killed by SIGTERM or
    SIGKILL, which Python cannot forward), so no orphan goes on computing a run nobody
    collects. The run it was in leaves no ``row.json`` and is redone on the next invocation."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


class GridRunError(RuntimeError):
    """Some runs of a grid failed (the others finished and are in the outputs)."""

    def __init__(self, failures: list[str]) -> None:
        super().__init__(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))
        self.failures = failures


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_eps(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "∞ (non-private)" if math.isinf(value) else f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------------- outputs
def write_outputs(out: Path, rows: list[dict[str, Any]], axes: Sequence[str]) -> None:
    """``results.csv``, ``report.md`` and the plots from ``rows``."""
    write_csv(out / CSV, rows)
    from simulations.report import plot_all, report_markdown

    write_atomic(out / REPORT, report_markdown(rows, axes).encode())
    plot_all(rows, axes, out)


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else _num(row[k])
                             if isinstance(row.get(k), float) else row.get(k)) for k in columns})
    write_atomic(path, buffer.getvalue().encode())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
