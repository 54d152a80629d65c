"""The privacy ledger: each client's DP spend, recomputed from what was charged, kept in SQLite.

:class:`PrivacyLedger` is the in-memory value: a budget, δ, an accountant and the charged
rounds; ε is always recomputed from the rounds by the accountant, never summed.

:class:`LedgerBook` is the durable form: one SQLite file (``ledger.sqlite``) holding a
ledger per client id. The server keeps one book in the run folder with a ledger for every
client; a client keeps one in its own state directory with its own ledger. Every charge is
one SQLite transaction that re-reads the ledger, checks the budget and appends the round,
so a charge is either durable or absent: a process killed after the commit keeps it, one
killed before keeps the old spend. The client charges *before* it trains (write-ahead), so
a crash may over-count its spend, never under-count it.

A ledger re-opened with another δ or accountant is a :class:`LedgerError`: ε from two
accountings cannot be mixed silently.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.privacy.accountant import Segment, epsilon

#: ``PRAGMA user_version`` of the schema below; bump it with a migration when it changes.
SCHEMA_VERSION = 1
#: The ledger's file name, in a run folder (server) and in a client's state directory.
LEDGER_FILE = "ledger.sqlite"
# Calibration stops when ε is within its tolerance *below* the target; this slack only
# absorbs float noise when the same history is re-evaluated.
_SLACK = 1e-9

_SCHEMA = """
CREATE TABLE ledger (
    client     TEXT PRIMARY KEY,
    budget     REAL NOT NULL,
    delta      REAL NOT NULL,
    accountant TEXT NOT NULL
);
CREATE TABLE charge (
    client           TEXT NOT NULL REFERENCES ledger (client),
    seq              INTEGER NOT NULL,
    server_round     INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate      REAL NOT NULL,
    steps            INTEGER NOT NULL,
    epsilon          REAL NOT NULL,  -- ε after this charge, as the accountant computed it
    PRIMARY KEY (client, seq)
);
"""


def client_sort_key(client: str) -> list:
    """Natural order of client ids: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", client)]


class BudgetExceededError(RuntimeError):
    """Charging this round would exceed the client's ε budget."""


