"""What differs between the event log's two databases, so that ``beagled.store`` holds one SQL store.

``store.SqlStore`` writes the same tables with the same SQL (``?`` placeholders) on both; a dialect
owns only: building the SQLAlchemy engines (SQLite pragmas; PostgreSQL URL, password file, keepalives),
wrapping a DB-API connection so that the store's SQL runs on it, how a write transaction begins
(SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``LOCK TABLE events IN EXCLUSIVE MODE``, which makes
positions follow commit order: the next append reads ``max(seq)`` only after the previous one
committed, so a reader by position never skips an event), the wake-up sent to tailing daemons
(``NOTIFY``), the lock that keeps two daemons from migrating the schema at once, and the database
errors to translate.

``shared`` says whether several daemons may append to one log: then the store re-reads the last
position and stream versions inside each write transaction instead of trusting its own counters.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from beagled.errors import ConfigError

NOTIFY_CHANNEL = "beagled_events"
_MIGRATE_LOCK = 0x62656167  # "beag": the advisory lock held while the schema is created or migrated


class DbConn(Protocol):
    """The slice of a DB-API connection the store's hot paths use (``sqlite3.Connection`` has it)."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


class Dialect(Protocol):
    name: str
    shared: bool
    integrity_error: type[Exception]
    error: type[Exception]

    def engine(self, *, writer: bool, pool_size: int, overflow: int) -> Engine: ...
    def wrap(self, dbapi_conn: Any) -> DbConn: ...
    def begin(self, db: DbConn) -> None: ...
    def commit(self, db: DbConn) -> None: ...
    def rollback(self, db: DbConn) -> None: ...
    def notify(self, db: DbConn, seq: int) -> None: ...
    def migrate_lock(self, conn: Connection) -> None: ...
    def integrity_check(self, db: DbConn) -> str: ...
    def broken(self, db: DbConn) -> bool: ...
    def describe(self) -> str: ...


class SqliteDialect:
    """One file, one writing daemon: WAL, ``synchronous=FULL``, ``BEGIN IMMEDIATE``."""

    name = "sqlite"
    shared = False
    integrity_error: type[Exception] = sqlite3.IntegrityError
    error: type[Exception] = sqlite3.Error

    def __init__(self, path: Path) -> None:
        self.path = path

    def engine(self, *, writer: bool, pool_size: int, overflow: int) -> Engine:
        engine = sa.create_engine(
            f"sqlite+pysqlite:///{self.path}",
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=overflow,
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
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine

    def wrap(self, dbapi_conn: Any) -> DbConn:
        return dbapi_conn  # type: ignore[no-any-return]

    def begin(self, db: DbConn) -> None:
        db.execute("BEGIN IMMEDIATE")

    def commit(self, db: DbConn) -> None:
        db.execute("COMMIT")

    def rollback(self, db: DbConn) -> None:
        if db.in_transaction:
            db.execute("ROLLBACK")

    def notify(self, db: DbConn, seq: int) -> None:
        pass  # nobody else tails a SQLite log

    def migrate_lock(self, conn: Connection) -> None:
        pass  # BEGIN IMMEDIATE already serialises

    def integrity_check(self, db: DbConn) -> str:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])

    def broken(self, db: DbConn) -> bool:
        return False

    def describe(self) -> str:
        return str(self.path)


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    return sql.replace("?", "%s")  # the store's SQL has no other '?' and no '%'


class _PgConn:
    """A psycopg connection that takes the store's ``?`` SQL; transactions begin implicitly."""

    def __init__(self, conn: Any) -> None:
        self._c = conn

    @property
    def in_transaction(self) -> bool:
        import psycopg

        return bool(self._c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        return self._c.execute(_pg_sql(sql), params or None)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any:
        cur = self._c.cursor()
        cur.executemany(_pg_sql(sql), list(rows))
        return cur

    @property
    def raw(self) -> Any:
        return self._c


class PostgresDialect:
    """A PostgreSQL database shared by any number of daemons (psycopg 3).

    The password comes from ``password_file`` (first line) or libpq's own sources (``PGPASSWORD``,
    ``~/.pgpass``); it is never part of what ``describe`` returns or what is logged.
    """

    name = "postgresql"
    shared = True

    def __init__(self, url: str, password_file: str = "") -> None:
        try:
            import psycopg
        except ImportError as e:
            raise ConfigError(
                "daemon.database_url", "PostgreSQL needs psycopg: pip install 'beagled[postgres]'"
            ) from e
        self.integrity_error: type[Exception] = psycopg.IntegrityError
        self.error: type[Exception] = psycopg.Error
        try:
            u = sa.engine.make_url(url)
        except sa.exc.ArgumentError as e:
            raise ConfigError("daemon.database_url", "is not a database URL") from e
        if u.get_backend_name() != "postgresql":
            raise ConfigError("daemon.database_url", "must start with postgresql+psycopg://")
        if u.get_driver_name() != "psycopg":
            u = u.set(drivername="postgresql+psycopg")
        if password_file:
            try:
                secret = Path(password_file).expanduser().read_text().splitlines()[0].strip()
            except (OSError, IndexError) as e:
                raise ConfigError("daemon.database_password_file", f"cannot read it: {e}") from e
            u = u.set(password=secret)
        self.url = u

    def engine(self, *, writer: bool, pool_size: int, overflow: int) -> Engine:
        args: dict[str, Any] = {"connect_timeout": 10, "application_name": "beagled"}
        if self.url.host and not self.url.host.startswith("/") and "host" not in self.url.query:
            # TCP: notice a lost peer in seconds, not after the kernel's two hours
            args.update(keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
        return sa.create_engine(
            self.url,
            connect_args=args,
            pool_size=pool_size,
            max_overflow=overflow,
            pool_pre_ping=not writer,
        )

    def wrap(self, dbapi_conn: Any) -> DbConn:
        return _PgConn(dbapi_conn)

    def begin(self, db: DbConn) -> None:
        # held to COMMIT: appends are serialised, so positions are taken in commit order; plain reads
        # (ACCESS SHARE) are not blocked
        db.execute("LOCK TABLE events IN EXCLUSIVE MODE")

    def commit(self, db: DbConn) -> None:
        db.raw.commit()  # type: ignore[attr-defined]

    def rollback(self, db: DbConn) -> None:
        raw = db.raw  # type: ignore[attr-defined]
        if not raw.closed:
            raw.rollback()

    def notify(self, db: DbConn, seq: int) -> None:
        db.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(seq)))  # delivered at COMMIT

    def migrate_lock(self, conn: Connection) -> None:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})

    def integrity_check(self, db: DbConn) -> str:
        # PostgreSQL checks its own pages; this says the log answers and its positions have no gap
        row = db.execute("SELECT count(*), coalesce(max(seq), 0) FROM events").fetchone()
        return "ok" if int(row[0]) == int(row[1]) else f"positions have gaps: {row[0]} events, max {row[1]}"

    def broken(self, db: DbConn) -> bool:
        import psycopg

        raw = db.raw  # type: ignore[attr-defined]
        return bool(raw.closed or raw.info.status != psycopg.pq.ConnStatus.OK)

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)


def for_url(url: str, password_file: str, sqlite_path: Path) -> Dialect:
    """The dialect ``daemon.database_url`` asks for ("" → the SQLite file)."""
    if not url:
        return SqliteDialect(sqlite_path)
    return PostgresDialect(url, password_file)
