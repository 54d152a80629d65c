"""Run fedmoe in Flower's simulation engine on one machine, with a live progress display.

``run(config, num_clients)`` is what ``fedmoe simulate`` (and ``make run``) calls: the same
ServerApp and ClientApp as ``flwr run .``, run by ``flwr.simulation.run_simulation`` with
one virtual SuperNode per client.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmoe.config import ConfigError, FedMoEConfig
from server.strategy import RoundRecord


class ProgressListener:
    """Shows rounds, clients and ε as a run goes, and the per-client table at the end."""

    def __init__(self, console: Console) -> None:
        self.console = console
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
        self.progress.start()
        self.task = self.progress.add_task(
            "rounds", total=config.num_server_rounds, status="starting clients…"
        )

    def round_finished(self, record: RoundRecord) -> None:
        evals = list(record.evaluate.values())
        acc = sum(e.personalized_accuracy for e in evals) / len(evals) if evals else float("nan")
        eps = max((e.epsilon for e in evals), default=0.0)
        phase = "" if record.phase == "train" else f"{record.phase} · "
        status = (f"{phase}clients {len(record.train)}/{record.sampled} trained · "
                  f"ε max {eps:.2f} · personalised acc {acc:.3f}")
        if record.rejected:
            status += f" · {len(record.rejected)} rejected"
        self.progress.update(self.task, advance=1, status=status)

    def finished(self, results: dict[str, Any], results_path: Path) -> None:
        self.results, self.results_path = results, results_path
        self.progress.stop()
        self.console.print(client_table(results))
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def client_table(results: dict[str, Any]) -> Table:
    """Final per-client table; perplexity (language model) and per-task accuracy
    (multi-task) columns appear when the run has them."""
    clients = results["final"]["clients"]
    extra = [k for k in ("personalized-perplexity", "global-perplexity", "unigram-perplexity")
             if any(k in c for c in clients)]
    extra += sorted({k for c in clients for k in c if k.startswith("personalized-task-")})
    table = Table(title="Per-client results (own test split)")
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
            f"{c['epsilon']:.3f}",
            f"{p['delta']:g}" if p else "",
            f"{p['noise_multiplier']:.3f}" if p.get("noise_multiplier") else "",
            str(c["num_examples"]),
            str(c["num_test_examples"]),
        )
    return table


def run(config: FedMoEConfig, num_clients: int, *, verbose: bool = False) -> dict[str, Any]:
    """Simulate ``num_clients`` clients; return the results that were written to the run folder.

    Raises
    ------
    ConfigError
        If the run could never start (more required clients than simulated ones).
    """
    if num_clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {num_clients}")
    if config.min_available_clients > num_clients:
        raise ConfigError(
            f"min-available-clients={config.min_available_clients} exceeds --clients "
            f"{num_clients}; the server would wait forever. Lower min-available-clients."
        )
    if config.data == "pystdlib":
        from fedmoe.data.text import stdlib_packages

        if num_clients > len(stdlib_packages()):
            raise ConfigError(
                f"--clients {num_clients}: the text corpus has one client per standard-library "
                f"package and this Python has {len(stdlib_packages())}; use fewer clients"
            )
    # Imported here: the simulation engine (Ray) is heavy and only needed to run.
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    if not verbose:
        # Flower's INFO log and its run_simulation deprecation notice would bury the
        # progress display; dropped replies show up there and in results.json instead.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # piped output (CI logs, make run | tee) gets a width that fits the per-client table
    listener = ProgressListener(Console(width=None if sys.stdout.isatty() else 120))
    run_simulation(
        server_app=make_server_app(config, listener),
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        verbose_logging=verbose,
    )
    if listener.results is None:
        raise RuntimeError("the simulation ended without results; rerun with --verbose for logs")
    kept = keep_client_state(listener.results["run_id"], listener.results_path.parent)
    if kept:
        listener.console.print(f"simulated clients' state (ledgers, local experts): {kept}")
    return listener.results


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
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)
    return target
