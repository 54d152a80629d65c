"""The fedmoe ServerApp: run the FedMoE strategy with its privacy ledger, write the run folder.

``app`` reads its configuration from Flower's run config (``flwr run .``).
:func:`make_server_app` builds the same app around an already validated config and a
:class:`RunListener` (``fedmoe simulate`` uses it for its progress display).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.supercore.run import Run

from fedmoe.config import FedMoEConfig
from fedmoe.data import with_data_shape
from fedmoe.data.files import input_fingerprints
from fedmoe.export import GLOBAL_MODEL
from fedmoe.methods import method_model
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import to_arrays
from fedmoe.reporting import build_results, privacy_rows, resolve_run_dir, write_run_folder
from fedmoe.roles import split_state_dict
from fedmoe.storage import run_folder_lock, write_atomic
from server.checkpoint import (
    Checkpoint,
    prepare_run_folder,
    resume_point,
    restore_strategy,
    save_checkpoint,
)
from server.strategy import WAIT_LOG_INTERVAL, FedMoE, RoundRecord


class RunListener(Protocol):
    """Hooks into a run's life, e.g. for a progress display."""

    def started(self, config: FedMoEConfig, run_dir: Path) -> None: ...
    def round_finished(self, record: RoundRecord) -> None: ...
    def finished(self, results: dict[str, Any], results_path: Path) -> None: ...


class RunInterrupted(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM in ``fedmoe simulate``) while waiting
    for clients."""


class StopRequest(threading.Event):
    """An :class:`threading.Event` that ends a run early; :meth:`request` sets it and names
    who asked (``cause``, e.g. ``"Ctrl-C"`` or ``"SIGTERM"``), for the report's stop reason."""

    def __init__(self) -> None:
        super().__init__()
        self.cause = "stop requested"
        self.at: float | None = None  # time.monotonic() of the request

    def request(self, cause: str) -> None:
        self.cause, self.at = cause, time.monotonic()
        self.set()


