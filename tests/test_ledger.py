"""Tamper-evident ledgers: no damage to a ledger file can lower the spend it reports.

Each kind of damage — a charge removed (first, middle, last), edited or re-ordered, a
client's rows all gone, the ledger row, budget or chain head edited, the file emptied or
truncated — is done with plain SQLite or file operations on a real ledger on disk, and
must be refused with a :class:`LedgerError` naming the file, by the library, the client
(4002) and ``fedmoe budget`` (exit 2); reading never writes; a client directory with local
experts but no ledger is refused."""

import sqlite3
from pathlib import Path

import pytest
from flwr.app import MessageType

from clients.app import app
from clients.state import LOCAL_FILE
from fedmoe.cli import main as cli
from fedmoe.privacy import LEDGER_FILE, LedgerBook, LedgerEntry, LedgerError
from fedmoe.privacy.ledger import SCHEMA_VERSION
from fedmoe.records import LEDGER_UNUSABLE
from tests.helpers import SMALL, context, message

CLIENTS = ("partition-0", "partition-1")


def _book(path: Path) -> None:
    """Two clients, three charges each, interleaved (as a server's book is)."""
    with LedgerBook(path) as book:
        for c in CLIENTS:
            book.open(c, budget=1e4, delta=1e-4, accountant="rdp")
        for r in (1, 2, 3):
            for i, c in enumerate(CLIENTS):
                book.charge(c, LedgerEntry(r, 1.0 + 0.5 * i + 0.1 * r, 0.25, 4))


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for s in statements:
        db.execute(s)
    db.commit()
    db.close()


DAMAGE = {
    "charge-first-removed": ["DELETE FROM charge WHERE client = 'partition-0' AND seq = 1"],
    "charge-middle-removed": ["DELETE FROM charge WHERE client = 'partition-0' AND seq = 2"],
    "charge-last-removed": ["DELETE FROM charge WHERE client = 'partition-1' AND seq = 3"],
    "charge-last-removed-and-renumbered": [
        "DELETE FROM charge WHERE client = 'partition-1' AND seq = 3",
        "UPDATE head SET count = count - 1"],
    "charge-epsilon-edited": ["UPDATE charge SET epsilon = 0.01 WHERE seq = 3"],
    "charge-sigma-edited": ["UPDATE charge SET noise_multiplier = 50, epsilon = 0.001 "
                            "WHERE client = 'partition-0' AND seq = 2"],
    "charge-steps-edited": ["UPDATE charge SET steps = 1 WHERE client = 'partition-1' AND seq = 1"],
    "charges-reordered": ["UPDATE charge SET seq = 10 WHERE client = 'partition-0' AND seq = 1",
                          "UPDATE charge SET seq = 1 WHERE client = 'partition-0' AND seq = 3",
                          "UPDATE charge SET seq = 3 WHERE client = 'partition-0' AND seq = 10"],
    "client-rows-all-gone": ["DELETE FROM charge WHERE client = 'partition-1'",
                             "DELETE FROM budget WHERE client = 'partition-1'",
                             "DELETE FROM ledger WHERE client = 'partition-1'"],
    "client-charges-all-gone": ["DELETE FROM charge WHERE client = 'partition-0'"],
    "ledger-delta-edited": ["UPDATE ledger SET delta = 0.5 WHERE client = 'partition-0'"],
    "budget-edited": ["UPDATE budget SET budget = 1e9"],
    "head-removed": ["DELETE FROM head"],
    "head-edited": ["UPDATE head SET hash = 'x'"],
    "table-dropped": ["DROP TABLE charge"],
    "links-shifted": ["UPDATE charge SET link = link + 100"],
}


def _damage(path: Path, kind: str) -> None:
    if kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated-to-header":
        path.write_bytes(path.read_bytes()[:100])
    else:
        _sql(path, *DAMAGE[kind])


KINDS = [*DAMAGE, "zero-bytes", "truncated", "truncated-to-header"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read_only", [False, True])
def test_every_damage_is_refused_naming_the_file_and_the_file_is_kept(tmp_path, kind, read_only):
    path = tmp_path / LEDGER_FILE
    _book(path)
    _damage(path, kind)
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=str(path)):
        LedgerBook(path, read_only=read_only)
    assert path.read_bytes() == before


def test_an_intact_book_reopens_with_its_spend(tmp_path):
    path = tmp_path / LEDGER_FILE
    _book(path)
    with LedgerBook(path, read_only=True) as book:
        assert book.clients() == list(CLIENTS)
        assert [len(book.get(c).entries) for c in CLIENTS] == [3, 3]
    with LedgerBook(path) as book:  # and keeps extending the chain
        book.charge("partition-0", LedgerEntry(4, 2.0, 0.25, 4))
        book.open("partition-1", budget=5e3, delta=1e-4, accountant="rdp")
    with LedgerBook(path) as book:
        assert len(book.get("partition-0").entries) == 4
        assert book.get("partition-1").budget == 5e3


def test_read_only_book_never_writes_and_refuses_writes(tmp_path):
    path = tmp_path / LEDGER_FILE
    _book(path)
    before = path.read_bytes()
    with LedgerBook(path, read_only=True) as book:
        with pytest.raises(LedgerError, match="read-only"):
            book.charge("partition-0", LedgerEntry(4, 2.0, 0.25, 4))
        with pytest.raises(LedgerError, match="read-only"):
            book.open("new", budget=1.0, delta=1e-4, accountant="rdp")
    assert path.read_bytes() == before
    with pytest.raises(LedgerError, match="no privacy ledger"):
        LedgerBook(tmp_path / "missing" / LEDGER_FILE, read_only=True)
    assert not (tmp_path / "missing").exists()


