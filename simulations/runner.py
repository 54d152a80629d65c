"""Run fedmoe in Flower's simulation engine on one machine, with a live progress display.

``run(config, num_clients)`` is what ``fedmoe simulate`` (and ``make run``) calls: the same
ServerApp and ClientApp as ``flwr run .``, run by ``flwr.simulation.run_simulation`` with
one virtual SuperNode per client.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.reporting import EPSILON_TOLERANCE
from fedmoe.storage import move_dir, write_atomic
from server.strategy import RoundRecord


#: This engine's name in a checkpoint (a run resumes only on the engine that ran it).
ENGINE = "flower"
#: The signals that stop a simulation gracefully (the report of the finished rounds is
#: written, Ray is stopped), with the name the report gives each: Ctrl-C, and the SIGTERM
#: of ``kill``, ``timeout`` and batch schedulers. A second one aborts at once.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
#: A stop signal this soon after the first is the same request (``timeout`` and batch
#: schedulers signal the process and then its whole group), not a second one.
STOP_REPEAT_SECONDS = 1.0


class ProgressListener:
    """Shows rounds, clients and ε as a run goes, and the per-client table at the end: a
    progress bar on a terminal, else (a log file, a pipe, a service manager) one line per
    finished round."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.lines = not console.is_terminal  # a bar would be drawn once, at the end
        self.progress = Progress(
            TextColumn("[bold]round {task.completed}/{task.total}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = None
        self.results: dict[str, Any] | None = None
        self.results_path: Path | None = None

    def started(self, config: FedMoEConfig, run_dir: Path) -> None:
        sigma = (f"σ={config.noise_multiplier:g}" if config.noise_multiplier
                 else "σ calibrated per client")
        delta = f"δ={config.target_delta:g}" if config.target_delta else "δ<1/n per client"
        privacy = (f"DP-SGD {sigma} (ε≤{config.target_epsilon:g}, {delta}, {config.accountant})"
                   if config.private else
                   "[bold red]NON-PRIVATE[/bold red] (ε=∞: no clipping, no noise)")
        model = config.model if config.method == "fedmoe" else f"{config.method} MLP"
        self.console.print(
            f"[bold]fedmoe[/bold] {model} on {config.data}: "
            f"{config.num_server_rounds} rounds, {privacy}, run folder {run_dir}"
        )
        if not self.lines:
            self.progress.start()
        self.task = self.progress.add_task(
            "rounds", total=config.num_server_rounds, status="starting clients…"
        )

    def round_finished(self, record: RoundRecord) -> None:
        evals = list(record.evaluate.values())
        acc = sum(e.personalized_accuracy for e in evals) / len(evals) if evals else float("nan")
        eps = max(record.epsilon.values(), default=0.0)  # the server's ledger
        phase = "" if record.phase == "train" else f"{record.phase} · "
        perplexities = [d["personalized-perplexity"] for d in record.details.values()
                        if "personalized-perplexity" in d]
        score = (f"personalised perplexity {sum(perplexities) / len(perplexities):.2f}"
                 if perplexities else f"personalised acc {acc:.3f}" if evals  # a language
                 else "not evaluated")  # model's; a round lost to an interrupt has no score
        status = (f"{phase}clients {len(record.train)}/{record.sampled} trained · "
                  f"ε max {eps:.2f}{_reported_max(record)} · {score}")
        if record.rejected:
            status += f" · {len(record.rejected)} rejected"
        self.progress.update(self.task, advance=1, status=status)
        if self.lines:
            task = self.progress.tasks[0]
            self.console.print(f"round {record.server_round}/{task.total:.0f} · {status}",
                               highlight=False)

    def finished(self, results: dict[str, Any], results_path: Path) -> None:
        self.results, self.results_path = results, results_path
        if not self.lines:
            self.progress.stop()
        self.console.print(client_table(results))
        if line := pretraining_line(results):
            self.console.print(line)
        if results["privacy"]["stopped"]:
            self.console.print(f"[yellow]training stopped early: "
                               f"{results['privacy']['stopped']}[/yellow]")
        final = results["final"]
        self.console.print(
            f"mean personalised accuracy {_fmt(final['personalized_accuracy_mean'])} · "
            f"global-only {_fmt(final['global_accuracy_mean'])} · "
            f"ε max {final['epsilon_max']:.2f} · {results['wall_seconds']:.0f} s\n"
            f"results: {results_path}"
        )


def pretraining_line(results: dict[str, Any]) -> str | None:
    """The perplexities of a run's last pretraining round, for a run that fine-tuned after
    it (the final table then shows the fine-tuned task's accuracy only): the means over
    clients of the personalised, global-only and unigram perplexity, and how many clients'
    personalised perplexity is below their own unigram model's. ``None`` for a run
    without a pretraining round that reported perplexities, or one that ended in it."""
    keys = ("personalized-perplexity", "global-perplexity", "unigram-perplexity")

    def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
        return [c for c in record.get("clients", []) if all(k in c for k in keys)]

    rounds = [r for r in results["rounds"] if r.get("phase") == "pretrain" and rows(r)]
    if not rounds or rounds[-1] is results["rounds"][-1]:
        return None
    clients = rows(rounds[-1])
    mine, glob, unigram = ([c[k] for c in clients] for k in keys)
    below = sum(p < u for p, u in zip(mine, unigram, strict=True))
    n = len(clients)
    return (f"pretraining, its last round ({rounds[-1]['round']}): personalised perplexity "
            f"{sum(mine) / n:.2f} · global-only {sum(glob) / n:.2f} · unigram "
            f"{sum(unigram) / n:.2f} (means over clients) · {below}/{n} clients below their "
            f"unigram perplexity")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _reported_max(record: RoundRecord) -> str:
    """`` (clients report X)`` (their largest ε) when any client's own ε differs from the
    server's ledger's."""
    reported = [(c, e.epsilon) for c, e in record.evaluate.items()]
    reported += [(c, t.epsilon) for c, t in record.train.items() if c not in record.evaluate]
    if not reported:
        return ""
    theirs = max(e for _, e in reported)
    differ = any(not math.isclose(record.epsilon.get(c, 0.0), e, rel_tol=EPSILON_TOLERANCE,
                                  abs_tol=1e-9) for c, e in reported)
    return f" (clients report {theirs:.2f})" if differ else ""


def _epsilon_cell(row: dict[str, Any]) -> str:
    """The server's ε, with the client's own beside it where they differ."""
    cell = f"{row['epsilon']:.3f}"
    if "client_epsilon" in row:
        cell += f" (client {row['client_epsilon']:.3f})"
    return cell


def client_table(results: dict[str, Any]) -> Table:
    """Final per-client table; perplexity (language model) and per-task accuracy
    (multi-task) columns appear when the run has them."""
    clients = results["final"]["clients"]
    extra = [k for k in ("personalized-perplexity", "global-perplexity", "unigram-perplexity")
             if any(k in c for c in clients)]
    extra += sorted({k for c in clients for k in c if k.startswith("personalized-task-")})
    split = results.get("config", {}).get("evaluate-on", "test")
    table = Table(title=f"Per-client results (own {split} split)")
    columns = ["client", "personalised acc", "global-only acc",
               *[k.replace("personalized-", "pers. ").replace("-accuracy", " acc")
                 .replace("global-", "global ").replace("unigram-", "unigram ") for k in extra],
               "rounds", "ε spent", "δ", "σ", "train ex.", "test ex."]
    for col in columns:
        table.add_column(col, justify="right")
    privacy = {p["client"]: p for p in results["privacy"]["clients"]}
    for c in clients:
        p = privacy.get(c["client"], {})
        table.add_row(
            str(c["client"]),
            _fmt(c["personalized_accuracy"]),
            _fmt(c["global_accuracy"]),
            *[_fmt(c.get(k)) for k in extra],
            str(p.get("rounds", "")),
            _epsilon_cell(c),
            f"{p['delta']:g}" if p else "",
            f"{p['noise_multiplier']:.3f}" if p.get("noise_multiplier") else "",
            *(str(c[k]) if c[k] is not None else "–"  # a client that never trained
              for k in ("num_examples", "num_test_examples")),
        )
    return table


def _ray_init_args(verbose: bool) -> dict[str, Any]:
    """``ray.init`` arguments: Flower's (no dashboard), and Ray's forwarding of what its
    actors log ("Manually terminating ClientAppActor" at every shutdown) to this terminal
    only with ``--verbose`` (a client's failure is in results.json either way)."""
    return {"include_dashboard": False, "log_to_driver": verbose}


def _start_ray(verbose: bool) -> None:
    """Start Ray as Flower's simulation backend would (``RayBackend.init_ray``: this
    process's ``sys.path`` passed on to the workers), so that it is started in the main
    thread before ``run_simulation``, which then finds it running."""
    import ray

    if ray.is_initialized():
        return
    path = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        path = f"{path}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = path
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, **_ray_init_args(verbose))


class SimulationInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; the report of the finished rounds is at
    ``results_path``."""

    def __init__(self, results_path: Path, results: dict[str, Any]) -> None:
        super().__init__(f"interrupted; the report of the finished rounds is {results_path}")
        self.results_path, self.results = results_path, results


def preflight(config: FedMoEConfig, num_clients: int) -> FedMoEConfig:
    """Every check that can fail before anything starts; returns ``config`` with its run
    folder resolved (``runs/<timestamp>`` when empty), the folder the run will write.

    Checks the run's inputs (:func:`check_inputs`; its warnings go to stderr) and the run
    folder (creatable and writable, not a file; no earlier run in it, or with ``resume``
    the checkpoint of an unfinished run of the same config and number of clients).

    Raises
    ------
    ConfigError
        Naming the problem and the fix (the CLI exits with code 2).
    LedgerError
        If the run folder holds a server ledger that does not verify, or results without
        their ledger (the CLI exits with code 2).
    """
    from fedmoe.reporting import check_run_folder, resolve_run_dir
    from server.checkpoint import prepare_run_folder

    config = check_inputs(config, num_clients,
                          lambda note: print(f"fedmoe: warning: {note}", file=sys.stderr))
    run_dir = resolve_run_dir(config)
    check_run_folder(run_dir)  # an earlier run's ledger must verify (read-only)
    prepare_run_folder(run_dir, config, num_clients=num_clients, engine=ENGINE)  # or --resume
    check_run_dir(run_dir)  # last: it creates the folder
    return config.replace(run_dir=str(run_dir))


def check_inputs(config: FedMoEConfig, num_clients: int, warn: Callable[[str], None],
                 clients_key: str = "--clients") -> FedMoEConfig:
    """Every check of one simulated run's inputs that needs no run folder, before anything
    starts (``fedmoe simulate`` through :func:`preflight`, ``fedmoe experiment`` for every
    run of its grid); returns ``config`` with the shape of its data file filled in.

    Checks the number of clients against ``min-available-clients``, ``min-train-replies``
    and the text corpus, the data file (read once: :func:`fedmoe.data.with_data_shape`),
    the data split (computed here: every client's size is known and at least
    :data:`fedmoe.data.MIN_CLIENT_EXAMPLES`), the DP steps a client's ``batch-size``
    implies, and every client size's DP plan (:func:`_check_plans`: a δ not below 1/n, a
    ``pretrain-share`` that leaves a phase no σ, a budget that pays for no client's
    round). ``warn`` gets each warning the config, the data file and the plans give (a run
    may go on with them); ``clients_key`` is how the messages name the number of clients
    (``--clients``, or a grid's ``[experiment] clients``).

    Raises
    ------
    ConfigError
        Naming the problem and the fix (:class:`~fedmoe.data.DataSplitError` and
        :class:`~fedmoe.data.files.DataFileError` are ConfigErrors).
    """
    from fedmoe.config import MAX_CLIENTS, MAX_DP_STEPS
    from fedmoe.data import check_split, with_data_shape
    from fedmoe.privacy.accountant import steps_per_epoch
    from fedmoe.privacy.plan import client_sample_rate

    if not 1 <= num_clients <= MAX_CLIENTS:
        raise ConfigError(f"{clients_key} must be in [1, {MAX_CLIENTS:,}], got {num_clients:,}")
    if config.min_available_clients > num_clients:
        raise ConfigError(
            f"min-available-clients={config.min_available_clients} exceeds {clients_key} "
            f"{num_clients}; the server would wait forever. Lower min-available-clients."
        )
    if config.min_train_replies > num_clients:
        raise ConfigError(
            f"min-train-replies={config.min_train_replies} exceeds {clients_key} {num_clients}; "
            "no round could change the model. Lower min-train-replies."
        )
    if config.data == "pystdlib":
        from fedmoe.data.text import stdlib_packages

        if num_clients > len(stdlib_packages()):
            raise ConfigError(
                f"{clients_key} {num_clients}: the text corpus has one client per standard-library "
                f"package and this Python has {len(stdlib_packages())}; use fewer clients"
            )
    if config.data == "node":
        raise ConfigError("dataset 'node' makes every SuperNode read its own data-path: it is "
                          "for deployments; to try a data file here use dataset='csv:PATH' "
                          "(or npz:, images:, hf:)")
    for note in config.warnings():
        warn(note)
    config = with_data_shape(config)  # a data file: read (and checked) once, here
    if config.is_file_data:
        from fedmoe.data.files import load_file, scale_warning

        warning = scale_warning(config.dataset, load_file(config.dataset, config.label_column),
                                config.feature_bounds)
        if warning:
            warn(warning)
    sizes = check_split(config, num_clients)
    if config.batch_size and sizes:
        smallest = min(train for train, _ in sizes)
        steps = (config.num_server_rounds * config.local_epochs
                 * steps_per_epoch(client_sample_rate(config, smallest)))
        if steps > MAX_DP_STEPS:
            raise ConfigError(
                f"batch-size={config.batch_size} on a client of {smallest} training examples is "
                f"{steps:,} DP-SGD steps over {config.num_server_rounds:,} rounds, over the "
                f"{MAX_DP_STEPS:,} fedmoe allows; use fewer rounds or epochs, or a larger "
                "batch-size"
            )
    _check_plans(config, num_clients, sizes, warn)
    return config


def _train_sizes(config: FedMoEConfig, num_clients: int,
                 sizes: list[tuple[int, int]]) -> set[int]:
    """The distinct training-set sizes the clients will plan with: from the split's
    (train, test) sizes, less the validation split with ``evaluate-on = "validation"``
    (:func:`fedmoe.data.validation_size`); the text corpus's by loading it (its
    windows are cheap to count)."""
    from fedmoe.data import load_client_data, validation_size

    if not sizes:
        return {len(load_client_data(config, i, num_clients, config.phase(1)).train)
                for i in range(num_clients)}
    if config.evaluate_on != "validation":  # check_split: every train and test size ≥ 1
        return {train for train, _ in sizes}
    return {train - validation_size(train, config.validation_fraction) for train, _ in sizes}


def _check_plans(config: FedMoEConfig, num_clients: int, sizes: list[tuple[int, int]],
                 warn: Callable[[str], None]) -> None:
    """Plan a client of each training size as the server will (no earlier spend: a
    simulation's ledgers start empty) and refuse, before anything starts, a run in which
    a client's plan fails (a δ not below 1/n, a ``pretrain-share`` that leaves a phase no
    σ: :class:`~fedmoe.privacy.plan.PlanError`) or in which no client's budget pays for a
    round — the server would exclude every client and train nothing. Clients that cannot
    pay while others can are a warning: the run goes on without them.

    Raises
    ------
    ConfigError
        With the plan's reason and the fix.
    """
    from fedmoe.methods import has_label_prior
    from fedmoe.privacy.plan import PlanError, plan_client

    if math.isinf(config.target_epsilon):
        return
    trains = sorted(_train_sizes(config, num_clients, sizes))
    unpaid = []
    for n in trains:
        try:
            plan = plan_client(config, "preflight", num_train=n, budget=config.target_epsilon,
                               label_prior=has_label_prior(config))
        except PlanError as err:
            why = str(err).removeprefix("client 'preflight': ")
            where = "" if "training examples" in why else f" (a client of {n:,} training examples)"
            raise ConfigError(f"{why}{where}") from None
        if plan.rounds_allowed == 0:
            unpaid.append(n)
    if not unpaid:
        return
    if config.noise_multiplier > 0:
        why = (f"noise-multiplier={config.noise_multiplier:g} costs more than "
               f"target-epsilon={config.target_epsilon:g} in one round")
        fix = "raise noise-multiplier or target-epsilon, or set noise-multiplier=0 (σ calibrated)"
    else:
        why = f"target-epsilon={config.target_epsilon:g} cannot pay for one round"
        fix = ("raise target-epsilon, or lower label-prior-share, local-epochs or "
               "sample-rate")
    def span(ns: list[int]) -> str:
        return f"{ns[0]:,}" if ns[0] == ns[-1] else f"{ns[0]:,}–{ns[-1]:,}"

    if len(unpaid) == len(trains):
        raise ConfigError(f"{why} for any client (training sizes {span(trains)}): the server "
                          f"would exclude every client and train nothing; {fix}")
    warn(f"{why} for the clients of {span(unpaid)} training examples: they take no part in "
         f"the run; {fix}")


def check_run_dir(run_dir: Path) -> None:
    """The run folder must be a folder (or creatable) that this process can write into:
    it is created here and a probe file written and removed (a permission check alone
    would pass for root on a read-only file system).

    Raises
    ------
    ConfigError
        If ``run_dir`` (or a parent) is a file, or it cannot be created or written; any
        folder created for the probe is removed again.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == run_dir else f" (its parent {existing} is a file)"
        raise ConfigError(f"--out {run_dir}: is a file, not a folder{where}; choose another "
                          "--out (a new folder)")
    for name in ("ledger.sqlite", "results.json"):
        if (run_dir / name).is_dir():
            raise ConfigError(f"--out {run_dir}: {run_dir / name} is a folder; choose another "
                              "--out")
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".fedmoe-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        for folder in reversed(created):
            folder.rmdir()
        raise ConfigError(f"--out {run_dir}: cannot write there ({err.strerror or err}); choose "
                          "another --out") from None


