"""The Unix-socket listener: one task per connection, driving the sans-IO ``protocol`` module.

Security: the socket is bound under ``umask 0o177`` (mode 0600 from the first instant) in a directory
only the owner can enter, and every peer's uid is checked (SO_PEERCRED / LOCAL_PEERCRED) against
``allowed_uids``. Isolation: a connection's failure, slowness or flood never reaches another one —
requests per connection are bounded (backpressure stops reading), a client that does not read its
responses is dropped after ``write_timeout_s``, an idle one after ``idle_timeout_s``, and every
exception is caught per connection. Pipelined requests run concurrently and are answered in order.
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
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from beagled import protocol
from beagled.engine import Engine
from beagled.errors import BeagledError, Conflict, Forbidden, Unavailable

log = logging.getLogger("beagled.server")

LINGER_S = 2.0  # after too_large: how long the rest of an oversized request is read and discarded
REJECT_LINGER_S = 0.5  # the same for a refused connection (forbidden, too many connections)


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


class _Entry:
    """One response position in a connection's output order. ``data`` is set when the answer is ready;
    a ``watch`` entry instead streams ``lines`` until ``done``."""

    __slots__ = ("data", "done", "lines", "stream")

    def __init__(self, *, stream: bool = False) -> None:
        self.data: bytes | None = None
        self.stream = stream
        self.lines: deque[bytes] = deque()
        self.done = False


class _Output:
    """The ordered answers of one connection and the wake-up of its one writer."""

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.changed = trio.Event()  # for the writer: an answer became ready
        self.drained = trio.Event()  # for the reader: the writer sent some answers

    def wake(self) -> None:
        self.changed.set()

    async def wait(self) -> None:
        await self.changed.wait()
        self.changed = trio.Event()

    async def wait_drained(self) -> None:
        await self.drained.wait()
        self.drained = trio.Event()

    def take_ready(self) -> bytes:
        """Every answer ready at the head, in order, as one write (watch lines included)."""
        chunks: list[bytes] = []
        entries = self.entries
        while entries:
            head = entries[0]
            if head.stream:
                chunks.extend(head.lines)
                head.lines.clear()
                if not head.done:
                    break
            elif head.data is None:
                break
            else:
                chunks.append(head.data)
            entries.popleft()
        return b"".join(chunks)


class Server:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        d = engine.cfg.daemon
        self.cfg = d
        self.path = engine.cfg.socket_path
        self.limits = protocol.Limits(max_draft_bytes=d.max_draft_bytes)
        self.allowed = set(d.allowed_uids) or {os.getuid()}
        self.active = 0
        self.listener: trio.SocketListener | None = None
        self._sync_ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": lambda f: engine.ping(),
            "status": lambda f: engine.status(),
            "jobs": lambda f: engine.list_jobs(f.get("voice"), f.get("state"), f["limit"]),
            "voices": lambda f: engine.list_voices(),
        }
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "job": lambda f: engine.job(f["job_id"]),
            "train": lambda f: engine.train_now(f["voice"]),
            "rollback": lambda f: engine.rollback(f["voice"], f.get("to")),
            "pause": lambda f: engine.set_paused(True, f.get("voice")),
            "resume": lambda f: engine.set_paused(False, f.get("voice")),
            "delete_voice": lambda f: engine.delete_voice(f["voice"], f["remove_adapters"]),
        }

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
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
        self.active += 1
        try:
            await self._serve_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.info("client closed the connection")
        except Exception as e:
            if _client_went_away(e):  # e.g. a watch client that closed: a normal end, not a failure
                log.info("client closed the connection")
            else:
                log.exception("connection failed")
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    async def _reject(self, stream: trio.SocketStream, exc: BeagledError) -> None:
        with trio.move_on_after(self.cfg.write_timeout_s):
            await stream.send_all(protocol.encode_error(None, exc))
        await self._linger(stream, REJECT_LINGER_S)  # the peer may have sent its request already

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        if self.active > self.cfg.max_connections:
            await self._reject(stream, Unavailable(f"too many connections (max {self.cfg.max_connections})"))
            return
        uid = peer_uid(stream.socket)
        if uid is None or uid not in self.allowed:
            log.warning("refused a peer", extra={"peer_uid": uid})
            await self._reject(stream, Forbidden(f"uid {uid} may not use this daemon"))
            return
        out = _Output()
        limit = self.cfg.max_inflight_per_connection
        streaming = False
        closing = False

        async def writer() -> None:
            while True:
                data = out.take_ready()
                if data:
                    out.drained.set()
                    with trio.fail_after(self.cfg.write_timeout_s):  # a client that does not read is dropped
                        await stream.send_all(data)
                    continue
                if closing and not out.entries:
                    return
                await out.wait()

        def answer(entry: _Entry, data: bytes) -> None:
            entry.data = data
            out.wake()

        async def run_op(req: protocol.Request, entry: _Entry) -> None:
            try:
                if req.op == "watch":
                    await self._watch(req, entry, out)
                    return
                data = protocol.encode_ok(req.id, await self._ops[req.op](req.fields))
            except BeagledError as e:
                data = protocol.encode_error(req.id, e)
            except Exception as e:
                log.exception("request %s failed", req.op)
                data = protocol.encode_error(req.id, e)
            answer(entry, data)

        def dispatch(line: bytes, nursery: trio.Nursery) -> None:
            nonlocal streaming
            entry = _Entry()
            out.entries.append(entry)
            try:
                req = protocol.parse_request(line, self.limits)
            except protocol.RequestError as e:
                answer(entry, protocol.encode_error(e.request_id, e))
                return
            try:
                if req.op == "submit":  # the hot path: a callback after COMMIT, no task per request
                    rid = req.id

                    def done(result: dict[str, Any] | None, error: BaseException | None) -> None:
                        # runs inside the engine's committer: it must never raise
                        try:
                            if error is not None or result is None:
                                data = protocol.encode_error(rid, error or RuntimeError("no result"))
                            else:
                                data = protocol.encode_ok(rid, result)
                        except Exception as e:  # e.g. an id the response line cannot encode
                            log.exception("cannot encode the answer to a submit")
                            data = protocol.encode_error(None, e)
                        answer(entry, data)

                    self.engine.submit_nowait(req.fields, done)
                elif req.op in self._sync_ops:
                    answer(entry, protocol.encode_ok(req.id, self._sync_ops[req.op](req.fields)))
                else:
                    if req.op == "watch":
                        entry.stream = True
                        streaming = True
                    nursery.start_soon(run_op, req, entry)
            except BeagledError as e:
                answer(entry, protocol.encode_error(req.id, e))
            except Exception as e:
                log.exception("request %s failed", req.op)
                answer(entry, protocol.encode_error(req.id, e))

        buf = protocol.LineBuffer(self.cfg.max_message_bytes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while True:
                data = b""
                with trio.move_on_after(self.cfg.idle_timeout_s) as idle:
                    data = await stream.receive_some(65536)
                if idle.cancelled_caught:
                    if streaming:
                        continue
                    log.info("closing an idle connection")
                    nursery.cancel_scope.cancel()
                    return
                if not data:
                    break
                for line in buf.feed(data):
                    if line.strip():
                        dispatch(line, nursery)
                if buf.overflow is not None:
                    answer(_append(out), protocol.encode_error(None, buf.overflow))
                    break
                while len(out.entries) > limit:  # too many answers pending: stop reading (backpressure)
                    await out.wait_drained()
            # the client finished sending: answer what is in flight, then close (watch runs on)
            closing = True
            out.wake()
        if buf.overflow is not None:
            await self._linger(stream)

    async def _linger(self, stream: trio.SocketStream, seconds: float = LINGER_S) -> None:
        """Close after a final error (``too_large``, ``forbidden``, too many connections) so that the
        client reads it: closing a Unix socket with unread input makes the peer's next read fail with
        ECONNRESET, losing the answer already sent. So: shut our side for writing, then read and discard
        what is still coming until the peer closes, for a bounded time."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_eof()
            with trio.move_on_after(min(seconds, self.cfg.write_timeout_s)):
                while await stream.receive_some(65536):
                    pass

    async def _watch(self, req: protocol.Request, entry: _Entry, out: _Output) -> None:
        gen = self.engine.watch(req.fields.get("from_seq"))
        try:
            async for msg in gen:
                key = "event" if "event" in msg else "progress"
                entry.lines.append(protocol.encode_stream(req.id, key, msg[key]))
                out.wake()
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        entry.lines.append(
            protocol.encode_error(req.id, Unavailable("watch stream ended: the client fell behind"))
        )
        entry.done = True
        out.wake()


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ConnectionError)


def _client_went_away(e: BaseException) -> bool:
    """True if ``e`` (or every exception in a group of them) only says the peer went away."""
    if isinstance(e, BaseExceptionGroup):
        return all(_client_went_away(x) for x in e.exceptions)
    return isinstance(e, _GONE)


def _append(out: _Output) -> _Entry:
    entry = _Entry()
    out.entries.append(entry)
    return entry
