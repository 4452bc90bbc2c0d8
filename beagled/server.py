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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from beagled import protocol
from beagled.engine import Engine
from beagled.errors import BeagledError, Conflict, Forbidden, Unavailable

log = logging.getLogger("beagled.server")


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
            os.chmod(path, 0o666)
            if path.parent.stat().st_uid == os.getuid():
                os.chmod(path.parent, 0o711)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(512)
    return sock


class _Slot:
    """One response position in a connection's output order; ``watch`` streams many lines into it."""

    def __init__(self, size: int = 1) -> None:
        self.send, self.recv = trio.open_memory_channel[bytes](size)


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
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "ping": self._sync(lambda f: engine.ping()),
            "submit": engine.submit,
            "status": self._sync(lambda f: engine.status()),
            "jobs": self._sync(lambda f: engine.list_jobs(f.get("voice"), f.get("state"), f["limit"])),
            "job": self._sync(lambda f: engine.job(f["job_id"])),
            "voices": self._sync(lambda f: engine.list_voices()),
            "train": lambda f: engine.train_now(f["voice"]),
            "rollback": lambda f: engine.rollback(f["voice"], f.get("to")),
            "pause": lambda f: engine.set_paused(True, f.get("voice")),
            "resume": lambda f: engine.set_paused(False, f.get("voice")),
            "delete_voice": lambda f: engine.delete_voice(f["voice"], f["remove_adapters"]),
        }

    @staticmethod
    def _sync(
        fn: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def call(fields: dict[str, Any]) -> dict[str, Any]:
            return fn(fields)

        return call

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
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    async def _reject(self, stream: trio.SocketStream, exc: BeagledError) -> None:
        with trio.move_on_after(self.cfg.write_timeout_s):
            await stream.send_all(protocol.encode_error(None, exc))

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        if self.active > self.cfg.max_connections:
            await self._reject(stream, Unavailable(f"too many connections (max {self.cfg.max_connections})"))
            return
        uid = peer_uid(stream.socket)
        if uid is None or uid not in self.allowed:
            log.warning("refused a peer", extra={"peer_uid": uid})
            await self._reject(stream, Forbidden(f"uid {uid} may not use this daemon"))
            return
        slots_send, slots_recv = trio.open_memory_channel[_Slot](self.cfg.max_inflight_per_connection)
        streaming = False

        async def writer() -> None:
            async with slots_recv:
                async for slot in slots_recv:
                    async for data in slot.recv:
                        with trio.fail_after(self.cfg.write_timeout_s):
                            await stream.send_all(data)

        async def handle(line: bytes, slot: _Slot) -> None:
            nonlocal streaming
            async with slot.send:
                try:
                    req = protocol.parse_request(line, self.limits)
                except protocol.RequestError as e:
                    await slot.send.send(protocol.encode_error(e.request_id, e))
                    return
                try:
                    if req.op == "watch":
                        streaming = True
                        await self._watch(req, slot)
                        return
                    result = await self._ops[req.op](req.fields)
                    data = protocol.encode_ok(req.id, result)
                except BeagledError as e:
                    data = protocol.encode_error(req.id, e)
                except Exception as e:
                    log.exception("request %s failed", req.op)
                    data = protocol.encode_error(req.id, e)
                await slot.send.send(data)

        buf = protocol.LineBuffer(self.cfg.max_message_bytes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            async with slots_send:
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
                        if not line.strip():
                            continue
                        slot = _Slot(size=256)
                        await slots_send.send(slot)  # blocks when too many requests are in flight
                        nursery.start_soon(handle, line, slot)
                    if buf.overflow is not None:
                        slot = _Slot()
                        await slots_send.send(slot)
                        async with slot.send:
                            await slot.send.send(protocol.encode_error(None, buf.overflow))
                        break
                # the client finished sending: answer what is in flight, then close (watch runs on)

    async def _watch(self, req: protocol.Request, slot: _Slot) -> None:
        gen = self.engine.watch(req.fields.get("from_seq"))
        try:
            async for msg in gen:
                key = "event" if "event" in msg else "progress"
                await slot.send.send(protocol.encode_stream(req.id, key, msg[key]))
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        await slot.send.send(
            protocol.encode_error(req.id, Unavailable("watch stream ended: the client fell behind"))
        )
