"""Leadership among daemons that share one PostgreSQL log: the lease, its term, and the wake-ups.

Theory: the leader holds ``pg_try_advisory_lock`` on a connection it keeps open, and a ``lease`` row
(``term``, ``node``, ``renewed_at`` on the database's clock) that it renews through that same
connection every ``timeout/4``. The lock dies with the connection (kill -9, host lost, connection
terminated), but a deposed leader may not know yet, so a candidate that gets the lock still waits
until the row is ``timeout`` old before it bumps the term; the old leader, having failed to renew for
``timeout/2``, has stopped its effects by then (``Leadership.run`` cancels them). The new term is
stamped on every effect event and the store refuses an append whose term is older than the row's
(``store.Fenced``): a leader that wakes up late cannot write. A leader that stops cleanly clears
``renewed_at`` so that a successor takes over at once.

``Listener``: ``LISTEN beagled_events`` on its own connection; each append ``NOTIFY``s at COMMIT. It
is only a wake-up: followers read the log by position, and poll when no notification comes.

Everything here blocks: the engine calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from beagled.dialects import NOTIFY_CHANNEL, PostgresDialect
from beagled.ports import LeaderInfo

log = logging.getLogger("beagled.leader")

LOCK_KEY = 0x62656168  # the advisory lock the leader holds
NODE_PREFIX = "beagled:"


def _conninfo(dialect: PostgresDialect) -> dict[str, Any]:
    u = dialect.url
    kw: dict[str, Any] = {"dbname": u.database, "connect_timeout": 10, "application_name": "beagled-lease"}
    if u.username:
        kw["user"] = u.username
    if u.password:
        kw["password"] = u.password
    if u.host:
        kw["host"] = u.host
    if u.port:
        kw["port"] = u.port
    for k, v in u.query.items():
        kw[k] = v if isinstance(v, str) else v[-1]
    if not str(kw.get("host", "/")).startswith("/"):
        kw.update(keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
    return kw


def _close_quietly(conn: Any) -> None:
    """Close a connection that may be dead already (closing it may fail: it is gone either way)."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def _connection_lost(what: str, e: Exception, drop: Callable[[], None]) -> None:
    """A call on a connection failed: say so and drop it (the next call connects anew)."""
    log.warning("%s: %s", what, e)
    drop()


class Lease:
    """One node's view of the lease (blocking calls; one thread at a time)."""

    def __init__(self, dialect: PostgresDialect, node: str, timeout_s: float) -> None:
        self._kw = _conninfo(dialect)
        self._kw["application_name"] = (NODE_PREFIX + node)[:63]  # how `nodes` finds the live daemons
        self.node = node
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._locked = False
        self.term: int | None = None

    def _connect(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(autocommit=True, **self._kw)
            self._locked = False
        return self._conn

    def _drop(self) -> None:
        _close_quietly(self._conn)
        self._conn = None
        self._locked = False
        self.term = None

    def try_acquire(self) -> int | None:
        """The new term if this node now leads; None if another does (or the old lease runs on)."""
        import psycopg

        try:
            c = self._connect()
            if not self._locked:
                self._locked = bool(c.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0])
                if not self._locked:
                    return None
            with c.transaction():
                row = c.execute(
                    "SELECT term, node, extract(epoch from clock_timestamp()) - renewed_at "
                    "FROM lease WHERE id = 1 FOR UPDATE"
                ).fetchone()
                if row is not None and float(row[2]) < self.timeout_s:
                    return None  # the previous leader may still be stopping: wait its lease out
                term = 1 if row is None else int(row[0]) + 1
                c.execute(
                    "INSERT INTO lease (id, term, node, renewed_at) "
                    "VALUES (1, %s, %s, extract(epoch from clock_timestamp())) "
                    "ON CONFLICT (id) DO UPDATE SET term = excluded.term, node = excluded.node, "
                    "renewed_at = excluded.renewed_at",
                    (term, self.node),
                )
            self.term = term
            return term
        except psycopg.Error as e:
            _connection_lost("cannot reach the lease", e, self._drop)
            return None

    def renew(self) -> bool:
        """Extend the lease (on the lock's connection); False when it is lost."""
        import psycopg

        if self._conn is None or self.term is None:
            return False
        try:
            cur = self._conn.execute(
                "UPDATE lease SET renewed_at = extract(epoch from clock_timestamp()) "
                "WHERE id = 1 AND term = %s AND node = %s",
                (self.term, self.node),
            )
            if cur.rowcount == 1:
                return True
            log.error("the lease was taken over", extra={"term": self.term})
        except psycopg.Error as e:
            log.error("lease lost: %s", e, extra={"term": self.term})
        self._drop()
        return False

    def release(self) -> None:
        """Step down: clear the lease so that a successor need not wait it out, drop the lock."""
        import psycopg

        if self._conn is not None and self.term is not None:
            try:
                self._conn.execute(
                    "UPDATE lease SET renewed_at = 0 WHERE id = 1 AND term = %s AND node = %s",
                    (self.term, self.node),
                )
            except psycopg.Error as e:
                log.warning("could not clear the lease: %s", e)
        self._drop()

    def current(self) -> tuple[LeaderInfo | None, list[str]]:
        """Who holds the newest term, and the nodes connected now (each holds a lease connection)."""
        import psycopg

        try:
            c = self._connect()
            row = c.execute("SELECT node, term FROM lease WHERE id = 1").fetchone()
            names = c.execute(
                "SELECT DISTINCT substr(application_name, %s) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE %s ORDER BY 1",
                (len(NODE_PREFIX) + 1, NODE_PREFIX + "%"),
            ).fetchall()
        except psycopg.Error:
            self._drop()
            return None, []
        return (None if row is None else LeaderInfo(str(row[0]), int(row[1]))), [str(n[0]) for n in names]

    def close(self) -> None:
        self._drop()


