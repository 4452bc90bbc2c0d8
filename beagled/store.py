"""The event log: SQLAlchemy Core on SQLite or PostgreSQL (with ``beagled.dialects``, the only modules
that import sqlalchemy), plus an in-memory twin with the same behaviour for fast tests.

One SQL store (``SqlStore``) serves both databases: the tables, the idempotency keys, the per-stream
versions and the snapshots are the same SQL; what differs (engines, how a write transaction begins,
commit-order positions, ``NOTIFY``) is the dialect's. On PostgreSQL several daemons may append to one
log: each write transaction locks ``events`` and re-reads the last position and stream versions.

Fencing: a store given a leader ``term`` (``beagled.leader``) stamps it on every event it ``append``s
and refuses (``Fenced``) to append when the ``lease`` row holds a newer term: a deposed leader that
wakes up cannot write effects. Submitted pairs carry no term (any daemon accepts them).

Durability: WAL with ``synchronous=FULL``, every write in ``BEGIN IMMEDIATE``; a call returns only
after COMMIT has returned, so an acknowledgement built on it is durable. One writer: the engine calls
the write methods from one thread at a time (a ``CapacityLimiter(1)``); readers use their own
connections (WAL lets them run beside the writer). Group commit: ``submit_batch`` writes many pairs in
one transaction. Each event has a global ``seq`` and a per-stream ``version``; ``(stream, version)`` is
unique, so a second writer loses with ``ConcurrencyError`` instead of forking a stream.

Speed: SQLAlchemy owns the schema and the connection pools; the hot paths (``submit_batch``,
``append``, ``read``) run plain SQL on the pooled DB-API connection with ``executemany`` over tuples —
per-row Core compilation cost more than the commit itself at group-commit batch sizes. The idempotency
lookup is one ``SELECT … IN`` per batch, inside the write transaction (so it sees every committed key).

Snapshots: ``write_snapshot(seq, schema, blob)`` stores an opaque serialised projection (see
``beagled.snapshot``) in the ``snapshots`` table of the same database, in its own transaction;
``snapshots()`` yields them newest first, so recovery can fall back to an older one (or to a full
replay) when one cannot be read. The newest ``KEEP_SNAPSHOTS`` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from beagled import events as ev
from beagled.dialects import DbConn, Dialect, SqliteDialect
from beagled.errors import ConcurrencyError, Fenced, StoreError
from beagled.keys import content_of, scoped_key
from beagled.ports import Store, SubmitResult

# the port and its values live in beagled.ports (stdlib only); re-exported for older imports
__all__ = ["MemoryStore", "SqlStore", "SqliteStore", "Store", "SubmitResult", "content_of", "scoped_key"]

SCHEMA_VERSION = 2  # 2: events.term, the lease table
KEEP_SNAPSHOTS = 2
_IN_CHUNK = 900  # bound parameters per IN (...) list (SQLite's old default limit is 999)

_Pos = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: the table's own rowid
metadata = sa.MetaData()
events_t = sa.Table(
    "events",
    metadata,
    sa.Column("seq", _Pos, primary_key=True, autoincrement=False),
    sa.Column("stream", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("schema", sa.Integer, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("term", sa.BigInteger, nullable=True),  # the writing leader's term; NULL: a pair, or no leases
    sa.UniqueConstraint("stream", "version", name="uq_stream_version"),
)
keys_t = sa.Table(
    "idempotency",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("pair_id", sa.Text, nullable=False),
    sa.Column("seq", _Pos, nullable=False),
    # issue 18: keys are scoped to (uid, voice) and stored as keyed hashes (``scoped_key``); ``content``
    # is the keyed fingerprint of the drafts, so the same key with other drafts is a conflict
    sa.Column("uid", sa.Integer, nullable=True),
    sa.Column("voice", sa.Text, nullable=True),
    sa.Column("content", sa.Text, nullable=True),
    sqlite_with_rowid=False,  # one B-tree per row written, not a table plus its key index
)
_KEY_COLUMNS = ("uid", "voice", "content")  # added after the first release: ALTER TABLE on open
pairs_t = sa.Table(
    "pairs",
    metadata,
    sa.Column("pair_id", sa.Text, primary_key=True),
    sa.Column("seq", _Pos, nullable=False),
    sqlite_with_rowid=False,
)
meta_t = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
snapshots_t = sa.Table(
    "snapshots",
    metadata,
    sa.Column("seq", _Pos, primary_key=True, autoincrement=False),  # state after this event
    sa.Column("schema", sa.Integer, nullable=False),  # the snapshot format's version
    sa.Column("data", sa.LargeBinary, nullable=False),
)
lease_t = sa.Table(  # one row: the newest leader term (written by beagled.leader, read by fencing)
    "lease",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("term", sa.BigInteger, nullable=False),
    sa.Column("node", sa.Text, nullable=False),
    sa.Column("renewed_at", sa.Float, nullable=False),  # the database's clock (epoch seconds)
)

_INSERT_EVENT = (
    "INSERT INTO events (seq, stream, version, type, schema, at, data, term) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_KEY = "INSERT INTO idempotency (key, pair_id, seq, uid, voice, content) VALUES (?, ?, ?, ?, ?, ?)"
_INSERT_PAIR = "INSERT INTO pairs (pair_id, seq) VALUES (?, ?)"
_SELECT_EVENTS = "SELECT seq, version, type, schema, at, data FROM events"
_SELECT_PUBLIC = {  # the drafts cut out by the database: a watch's history never loads a draft
    "sqlite": "SELECT seq, type, at, CASE WHEN type = 'PairSubmitted' "
    "THEN json_remove(data, '$.bad', '$.good', '$.prompt', '$.system', '$.messages') ELSE data END "
    "FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
    "postgresql": "SELECT seq, type, at, CASE WHEN type = 'PairSubmitted' "
    "THEN (data::jsonb - 'bad' - 'good' - 'prompt' - 'system' - 'messages')::text ELSE data END "
    "FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
}
_ERASE_DRAFTS = {
    "sqlite": "UPDATE events SET data = json_set(data, '$.bad', '', '$.good', '', '$.prompt', NULL, "
    "'$.system', NULL, '$.messages', NULL) WHERE stream = ? AND type = 'PairSubmitted'",
    "postgresql": 'UPDATE events SET data = (data::jsonb || \'{"bad": "", "good": "", '
    '"prompt": null, "system": null, "messages": null}\'::jsonb)::text '
    "WHERE stream = ? AND type = 'PairSubmitted'",
}

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # one encoder, reused
_quote: Any = json.encoder.encode_basestring  # the C string quoter
_decode = json.JSONDecoder().decode


def _data(p: ev.Payload) -> str:
    if type(p) is ev.PairSubmitted:  # the hot path: the same JSON as to_data(), without its field walk
        out: str = (
            '{"pair_id":'
            + _quote(p.pair_id)
            + ',"voice":'
            + _quote(p.voice)
            + ',"bad":'
            + _quote(p.bad)
            + ',"good":'
            + _quote(p.good)
            + ',"key":'
            + _quote(p.key)
            + ',"prompt":'
            + ("null" if p.prompt is None else _quote(p.prompt))
            + ',"quality":'
            + ("null" if p.quality is None else _encode(p.quality))
            + ',"heldout":'
            + ("true" if p.heldout else "false")
            + ',"uid":'
            + ("null" if p.uid is None else str(int(p.uid)))
            + ',"system":'
            + ("null" if p.system is None else _quote(p.system))
            + ',"messages":'
            + ("null" if p.messages is None else _encode(list(p.messages)))
            + "}"
        )
        return out
    return str(_encode(p.to_data()))


def _row(e: ev.Event, term: int | None = None) -> tuple[int, str, int, str, int, float, str, int | None]:
    return (e.seq, e.stream, e.version, e.type, e.payload.SCHEMA, e.at, _data(e.payload), term)


def _event(row: tuple[int, int, str, int, float, str]) -> ev.Event:
    seq, version, type_, schema, at, data = row
    fields = _decode(data)
    payload: ev.Payload | None = None
    if type_ == "PairSubmitted" and schema == ev.PairSubmitted.SCHEMA:
        try:  # fast path; anything unexpected goes through the general decoder
            if fields.get("messages") is not None:
                fields["messages"] = tuple(fields["messages"])
            payload = ev.PairSubmitted(**fields)
        except TypeError:
            payload = None
    if payload is None:
        payload = ev.decode(type_, schema, fields)
    return ev.Event(payload=payload, seq=seq, version=version, at=at, schema=schema)


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

    def refresh(self, last_seq: int) -> None:
        """Forget what this writer knew: another daemon may have appended (shared logs)."""
        self.last = last_seq
        self.versions.clear()


Found = dict[str, tuple[str, int, str | None]]  # key -> (pair_id, seq, content fingerprint or None)


def _plan(
    items: Sequence[ev.PairSubmitted], found: Found, content: Any
) -> tuple[list[ev.PairSubmitted], list[tuple[str, int, bool] | int]]:
    """Which items are new, and for each item: an existing (pair_id, seq, conflict) or an index into
    ``fresh`` (negative ``-1 - i`` for a duplicate of the ``i``-th fresh pair of this same batch).
    ``conflict``: the key is stored with other drafts (a row from before fingerprints never conflicts)."""
    fresh: list[ev.PairSubmitted] = []
    plan: list[tuple[str, int, bool] | int] = []
    batch_keys: dict[str, int] = {}
    for p in items:
        if p.key in found:
            pid, seq, fp = found[p.key]
            plan.append((pid, seq, fp is not None and fp != content(p)))
        elif p.key in batch_keys:
            first = fresh[batch_keys[p.key]]
            if content(first) != content(p):
                plan.append((first.pair_id, -1 - batch_keys[p.key], True))
            else:
                plan.append(-1 - batch_keys[p.key])
        else:
            batch_keys[p.key] = len(fresh)
            plan.append(len(fresh))
            fresh.append(p)
    return fresh, plan


def _results(
    fresh: list[ev.PairSubmitted], plan: list[tuple[str, int, bool] | int], stamped: list[ev.Event]
) -> list[SubmitResult]:
    out: list[SubmitResult] = []
    for step in plan:
        if isinstance(step, tuple):
            pid, seq, conflict = step
            if seq < 0:  # a conflict with a fresh pair of this same batch
                seq = stamped[-1 - seq].seq
            out.append(
                SubmitResult(pair_id=pid, seq=seq, duplicate=not conflict, event=None, conflict=conflict)
            )
        elif step >= 0:
            new = stamped[step]
            out.append(SubmitResult(pair_id=fresh[step].pair_id, seq=new.seq, duplicate=False, event=new))
        else:
            first = stamped[-1 - step]
            out.append(
                SubmitResult(pair_id=fresh[-1 - step].pair_id, seq=first.seq, duplicate=True, event=None)
            )
    return out


class SqlStore:
    """The event log on a SQL database; ``dialect`` says which (see ``beagled.dialects``)."""

    term: int | None = None  # set by the leader lease: appends are fenced by it (None: no fencing)

    def __init__(self, dialect: Dialect) -> None:
        self._d = d = dialect
        try:
            # pool: the store's own writer connection, plus one for whoever inspects the pragmas
            self._writer = d.engine(writer=True, pool_size=1, overflow=1)
            self._reader = d.engine(writer=False, pool_size=4, overflow=0)
            with self._writer.begin() as c:
                d.migrate_lock(c)  # two daemons starting on one new database: one creates, one waits
                _migrate(c)
                last = c.execute(sa.select(sa.func.max(events_t.c.seq))).scalar()
                self._secret = _load_secret(c)
            self._wconn = self._writer.raw_connection()  # held for the store's life: the one writer
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open the event log {d.describe()}: {e}") from e
        self._db: DbConn = d.wrap(self._wconn.driver_connection)
        self._lock = threading.Lock()  # guards the sequencer if a caller forgets the one-writer rule
        self._seq = _Sequencer(int(last or 0), self._stream_version)

    def key_secret(self) -> bytes:
        return self._secret

    def submitters(self) -> list[tuple[int, str]]:
        """Every (uid, voice) that has submitted a pair (since scoped keys), for the roles."""
        with self._read_db() as db:
            rows = db.execute(
                "SELECT DISTINCT uid, voice FROM idempotency WHERE uid IS NOT NULL AND voice IS NOT NULL"
            ).fetchall()
        return [(int(u), str(v)) for u, v in rows]

    # -- the writer ----------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[DbConn]:
        """One write transaction (``BEGIN IMMEDIATE`` … ``COMMIT`` on SQLite; on PostgreSQL with the
        ``events`` table locked) on the writer connection; errors translated."""
        d = self._d
        try:
            if d.broken(self._db):  # the database restarted or cut us off: a fresh connection
                self._reconnect()
            db = self._db
            d.begin(db)
            if d.shared:
                row = db.execute("SELECT max(seq) FROM events").fetchone()
                self._seq.refresh(int(row[0] or 0))
            try:
                yield db
                d.commit(db)
            except BaseException:
                d.rollback(db)
                raise
        except d.integrity_error as e:
            raise ConcurrencyError(f"another writer appended to the log: {e}") from e
        except d.error as e:
            raise StoreError(f"the event log could not be written: {e}") from e
        except SQLAlchemyError as e:
            raise StoreError(f"the event log could not be written: {e}") from e

    def _reconnect(self) -> None:
        self._wconn.invalidate()
        self._wconn = self._writer.raw_connection()  # (raises the driver's error: _tx translates it)
        self._db = self._d.wrap(self._wconn.driver_connection)

    def _stream_version(self, stream: str) -> int:
        # called inside the write transaction (by the sequencer): sees every committed event
        row = self._db.execute("SELECT max(version) FROM events WHERE stream = ?", (stream,)).fetchone()
        return int(row[0] or 0)

    def _write(self, payloads: Sequence[ev.Payload], at: float, extra: Any = None) -> list[ev.Event]:
        term = self.term
        with self._lock, self._tx() as db:
            if term is not None:
                row = db.execute("SELECT term FROM lease WHERE id = 1").fetchone()
                if row is not None and int(row[0]) > term:
                    raise Fenced(f"leader term {term} is deposed: the log is at term {row[0]}")
            stamped, staged, seq = self._seq.stamp(payloads, at)
            if stamped:
                db.executemany(_INSERT_EVENT, [_row(e, term) for e in stamped])
                self._d.notify(db, seq)
            if extra is not None:
                extra(db, stamped)
        self._seq.commit(staged, seq)  # only after COMMIT returned
        return stamped

    def append(self, payloads: Sequence[ev.Payload], at: float) -> list[ev.Event]:
        return self._write(payloads, at)

    def submit_batch(self, items: Sequence[ev.PairSubmitted], at: float) -> list[SubmitResult]:
        if not items:
            return []
        with self._lock, self._tx() as db:
            found = self._find(db, list(dict.fromkeys(p.key for p in items)))
            fresh, plan = _plan(items, found, self._content)
            stamped, staged, seq = self._seq.stamp(fresh, at)
            if stamped:
                db.executemany(_INSERT_EVENT, [_row(e) for e in stamped])
                db.executemany(
                    _INSERT_KEY,
                    [
                        (p.key, p.pair_id, e.seq, p.uid, p.voice, self._content(p))
                        for p, e in zip(fresh, stamped, strict=True)
                    ],
                )
                db.executemany(
                    _INSERT_PAIR, [(p.pair_id, e.seq) for p, e in zip(fresh, stamped, strict=True)]
                )
                self._d.notify(db, seq)
        self._seq.commit(staged, seq)
        return _results(fresh, plan, stamped)

    def _content(self, p: ev.PairSubmitted) -> str:
        return content_of(self._secret, p)

    @staticmethod
    def _find(db: DbConn, keys: list[str]) -> Found:
        out: Found = {}
        for i in range(0, len(keys), _IN_CHUNK):
            chunk = keys[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT key, pair_id, seq, content FROM idempotency WHERE key IN ({marks})"  # noqa: S608
            for k, pid, seq, content in db.execute(q, chunk):
                out[k] = (pid, seq, content)
        return out

    def erase_drafts(self, voice: str, at: float) -> list[ev.Event]:
        """Overwrite the drafts of every pair of ``voice`` in place and record ``DraftsErased``, in one
        transaction; ``secure_delete`` zeroes the freed bytes and a checkpoint moves them out of the WAL."""
        sqlite = self._d.name == "sqlite"
        if sqlite:
            self._db.execute("PRAGMA secure_delete=ON")
        with self._lock, self._tx() as db:
            n = db.execute(_ERASE_DRAFTS[self._d.name], (f"voice:{voice}",)).rowcount
            stamped, staged, seq = self._seq.stamp([ev.DraftsErased(voice=voice, pairs=n)], at)
            db.executemany(_INSERT_EVENT, [_row(e) for e in stamped])
        self._seq.commit(staged, seq)
        if sqlite:
            with suppress(sqlite3.Error):  # a reader holds the WAL: the next checkpoint moves it
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return stamped

    def write_snapshot(self, seq: int, schema: int, blob: bytes) -> None:
        """Store a serialised projection of the state after event ``seq``; keep the newest few."""
        with self._lock, self._tx() as db:
            db.execute(
                "INSERT INTO snapshots (seq, schema, data) VALUES (?, ?, ?) ON CONFLICT (seq) DO UPDATE "
                "SET schema = excluded.schema, data = excluded.data",
                (seq, schema, blob),
            )
            db.execute(
                "DELETE FROM snapshots WHERE seq NOT IN "
                "(SELECT seq FROM snapshots ORDER BY seq DESC LIMIT ?)",
                (KEEP_SNAPSHOTS,),
            )

    # -- readers -------------------------------------------------------------------------------------
    @contextmanager
    def _read_db(self) -> Iterator[DbConn]:
        try:
            raw = self._reader.raw_connection()
        except (SQLAlchemyError, self._d.error) as e:  # (a pool's pre-ping may raise the driver's own)
            raise StoreError(f"the event log could not be read: {e}") from e
        try:
            yield self._d.wrap(raw.driver_connection)
        except self._d.error as e:
            raise StoreError(f"the event log could not be read: {e}") from e
        finally:
            raw.close()  # back to the pool

    def snapshots(self) -> Iterator[tuple[int, int, bytes]]:
        """``(seq, schema, blob)`` of each stored snapshot, newest first (read one at a time)."""
        with self._read_db() as db:
            seqs = [r[0] for r in db.execute("SELECT seq FROM snapshots ORDER BY seq DESC")]
        for s in seqs:
            with self._read_db() as db:
                row = db.execute("SELECT seq, schema, data FROM snapshots WHERE seq = ?", (s,)).fetchone()
            if row is not None:
                yield int(row[0]), int(row[1]), bytes(row[2])

    def read(self, from_seq: int = 0, *, batch: int = 5000) -> Iterator[ev.Event]:
        """Events with ``seq > from_seq``, in order, read in batches (a long replay holds no lock)."""
        last = from_seq
        while True:
            with self._read_db() as db:
                rows = db.execute(
                    _SELECT_EVENTS + " WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield _event(r)
            last = rows[-1][0]

    def read_public(self, from_seq: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` events after ``from_seq`` as ``watch`` shows them (``Event.public()``), the
        drafts cut out by the database (``json_remove``): a watch's history never loads a draft."""
        with self._read_db() as db:
            rows = db.execute(_SELECT_PUBLIC[self._d.name], (from_seq, limit)).fetchall()
        return [{"seq": seq, "type": t, "at": at, "data": _decode(data)} for seq, t, at, data in rows]

    def read_stream(self, stream: str) -> list[ev.Event]:
        with self._read_db() as db:
            rows = db.execute(_SELECT_EVENTS + " WHERE stream = ? ORDER BY version", (stream,)).fetchall()
        return [_event(r) for r in rows]

    def get_pairs(self, pair_ids: Sequence[str]) -> dict[str, ev.PairSubmitted]:
        out: dict[str, ev.PairSubmitted] = {}
        ids = list(pair_ids)
        with self._read_db() as db:
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                q = (
                    "SELECT e.seq, e.version, e.type, e.schema, e.at, e.data FROM events e "  # noqa: S608
                    f"JOIN pairs p ON p.seq = e.seq WHERE p.pair_id IN ({','.join('?' * len(chunk))})"
                )
                for r in db.execute(q, chunk):
                    p = _event(r).payload
                    assert isinstance(p, ev.PairSubmitted)
                    out[p.pair_id] = p
        return out

    def last_seq(self) -> int:
        if self._d.shared:  # others append too: the log's, not this writer's
            with self._read_db() as db:
                return int(db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
        return self._seq.last

    def terms(self, from_seq: int = 0) -> list[tuple[int, str, int | None]]:
        """``(seq, type, term)`` of every event after ``from_seq``: what the fencing checks rest on."""
        with self._read_db() as db:
            rows = db.execute(
                "SELECT seq, type, term FROM events WHERE seq > ? ORDER BY seq", (from_seq,)
            ).fetchall()
        return [(int(a), str(b), None if c is None else int(c)) for a, b, c in rows]

    def describe(self) -> str:
        return self._d.describe()

    def integrity_check(self) -> str:
        with self._read_db() as db:
            return self._d.integrity_check(db)

    def close(self) -> None:
        self._wconn.close()
        self._writer.dispose()
        self._reader.dispose()


class SqliteStore(SqlStore):
    """The event log in one SQLite file (WAL, ``synchronous=FULL``): one daemon's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(SqliteDialect(path))


def _load_secret(c: sa.Connection) -> bytes:
    """The log's own key-hash secret (``meta.key_secret``), created with the log; shared by every daemon
    that shares the log, so that their keyed hashes agree. (Read in the migration's transaction: a
    second pooled writer connection would go stale beside the store's own when the server cuts us.)"""
    c.execute(  # ON CONFLICT DO NOTHING: SQLite and PostgreSQL alike (two daemons racing)
        sa.text("INSERT INTO meta (key, value) VALUES (:k, :v) ON CONFLICT (key) DO NOTHING"),
        {"k": "key_secret", "v": secrets.token_hex(32)},
    )
    value = c.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "key_secret")).scalar_one()
    return bytes.fromhex(value)


