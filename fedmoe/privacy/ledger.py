"""The privacy ledger: a versioned, replayable record of one client's DP spend.

Client and server each keep one per client. The client charges its own ledger *before*
it trains (write-ahead) and saves it, so a crash can over-count the spend but never
under-count it; it refuses a round that would take it over budget. The server keeps a
ledger per client to sample only clients that can still afford a round.

The state is the list of charged rounds; ε is recomputed from it by the accountant, so
the JSON form (:meth:`to_dict`) replays exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmoe.privacy.accountant import Segment, epsilon

LEDGER_VERSION = 1
# Calibration stops when ε is within its tolerance *below* the target; this slack only
# absorbs float noise when the same history is re-evaluated.
_SLACK = 1e-9


class BudgetExceededError(RuntimeError):
    """Charging this round would exceed the client's ε budget."""


class LedgerError(ValueError):
    """A stored ledger cannot be read. Never delete it to "fix" this: that resets the spend."""


@dataclass(frozen=True)
class LedgerEntry:
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def segment(self) -> Segment:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class PrivacyLedger:
    """(ε, δ) spend of one client across rounds.

    Parameters
    ----------
    budget : float
        The most ε this client may spend in total.
    delta : float
    accountant : str (default: "rdp")
    entries : list[LedgerEntry]
        Rounds charged so far, oldest first.
    """

    budget: float
    delta: float
    accountant: str = "rdp"
    entries: list[LedgerEntry] = field(default_factory=list)

    @property
    def history(self) -> list[Segment]:
        return [e.segment for e in self.entries]

    def spent(self) -> float:
        return epsilon(self.history, self.delta, self.accountant)

    def epsilon_after(self, entry: LedgerEntry) -> float:
        return epsilon([*self.history, entry.segment], self.delta, self.accountant)

    def can_afford(self, entry: LedgerEntry) -> bool:
        return self.epsilon_after(entry) <= self.budget + _SLACK

    def charge(self, entry: LedgerEntry) -> float:
        """Append ``entry`` if it fits the budget and return ε after it.

        Raises
        ------
        BudgetExceededError
            With the ε it would reach; the ledger is unchanged.
        """
        after = self.epsilon_after(entry)
        if after > self.budget + _SLACK:
            raise BudgetExceededError(
                f"round {entry.server_round} would raise ε from {self.spent():.3f} to "
                f"{after:.3f}, over this client's budget {self.budget:.3f} (δ={self.delta:g})"
            )
        self.entries.append(entry)
        return after

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        return {
            "version": LEDGER_VERSION,
            "budget": self.budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "entries": [asdict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        """Rebuild a ledger; raises :class:`LedgerError` for any malformed content."""
        if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise LedgerError(
                f"privacy ledger version {version!r} is not supported (expected "
                f"{LEDGER_VERSION}); do not edit ledgers by hand"
            )
        try:
            return cls(
                budget=float(data["budget"]),
                delta=float(data["delta"]),
                accountant=str(data["accountant"]),
                entries=[LedgerEntry(**e) for e in data["entries"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LedgerError(f"privacy ledger is malformed: {err!r}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(f"privacy ledger is not valid JSON: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + fsync + rename): a crash leaves the old or new ledger."""
        write_atomic(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a saved ledger.

        Raises
        ------
        LedgerError
            If the file is unreadable; the message names the file. The client then refuses
            to train: restore the file from a backup, never delete it (that would reset the
            client's recorded privacy spend to zero).
        """
        try:
            return cls.from_json(Path(path).read_text())
        except LedgerError as err:
            raise LedgerError(
                f"{path}: {err}. Training is refused until it is restored from a backup; "
                "deleting it would reset this client's recorded privacy spend"
            ) from err


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
