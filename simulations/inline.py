"""An in-process federation engine: the real ServerApp logic and the real ClientApp, no Ray.

Flower's simulation engine starts Ray, a SuperLink-like state and one worker per CPU, and
costs about 25 s before the first round. An experiment grid runs hundreds of small
federations, so :func:`run_inline` runs each one in the calling process instead:

- the server side is :func:`server.app.run_federation` (the FedMoE strategy, its ledger,
  the run folder), exactly what ``flwr run .`` runs;
- the clients are :data:`clients.app.app`, the same ``ClientApp``, called with one Flower
  ``Context`` per simulated node whose ``state-dir`` is a folder on disk, so a client's
  local experts and privacy ledger live on disk between its rounds, not in memory;
- :class:`InlineGrid` delivers each message to its node's ClientApp one after the other
  (a ClientApp that raises gives an error reply, as in Flower's engine) and measures the
  time spent inside the client handlers, so framework overhead is
  ``wall / client seconds``. Each message gets ``timeout`` seconds of its own (the
  strategy's ``reply-timeout``): a client still working then gives no reply, as a
  straggler in a deployment, and until it finishes it answers later messages with an
  error reply (it is busy).

Messages are not serialised on the way (Flower's engine would); the bytes a client uploads
are measured by the strategy from its reply's arrays either way. Use Flower's engine
(``fedmoe simulate``, or ``engine = "flower"`` in an experiment grid) to check a result
against it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.config import FedMoEConfig

#: Node ids of simulated clients start here (partition p is node FIRST_NODE_ID + p).
FIRST_NODE_ID = 1000


@dataclass
class ClientTime:
    """Seconds spent inside the client handlers, per message type, and message counts."""

    seconds: dict[str, float] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.messages[kind] = self.messages.get(kind, 0) + 1


class InlineGrid:
    """A Flower ``Grid`` (the part a strategy uses: ``get_node_ids``, ``send_and_receive``)
    that runs each message through ``client_app`` in this process.

    Parameters
    ----------
    num_clients : int
        Simulated clients; partition p gets node id ``FIRST_NODE_ID + p``.
    state_root : Path
        Client p keeps its state in ``state_root / partition-<p>``.
    run_id : int (default: 1)
    node_configs : mapping of partition id to node-config dict, optional
        Extra node-config keys (kebab-case) of chosen clients, e.g. an ``epsilon-budget``.
    client_app : flwr.clientapp.ClientApp, optional (default: :data:`clients.app.app`)
    """

    def __init__(
        self,
        num_clients: int,
        state_root: Path,
        *,
        run_id: int = 1,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
        client_app: Any = None,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if client_app is None:
            from clients.app import app as client_app
        self.app = client_app
        self.time = ClientTime()
        self.contexts = {
            FIRST_NODE_ID + p: Context(
                run_id=run_id, node_id=FIRST_NODE_ID + p,
                node_config={"partition-id": p, "num-partitions": num_clients,
                             "state-dir": str(Path(state_root) / f"partition-{p}"),
                             **dict((node_configs or {}).get(p, {}))},
                state=RecordDict(), run_config={},
            )
            for p in range(num_clients)
        }
        #: node -> the thread of a message it did not answer in time, while it still runs
        self.busy: dict[int, threading.Thread] = {}
        # Flower's Message() reads the task identity an engine sets; run_simulation sets
        # a dummy one the same way.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message],
                         timeout: float | None = None) -> list[Message]:
        """Deliver every message, one after the other, and return the replies that came
        back within ``timeout`` seconds of their delivery (None: wait for each)."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.busy and self.busy[node].is_alive():
                replies.append(Message(Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason="the node is still busy with an earlier message it did not answer "
                           "in time"), reply_to=msg))
                continue
            self.busy.pop(node, None)
            box: list[Message] = []
            start = time.perf_counter()
            if timeout is None:
                self._deliver(msg, box)
            else:  # the client works in a thread; past the timeout it is a straggler
                worker = threading.Thread(target=self._deliver, args=(msg, box), daemon=True)
                worker.start()
                worker.join(timeout)
                if worker.is_alive():
                    self.busy[node] = worker
            self.time.add(msg.metadata.message_type, time.perf_counter() - start)
            replies.extend(box[:1])
        return replies

    def _deliver(self, msg: Message, box: list[Message]) -> None:
        try:
            box.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        except Exception as err:  # noqa: BLE001  (Flower's engine does the same)
            box.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                     reason=f"{type(err).__name__}: {err}"), reply_to=msg))

    def close(self) -> None:
        """Wait for the stragglers still working (their replies are not used)."""
        for worker in self.busy.values():
            worker.join()
        self.busy.clear()


@dataclass(frozen=True)
class InlineRun:
    """What :func:`run_inline` returns: the run's ``results.json`` document, its wall time
    and the time spent inside the client handlers."""

    results: dict[str, Any]
    wall_seconds: float
    client_time: ClientTime

    @property
    def overhead(self) -> float:
        """Wall time / client handler time (1.0 = no framework overhead at all)."""
        total = self.client_time.total
        return self.wall_seconds / total if total else float("inf")


def run_inline(
    config: FedMoEConfig,
    num_clients: int,
    *,
    state_root: Path | None = None,
    listener: Any = None,
    run_id: int = 1,
    client_app: Any = None,
) -> InlineRun:
    """Run one federation of ``num_clients`` simulated clients in this process.

    The run folder is ``config.run_dir`` (as for any fedmoe run); clients keep their state
    under ``state_root`` (default: ``<run folder>/clients``). ``client_app`` replaces
    :data:`clients.app.app` (tests wrap it to make clients fail).

    Raises
    ------
    fedmoe.config.ConfigError
        If ``min-available-clients`` or ``min-train-replies`` exceeds ``num_clients``.
    """
    from fedmoe.config import ConfigError
    from fedmoe.reporting import resolve_run_dir
    from server.app import run_federation

    if config.min_available_clients > num_clients:
        raise ConfigError(f"min-available-clients={config.min_available_clients} exceeds the "
                          f"{num_clients} simulated clients; lower min-available-clients")
    if config.min_train_replies > num_clients:
        raise ConfigError(f"min-train-replies={config.min_train_replies} exceeds the "
                          f"{num_clients} simulated clients: no round could change the model; "
                          "lower min-train-replies")
    run_dir = resolve_run_dir(config)
    config = config.replace(run_dir=str(run_dir))
    grid = InlineGrid(num_clients, state_root or run_dir / "clients", run_id=run_id,
                      client_app=client_app)
    start = time.perf_counter()
    try:
        results = run_federation(grid, config, listener, run_id=run_id,
                                 num_clients=num_clients, engine="inline")
    finally:
        grid.close()
    return InlineRun(results, time.perf_counter() - start, grid.time)
