"""The Unix-socket listener: binding the socket, admitting each peer, one task per connection.

Security: the socket is bound under ``umask 0o177`` (mode 0600 from the first instant) in a directory
only the owner can enter, and every peer's uid is checked (SO_PEERCRED / LOCAL_PEERCRED) against
``allowed_uids``. Isolation: a connection's failure, slowness or flood never reaches another one —
each is served by its own ``beagled.connection.Connection`` (bounded, answered in order), and every
exception is caught per connection.

Shared hosts (issue 18): the peer's uid is checked before a connection counts against any cap; refused
peers are answered briefly, their log line rate-limited; connections per uid are capped; every op is
checked against the roles (``beagled.access``); a connection streams at most one ``watch``, with caps
per uid and overall (``beagled.watches``); a submitter's pending pairs are capped (``beagled.quotas``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdsocket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

import trio

from beagled import protocol
from beagled.access import Policy
from beagled.bounds import Throttle
from beagled.connection import Connection, Shared, linger
from beagled.engine import Engine
from beagled.errors import BeagledError, Conflict, Forbidden, Unavailable
from beagled.quotas import SubmitQuota
from beagled.watches import Watches

log = logging.getLogger("beagled.server")

REJECT_LINGER_S = 0.5  # how long a refused connection (forbidden, too many) is read and discarded
MAX_REJECTING = 32  # refused connections lingering at once; beyond, they are closed without an answer


def peer_uid(sock: Any) -> int | None:
    """The connecting process's uid, or None where the platform cannot tell."""
    if hasattr(stdsocket, "SO_PEERCRED"):
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
        return int(uid)
    if sys.platform == "darwin":  # LOCAL_PEERCRED on SOL_LOCAL (0) returns a struct xucred
        raw = sock.getsockopt(0, 0x001, struct.calcsize("IIh16I"))
        return int(struct.unpack_from("II", raw)[1])
    return None


def _prepare_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _remove_stale(path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise Conflict(f"{path} exists and is not a socket; refusing to replace it")
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
        return
    finally:
        probe.close()
    raise Conflict(f"another beagled is listening on {path}")


def bind_unix(path: Path, *, shared: bool = False) -> stdsocket.socket:
    """Bind ``path`` with mode 0600 from the first instant, in a directory only the owner can enter.

    ``shared`` (``allowed_uids`` names a uid other than the daemon's own): once bound, and before
    ``listen``, the socket is widened to 0666 and its directory (when the daemon owns it) to 0711 —
    traverse, not list — so that those users can connect at all; the SO_PEERCRED check on every
    connection is then what keeps everyone else out (they are answered ``forbidden``).
    """
    _prepare_dir(path.parent)
    _remove_stale(path)
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is 0600 from the moment it exists
    try:
        sock.bind(str(path))
        if shared:
            os.chmod(path, 0o666)  # noqa: S103 - deliberate: SO_PEERCRED decides who is served
            if path.parent.stat().st_uid == os.getuid():
                os.chmod(path.parent, 0o711)  # noqa: S103 - traverse only, no listing
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(512)
    return sock


class Server:
    """The listener, and what every connection shares: the roles, the caps on connections (overall
    and per uid), the watch streams and the submit quota."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        d = engine.cfg.daemon
        self.cfg = d
        self.path = engine.cfg.socket_path
        operators = frozenset(d.operator_uids or [os.getuid()])
        self.allowed = set(d.allowed_uids) | operators
        self.policy = Policy(operators=operators, owners=dict(d.voice_owners))
        self.active = 0
        self.per_uid: dict[int, int] = {}  # open connections per uid
        self.rejecting = 0
        self.shared = Shared(  # what each connection is served with
            engine,
            d,
            protocol.Limits(max_draft_bytes=d.max_draft_bytes),
            self.policy,
            SubmitQuota(engine, self.policy, d.max_pending_per_uid),
            Watches(engine, self.policy, d),
        )
        self._refusals = Throttle(burst=5, per_s=10.0)
        self.listener: trio.SocketListener | None = None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.policy.seed(await trio.to_thread.run_sync(self.engine.store.submitters))
        shared = bool(self.allowed - {os.getuid()})
        sock = bind_unix(self.path, shared=shared)
        if shared:
            log.warning(
                "socket opened to other uids; each peer is checked against allowed_uids",
                extra={"socket": str(self.path), "allowed_uids": sorted(self.allowed)},
            )
        self.listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        log.info("listening", extra={"socket": str(self.path)})
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        stream = await self.listener.accept()
                    except trio.ClosedResourceError:
                        return
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                            log.error("accept failed: %s; pausing", e)
                            await trio.sleep(0.1)  # the resource shortage passes; nothing to poll for
                            continue
                        raise
                    nursery.start_soon(self._connection, stream)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def stop_accepting(self) -> None:
        if self.listener is not None:
            await self.listener.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        uid: int | None = None
        counted = False
        try:
            uid = peer_uid(stream.socket)  # the peer check comes first: a refused peer counts nowhere
            if uid is None or uid not in self.allowed:
                self._log_refusal("refused a peer", uid)
                await self._reject(stream, Forbidden(f"uid {uid} may not use this daemon"))
                return
            self.active += 1
            self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
            counted = True
            if self.active > self.cfg.max_connections:
                self._log_refusal("refused a connection: too many connections", uid)
                too_many = Unavailable(f"too many connections (max {self.cfg.max_connections})")
                await self._reject(stream, too_many)
                return
            if self.per_uid[uid] > self.cfg.max_connections_per_uid and not self.policy.is_operator(uid):
                self._log_refusal("refused a connection: too many connections of this uid", uid)
                await self._reject(
                    stream,
                    Unavailable(
                        f"too many connections of uid {uid} (daemon.max_connections_per_uid = "
                        f"{self.cfg.max_connections_per_uid})"
                    ),
                )
                return
            await Connection(stream, uid, self.shared).serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.info("client closed the connection")
        except Exception as e:
            if _client_went_away(e):  # e.g. a watch client that closed: a normal end, not a failure
                log.info("client closed the connection")
            else:
                log.exception("connection failed")
        finally:
            if counted and uid is not None:
                self.active -= 1
                self.per_uid[uid] -= 1
                if not self.per_uid[uid]:
                    del self.per_uid[uid]
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    def _log_refusal(self, what: str, uid: int | None) -> None:
        ok, suppressed = self._refusals.allow()  # a flood of refused connects must not flood the log
        if ok:
            log.warning(what, extra={"peer_uid": uid, "suppressed_since_last": suppressed})

    async def _reject(self, stream: trio.SocketStream, exc: BeagledError) -> None:
        if self.rejecting >= MAX_REJECTING:  # a flood: no answer, no linger, the descriptor back at once
            return
        self.rejecting += 1
        try:
            with trio.move_on_after(min(self.cfg.write_timeout_s, REJECT_LINGER_S)):
                await stream.send_all(protocol.encode_error(None, exc))
            await linger(
                stream, self.cfg.write_timeout_s, REJECT_LINGER_S
            )  # the peer may have sent its request already
        finally:
            self.rejecting -= 1


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ConnectionError)


def _client_went_away(e: BaseException) -> bool:
    """True if ``e`` (or every exception in a group of them) only says the peer went away."""
    if isinstance(e, BaseExceptionGroup):
        return all(_client_went_away(x) for x in e.exceptions)
    return isinstance(e, _GONE)
