"""The fedmoe ServerApp: run the FedMoE strategy with its privacy ledger, write the run folder.

``app`` reads its configuration from Flower's run config (``flwr run .``).
:func:`make_server_app` builds the same app around an already validated config and a
:class:`RunListener` (``fedmoe simulate`` uses it for its progress display).
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedmoe.config import FedMoEConfig
from fedmoe.methods import method_model
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import to_arrays
from fedmoe.reporting import build_results, privacy_rows, resolve_run_dir, write_run_folder
from fedmoe.roles import split_state_dict
from server.strategy import FedMoE, RoundRecord


class RunListener(Protocol):
    """Hooks into a run's life, e.g. for a progress display."""

    def started(self, config: FedMoEConfig, run_dir: Path) -> None: ...
    def round_finished(self, record: RoundRecord) -> None: ...
    def finished(self, results: dict[str, Any], results_path: Path) -> None: ...


def run_federation(
    grid: Grid, config: FedMoEConfig, listener: RunListener | None = None,
    run_id: int | None = None,
) -> dict[str, Any]:
    """Run FedMoE on ``grid`` until the planned rounds are done or no client can afford
    another; write the run folder and return the results."""
    start = time.time()
    run_dir = resolve_run_dir(config)
    torch.manual_seed(config.seed)
    initial = to_arrays(split_state_dict(method_model(config)))  # shared + gate only
    log(INFO, "fedmoe: %s rounds planned, target ε=%g per client; run folder %s",
        config.num_server_rounds, config.target_epsilon, run_dir)
    if listener:
        listener.started(config, run_dir)
    with LedgerBook(run_dir / LEDGER_FILE) as book:
        strategy = FedMoE(
            config, book=book, on_round=listener.round_finished if listener else None
        )
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=config.num_server_rounds)
        results = build_results(
            config, strategy.history, time.time() - start,
            privacy=privacy_rows(book, strategy.plans), stopped=strategy.stop_reason,
            run_id=run_id,
        )
        path = write_run_folder(run_dir, results, book)
    log(INFO, "fedmoe: results written to %s", path)
    if listener:
        listener.finished(results, path)
    return results


def make_server_app(
    config: FedMoEConfig | None = None, listener: RunListener | None = None
) -> ServerApp:
    """A ServerApp for ``config`` (or, if None, for the run config Flower passes in)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or FedMoEConfig.from_run_config(context.run_config)
        run_federation(grid, run_config, listener, run_id=context.run_id)

    return server_app


app = make_server_app()
