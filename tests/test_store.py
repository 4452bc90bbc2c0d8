"""One store test suite run against SQLite (a real file) and the in-memory twin."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from beagled import events as ev
from beagled.errors import ConcurrencyError
from beagled.store import MemoryStore, SqliteStore, Store


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store = SqliteStore(tmp_path / "events.sqlite3") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def pair(i: int, key: str | None = None, voice: str = "v") -> ev.PairSubmitted:
    return ev.PairSubmitted(
        pair_id=f"p{i}", voice=voice, bad=f"bad {i}", good=f"good {i}", key=key or f"k{i}"
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