def run(config: FedMoEConfig, num_clients: int, *, verbose: bool = False) -> dict[str, Any]:
    """Simulate ``num_clients`` clients; return the results that were written to the run folder.

    Everything that can be checked is checked first (:func:`preflight`), and what an
    earlier, killed run left behind is removed (:func:`simulations.leftovers.clean_leftovers`).
    Ctrl-C or SIGTERM (:data:`STOP_SIGNALS`) stops the run within seconds: the round in
    progress is abandoned, the report of the finished rounds is written, Ray is stopped,
    and :class:`SimulationInterrupted` is raised. A second one aborts at once.

    Raises
    ------
    ConfigError
        If the run could never start (bad client count, run folder or data split).
    SimulationInterrupted
        After Ctrl-C or SIGTERM, once the partial report is written.
    """
    from fedmoe.storage import run_folder_lock
    from server.checkpoint import prepare_run_folder

    config = preflight(config, num_clients)
    with run_folder_lock(Path(config.run_dir)):  # held until the run folder is complete
        # again, under the lock: another run may have ended in the meantime
        prepare_run_folder(Path(config.run_dir), config, num_clients=num_clients, engine=ENGINE)
        return _run(config, num_clients, verbose=verbose)


def _run(config: FedMoEConfig, num_clients: int, *, verbose: bool) -> dict[str, Any]:
    # Imported here: the simulation engine (Ray) is heavy and only needed to run.
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import StopRequest, make_server_app
    from simulations.leftovers import Recorder, clean_leftovers

    # piped output (CI logs, make run | tee) gets a width that fits the per-client table
    console = Console(width=None if sys.stdout.isatty() else 120)
    for line in clean_leftovers():
        console.print(f"[yellow]cleaned up after an earlier killed run: {line}[/yellow]")
    if not verbose:
        # Flower's INFO log and its run_simulation deprecation notice would bury the
        # progress display; dropped replies show up there and in results.json instead.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    listener = ProgressListener(console)
    stop = StopRequest()

    def on_stop_signal(signum: int, frame: Any) -> None:
        cause = STOP_SIGNALS[signum]
        if stop.is_set():
            if time.monotonic() - stop.at < STOP_REPEAT_SECONDS:
                return  # the same request again (`timeout` signals the child, then its group)
            raise KeyboardInterrupt  # a second stop signal: abort now
        stop.request(cause)
        if not verbose:  # dying actors' errors (a signal to the whole group) are expected now
            logging.getLogger("flwr").setLevel(logging.CRITICAL)
        print(f"\nfedmoe: stopping ({cause}; {cause} again to abort): writing the report of "
              "the finished rounds…", file=sys.stderr, flush=True)

    # Python lets only the main thread set signal handlers; run() elsewhere keeps Python's
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_stop_signal) for s in STOP_SIGNALS} if main else {}
    recorder = Recorder(Path(config.run_dir).resolve())
    previous_run = _checkpoint_run_id(config)

    def on_run_id(run_id: int) -> None:
        recorder.set_run_id(run_id)
        if previous_run is not None:  # before any client is sent a message
            carry_client_state(previous_run, run_id, Path(config.run_dir))
    try:
        with recorder:
            if main:
                # ray.init replaces this process's SIGTERM handler twice (its own exit, then
                # the core worker's abort: exit -6, no report); started here, before
                # run_simulation (which then uses it), the stop handlers go back on top
                _start_ray(verbose)
                for sig in STOP_SIGNALS:
                    signal.signal(sig, on_stop_signal)
            run_simulation(
                server_app=make_server_app(config, listener, stop=stop, on_run_id=on_run_id,
                                           num_clients=num_clients, engine=ENGINE),
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                "init_args": _ray_init_args(verbose)},
                verbose_logging=verbose,
            )
    finally:
        try:  # the stop handlers stay until the clean-up is done: a signal in it aborts it
            if listener.results is not None:
                kept = keep_client_state(listener.results["run_id"],
                                         listener.results_path.parent)
                if kept:
                    listener.console.print(f"simulated clients' state (ledgers, local "
                                           f"experts): {kept}")
            for line in recorder.finish():
                logging.getLogger(__name__).info("ended leftover Ray process %s", line)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if listener.results is None:
        raise RuntimeError("the simulation ended without results; rerun with --verbose for logs")
    if stop.is_set():
        raise SimulationInterrupted(listener.results_path, listener.results)
    return listener.results


