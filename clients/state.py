"""Where a client keeps what must outlive a round: its local experts and its privacy ledger.

Both live in the client's state directory, on its own disk:

- ``ledger.sqlite``: the client's :class:`~fedmoe.privacy.LedgerBook` (one ledger, its own);
- ``local_experts.pt``: the local-expert tensors, written atomically;
- ``upload_residual.pt`` (lossy ``upload-codec`` with error feedback): what the codec
  dropped from the client's last update, added to its next one; kept on disk so that a
  restarted client loses nothing of it;
- ``download_reference.pt`` (lossy ``download-codec``): the global tensors it holds and the
  number of the message they came from; the next message is encoded relative to them.

A deployment sets the directory with ``--node-config "state-dir=/var/lib/fedmoe"`` so the
ledger outlives runs and the budget is a lifetime budget. Without it (simulation) each run
gets its own folder under the system's temp directory, ``fedmoe-state/run-<id>/<client>``
(:func:`run_state_root`); ``fedmoe simulate`` moves that folder into the run folder when
the simulation ends.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context

from fedmoe.config import NodeSettings
from fedmoe.privacy import LEDGER_FILE, LedgerBook, LedgerError, PrivacyLedger
from fedmoe.storage import write_atomic

LOCAL_FILE = "local_experts.pt"
RESIDUAL_FILE = "upload_residual.pt"
REFERENCE_FILE = "download_reference.pt"


class ClientStore:
    """A client's state directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._local = self.root / LOCAL_FILE

    def book(self, client: str) -> LedgerBook:
        """``client``'s privacy ledger book, created if this is its first round (use as a
        context manager to close it).

        Raises
        ------
        LedgerError
            If the ledger cannot be used (it is left as it is); if it is missing while the
            directory holds local experts: they prove earlier training, whose spend the
            missing ledger recorded; or if it holds another client's ledger (a state dir
            is one client's: under a new client-id the same data would get a fresh budget).
        """
        self._check_not_lost()
        book = LedgerBook(self.root / LEDGER_FILE)
        try:
            self._check_owner(book.clients(), client)
        except LedgerError:
            book.close()
            raise
        return book

    def ledger(self, client: str, *, private: bool = True) -> PrivacyLedger | None:
        """The client's own ledger, None before its first round; opened read-only (reading
        never writes, never creates). ``private=False`` (a client that trains without DP,
        ``target-epsilon = inf``, keeps no ledger) skips the lost-ledger check.

        Raises
        ------
        LedgerError
            As :meth:`book`.
        """
        if private:
            self._check_not_lost()
        if not (self.root / LEDGER_FILE).exists():
            return None
        with LedgerBook(self.root / LEDGER_FILE, read_only=True) as book:
            self._check_owner(book.clients(), client)
            return book.get(client)

    def _check_owner(self, clients: list[str], client: str) -> None:
        others = [c for c in clients if c != client]
        if others:
            raise LedgerError(
                f"{self.root}: its ledger belongs to client {others[0]!r}"
                f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}, not to "
                f"{client!r}: a state dir keeps one client's ledger and local experts, and "
                "the same data under a new client-id would start a fresh budget beside the "
                f"spend recorded there. Give this node the client-id it had "
                f"(client-id='{others[0]}'), or a new client its own state-dir")

    def _check_not_lost(self) -> None:
        if self._local.exists() and not (self.root / LEDGER_FILE).exists():
            raise LedgerError(
                f"{self.root}: holds local experts ({LOCAL_FILE}) but no {LEDGER_FILE}: the "
                "client trained before and its privacy ledger is gone. Training is refused "
                "until the ledger is restored from a backup; removing the local experts "
                "would not undo the earlier spend")

    def load_local(self) -> dict[str, torch.Tensor] | None:
        if not self._local.exists():
            return None
        return torch.load(self._local, weights_only=True)

    def save_local(self, state: dict[str, torch.Tensor]) -> None:
        _save(self._local, {k: v.detach().cpu() for k, v in state.items()})

    def load_residual(self) -> dict[str, np.ndarray] | None:
        """The upload codec's error-feedback residual (None before the first one)."""
        path = self.root / RESIDUAL_FILE
        if not path.exists():
            return None
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}

    def save_residual(self, residual: dict[str, np.ndarray] | None) -> None:
        """Keep ``residual`` for the next round (None: remove the stored one)."""
        path = self.root / RESIDUAL_FILE
        if residual is None:
            path.unlink(missing_ok=True)
            return
        _save(path, {k: torch.from_numpy(np.array(v)) for k, v in residual.items()})

    def load_reference(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(message number, global tensors)`` the download codec builds on, or None."""
        path = self.root / REFERENCE_FILE
        if not path.exists():
            return None
        stored = torch.load(path, weights_only=True)
        return int(stored["seq"]), {k: v.numpy() for k, v in stored["tensors"].items()}

    def save_reference(self, held: tuple[int, dict[str, np.ndarray]]) -> None:
        seq, tensors = held
        _save(self.root / REFERENCE_FILE,
              {"seq": int(seq), "tensors": {k: torch.from_numpy(np.array(v))
                                            for k, v in tensors.items()}})


def _save(path: Path, obj: object) -> None:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def run_state_root(run_id: int) -> Path:
    """Where the clients of run ``run_id`` that have no ``state-dir`` keep their state."""
    return Path(tempfile.gettempdir()) / "fedmoe-state" / f"run-{run_id}"


def state_dir(context: Context, node: NodeSettings) -> Path:
    """``state-dir`` from the node config, else a per-run folder under the temp directory."""
    if node.state_dir:
        return Path(node.state_dir)
    return run_state_root(context.run_id) / node.client


def open_store(context: Context, node: NodeSettings) -> ClientStore:
    return ClientStore(state_dir(context, node))