def _migrate(c: sa.Connection) -> None:
    """Create the tables, or bring an older schema up to ``SCHEMA_VERSION`` (idempotent; the caller
    holds the dialect's migration lock)."""
    metadata.create_all(c)
    found = c.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
    version = int(found) if found is not None else SCHEMA_VERSION  # a new log: create_all made it
    if version > SCHEMA_VERSION:
        raise StoreError(f"the event log has schema {version}, newer than this beagled's {SCHEMA_VERSION}")
    if version < 2:
        columns = {col["name"] for col in sa.inspect(c).get_columns("events")}
        if "term" not in columns:
            c.execute(sa.text("ALTER TABLE events ADD COLUMN term BIGINT"))
    # a log from before scoped keys: add the idempotency columns (nullable; old rows stay as they were,
    # and never conflict)
    have = {col["name"] for col in sa.inspect(c).get_columns("idempotency")}
    for name in _KEY_COLUMNS:
        if name not in have:
            kind = keys_t.c[name].type.compile(c.dialect)
            c.execute(sa.text(f"ALTER TABLE idempotency ADD COLUMN {name} {kind}"))
    if found is None:
        c.execute(sa.insert(meta_t).values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif version != SCHEMA_VERSION:
        c.execute(sa.update(meta_t).where(meta_t.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))


class MemoryStore:
    """The same contract as ``SqlStore``, in memory: a fake for tests of the engine's logic."""

    term: int | None = None  # accepted for the port's sake: one process, nothing to fence

    def __init__(self) -> None:
        self._events: list[ev.Event] = []
        self._keys: Found = {}
        self._secret = secrets.token_bytes(32)
        self._submitters: set[tuple[int, str]] = set()
        self._pairs: dict[str, ev.PairSubmitted] = {}
        self._snapshots: dict[int, tuple[int, bytes]] = {}
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
        fresh, plan = _plan(
            items, {p.key: self._keys[p.key] for p in items if p.key in self._keys}, self._content
        )
        stamped = self.append(fresh, at) if fresh else []
        for p, e in zip(fresh, stamped, strict=True):
            self._keys[p.key] = (p.pair_id, e.seq, self._content(p))
            self._pairs[p.pair_id] = p
            if p.uid is not None:
                self._submitters.add((p.uid, p.voice))
        return _results(fresh, plan, stamped)

    def erase_drafts(self, voice: str, at: float) -> list[ev.Event]:
        self._check_fail()
        n = 0
        for i, e in enumerate(self._events):
            p = e.payload
            if isinstance(p, ev.PairSubmitted) and p.voice == voice:
                blank = dataclasses.replace(p, bad="", good="", prompt=None, system=None, messages=None)
                self._events[i] = dataclasses.replace(e, payload=blank)
                self._pairs[p.pair_id] = blank
                n += 1
        return self.append([ev.DraftsErased(voice=voice, pairs=n)], at)

    def write_snapshot(self, seq: int, schema: int, blob: bytes) -> None:
        self._check_fail()
        self._snapshots[seq] = (schema, bytes(blob))
        for old in sorted(self._snapshots)[:-KEEP_SNAPSHOTS]:
            del self._snapshots[old]

    def snapshots(self) -> Iterator[tuple[int, int, bytes]]:
        for seq in sorted(self._snapshots, reverse=True):
            schema, blob = self._snapshots[seq]
            yield seq, schema, blob

    def _content(self, p: ev.PairSubmitted) -> str:
        return content_of(self._secret, p)

    def key_secret(self) -> bytes:
        return self._secret

    def submitters(self) -> list[tuple[int, str]]:
        return sorted(self._submitters)

    def read(self, from_seq: int = 0) -> Iterator[ev.Event]:
        return iter([e for e in self._events if e.seq > from_seq])

    def read_public(self, from_seq: int, limit: int) -> list[dict[str, Any]]:
        return [e.public() for e in self._events if e.seq > from_seq][:limit]

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