def _checkpoint_run_id(config: FedMoEConfig) -> int | None:
    """Flower's run id of the run a ``resume`` continues (its clients' state is named by it)."""
    if not config.resume:
        return None
    from server.checkpoint import load_checkpoint

    return load_checkpoint(Path(config.run_dir)).run_id


#: In a simulation's run folder: which Flower run id's folder holds the simulated clients'
#: state (written before the state moves to a resumed run's id, so that a resume killed
#: before its first checkpoint leaves the state findable; the checkpoint names the run id
#: of the last finished round).
STATE_OWNER = Path("clients") / "owner.json"


def carry_client_state(previous: int, run_id: int, run_dir: Path) -> Path | None:
    """Give a resumed simulation's clients the state of the run it continues.

    Simulated clients keep their ledgers and local experts under a folder named by
    Flower's run id (:func:`clients.state.run_state_root`), which is new in every process.
    The state of the run this one continues is in the temp directory, or in
    ``<run_dir>/clients`` once ``fedmoe clean`` (or this command's own cleanup) moved it
    there, under the id :data:`STATE_OWNER` names (a resume killed before it finished a
    round) or else the checkpoint's ``previous``; it is moved to the new run id's folder
    (:func:`fedmoe.storage.move_dir`: complete or absent, whenever it is killed), so each
    client continues its own ledger and experts.
    """
    from clients.state import run_state_root

    target = run_state_root(run_id)
    if target.exists():
        return None
    for owner in dict.fromkeys([*_state_owner(run_dir), previous]):
        for source in (run_dir / "clients" / f"run-{owner}", run_state_root(owner)):
            if source.is_dir():
                run_dir.joinpath(STATE_OWNER).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(run_dir / STATE_OWNER, json.dumps({"run_id": run_id}).encode())
                move_dir(source, target)
                return target
    return None


def _state_owner(run_dir: Path) -> list[int]:
    """The run id :data:`STATE_OWNER` names, if it is readable (else none)."""
    try:
        return [int(json.loads((run_dir / STATE_OWNER).read_text())["run_id"])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def keep_client_state(run_id: int, run_dir: Path) -> Path | None:
    """Move the simulated clients' state (their ledgers and local experts) out of the temp
    directory into ``<run_dir>/clients/run-<run_id>``; return where, or None if none.

    Simulated clients have no ``state-dir``, so they keep their state under the temp
    directory (:func:`clients.state.run_state_root`), where it would pile up run after run.
    Moved, it stays inspectable next to the server's ledger (``fedmoe budget`` reads a
    client's folder too). In a deployment it stays on each client's own machine.
    """
    from clients.state import run_state_root

    source = run_state_root(run_id)
    if not source.is_dir():
        return None
    target = run_dir / "clients" / source.name
    move_dir(source, target)
    return target