class StoppableGrid(Grid):
    """A Grid that gives up waiting for replies as soon as ``stop`` is set.

    Flower's ``send_and_receive`` sleeps until every reply arrives or the timeout (an hour)
    passes, and nothing else can end it; this one polls the same way and raises
    :class:`RunInterrupted` when ``stop`` is set, and every 10 s logs which nodes' replies
    it is still waiting for. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, stop: StopRequest, poll_interval: float = 0.1) -> None:
        self.grid, self.stop, self.poll_interval = grid, stop, poll_interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        waiting = set(self.push_messages(sent))
        nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}  # set by push
        end = None if timeout is None else time.monotonic() + timeout
        next_log = time.monotonic() + WAIT_LOG_INTERVAL
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            self._check()
            new = list(self.pull_messages(waiting))
            replies.extend(new)
            waiting -= {m.metadata.reply_to_message_id for m in new}
            if waiting and time.monotonic() >= next_log:
                left = "" if end is None else f", giving up in {end - time.monotonic():.0f}s"
                log(INFO, "fedmoe: waiting for %s repl%s (nodes %s)%s", len(waiting),
                    "y" if len(waiting) == 1 else "ies",
                    ", ".join(str(nodes.get(m, "?")) for m in sorted(waiting)[:5]), left)
                next_log = time.monotonic() + WAIT_LOG_INTERVAL
            if waiting:
                self.stop.wait(self.poll_interval)
        if waiting:
            log(WARNING, "fedmoe: %s repl%s did not come within %.0fs (nodes %s)", len(waiting),
                "y" if len(waiting) == 1 else "ies", timeout,
                ", ".join(str(nodes.get(m, "?")) for m in sorted(waiting)[:5]))
        return replies

    def _check(self) -> None:
        if self.stop.is_set():
            raise RunInterrupted("stop requested")


def run_federation(
    grid: Grid, config: FedMoEConfig, listener: RunListener | None = None,
    run_id: int | None = None, *, stop: StopRequest | None = None,
    num_clients: int | None = None, engine: str | None = None,
) -> dict[str, Any]:
    """Run FedMoE on ``grid`` until the planned rounds are done, no client can afford
    another, or ``stop`` is set; write the run folder and return the results.

    The run folder is locked for the whole run (:func:`fedmoe.storage.run_folder_lock`);
    it must hold no earlier run, or, with ``config.resume``, the checkpoint of an
    unfinished run of the same config, which the run continues
    (:func:`server.checkpoint.prepare_run_folder`). A checkpoint is written after every
    finished round. When ``stop`` is set the round in progress is abandoned (its charges
    stay in the ledgers: sent = spent) and the report covers the rounds that finished.
    ``num_clients`` and ``engine`` (simulations) are recorded in the checkpoint.

    Raises
    ------
    server.checkpoint.CheckpointError
        If the run folder holds a run and ``config.resume`` is false, or the checkpoint
        cannot be resumed with ``config``.
    fedmoe.storage.RunFolderBusy
        If another process is writing the run folder.
    """
    config = with_data_shape(config)  # a data file's features and classes shape the model
    run_dir = resolve_run_dir(config)
    with run_folder_lock(run_dir):
        checkpoint = prepare_run_folder(run_dir, config, num_clients=num_clients, engine=engine)
        return _run_locked(grid, config, run_dir, checkpoint, listener, run_id, stop,
                           (num_clients, engine))


def _run_locked(
    grid: Grid, config: FedMoEConfig, run_dir: Path, checkpoint: Checkpoint | None,
    listener: RunListener | None, run_id: int | None, stop: StopRequest | None,
    simulation: tuple[int | None, str | None],
) -> dict[str, Any]:
    start = time.time() - (checkpoint.wall_seconds if checkpoint else 0.0)
    if checkpoint is None:
        torch.manual_seed(config.seed)
        initial = to_arrays(split_state_dict(method_model(config)))  # shared + gate only
    else:
        initial = ArrayRecord({k: Array(v) for k, v in checkpoint.arrays.items()})
    log(INFO, "fedmoe: %s rounds planned, target ε=%g per client; run folder %s%s",
        config.num_server_rounds, config.target_epsilon, run_dir,
        f"; resuming after round {checkpoint.server_round}" if checkpoint else "")
    if stop is not None or hasattr(grid, "push_messages"):  # Flower's grids: logged waits
        grid = StoppableGrid(grid, stop or StopRequest())
    if listener:
        listener.started(config, run_dir)
    finished: set[int] = set()

    def on_round(record: RoundRecord) -> None:
        finished.add(record.server_round)
        if listener:
            listener.round_finished(record)

    inputs = input_fingerprints(config)  # the data files read now, compared on resume

    with LedgerBook(run_dir / LEDGER_FILE) as book:
        def save(server_round: int, arrays: ArrayRecord, done: bool = False) -> None:
            save_checkpoint(run_dir, strategy, server_round,
                            {k: a.numpy() for k, a in arrays.items()}, run_id=run_id,
                            num_clients=simulation[0], engine=simulation[1], finished=done,
                            wall_seconds=time.time() - start, inputs=inputs)

        last = (checkpoint.server_round if checkpoint else 0, initial)

        def track(server_round: int, arrays: ArrayRecord) -> None:
            nonlocal last
            last = (server_round, arrays)
            save(server_round, arrays)

        strategy = FedMoE(config, book=book, on_round=on_round, on_checkpoint=track)
        first_round = 1
        if checkpoint is not None:
            restore_strategy(strategy, checkpoint.strategy, checkpoint.velocity,
                             checkpoint.average)
            first_round = resume_point(checkpoint, strategy, book)
            for record in strategy.history:  # the progress display counts them too
                on_round(record)
        else:
            save(0, initial)  # a folder with a ledger always has a checkpoint to resume
        interrupted = False
        try:
            result = strategy.start(grid=grid, initial_arrays=initial,
                                    num_rounds=config.num_server_rounds, first_round=first_round)
            save_global_model(run_dir, result.arrays)
        except RunInterrupted:
            interrupted = True
            unfinished = [r.server_round for r in strategy.history
                          if r.server_round not in finished]
            strategy.history = [r for r in strategy.history if r.server_round in finished]
            strategy.stop_reason = (
                f"interrupted ({stop.cause if stop is not None else 'stop requested'})"
                + (f" during round {unfinished[0]}" if unfinished else "")
                + f"; the report covers the {len(strategy.history)} finished round(s)")
            log(WARNING, "fedmoe: %s", strategy.stop_reason)
        if not interrupted:  # --resume of this folder is refused from now on
            save(*last, done=True)
        results = build_results(
            config, strategy.history, time.time() - start,
            privacy=privacy_rows(book, strategy.plans), stopped=strategy.stop_reason,
            run_id=run_id, excluded=strategy.all_excluded(), inputs=inputs,
        )
        path = write_run_folder(run_dir, results, book)
    log(INFO, "fedmoe: results written to %s", path)
    if listener:
        listener.finished(results, path)
    return results


def save_global_model(run_dir: Path, arrays: ArrayRecord) -> None:
    """Write the released global shared+gate tensors (``global_model.pt``; with
    ``ema-decay`` > 0 their average over rounds, :meth:`FedMoE.released`): with a client's
    local tensors they give its personalised model (``fedmoe export``)."""
    buffer = io.BytesIO()
    torch.save(arrays.to_torch_state_dict(), buffer)
    write_atomic(run_dir / GLOBAL_MODEL, buffer.getvalue())


def make_server_app(
    config: FedMoEConfig | None = None, listener: RunListener | None = None,
    *, stop: StopRequest | None = None,
    on_run_id: Callable[[int], None] | None = None,
    num_clients: int | None = None, engine: str | None = None,
) -> ServerApp:
    """A ServerApp for ``config`` (or, if None, for the run config Flower passes in).

    ``stop``: set it to end the run early with a report of the finished rounds;
    ``on_run_id``: called with Flower's run id when the run starts (``fedmoe simulate``
    records it, to find what a killed run left behind); ``num_clients``: the simulated
    clients and ``engine``, kept in the checkpoint (a resumed simulation must match).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or FedMoEConfig.from_run_config(context.run_config)
        if config is None:  # a deployment: what `fedmoe simulate` prints before it starts
            for note in run_config.warnings():
                log(WARNING, "fedmoe: warning: %s", note)
        if on_run_id is not None:
            on_run_id(context.run_id)
        run_federation(grid, run_config, listener, run_id=context.run_id, stop=stop,
                       num_clients=num_clients, engine=engine)

    return server_app


app = make_server_app()
