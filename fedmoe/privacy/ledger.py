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

The file is tamper-evident: every write extends a hash chain whose length and head are
stored with it, and a book whose rows do not replay to that head is refused (see
:class:`LedgerBook`): no removal or edit of rows, and no truncation of the file, can lower
the spend it reports. Readers that must not write (``fedmoe budget``, a client's query and
evaluate handlers) open it read-only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.privacy.accountant import AccountingError, Segment, epsilon

#: ``PRAGMA user_version`` of the schema below. Version 2 added the hash chain (``link``
#: columns, the ``head`` and ``budget`` tables); a version-1 ledger cannot be verified and
#: is refused (see :class:`LedgerBook`).
SCHEMA_VERSION = 2
#: The ledger's file name, in a run folder (server) and in a client's state directory.
LEDGER_FILE = "ledger.sqlite"
# Calibration stops when ε is within its tolerance *below* the target; this slack only
# absorbs float noise when the same history is re-evaluated.
_SLACK = 1e-9
#: The chain's hash before any event.
GENESIS = hashlib.sha256(b"fedmoe privacy ledger v2").hexdigest()

_SCHEMA = """
CREATE TABLE ledger (
    client     TEXT PRIMARY KEY,
    delta      REAL NOT NULL,
    accountant TEXT NOT NULL,
    link       INTEGER NOT NULL UNIQUE  -- position of this event in the hash chain
);
CREATE TABLE budget (
    link   INTEGER PRIMARY KEY,
    client TEXT NOT NULL REFERENCES ledger (client),
    budget REAL NOT NULL  -- the client's budget from this event on (latest wins)
);
CREATE TABLE charge (
    client           TEXT NOT NULL REFERENCES ledger (client),
    seq              INTEGER NOT NULL,
    server_round     INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate      REAL NOT NULL,
    steps            INTEGER NOT NULL,
    epsilon          REAL NOT NULL,  -- ε after this charge, as the accountant computed it
    link             INTEGER NOT NULL UNIQUE,
    PRIMARY KEY (client, seq)
);
CREATE TABLE head (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    count INTEGER NOT NULL,  -- events in the chain
    hash  TEXT NOT NULL      -- sha256 chained over every event, in link order
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

    def epsilon_after(self, *entries: LedgerEntry) -> float:
        """ε after charging ``entries`` too (a round, or a label histogram and a round)."""
        return epsilon([*self.history, *(e.segment for e in entries)], self.delta,
                       self.accountant)

    def can_afford(self, *entries: LedgerEntry) -> bool:
        try:
            return self.epsilon_after(*entries) <= self.budget + _SLACK
        except AccountingError:  # an ε that cannot be computed is never affordable
            return False

    def charge(self, entry: LedgerEntry) -> float:
        """Append ``entry`` if it fits the budget and return ε after it.

        Raises
        ------
        BudgetExceededError
            With the ε it would reach, or why the accountant cannot price it; the ledger
            is unchanged.
        """
        try:
            after = self.epsilon_after(entry)
        except AccountingError as err:
            raise BudgetExceededError(f"round {entry.server_round} cannot be accounted: "
                                      f"{err}") from err
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
    """Durable privacy ledgers by client id, in one tamper-evident SQLite file.

    Every write — a ledger created (client, δ, accountant), a budget set, a round charged —
    is an *event* with a global position (``link``) in a hash chain: ``head = sha256(head
    ‖ event)``, and the chain's length and head are stored with it in the same transaction.
    Opening a book replays the chain from the rows and refuses the file unless it
    reproduces the stored head over exactly ``count`` events: a removed, edited or
    re-ordered row (of any client, first, middle or last), a client whose rows are all
    gone, a file truncated or emptied, each is a :class:`LedgerError` naming the file —
    none can lower the spend the book reports. (The chain has no secret: it detects damage
    and hand edits, not a forger who re-runs fedmoe's own hashing.) Within one open book,
    each write first checks that the head and the number of events are the ones it last
    saw, and replays the chain again if another process wrote in between.

    Only a *missing* file is created, and atomically (the schema is written to a temporary
    file that is then linked into place), so a crash never leaves a half-made ledger; a
    file that exists but is not a complete version-2 ledger is refused and kept as it is.

    Parameters
    ----------
    path : str or Path
        The SQLite file; created (with its folder) if missing, unless ``read_only``.
    read_only : bool, keyword-only (default: False)
        Open with SQLite's ``mode=ro``: nothing is ever written, nothing created.

    Raises
    ------
    LedgerError
        If the file is not a complete, intact fedmoe ledger of this schema version (it is
        left as is), or if ``read_only`` and it does not exist.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if self.path.exists() and not self.path.is_file():  # sqlite says "disk I/O error"
            raise LedgerError(f"{self.path}: is a folder (or another non-file), not a privacy "
                              "ledger file. Move it away, or restore the ledger file from a "
                              "backup; a new ledger here would reset the recorded privacy "
                              "spend")
        if not self.path.exists():
            if read_only:
                raise LedgerError(f"{self.path}: no privacy ledger here")
            _create(self.path)
        try:
            if read_only:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
            else:
                # Autocommit mode: transactions are opened explicitly, BEGIN IMMEDIATE, so
                # two processes charging the same book serialise instead of both reading
                # old state.
                self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
                self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as err:
            raise self._unreadable(err) from err
        try:
            with self._transaction(write=False):
                self._check_schema()
                self._head = self._verify()
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise self._unreadable(err) from err
        except LedgerError:
            self._db.close()
            raise

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
            If the ledger exists with another δ or accountant, or the book is read-only.
        """
        with self._transaction():
            ledger = self._read(client)
            if ledger is None:
                self._append("ledger", (client, delta, accountant))
                self._append("budget", (client, budget))
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
                self._append("budget", (client, budget))
                ledger.budget = budget
            return ledger

    def charge(self, client: str, entry: LedgerEntry) -> float:
        """Durably append ``entry`` to the client's ledger if it fits; return ε after it.

        Raises
        ------
        BudgetExceededError
            If it would exceed the budget (nothing is written).
        LedgerError
            If the client has no ledger (call :meth:`open` first), it is unreadable or
            damaged, or the book is read-only.
        """
        with self._transaction():
            ledger = self._read(client)
            if ledger is None:
                raise LedgerError(f"{self.path}: no ledger for client {client!r}; open it first")
            after = ledger.charge(entry)
            self._append("charge", (client, len(ledger.entries), entry.server_round,
                                    entry.noise_multiplier, entry.sample_rate, entry.steps,
                                    after))
        return after

    # ------------------------------------------------------------------ internals
    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[None]:
        if write and self.read_only:
            raise LedgerError(f"{self.path}: opened read-only; nothing may be written")
        self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        head = getattr(self, "_head", None)
        try:
            if write:
                self._check_head()
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if head is not None:
                self._head = head  # what was appended is gone again
            raise

    def _check_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 1:
            raise LedgerError(
                f"{self.path}: a version-1 fedmoe ledger (before tamper-evident ledgers); it "
                "cannot be verified, so it is not migrated. Keep it as the record of that "
                "spend: continue this client with the fedmoe release that wrote it, or give "
                "it a new state-dir only if its data is new")
        if version != SCHEMA_VERSION or not {"ledger", "budget", "charge", "head"} <= tables:
            raise LedgerError(
                f"{self.path}: not a complete fedmoe privacy ledger (schema version {version},"
                f" tables {sorted(tables)}; expected version {SCHEMA_VERSION}). It was "
                "emptied, truncated or replaced: training is refused until it is restored "
                "from a backup; deleting it would reset the recorded privacy spend")

    def _events(self) -> list[tuple[int, str, tuple]]:
        """Every event, ``(link, kind, fields)``, in link order."""
        events = [(int(r[3]), "ledger", (r[0], float(r[1]), r[2])) for r in self._db.execute(
            "SELECT client, delta, accountant, link FROM ledger")]
        events += [(int(r[0]), "budget", (r[1], float(r[2]))) for r in self._db.execute(
            "SELECT link, client, budget FROM budget")]
        events += [(int(r[7]), "charge", (r[0], int(r[1]), int(r[2]), float(r[3]),
                                          float(r[4]), int(r[5]), float(r[6])))
                   for r in self._db.execute(
                       "SELECT client, seq, server_round, noise_multiplier, sample_rate, "
                       "steps, epsilon, link FROM charge")]
        return sorted(events, key=lambda e: e[0])

    def _stored_head(self) -> tuple[int, str]:
        row = self._db.execute("SELECT count, hash FROM head WHERE id = 0").fetchone()
        if row is None:
            raise self._damaged("its chain head is missing")
        return int(row[0]), str(row[1])

    def _verify(self) -> tuple[int, str]:
        """Replay the chain from the rows; return the head if it is the stored one."""
        count, stored = self._stored_head()
        events = self._events()
        if [link for link, _, _ in events] != list(range(1, len(events) + 1)):
            raise self._damaged("its events are not one unbroken chain: rows were removed "
                                "or renumbered")
        head = GENESIS
        for _, kind, values in events:
            head = _link(head, kind, values)
        if len(events) != count or head != stored:
            raise self._damaged(f"its {len(events)} events do not reproduce the stored chain "
                                f"head ({count} events): rows were removed, edited or "
                                "re-ordered")
        return count, head

    def _check_head(self) -> None:
        """Before a write: the head is the one this book last saw, else replay the chain."""
        if self._stored_head() != self._head or self._count() != self._head[0]:
            self._head = self._verify()

    def _count(self) -> int:
        return sum(self._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                   for t in ("ledger", "budget", "charge"))

    def _append(self, kind: str, values: tuple) -> None:
        """Write one event and advance the head (inside the caller's transaction)."""
        count, head = self._head
        link = count + 1
        if kind == "ledger":
            self._db.execute("INSERT INTO ledger (client, delta, accountant, link) "
                             "VALUES (?, ?, ?, ?)", (*values, link))
        elif kind == "budget":
            self._db.execute("INSERT INTO budget (link, client, budget) VALUES (?, ?, ?)",
                             (link, *values))
        else:
            self._db.execute("INSERT INTO charge (client, seq, server_round, noise_multiplier, "
                             "sample_rate, steps, epsilon, link) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (*values, link))
        new = (link, _link(head, kind, values))
        self._db.execute("UPDATE head SET count = ?, hash = ? WHERE id = 0", new)
        self._head = new

    def _read(self, client: str) -> PrivacyLedger | None:
        row = self._db.execute(
            "SELECT delta, accountant FROM ledger WHERE client = ?", (client,)
        ).fetchone()
        if row is None:
            return None
        budget = self._db.execute(
            "SELECT budget FROM budget WHERE client = ? ORDER BY link DESC LIMIT 1", (client,)
        ).fetchone()
        if budget is None:
            raise self._tampered(client, "its budget is missing")
        rows = list(self._db.execute(
            "SELECT seq, server_round, noise_multiplier, sample_rate, steps, epsilon FROM charge "
            "WHERE client = ? ORDER BY seq", (client,)
        ))
        ledger = PrivacyLedger(budget=float(budget[0]), delta=float(row[0]),
                               accountant=str(row[1]))
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

    def _unreadable(self, err: Exception) -> LedgerError:
        return LedgerError(
            f"{self.path}: not a readable fedmoe privacy ledger ({err}). Training is refused "
            "until it is restored from a backup; deleting it would reset the recorded "
            "privacy spend")

    def _damaged(self, why: str) -> LedgerError:
        return LedgerError(
            f"{self.path}: the privacy ledger is damaged ({why}). Training is refused until "
            "it is restored from a backup; deleting it would reset the recorded privacy spend")

    def _tampered(self, client: str, why: str) -> LedgerError:
        return LedgerError(
            f"{self.path}: the ledger of {client!r} is inconsistent ({why}): it was edited or "
            "damaged. Training is refused until it is restored from a backup"
        )


def _link(head: str, kind: str, values: tuple) -> str:
    """The chain's next head: sha256 of the previous head and the event, floats exact."""
    fields = [v.hex() if isinstance(v, float) else v for v in values]
    return hashlib.sha256(json.dumps([head, kind, fields]).encode()).hexdigest()


def _create(path: Path) -> None:
    """Create an empty version-2 ledger at ``path`` atomically; if another process created
    one first, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ledger-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("BEGIN")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO head (id, count, hash) VALUES (0, 0, ?)", (GENESIS,))
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        finally:
            db.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the path exists: never replaces a ledger
        except FileExistsError:
            pass
        except OSError:  # no hard links here: exclusive create, then copy (a crash
            _copy_exclusive(tmp, path)  # mid-copy leaves a file that is refused, never read)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        os.unlink(tmp)


def _copy_exclusive(source: str, path: Path) -> None:
    """Copy ``source`` to ``path`` only if ``path`` does not exist yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
        out.write(src.read())
        out.flush()
        os.fsync(out.fileno())
