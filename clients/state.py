"""Where a client keeps what must outlive a round: its local experts and its privacy ledger.

Two stores with one interface:

- :class:`ContextStore` keeps them in Flower's ``context.state`` (simulation: the engine
  carries a node's context from round to round in memory);
- :class:`DirectoryStore` keeps them on the client's own disk (deployment: set
  ``--node-config "state-dir=/var/lib/fedmoe"``), written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedmoe.config import NodeSettings
from fedmoe.privacy.ledger import PrivacyLedger, write_atomic

_LOCAL, _LEDGER = "fedmoe-local-experts", "fedmoe-privacy-ledger"


class ClientStore(Protocol):
    def load_local(self) -> dict[str, torch.Tensor] | None: ...
    def save_local(self, state: dict[str, torch.Tensor]) -> None: ...
    def load_ledger(self) -> PrivacyLedger | None: ...
    def save_ledger(self, ledger: PrivacyLedger) -> None: ...


class ContextStore:
    """Client state in ``context.state`` (a RecordDict Flower keeps per node and run)."""

    def __init__(self, context: Context) -> None:
        self._state = context.state

    def load_local(self) -> dict[str, torch.Tensor] | None:
        record = self._state.array_records.get(_LOCAL)
        return None if record is None else record.to_torch_state_dict()

    def save_local(self, state: dict[str, torch.Tensor]) -> None:
        self._state[_LOCAL] = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})

    def load_ledger(self) -> PrivacyLedger | None:
        record = self._state.config_records.get(_LEDGER)
        return None if record is None else PrivacyLedger.from_json(str(record["json"]))

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        self._state[_LEDGER] = ConfigRecord({"json": ledger.to_json()})


class DirectoryStore:
    """Client state in files under ``root`` (``local_experts.pt``, ``privacy_ledger.json``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._local = self.root / "local_experts.pt"
        self._ledger = self.root / "privacy_ledger.json"

    def load_local(self) -> dict[str, torch.Tensor] | None:
        if not self._local.exists():
            return None
        return torch.load(self._local, weights_only=True)

    def save_local(self, state: dict[str, torch.Tensor]) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
        write_atomic(self._local, buffer.getvalue())

    def load_ledger(self) -> PrivacyLedger | None:
        return PrivacyLedger.load(self._ledger) if self._ledger.exists() else None

    def save_ledger(self, ledger: PrivacyLedger) -> None:
        ledger.save(self._ledger)


def open_store(context: Context, node: NodeSettings) -> ClientStore:
    return DirectoryStore(node.state_dir) if node.state_dir else ContextStore(context)