class LedgerError(ValueError):
    """A stored ledger cannot be used. Never delete it to "fix" this: that resets the spend."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round's DP-SGD: ``steps`` Poisson-sampled steps at rate q with noise σ."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        ok = (
            self.noise_multiplier > 0
            and math.isfinite(self.noise_multiplier)
            and 0 < self.sample_rate <= 1
            and self.steps >= 1
        )
        if not ok:
            raise LedgerError(
                f"invalid DP round {self}: need σ > 0 finite, 0 < q ≤ 1 and steps ≥ 1"
            )

    @property
    def segment(self) -> Segment:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict:
        return {
            "round": self.server_round,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }


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

    def to_dict(self, client: str) -> dict:
        """The machine-readable form ``fedmoe budget --json`` prints: enough to recompute ε
        with any accountant."""
        return {
            "client": client,
            "epsilon": self.spent(),
            "budget": self.budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [e.to_dict() for e in self.entries],
        }


class LedgerBook:
    """Durable privacy ledgers by client id, in one SQLite file.

    Parameters
    ----------
    path : str or Path
        The SQLite file; created (with its folder) if missing.

    Raises
    ------
    LedgerError
        If the file is not a fedmoe ledger of this schema version (the file is left as is).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode: transactions are opened explicitly, BEGIN IMMEDIATE, so two
            # processes charging the same book serialise instead of both reading old state.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA synchronous = FULL")
            with self._transaction():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0 and not self._tables():
                    # statement by statement: executescript() would commit mid-transaction
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise LedgerError(
                        f"{self.path}: ledger schema version {version} is not supported "
                        f"(expected {SCHEMA_VERSION}); do not edit ledgers by hand"
                    )
        except sqlite3.DatabaseError as err:
            raise LedgerError(
                f"{self.path}: not a readable fedmoe privacy ledger ({err}). Training is "
                "refused until it is restored from a backup; deleting it would reset the "
                "recorded privacy spend"
            ) from err

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LedgerBook:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def clients(self) -> list[str]:
        """Client ids, in natural order (``partition-2`` before ``partition-10``)."""
        return sorted((row[0] for row in self._db.execute("SELECT client FROM ledger")),
                      key=client_sort_key)

    def get(self, client: str) -> PrivacyLedger | None:
        """The client's ledger, or None if it has none.

        Raises
        ------
        LedgerError
            If the stored rounds are invalid or do not reproduce the stored ε (edited or
            removed rows).
        """
        try:
            return self._read(client)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: cannot read the ledger of {client!r}: {err}") from err

    def trajectory(self, client: str) -> list[tuple[int, float]]:
        """``(server_round, ε after it)`` for every charge, oldest first (for plots)."""
        rows = self._db.execute(
            "SELECT server_round, epsilon FROM charge WHERE client = ? ORDER BY seq", (client,)
        )
        return [(int(r), float(e)) for r, e in rows]

    # ------------------------------------------------------------------ writing
    def open(self, client: str, *, budget: float, delta: float, accountant: str) -> PrivacyLedger:
        """The client's ledger, created empty if it is new; its budget is set to ``budget``.

        Raises
        ------
        LedgerError
            If the ledger exists with another δ or accountant.
        """
        with self._transaction():
            ledger = self._read(client)
            if ledger is None:
                self._db.execute(
                    "INSERT INTO ledger (client, budget, delta, accountant) VALUES (?, ?, ?, ?)",
                    (client, budget, delta, accountant),
                )
                return PrivacyLedger(budget=budget, delta=delta, accountant=accountant)
            if ledger.delta != delta or ledger.accountant != accountant:
                raise LedgerError(
                    f"{self.path}: the ledger of {client!r} accounts at δ={ledger.delta:g} with "
                    f"{ledger.accountant!r}, but δ={delta:g} with {accountant!r} was asked; "
                    "ε from two accountings cannot be mixed. Keep this run's target-delta and "
                    "accountant equal to the ledger's, or give the client a new state-dir "
                    "only if its data is new"
                )
            if ledger.budget != budget:
                self._db.execute("UPDATE ledger SET budget = ? WHERE client = ?", (budget, client))
                ledger.budget = budget
            return ledger

    def charge(self, client: str, entry: LedgerEntry) -> float:
        """Durably append ``entry`` to the client's ledger if it fits; return ε after it.

        Raises
        ------
        BudgetExceededError
            If it would exceed the budget (nothing is written).
        LedgerError
            If the client has no ledger (call :meth:`open` first) or it is unreadable.
        """
        with self._transaction():
            ledger = self._read(client)
            if ledger is None:
                raise LedgerError(f"{self.path}: no ledger for client {client!r}; open it first")
            after = ledger.charge(entry)
            self._db.execute(
                "INSERT INTO charge (client, seq, server_round, noise_multiplier, sample_rate, "
                "steps, epsilon) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (client, len(ledger.entries), entry.server_round, entry.noise_multiplier,
                 entry.sample_rate, entry.steps, after),
            )
        return after

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _tables(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")]

    def _read(self, client: str) -> PrivacyLedger | None:
        row = self._db.execute(
            "SELECT budget, delta, accountant FROM ledger WHERE client = ?", (client,)
        ).fetchone()
        if row is None:
            return None
        rows = list(self._db.execute(
            "SELECT seq, server_round, noise_multiplier, sample_rate, steps, epsilon FROM charge "
            "WHERE client = ? ORDER BY seq", (client,)
        ))
        ledger = PrivacyLedger(budget=float(row[0]), delta=float(row[1]), accountant=str(row[2]))
        if [r[0] for r in rows] != list(range(1, len(rows) + 1)):
            raise self._tampered(client, "charges are missing or out of order")
        ledger.entries = [LedgerEntry(int(r[1]), float(r[2]), float(r[3]), int(r[4])) for r in rows]
        if rows:
            stored, recomputed = float(rows[-1][5]), ledger.spent()
            if not math.isclose(stored, recomputed, rel_tol=1e-6, abs_tol=1e-9):
                raise self._tampered(
                    client, f"its rounds give ε={recomputed:.6f} but it recorded {stored:.6f}"
                )
        return ledger

    def _tampered(self, client: str, why: str) -> LedgerError:
        return LedgerError(
            f"{self.path}: the ledger of {client!r} is inconsistent ({why}): it was edited or "
            "damaged. Training is refused until it is restored from a backup"
        )
