"""One store test suite run against SQLite (a real file), a real PostgreSQL server and the in-memory twin."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from beagled import events as ev
from beagled.dialects import PostgresDialect
from beagled.errors import ConcurrencyError
from beagled.store import MemoryStore, SqliteStore, SqlStore, Store
from tests.pg import PgServer


@pytest.fixture(params=["sqlite", "postgres", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "events.sqlite3")
    elif request.param == "postgres":
        s = SqlStore(PostgresDialect(request.getfixturevalue("pg_server").fresh_url()))
    else:
        s = MemoryStore()
    yield s
    s.close()


def pair(i: int, key: str | None = None, voice: str = "v", drafts: int | None = None) -> ev.PairSubmitted:
    """Pair ``i``; ``drafts``: whose drafts it carries (a retry of pair ``drafts`` under its key)."""
    d = i if drafts is None else drafts
    return ev.PairSubmitted(
        pair_id=f"p{i}", voice=voice, bad=f"bad {d}", good=f"good {d}", key=key or f"k{i}"
    )


def test_append_assigns_global_seq_and_stream_versions(store: Store) -> None:
    a = store.append([ev.Paused(), ev.JobCreated(job_id="j1", voice="v", pair_ids=())], 1.0)
    b = store.append([ev.Resumed(), ev.JobFailed(job_id="j1", error="x")], 2.0)
    assert [e.seq for e in a + b] == [1, 2, 3, 4]
    assert [(e.stream, e.version) for e in a + b] == [
        ("daemon", 1),
        ("job:j1", 1),
        ("daemon", 2),
        ("job:j1", 2),
    ]
    assert [e.payload for e in store.read(0)] == [e.payload for e in a + b]
    assert [e.seq for e in store.read(2)] == [3, 4]
    assert store.last_seq() == 4


def test_submit_batch_deduplicates_within_and_across_batches(store: Store) -> None:
    same = dataclasses.replace(pair(1), pair_id="p3")  # the same key and drafts: a duplicate
    r = store.submit_batch([pair(1), pair(2), same, pair(6, key="k1")], 1.0)
    got = [(x.pair_id, x.duplicate, x.conflict) for x in r]
    assert got == [("p1", False, False), ("p2", False, False), ("p1", True, False), ("p1", False, True)]
    assert r[2].seq == r[0].seq == r[3].seq  # the same key with other drafts: a conflict, never stored
    r2 = store.submit_batch([dataclasses.replace(pair(2), pair_id="p4"), pair(4, key="k2"), pair(5)], 2.0)
    got = [(x.pair_id, x.duplicate, x.conflict) for x in r2]
    assert got == [("p2", True, False), ("p2", False, True), ("p5", False, False)]
    assert store.get_pairs(["p1", "p5", "nope"]) == {"p1": pair(1), "p5": pair(5)}
    assert len(list(store.read(0))) == 3


CHAT = (
    {"role": "user", "content": "Write to Ana about the report."},
    {"role": "assistant", "content": "Formal or casual?"},
    {"role": "user", "content": "Casual, it is late."},
)


def chat_pair(i: int, key: str, messages: tuple[dict[str, str], ...] = CHAT) -> ev.PairSubmitted:
    return dataclasses.replace(pair(i, key=key), system="You are Bea.", messages=messages)


def test_chat_pairs_round_trip_conflict_on_other_messages_and_erase_with_the_drafts(store: Store) -> None:
    r = store.submit_batch([chat_pair(1, "c1"), pair(2, key="plain")], 1.0)
    assert [x.duplicate for x in r] == [False, False]
    got = store.get_pairs(["p1", "p2"])
    assert got["p1"] == chat_pair(1, "c1") and got["p1"].messages == CHAT
    assert got["p2"].messages is None and got["p2"].system is None
    assert [e.payload for e in store.read(0)] == [chat_pair(1, "c1"), pair(2, key="plain")]
    assert all(e.schema == ev.PairSubmitted.SCHEMA == 2 for e in store.read(0))
    public = store.read_public(0, 10)[0]["data"]  # watch never shows the conversation
    assert "messages" not in public and "system" not in public and "bad" not in public
    # the same key: the same conversation is a duplicate; another conversation (or none) is a conflict
    again = store.submit_batch([dataclasses.replace(chat_pair(1, "c1"), pair_id="p7")], 2.0)[0]
    assert (again.pair_id, again.duplicate, again.conflict) == ("p1", True, False)
    other = chat_pair(8, "c1", messages=(*CHAT[:2], {"role": "user", "content": "Formal."}))
    others = store.submit_batch(
        [
            dataclasses.replace(other, bad="bad 1", good="good 1"),
            dataclasses.replace(chat_pair(9, "c1"), system="You are Holt."),
            dataclasses.replace(pair(1, key="c1")),
        ],
        3.0,
    )
    assert [(x.pair_id, x.conflict) for x in others] == [("p1", True)] * 3
    assert len(list(store.read(0))) == 2

    erased = store.erase_drafts("v", 4.0)
    assert erased[0].payload == ev.DraftsErased(voice="v", pairs=2)
    blank = store.get_pairs(["p1"])["p1"]
    assert (blank.bad, blank.good, blank.prompt, blank.system, blank.messages) == ("", "", None, None, None)
    assert blank.key == chat_pair(1, "c1").key


def test_a_schema_1_pair_is_upcast_with_no_conversation(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    s = SqliteStore(path)
    s.close()
    old = '{"pair_id":"p1","voice":"v","bad":"b","good":"g","key":"k1","prompt":"p","quality":null}'
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "INSERT INTO events (seq, stream, version, type, schema, at, data, term) "
            "VALUES (1, 'voice:v', 1, 'PairSubmitted', 1, 1.0, ?, NULL)",
            (old,),
        )
        db.execute("INSERT INTO pairs (pair_id, seq) VALUES ('p1', 1)")
    db.close()
    s = SqliteStore(path)
    [e] = list(s.read(0))
    assert e.schema == 1
    assert e.payload == ev.PairSubmitted(pair_id="p1", voice="v", bad="b", good="g", key="k1", prompt="p")
    assert s.get_pairs(["p1"])["p1"].messages is None
    s.close()
    v1 = ev.decode("PairSubmitted", 1, {"pair_id": "p", "voice": "v", "bad": "b", "good": "g", "key": "k"})
    assert isinstance(v1, ev.PairSubmitted) and (v1.system, v1.messages) == (None, None)
    with pytest.raises(ValueError, match="newer"):
        ev.decode("PairSubmitted", 3, {})


def test_sqlite_survives_reopen_and_is_durable_by_configuration(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    s = SqliteStore(path)
    s.submit_batch([pair(1)], 1.0)
    s.append([ev.Paused()], 2.0)
    s.close()
    s = SqliteStore(path)
    assert s.last_seq() == 2
    assert s.submit_batch([dataclasses.replace(pair(1), pair_id="p9")], 3.0)[0].duplicate is True
    assert s.submit_batch([pair(9, key="k1")], 3.0)[0].conflict is True
    assert s.append([ev.Resumed()], 4.0)[0].version == 2  # the stream continues where it was
    with s._writer.connect() as c:  # the pragmas the durability promise rests on
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert s.integrity_check() == "ok"
    s.close()


def test_a_second_writer_loses_instead_of_forking_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    one, two = SqliteStore(path), SqliteStore(path)
    one.append([ev.Paused()], 1.0)
    with pytest.raises(ConcurrencyError):
        two.append([ev.Resumed()], 2.0)  # two still thinks seq 1 and daemon v1 are free
    assert [e.type for e in one.read(0)] == ["Paused"]
    one.close()
    two.close()


def test_writes_are_in_immediate_transactions(tmp_path: Path) -> None:
    """A reader holding a read transaction does not stop the writer (WAL); a writer lock does."""
    path = tmp_path / "e.sqlite3"
    s = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    other.execute("BEGIN IMMEDIATE")  # someone else holds the write lock
    done = threading.Event()

    def write() -> None:
        s.append([ev.Paused()], 1.0)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    assert not done.wait(0.5)  # blocked on the lock, not failing half-way
    other.execute("ROLLBACK")
    assert done.wait(10)
    t.join()
    other.close()
    s.close()


def test_store_error_on_unwritable_log(tmp_path: Path) -> None:
    m = MemoryStore()
    m.fail_next = OSError("No space left on device")
    from beagled.errors import StoreError

    with pytest.raises(StoreError, match="No space"):
        m.submit_batch([pair(1)], 1.0)
    assert list(m.read(0)) == []
    assert m.submit_batch([pair(1)], 1.0)[0].duplicate is False


# -- PostgreSQL: several daemons on one log ------------------------------------------------------------
@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.fresh_url()


def test_two_daemons_share_one_log_with_contiguous_positions(pg_url: str) -> None:
    one, two = SqlStore(PostgresDialect(pg_url)), SqlStore(PostgresDialect(pg_url))
    a = one.append([ev.Paused()], 1.0)
    b = two.append([ev.Resumed()], 2.0)  # two's counters are stale: it re-reads them under the lock
    c = one.submit_batch([pair(1)], 3.0)
    d = two.submit_batch([pair(2, key="k1", drafts=1), pair(3)], 4.0)  # k1 committed by the other
    assert [e.seq for e in a + b] == [1, 2]
    assert [(e.stream, e.version) for e in a + b] == [("daemon", 1), ("daemon", 2)]
    assert (c[0].seq, d[0].pair_id, d[0].duplicate, d[1].seq) == (3, "p1", True, 4)
    assert one.last_seq() == two.last_seq() == 4
    assert [e.seq for e in one.read(0)] == [1, 2, 3, 4]
    assert one.integrity_check() == "ok"
    one.close()
    two.close()


def test_racing_daemons_same_key_one_pair_and_a_reader_never_skips(pg_url: str) -> None:
    """Writers in threads (one store each, as daemons) race on shared keys while a reader tails by
    position: every key is stored once, and the reader sees every position in order, no gaps."""
    stores = [SqlStore(PostgresDialect(pg_url)) for _ in range(3)]
    reader = SqlStore(PostgresDialect(pg_url))
    results: list[list[tuple[str, bool]]] = [[] for _ in stores]
    done = threading.Event()
    seen: list[int] = []

    def write(i: int) -> None:
        for n in range(40):
            r = stores[i].submit_batch(
                [pair(n * 10 + i, key=f"k{n}", drafts=n), pair(1000 + n * 10 + i)], float(n)
            )
            results[i].extend((x.pair_id, x.duplicate) for x in r[:1])

    def tail() -> None:
        while True:
            stop = done.is_set()
            seen.extend(e.seq for e in reader.read(seen[-1] if seen else 0))
            if stop:
                return

    t = threading.Thread(target=tail)
    t.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    t.join()
    total = reader.last_seq()
    assert total == 40 + 3 * 40  # each shared key once, each unkeyed pair once
    assert seen == list(range(1, total + 1))
    for n in range(40):  # all three daemons got the same first pair_id for key k{n}
        assert len({results[i][n][0] for i in range(3)}) == 1
        assert sorted(results[i][n][1] for i in range(3)) == [False, True, True]
    for s in [*stores, reader]:
        s.close()


def test_a_deposed_leader_cannot_append(pg_url: str) -> None:
    s = SqlStore(PostgresDialect(pg_url))
    s.term = 1
    with s._writer.begin() as c:
        c.exec_driver_sql("INSERT INTO lease (id, term, node, renewed_at) VALUES (1, 1, 'a', 0)")
    s.append([ev.Paused()], 1.0)
    with s._writer.begin() as c:
        c.exec_driver_sql("UPDATE lease SET term = 2, node = 'b'")
    from beagled.errors import Fenced

    with pytest.raises(Fenced, match="deposed"):
        s.append([ev.Resumed()], 2.0)
    assert s.submit_batch([pair(1)], 3.0)[0].duplicate is False  # pairs are not effects: any node takes them
    assert s.terms() == [(1, "Paused", 1), (2, "PairSubmitted", None)]
    s.close()


def test_store_reconnects_after_its_connection_is_cut(pg_url: str, pg_server: PgServer) -> None:
    s = SqlStore(PostgresDialect(pg_url))
    s.append([ev.Paused()], 1.0)
    db = pg_url.split("/")[3].split("?", maxsplit=1)[0]
    pg_server.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")
    from beagled.errors import StoreError

    with pytest.raises(StoreError):  # the cut is noticed by the write in flight: not acked
        s.append([ev.Resumed()], 2.0)
    assert [e.seq for e in s.append([ev.Resumed()], 3.0)] == [2]  # then a fresh connection
    assert [e.type for e in s.read(0)] == ["Paused", "Resumed"]
    s.close()


def test_sqlite_log_of_schema_1_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,"
        " type TEXT NOT NULL, schema INTEGER NOT NULL, at FLOAT NOT NULL, data TEXT NOT NULL,"
        " UNIQUE (stream, version));"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        """INSERT INTO events VALUES (1, 'daemon', 1, 'Paused', 1, 1.0, '{}');"""
    )
    db.close()
    for i in range(2):  # idempotent
        s = SqliteStore(path)
        assert [e.type for e in s.read(0)] == ["Paused"] + ["Resumed"] * i
        assert s.append([ev.Resumed()], 2.0)[0].seq == 2 + i
        s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta").fetchone() == ("2",)
        assert [r[0] for r in db.execute("SELECT term FROM events")] == [None, None, None]
