"""One client connection of the Unix-socket listener, driving the sans-IO ``protocol`` module.

It reads request lines and dispatches each: a submit goes to the engine's committer with a callback
(no task per request), a quick read is answered at once when no change before it is still pending,
everything else runs as its own task. Pipelined requests run concurrently and are answered in order
by the one writer (``beagled.answers``); a request waits for the changes (submits, commands) before
it on its connection to take effect first. Bounded: too many answers pending stops the reading
(backpressure), a client that does not read is dropped after ``write_timeout_s``, an idle one after
``idle_timeout_s``; an oversized request is answered ``too_large`` and the rest of it discarded."""

from __future__ import annotations

import contextlib
import logging
import select
from dataclasses import dataclass
from typing import Any

import trio

from beagled import protocol
from beagled.access import Policy
from beagled.answers import Entry, Output
from beagled.config import DaemonConfig
from beagled.engine import Engine
from beagled.errors import BeagledError
from beagled.protocol import Kind, Op
from beagled.quotas import SubmitQuota
from beagled.watches import Watches

log = logging.getLogger("beagled.server")

LINGER_S = 2.0  # after too_large: how long the rest of an oversized request is read and discarded
HANGUP_POLL_S = 1.0  # how often a watch whose client stopped sending checks that it is still there


@dataclass(frozen=True)
class Shared:
    """What every connection of the listener shares."""

    engine: Engine
    cfg: DaemonConfig
    limits: protocol.Limits
    policy: Policy
    quota: SubmitQuota
    watches: Watches