class Listener:
    """``LISTEN`` on its own connection: ``wait`` returns the newest notified position (or None)."""

    def __init__(self, dialect: PostgresDialect) -> None:
        self._kw = _conninfo(dialect)
        self._kw["application_name"] = "beagled-listen"
        self._conn: Any = None

    def wait(self, timeout_s: float) -> int | None:
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(autocommit=True, **self._kw)
                self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                return None  # (re)connected: the caller catches up by reading anyway
            newest: int | None = None
            for n in self._conn.notifies(timeout=timeout_s, stop_after=1):
                newest = max(newest or 0, int(n.payload))
            return newest
        except psycopg.Error as e:
            _connection_lost("listen connection lost", e, self.close)
            return None

    def close(self) -> None:
        _close_quietly(self._conn)
        self._conn = None


class Leadership:
    """Runs ``effects`` while this node holds the lease; cancels them as soon as it may not."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.is_leader = False
        self.term: int | None = None
        self.leader: LeaderInfo | None = None
        self.nodes: list[str] = []
        self._limiter = trio.CapacityLimiter(1)  # the lease's connection: one call at a time

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)

    async def run(
        self,
        on_elected: Callable[[int], Awaitable[None]],
        effects: Callable[[], Awaitable[None]],
        on_deposed: Callable[[], None],
    ) -> None:
        period = self.lease.timeout_s / 4
        try:
            while True:
                term = await self._call(self.lease.try_acquire)
                if term is None:
                    self.leader, self.nodes = await self._call(self.lease.current)
                    await trio.sleep(period)  # nothing to wait on: a lease is a clock
                    continue
                log.info("leading", extra={"term": term, "node": self.lease.node})
                self.is_leader, self.term = True, term
                self.leader = LeaderInfo(self.lease.node, term)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._keep, nursery.cancel_scope, period)
                        await on_elected(term)
                        await effects()
                except Exception:  # taking over failed (the log unreadable, a bug): step down, never die
                    log.exception("leading failed: stepping down", extra={"term": term})
                    self.is_leader = False
                    await self._call(self.lease.release)
                    await trio.sleep(period)
                finally:
                    self.is_leader = False
                    on_deposed()
                log.error("no longer leading: effects stopped", extra={"term": term})
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.lease.release, limiter=self._limiter)

    async def _keep(self, scope: trio.CancelScope, period: float) -> None:
        """Renew every ``period``; stop the effects when a renewal fails or the last good one is
        ``timeout/2`` old (a hung database), before any successor may start."""
        last_ok = trio.current_time()
        grace = self.lease.timeout_s / 2
        while True:
            sent = trio.current_time()
            with trio.move_on_at(last_ok + grace) as deadline:
                ok = await self._call(self.lease.renew)
            if deadline.cancelled_caught or not ok:
                scope.cancel()
                return
            last_ok = sent
            with trio.move_on_at(last_ok + grace):
                _, self.nodes = await self._call(self.lease.current)
            await trio.sleep(period)


def default_node_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
