"""The event log: SQLAlchemy Core on SQLite (the only module that imports sqlalchemy), plus an
in-memory twin with the same behaviour for fast tests.

Durability: WAL with ``synchronous=FULL``, every write in ``BEGIN IMMEDIATE``; a call returns only
after COMMIT has returned, so an acknowledgement built on it is durable. One writer: the engine calls
the write methods from one thread at a time (a ``CapacityLimiter(1)``); readers use their own
connections (WAL lets them run beside the writer). Group commit: ``submit_batch`` writes many pairs in
one transaction. Each event has a global ``seq`` and a per-stream ``version``; ``(stream, version)`` is
unique, so a second writer loses with ``ConcurrencyError`` instead of forking a stream.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from beagled import events as ev
from beagled.errors import ConcurrencyError, StoreError

SCHEMA_VERSION = 1

metadata = sa.MetaData()
events_t = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("stream", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("schema", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.UniqueConstraint("stream", "version", name="uq_stream_version"),
)
keys_t = sa.Table(
    "idempotency",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("pair_id", sa.Text, nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
)
pairs_t = sa.Table(
    "pairs",
    metadata,
    sa.Column("pair_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
)
meta_t = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


@dataclass(frozen=True)
class SubmitResult:
    pair_id: str
    seq: int
    duplicate: bool
    event: ev.Event | None  # the new event, None for a duplicate


class Store(Protocol):
    """The port the engine uses. Write methods are called by one writer at a time."""

    def append(self, payloads: Sequence[ev.Payload], at: float) -> list[ev.Event]: ...
    def submit_batch(self, items: Sequence[ev.PairSubmitted], at: float) -> list[SubmitResult]: ...
    def read(self, from_seq: int = 0) -> Iterator[ev.Event]: ...
    def get_pairs(self, pair_ids: Sequence[str]) -> dict[str, ev.PairSubmitted]: ...
    def last_seq(self) -> int: ...
    def integrity_check(self) -> str: ...
    def close(self) -> None: ...


def _row(e: ev.Event) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "stream": e.stream,
        "version": e.version,
        "type": e.type,
        "schema": e.payload.SCHEMA,
        "at": e.at,
        "data": json.dumps(e.payload.to_data(), separators=(",", ":"), ensure_ascii=False),
    }


def _event(row: Any) -> ev.Event:
    payload = ev.decode(row.type, row.schema, json.loads(row.data))
    return ev.Event(payload=payload, seq=row.seq, version=row.version, at=row.at, schema=row.schema)


class _Sequencer:
    """Hands out ``seq`` and per-stream ``version`` numbers; rolled back with a failed transaction."""

    def __init__(self, last_seq: int, version_of: Any) -> None:
        self.last = last_seq
        self.versions: dict[str, int] = {}
        self._version_of = version_of

    def stamp(self, payloads: Sequence[ev.Payload], at: float) -> tuple[list[ev.Event], dict[str, int], int]:
        staged: dict[str, int] = {}
        seq = self.last
        out = []
        for p in payloads:
            stream = p.stream()
            if stream not in staged:
                staged[stream] = (
                    self.versions[stream] if stream in self.versions else self._version_of(stream)
                )
            staged[stream] += 1
            seq += 1
            out.append(ev.Event(payload=p, seq=seq, version=staged[stream], at=at, schema=p.SCHEMA))
        return out, staged, seq

    def commit(self, staged: dict[str, int], seq: int) -> None:
        self.versions.update(staged)
        self.last = seq


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite+pysqlite:///{path}"
        try:
            self._writer = self._engine(url, immediate=True, pool_size=1)
            self._reader = self._engine(url, immediate=False, pool_size=4)
            metadata.create_all(self._writer)
            with self._writer.begin() as c:
                c.execute(
                    sa.insert(meta_t)
                    .prefix_with("OR IGNORE")
                    .values(key="schema_version", value=str(SCHEMA_VERSION))
                )
                last = c.execute(sa.select(sa.func.max(events_t.c.seq))).scalar()
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open the event log {path}: {e}") from e
        self._lock = threading.Lock()  # guards the sequencer if a caller forgets the one-writer rule
        self._seq = _Sequencer(int(last or 0), self._stream_version)

    @staticmethod
    def _engine(url: str, *, immediate: bool, pool_size: int) -> Engine:
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=0,
        )

        @sa_event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa_event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def _stream_version(self, stream: str) -> int:
        with self._reader.connect() as c:
            v = c.execute(
                sa.select(sa.func.max(events_t.c.version)).where(events_t.c.stream == stream)
            ).scalar()
        return int(v or 0)

    def _write(self, payloads: Sequence[ev.Payload], at: float, extra: Any = None) -> list[ev.Event]:
        with self._lock:
            stamped, staged, seq = self._seq.stamp(payloads, at)
            try:
                with self._writer.begin() as c:
                    if stamped:
                        c.execute(sa.insert(events_t), [_row(e) for e in stamped])
                    if extra is not None:
                        extra(c, stamped)
            except IntegrityError as e:
                raise ConcurrencyError(f"another writer appended to the log: {e.orig}") from e
            except OperationalError as e:
                raise StoreError(f"the event log could not be written: {e.orig}") from e
            except SQLAlchemyError as e:
                raise StoreError(f"the event log could not be written: {e}") from e
            self._seq.commit(staged, seq)
            return stamped

    def append(self, payloads: Sequence[ev.Payload], at: float) -> list[ev.Event]:
        return self._write(payloads, at)

    def submit_batch(self, items: Sequence[ev.PairSubmitted], at: float) -> list[SubmitResult]:
        keys = list(dict.fromkeys(p.key for p in items))
        with self._lock:
            try:
                with self._reader.connect() as c:
                    found = (
                        {
                            r.key: (r.pair_id, r.seq)
                            for r in c.execute(sa.select(keys_t).where(keys_t.c.key.in_(keys)))
                        }
                        if len(keys) <= 900
                        else self._find_many(c, keys)
                    )
            except SQLAlchemyError as e:
                raise StoreError(f"the event log could not be read: {e}") from e
        fresh: list[ev.PairSubmitted] = []
        plan: list[tuple[str, int] | int] = []  # existing (pair_id, seq) or an index into fresh
        batch_keys: dict[str, int] = {}
        for p in items:
            if p.key in found:
                plan.append(found[p.key])
            elif p.key in batch_keys:
                plan.append(-1 - batch_keys[p.key])  # duplicate of a pair earlier in this batch
            else:
                batch_keys[p.key] = len(fresh)
                plan.append(len(fresh))
                fresh.append(p)

        def extra(c: Connection, stamped: list[ev.Event]) -> None:
            rows = [(p.key, p.pair_id, e.seq) for p, e in zip(fresh, stamped, strict=True)]
            c.execute(sa.insert(keys_t), [{"key": k, "pair_id": pid, "seq": seq} for k, pid, seq in rows])
            c.execute(sa.insert(pairs_t), [{"pair_id": pid, "seq": seq} for _k, pid, seq in rows])

        stamped = self._write(fresh, at, extra) if fresh else []
        out: list[SubmitResult] = []
        for step in plan:
            if isinstance(step, tuple):
                out.append(SubmitResult(pair_id=step[0], seq=step[1], duplicate=True, event=None))
            elif step >= 0:
                new = stamped[step]
                out.append(SubmitResult(pair_id=fresh[step].pair_id, seq=new.seq, duplicate=False, event=new))
            else:
                first = stamped[-1 - step]
                out.append(
                    SubmitResult(pair_id=fresh[-1 - step].pair_id, seq=first.seq, duplicate=True, event=None)
                )
        return out

    @staticmethod
    def _find_many(c: Connection, keys: list[str]) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            for r in c.execute(sa.select(keys_t).where(keys_t.c.key.in_(chunk))):
                out[r.key] = (r.pair_id, r.seq)
        return out

    def find_key(self, key: str) -> tuple[str, int] | None:
        with self._reader.connect() as c:
            r = c.execute(sa.select(keys_t).where(keys_t.c.key == key)).first()
        return (r.pair_id, r.seq) if r else None

    def read(self, from_seq: int = 0, *, batch: int = 5000) -> Iterator[ev.Event]:
        """Events with ``seq > from_seq``, in order, read in batches (a long replay holds no lock)."""
        last = from_seq
        while True:
            try:
                with self._reader.connect() as c:
                    rows = c.execute(
                        sa.select(events_t).where(events_t.c.seq > last).order_by(events_t.c.seq).limit(batch)
                    ).all()
            except SQLAlchemyError as e:
                raise StoreError(f"the event log could not be read: {e}") from e
            if not rows:
                return
            for r in rows:
                yield _event(r)
            last = rows[-1].seq

    def read_stream(self, stream: str) -> list[ev.Event]:
        with self._reader.connect() as c:
            rows = c.execute(
                sa.select(events_t).where(events_t.c.stream == stream).order_by(events_t.c.version)
            ).all()
        return [_event(r) for r in rows]

    def get_pairs(self, pair_ids: Sequence[str]) -> dict[str, ev.PairSubmitted]:
        out: dict[str, ev.PairSubmitted] = {}
        ids = list(pair_ids)
        with self._reader.connect() as c:
            for i in range(0, len(ids), 900):
                q = (
                    sa.select(events_t)
                    .join(pairs_t, pairs_t.c.seq == events_t.c.seq)
                    .where(pairs_t.c.pair_id.in_(ids[i : i + 900]))
                )
                for r in c.execute(q):
                    p = _event(r).payload
                    assert isinstance(p, ev.PairSubmitted)
                    out[p.pair_id] = p
        return out

    def last_seq(self) -> int:
        return self._seq.last

    def integrity_check(self) -> str:
        with self._reader.connect() as c:
            return str(c.exec_driver_sql("PRAGMA integrity_check").scalar())

    def close(self) -> None:
        self._writer.dispose()
        self._reader.dispose()


class MemoryStore:
    """The same contract as ``SqliteStore``, in memory: a fake for tests of the engine's logic."""

    def __init__(self) -> None:
        self._events: list[ev.Event] = []
        self._keys: dict[str, tuple[str, int]] = {}
        self._pairs: dict[str, ev.PairSubmitted] = {}
        self._seq = _Sequencer(0, lambda stream: 0)
        self.fail_next: Exception | None = None  # the next write raises this (disk-full simulations)

    def _check_fail(self) -> None:
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise StoreError(f"the event log could not be written: {err}") from err

    def append(self, payloads: Sequence[ev.Payload], at: float) -> list[ev.Event]:
        self._check_fail()
        stamped, staged, seq = self._seq.stamp(payloads, at)
        self._seq.commit(staged, seq)
        self._events.extend(stamped)
        return stamped

    def submit_batch(self, items: Sequence[ev.PairSubmitted], at: float) -> list[SubmitResult]:
        self._check_fail()
        out = []
        for p in items:
            if p.key in self._keys:
                pid, seq = self._keys[p.key]
                out.append(SubmitResult(pair_id=pid, seq=seq, duplicate=True, event=None))
                continue
            (e,) = self.append([p], at)
            self._keys[p.key] = (p.pair_id, e.seq)
            self._pairs[p.pair_id] = p
            out.append(SubmitResult(pair_id=p.pair_id, seq=e.seq, duplicate=False, event=e))
        return out

    def find_key(self, key: str) -> tuple[str, int] | None:
        return self._keys.get(key)

    def read(self, from_seq: int = 0) -> Iterator[ev.Event]:
        return iter([e for e in self._events if e.seq > from_seq])

    def read_stream(self, stream: str) -> list[ev.Event]:
        return [e for e in self._events if e.stream == stream]

    def get_pairs(self, pair_ids: Sequence[str]) -> dict[str, ev.PairSubmitted]:
        return {pid: self._pairs[pid] for pid in pair_ids if pid in self._pairs}

    def last_seq(self) -> int:
        return self._seq.last

    def integrity_check(self) -> str:
        return "ok"

    def close(self) -> None:
        pass