def test_damage_while_a_book_is_open_is_caught_at_its_next_write(tmp_path):
    path = tmp_path / LEDGER_FILE
    _book(path)
    with LedgerBook(path) as book:
        _sql(path, "DELETE FROM charge WHERE client = 'partition-1' AND seq = 3")
        with pytest.raises(LedgerError, match=str(path)):
            book.charge("partition-1", LedgerEntry(4, 2.0, 0.25, 4))
        with pytest.raises(LedgerError, match=str(path)):  # another client's write too
            book.charge("partition-0", LedgerEntry(4, 2.0, 0.25, 4))


def test_another_process_writing_in_between_is_fine(tmp_path):
    path = tmp_path / LEDGER_FILE
    _book(path)
    with LedgerBook(path) as first, LedgerBook(path) as second:
        first.charge("partition-0", LedgerEntry(4, 2.0, 0.25, 4))
        second.charge("partition-0", LedgerEntry(5, 2.0, 0.25, 4))
        first.charge("partition-1", LedgerEntry(4, 2.0, 0.25, 4))
    with LedgerBook(path) as book:
        assert [len(book.get(c).entries) for c in CLIENTS] == [5, 4]


def test_version_1_ledger_is_refused_with_the_reason(tmp_path):
    path = tmp_path / LEDGER_FILE
    _sql(path, "CREATE TABLE ledger (client TEXT PRIMARY KEY, budget REAL, delta REAL, "
               "accountant TEXT)", "PRAGMA user_version = 1")
    with pytest.raises(LedgerError, match="version-1 fedmoe ledger.*cannot be verified"):
        LedgerBook(path)
    assert SCHEMA_VERSION == 2


# ------------------------------------------------------------------ the client and the CLI
def _client_ledger(state: Path, rounds: int = 2) -> None:
    ctx = context(state_dir=str(state))
    for r in range(1, rounds + 1):
        assert not app(message(server_round=r), ctx).has_error()


@pytest.mark.parametrize("kind", ["charge-last-removed-client", "client-charges-all-gone",
                                  "zero-bytes", "truncated"])
@pytest.mark.parametrize("kind_of_message", [MessageType.TRAIN, MessageType.QUERY,
                                             MessageType.EVALUATE])
def test_client_refuses_a_damaged_ledger_with_4002(tmp_path, kind, kind_of_message):
    state = tmp_path / "state"
    _client_ledger(state)
    path = state / LEDGER_FILE
    if kind == "charge-last-removed-client":
        _sql(path, "DELETE FROM charge WHERE seq = 2")
    else:
        _damage(path, kind)
    before = path.read_bytes()
    reply = app(message(kind=kind_of_message, server_round=3), context(state_dir=str(state)))
    assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
    assert str(path) in reply.error.reason
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind_of_message", [MessageType.TRAIN, MessageType.QUERY,
                                             MessageType.EVALUATE])
def test_local_experts_without_a_ledger_are_refused(tmp_path, kind_of_message):
    state = tmp_path / "state"
    _client_ledger(state, rounds=1)
    assert (state / LOCAL_FILE).exists()
    (state / LEDGER_FILE).unlink()
    reply = app(message(kind=kind_of_message, server_round=2), context(state_dir=str(state)))
    assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
    assert "local experts" in reply.error.reason and str(state) in reply.error.reason
    assert not (state / LEDGER_FILE).exists()


def test_query_and_evaluate_never_write_the_ledger(tmp_path):
    state = tmp_path / "state"
    _client_ledger(state)
    path = state / LEDGER_FILE
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    for kind in (MessageType.QUERY, MessageType.EVALUATE):
        assert not app(message(kind=kind, server_round=3), context(state_dir=str(state))).has_error()
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    fresh = tmp_path / "fresh"  # a first query creates nothing
    assert not app(message(kind=MessageType.QUERY), context(state_dir=str(fresh))).has_error()
    assert not (fresh / LEDGER_FILE).exists()


@pytest.mark.parametrize("kind", ["charge-last-removed", "zero-bytes", "truncated",
                                  "client-rows-all-gone"])
def test_budget_command_refuses_damage_and_never_writes(tmp_path, capsys, kind):
    path = tmp_path / LEDGER_FILE
    _book(path)
    _damage(path, kind)
    before = path.read_bytes()
    assert cli(["budget", str(tmp_path)]) == 2
    assert cli(["budget", str(tmp_path), "--json"]) == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["zero-bytes", "charge-last-removed", "no-ledger-but-results"])
def test_simulate_into_a_folder_with_a_damaged_ledger_exits_2_before_starting(tmp_path,
                                                                              capsys, kind):
    if kind == "no-ledger-but-results":
        (tmp_path / "results.json").write_text("{}")
        expected = "no ledger.sqlite"
    else:
        _book(tmp_path / LEDGER_FILE)
        _damage(tmp_path / LEDGER_FILE, kind)
        expected = str(tmp_path / LEDGER_FILE)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    assert cli(["simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path)]) == 2
    assert expected in capsys.readouterr().err
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before


def test_a_new_ledger_is_created_whole_even_without_hard_links(tmp_path, monkeypatch):
    import os

    def no_links(*_):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "a" / LEDGER_FILE
    with LedgerBook(path) as book:
        book.open("c", budget=1.0, delta=1e-4, accountant="rdp")
    with LedgerBook(path, read_only=True) as book:
        assert book.clients() == ["c"]
    assert [p.name for p in path.parent.iterdir()] == [LEDGER_FILE]  # no temporary left