class Connection:
    """The requests and answers of one peer (``uid``, already admitted) on ``stream``."""

    def __init__(self, stream: trio.SocketStream, uid: int, shared: Shared) -> None:
        self.stream = stream
        self.uid = uid
        self.shared = shared
        self.out = Output()
        self.streaming = False  # the connection streams its (one) watch
        self.closing = False  # the client finished sending: the writer ends once all is answered

    async def serve(self) -> None:
        """Read and dispatch requests until the client stops sending, then answer what is in flight."""
        cfg, out = self.shared.cfg, self.out
        buf = protocol.LineBuffer(cfg.max_message_bytes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            while True:
                data = b""
                with trio.move_on_after(cfg.idle_timeout_s) as idle:
                    data = await self.stream.receive_some(65536)
                if idle.cancelled_caught:
                    if self.streaming:
                        continue
                    log.info("closing an idle connection")
                    nursery.cancel_scope.cancel()
                    return
                if not data:
                    break
                for line in buf.feed(data):
                    if line.strip():
                        self._dispatch(line, nursery)
                if buf.overflow is not None:
                    entry = Entry()
                    out.entries.append(entry)
                    self._answer(entry, protocol.encode_error(None, buf.overflow))
                    break
                while len(out.entries) > cfg.max_inflight_per_connection:  # stop reading (backpressure)
                    await out.wait_drained()
            # the client finished sending: answer what is in flight, then close (watch runs on)
            self.closing = True
            out.wake()
            if self.streaming:
                nursery.start_soon(self._hangup, nursery.cancel_scope)
        if buf.overflow is not None:
            await linger(self.stream, cfg.write_timeout_s)

    async def _writer(self) -> None:
        out, timeout = self.out, self.shared.cfg.write_timeout_s
        while True:
            data = out.take_ready()
            if data:
                out.drained.set()
                out.flushed.set()
                with trio.fail_after(timeout):  # a client that does not read is dropped
                    await self.stream.send_all(data)
                continue
            if self.closing and not out.entries:
                return
            await out.wait()

    def _answer(self, entry: Entry, data: bytes) -> None:
        entry.data = data
        if entry.write:
            self.out.settle(entry)
        self.out.wake()

    def _dispatch(self, line: bytes, nursery: trio.Nursery) -> None:
        out = self.out
        entry = Entry()
        out.entries.append(entry)
        try:
            req = protocol.parse_request(line, self.shared.limits)
        except protocol.RequestError as e:
            self._answer(entry, protocol.encode_error(e.request_id, e))
            return
        try:
            self.shared.policy.check_op(self.uid, req.op)
            op = protocol.OPS[req.op]
            entry.after = out.last_write
            if op.kind.writes:
                out.add_write(entry)
            if op.kind is Kind.COMMIT:  # the hot path: a callback after COMMIT, no task per request
                self._submit(req, op, entry)
            elif op.kind is Kind.QUICK and not out.unsettled():
                result = self._filtered(req, op.call(self.shared.engine, req.fields))
                self._answer(entry, protocol.encode_ok(req.id, result))
            else:
                if op.kind is Kind.STREAM:
                    self.shared.watches.open(self.uid, self.streaming)
                    entry.stream = True
                    self.streaming = True
                nursery.start_soon(self._run_op, req, entry)
        except BeagledError as e:
            self._answer(entry, protocol.encode_error(req.id, e))
        except Exception as e:
            log.exception("request %s failed", req.op)
            self._answer(entry, protocol.encode_error(req.id, e))

    def _submit(self, req: protocol.Request, op: Op, entry: Entry) -> None:
        uid, rid, voice = self.uid, req.id, req.fields["voice"]
        self.shared.policy.check_submit(uid, voice)
        self.shared.quota.check(uid)

        def done(result: dict[str, Any] | None, error: BaseException | None) -> None:
            # runs inside the engine's committer: it must never raise
            self.shared.quota.committed(uid)
            try:
                if error is not None or result is None:
                    data = protocol.encode_error(rid, error or RuntimeError("no result"))
                else:
                    self.shared.policy.record(uid, voice)
                    data = protocol.encode_ok(rid, result)
            except Exception as e:  # e.g. an id the response line cannot encode
                log.exception("cannot encode the answer to a submit")
                data = protocol.encode_error(None, e)
            self._answer(entry, data)

        op.call(self.shared.engine, req.fields, done, uid)
        self.shared.quota.queue(uid)

    async def _run_op(self, req: protocol.Request, entry: Entry) -> None:
        try:
            await self._run_op_inner(req, entry)
        finally:
            if protocol.OPS[req.op].kind is Kind.STREAM:
                self.shared.watches.close(self.uid)

    async def _run_op_inner(self, req: protocol.Request, entry: Entry) -> None:
        try:
            await Output.after_writes_before(entry)
            op = protocol.OPS[req.op]
            if op.kind is Kind.STREAM:
                await self.shared.watches.stream(req, entry, self.out, self.uid)
                return
            if op.kind is Kind.QUICK:
                result = self._filtered(req, op.call(self.shared.engine, req.fields))
            else:
                result = await op.call(self.shared.engine, req.fields)
                if req.op == "job":
                    self.shared.policy.check_read(self.uid, result["job"]["voice"])
            data = protocol.encode_ok(req.id, result)
        except BeagledError as e:
            data = protocol.encode_error(req.id, e)
        except Exception as e:
            log.exception("request %s failed", req.op)
            data = protocol.encode_error(req.id, e)
        if entry.stream:  # a watch that failed before streaming: its error ends its stream
            entry.lines.append(data)
            entry.done = True
            self.out.wake()
            return
        self._answer(entry, data)

    def _filtered(self, req: protocol.Request, result: dict[str, Any]) -> dict[str, Any]:
        if req.op == "jobs":
            return self.shared.policy.filter_jobs(self.uid, result)
        if req.op == "voices":
            return self.shared.policy.filter_voices(self.uid, result)
        return result

    async def _hangup(self, scope: trio.CancelScope) -> None:
        # Its sending side closed, a client may still read its watch (a shutdown(SHUT_WR)); one that
        # closed for good is otherwise only noticed at the next line written to it, and until then its
        # watch counts against daemon.max_watches (a quiet daemon refused new watches so).
        while self.out.entries:
            await trio.sleep(HANGUP_POLL_S)  # nothing to wait on: the kernel says it only when asked
            if _hung_up(self.stream.socket):
                log.info("client closed the connection")
                scope.cancel()
                return


async def linger(stream: trio.SocketStream, write_timeout_s: float, seconds: float = LINGER_S) -> None:
    """Close after a final error (``too_large``, ``forbidden``, too many connections) so that the
    client reads it: closing a Unix socket with unread input makes the peer's next read fail with
    ECONNRESET, losing the answer already sent. So: shut our side for writing, then read and discard
    what is still coming until the peer closes, for a bounded time."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_eof()
        with trio.move_on_after(min(seconds, write_timeout_s)):
            while await stream.receive_some(65536):
                pass


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """The peer closed its end for good (POLLHUP), not only its sending side (a plain EOF)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
