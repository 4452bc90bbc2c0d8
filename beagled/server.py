"""The Unix-socket listener: one task per connection, driving the sans-IO ``protocol`` module.

Security: the socket is bound under ``umask 0o177`` (mode 0600 from the first instant) in a directory
only the owner can enter, and every peer's uid is checked (SO_PEERCRED / LOCAL_PEERCRED) against
``allowed_uids``. Isolation: a connection's failure, slowness or flood never reaches another one —
requests per connection are bounded (backpressure stops reading), a client that does not read its
responses is dropped after ``write_timeout_s``, an idle one after ``idle_timeout_s``, and every
exception is caught per connection. Pipelined requests run concurrently and are answered in order;
a request waits for the changes (submits, commands) before it on its connection to take effect first.

Shared hosts (issue 18): the peer's uid is checked before a connection counts against any cap; refused
peers are answered briefly, their log line rate-limited; connections per uid are capped; every op is
checked against the roles (``beagled.access``); a connection streams at most one ``watch``, with caps
per uid and overall, and a watch's queued lines are bounded (it waits for the client to read them).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket as stdsocket
import stat
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any

import trio

from beagled import protocol
from beagled.access import Policy
from beagled.bounds import Throttle
from beagled.engine import Engine
from beagled.errors import BeagledError, Conflict, Forbidden, Unavailable
from beagled.protocol import Kind

log = logging.getLogger("beagled.server")

LINGER_S = 2.0  # after too_large: how long the rest of an oversized request is read and discarded
REJECT_LINGER_S = 0.5  # the same for a refused connection (forbidden, too many connections)
MAX_REJECTING = 32  # refused connections lingering at once; beyond, they are closed without an answer
HANGUP_POLL_S = 1.0  # how often a watch whose client stopped sending checks that it is still there
WATCH_LINES_MAX = 256  # lines a watch may have queued for its client before it waits for it to read


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

    __slots__ = (
        "after",
        "data",
        "done",
        "lines",
        "next_write",
        "prev_write",
        "ready",
        "settled",
        "stream",
        "write",
    )

    def __init__(self, *, stream: bool = False) -> None:
        self.data: bytes | None = None
        self.stream = stream
        self.lines: deque[bytes] = deque()
        self.done = False
        # Changes (submit, commands) form a chain per connection; a write is *settled* once it and
        # every write before it are answered. A later request waits for the last write before it.
        self.write = False
        self.settled = False
        self.prev_write: _Entry | None = None
        self.next_write: _Entry | None = None
        self.after: _Entry | None = None  # the last write dispatched before this request
        self.ready: trio.Event | None = None  # made by a request that waits for this write to settle


class _Output:
    """The ordered answers of one connection and the wake-up of its one writer."""

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.changed = trio.Event()  # for the writer: an answer became ready
        self.drained = trio.Event()  # for the reader: the writer sent some answers
        self.flushed = trio.Event()  # for the connection's one watch: the writer sent its lines
        self.last_write: _Entry | None = None  # the newest write of the chain (see ``_Entry``)

    def wake(self) -> None:
        self.changed.set()

    async def wait(self) -> None:
        await self.changed.wait()
        self.changed = trio.Event()

    async def wait_drained(self) -> None:
        await self.drained.wait()
        self.drained = trio.Event()

    async def wait_flushed(self) -> None:
        await self.flushed.wait()
        self.flushed = trio.Event()

    def unsettled(self) -> bool:
        return self.last_write is not None and not self.last_write.settled

    def add_write(self, entry: _Entry) -> None:
        entry.write = True
        entry.prev_write = self.last_write
        if self.last_write is not None:
            self.last_write.next_write = entry
        self.last_write = entry

    @staticmethod
    def settle(entry: _Entry | None) -> None:
        """``entry`` was answered: settle it and every answered write after it whose turn it now is."""
        while (
            entry is not None
            and entry.data is not None
            and not entry.settled
            and (entry.prev_write is None or entry.prev_write.settled)
        ):
            entry.settled = True
            entry.prev_write = None  # nothing needs it any more
            if entry.ready is not None:
                entry.ready.set()
            entry = entry.next_write

    @staticmethod
    async def after_writes_before(entry: _Entry) -> None:
        """Wait until every change queued before ``entry`` on this connection is answered."""
        w = entry.after
        entry.after = None
        if w is None or w.settled:
            return
        if w.ready is None:
            w.ready = trio.Event()
        await w.ready.wait()

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
        operators = frozenset(d.operator_uids or [os.getuid()])
        self.allowed = set(d.allowed_uids) | operators
        self.policy = Policy(operators=operators, owners=dict(d.voice_owners))
        self.active = 0
        self.per_uid: dict[int, int] = {}  # open connections per uid
        self.rejecting = 0
        self.watches: dict[int, int] = {}  # live watch streams per uid
        self.queued_submits: dict[int, int] = {}  # submits of a submitter not yet committed (quota)
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
            await self._serve_connection(stream, uid)
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
            await self._linger(stream, REJECT_LINGER_S)  # the peer may have sent its request already
        finally:
            self.rejecting -= 1

    async def _serve_connection(self, stream: trio.SocketStream, uid: int) -> None:
        policy = self.policy
        out = _Output()
        limit = self.cfg.max_inflight_per_connection
        streaming = False
        closing = False

        async def writer() -> None:
            while True:
                data = out.take_ready()
                if data:
                    out.drained.set()
                    out.flushed.set()
                    with trio.fail_after(self.cfg.write_timeout_s):  # a client that does not read is dropped
                        await stream.send_all(data)
                    continue
                if closing and not out.entries:
                    return
                await out.wait()

        def answer(entry: _Entry, data: bytes) -> None:
            entry.data = data
            if entry.write:
                out.settle(entry)
            out.wake()

        async def run_op(req: protocol.Request, entry: _Entry) -> None:
            try:
                await run_op_inner(req, entry)
            finally:
                if protocol.OPS[req.op].kind is Kind.STREAM:
                    self.watches[uid] -= 1
                    if not self.watches[uid]:
                        del self.watches[uid]

        async def run_op_inner(req: protocol.Request, entry: _Entry) -> None:
            try:
                await _Output.after_writes_before(entry)
                op = protocol.OPS[req.op]
                if op.kind is Kind.STREAM:
                    await self._watch(req, entry, out, uid)
                    return
                if op.kind is Kind.QUICK:
                    result = self._filtered(uid, req, op.call(self.engine, req.fields))
                else:
                    result = await op.call(self.engine, req.fields)
                    if req.op == "job":
                        policy.check_read(uid, result["job"]["voice"])
                data = protocol.encode_ok(req.id, result)
            except BeagledError as e:
                data = protocol.encode_error(req.id, e)
            except Exception as e:
                log.exception("request %s failed", req.op)
                data = protocol.encode_error(req.id, e)
            if entry.stream:  # a watch that failed before streaming: its error ends its stream
                entry.lines.append(data)
                entry.done = True
                out.wake()
                return
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
                policy.check_op(uid, req.op)
                op = protocol.OPS[req.op]
                entry.after = out.last_write
                if op.kind.writes:
                    out.add_write(entry)
                if op.kind is Kind.COMMIT:  # the hot path: a callback after COMMIT, no task per request
                    rid = req.id
                    voice = req.fields["voice"]
                    policy.check_submit(uid, voice)
                    self._check_quota(uid)
                    queued = self.queued_submits

                    def done(result: dict[str, Any] | None, error: BaseException | None) -> None:
                        # runs inside the engine's committer: it must never raise
                        queued[uid] -= 1
                        if not queued[uid]:
                            del queued[uid]
                        try:
                            if error is not None or result is None:
                                data = protocol.encode_error(rid, error or RuntimeError("no result"))
                            else:
                                policy.record(uid, voice)
                                data = protocol.encode_ok(rid, result)
                        except Exception as e:  # e.g. an id the response line cannot encode
                            log.exception("cannot encode the answer to a submit")
                            data = protocol.encode_error(None, e)
                        answer(entry, data)

                    op.call(self.engine, req.fields, done, uid)
                    queued[uid] = queued.get(uid, 0) + 1
                elif op.kind is Kind.QUICK and not out.unsettled():
                    result = self._filtered(uid, req, op.call(self.engine, req.fields))
                    answer(entry, protocol.encode_ok(req.id, result))
                else:
                    if op.kind is Kind.STREAM:
                        self._open_watch(uid, streaming)
                        entry.stream = True
                        streaming = True
                    nursery.start_soon(run_op, req, entry)
            except BeagledError as e:
                answer(entry, protocol.encode_error(req.id, e))
            except Exception as e:
                log.exception("request %s failed", req.op)
                answer(entry, protocol.encode_error(req.id, e))

        async def hangup() -> None:
            # Its sending side closed, a client may still read its watch (a shutdown(SHUT_WR)); one that
            # closed for good is otherwise only noticed at the next line written to it, and until then its
            # watch counts against daemon.max_watches (a quiet daemon refused new watches so).
            while out.entries:
                await trio.sleep(HANGUP_POLL_S)  # nothing to wait on: the kernel says it only when asked
                if _hung_up(stream.socket):
                    log.info("client closed the connection")
                    nursery.cancel_scope.cancel()
                    return

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
            if streaming:
                nursery.start_soon(hangup)
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

    def _filtered(self, uid: int, req: protocol.Request, result: dict[str, Any]) -> dict[str, Any]:
        if req.op == "jobs":
            return self.policy.filter_jobs(uid, result)
        if req.op == "voices":
            return self.policy.filter_voices(uid, result)
        return result

    def _check_quota(self, uid: int) -> None:
        """A submitter's pending pairs (in the voices it submitted to) are capped; operators are not."""
        if self.policy.is_operator(uid):
            return
        voices = self.engine.state.voices
        pending = self.queued_submits.get(uid, 0) + sum(
            len(voices[v].pending) for v in self.policy.submitted.get(uid, ()) if v in voices
        )
        if pending >= self.cfg.max_pending_per_uid:
            raise Unavailable(
                f"uid {uid} has {pending} pending pairs (daemon.max_pending_per_uid = "
                f"{self.cfg.max_pending_per_uid}); wait for a job to take them"
            )

    def _open_watch(self, uid: int, already: bool) -> None:
        if already:
            raise Conflict("this connection already streams a watch (one per connection)")
        total = sum(self.watches.values())
        if total >= self.cfg.max_watches:
            raise Unavailable(f"too many watch streams (daemon.max_watches = {self.cfg.max_watches})")
        if self.watches.get(uid, 0) >= self.cfg.max_watches_per_uid and not self.policy.is_operator(uid):
            raise Unavailable(
                f"uid {uid} has {self.watches[uid]} watch streams "
                f"(daemon.max_watches_per_uid = {self.cfg.max_watches_per_uid})"
            )
        self.watches[uid] = self.watches.get(uid, 0) + 1

    def _visible(self, uid: int, kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """A watch message as ``uid`` may see it, or None."""
        policy = self.policy
        if policy.is_operator(uid):
            return body
        if kind == "progress":
            return body if policy.may_read(uid, body.get("voice")) else None
        data = body.get("data") or {}
        voice = data.get("voice")
        if voice is None and "job_id" in data:
            job = self.engine.state.jobs.get(data["job_id"])
            if job is None:
                return None  # a job no longer in memory: its voice is unknown here, so not shown
            voice = job.voice
        return policy.public_event(uid, body, voice)

    async def _watch(self, req: protocol.Request, entry: _Entry, out: _Output, uid: int) -> None:
        gen = protocol.OPS[req.op].call(self.engine, req.fields)
        try:
            async for msg in gen:
                key = "event" if "event" in msg else "progress"
                body = self._visible(uid, key, msg[key])
                if body is None:
                    continue
                entry.lines.append(protocol.encode_stream(req.id, key, body))
                out.wake()
                while len(entry.lines) >= WATCH_LINES_MAX:  # bounded: wait for the client to read
                    await out.wait_flushed()
        finally:
            await gen.aclose()
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


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """The peer closed its end for good (POLLHUP), not only its sending side (a plain EOF)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
