"""Python client for the beagled socket protocol, version 1 (CONTRACT.md).

Two flavours over the same wire format (UTF-8 JSON, one object per ``\\n``-terminated line):

* :class:`Client` -- blocking, plain :mod:`socket`; what ``beaglectl``, scripts and users' loops use.
* :class:`AsyncClient` -- trio; ``client = await AsyncClient.connect(path)``.

Both keep one connection for requests (opened at construction, reopened lazily after it was lost) and
raise the :mod:`beagled.errors` ``ClientError`` subclass that matches the daemon's error ``code``, with
the daemon's message. ``watch()`` opens a connection of its own, since a watch stream owns its
connection until the client closes it; the request connection stays usable meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tomllib
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import trio

from beagled import errors, paths

__all__ = [
    "DEFAULT_STATE_DIR",
    "PROTOCOL_VERSION",
    "AsyncClient",
    "AsyncWatch",
    "Client",
    "ClientProtocol",
    "ConnectionLost",
    "DaemonNotRunning",
    "ProtocolError",
    "RequestTimeout",
    "default_socket_path",
    "error_from_response",
    "exception_for",
    "raise_for_response",
    "stream_message",
]

PROTOCOL_VERSION = 1
#: The last fallback of ``[daemon] state_dir``, after ``$STATE_DIRECTORY`` and ``$XDG_STATE_HOME``
#: (``beagled.paths.default_state_dir``, which the daemon and this client both use).
DEFAULT_STATE_DIR = "~/.local/state/beagled"
SOCKET_NAME = paths.SOCKET_NAME
#: A line longer than this from the daemon is a protocol error (the daemon's own limit is 1 MiB in).
MAX_LINE_BYTES = 64 * 1024 * 1024
_CHUNK = 65536


# --- errors -------------------------------------------------------------------------------------


class DaemonNotRunning(errors.Unavailable):
    """No daemon listens at the socket path: the file is missing, or nothing accepts on it."""

    def __init__(self, message: str, *, path: str | Path = "") -> None:
        super().__init__(message)
        self.path = str(path)


class ConnectionLost(errors.Unavailable):
    """The daemon closed the connection (or it broke) before answering."""


class RequestTimeout(errors.Unavailable):
    """No answer within the client's timeout; the connection is dropped (its replies would be stale)."""


class ProtocolError(errors.BeagledError):
    """The daemon sent something that is not protocol v1 (not JSON, wrong id, no result)."""

    code = "internal"


_CODE_TO_CLASS: dict[str, type[errors.BeagledError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidJSON,
        errors.BadRequest,
        errors.UnknownOp,
        errors.UnsupportedVersion,
        errors.TooLarge,
        errors.Forbidden,
        errors.NotFound,
        errors.Conflict,
        errors.Unavailable,
    )
}


def exception_for(code: str, message: str) -> errors.BeagledError:
    """The exception for a protocol error ``code``; an unknown code (and ``internal``) gives BeagledError."""
    cls = _CODE_TO_CLASS.get(code, errors.BeagledError)
    exc = cls(message)
    if cls is errors.BeagledError and code != "internal":
        exc.code = code  # keep what the daemon said, even when this client does not know it
    return exc


def error_from_response(response: Mapping[str, Any]) -> errors.BeagledError | None:
    """The exception a failed response stands for, or None for a successful one."""
    if response.get("ok", True) is not False:
        return None
    err = response.get("error")
    if not isinstance(err, Mapping):
        return ProtocolError(f"failed response without an error object: {response!r}")
    code = str(err.get("code", "internal"))
    message = str(err.get("message", "")) or code
    return exception_for(code, message)


def raise_for_response(response: Mapping[str, Any]) -> dict[str, Any]:
    """Return a response's ``result``, or raise the exception matching its error code."""
    exc = error_from_response(response)
    if exc is not None:
        raise exc
    result = response.get("result")
    if not isinstance(result, dict):
        raise ProtocolError(f"response without a result object: {response!r}")
    return result


# --- socket path --------------------------------------------------------------------------------


def default_socket_path(config: str | Path | None = None) -> Path:
    """Where the daemon's socket is, as the daemon would resolve it (``beagled.paths``).

    ``$BEAGLED_SOCKET`` wins. Otherwise the config file (``config``, else the daemon's lookup:
    ``$BEAGLED_CONFIG``, ``./config.toml``, ``$XDG_CONFIG_HOME/beagled/config.toml``,
    ``/etc/beagled/config.toml``) is read for ``[daemon] socket``, else ``<state_dir>/beagled.sock`` with
    the state dir from ``[daemon] state_dir``, ``$STATE_DIRECTORY``, ``$XDG_STATE_HOME/beagled`` or
    ``~/.local/state/beagled`` (and, if no socket is there, the runtime directory's). A config named
    explicitly (argument or ``$BEAGLED_CONFIG``) must exist. Raises :class:`beagled.errors.ConfigError`
    on an unreadable or invalid config.
    """
    env_socket = os.environ.get("BEAGLED_SOCKET", "")
    if env_socket:
        return Path(env_socket).expanduser()
    path, explicit = paths.config_path(None if config is None else str(config))
    daemon: Mapping[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as e:
            raise errors.ConfigError("", f"config file not found: {path}") from e
        except OSError as e:
            if not explicit and path == paths.SYSTEM_CONFIG:  # another user's config: the defaults
                data = {}
            else:
                raise errors.ConfigError("", f"cannot read config file {path}: {e.strerror or e}") from e
        except tomllib.TOMLDecodeError as e:
            raise errors.ConfigError("", f"{path} is not valid TOML: {e}") from e
        section = data.get("daemon", {})
        if not isinstance(section, dict):
            raise errors.ConfigError("daemon", "must be a table")
        daemon = section
    sock = daemon.get("socket", "")
    if not isinstance(sock, str):
        raise errors.ConfigError("daemon.socket", "must be a string")
    state_dir = daemon.get("state_dir", "")
    if not isinstance(state_dir, str):
        raise errors.ConfigError("daemon.state_dir", "must be a string")
    candidates = paths.client_socket_candidates(sock, state_dir)
    return next((c for c in candidates if c.exists()), candidates[0])


# --- the sans-IO client protocol ----------------------------------------------------------------


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"daemon sent a line that is not JSON: {line[:200]!r}") from e
    if not isinstance(message, dict):
        raise ProtocolError(f"daemon sent a line that is not a JSON object: {line[:200]!r}")
    return message


def _check_id(response: Mapping[str, Any], expected: int) -> None:
    got = response.get("id")
    # ``id: null`` is how the daemon answers a line it could not parse (invalid_json, too_large).
    if got is not None and got != expected:
        raise ProtocolError(f"response id {got!r} does not match request id {expected!r}")


def stream_message(message: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``watch`` line: the stream message, None for anything else (skipped); an error raises."""
    exc = error_from_response(message)
    if exc is not None:
        raise exc
    return dict(message) if "event" in message or "progress" in message else None


class ClientProtocol:
    """Protocol v1 for a client, without I/O (as h11 is for HTTP): calls become request bytes, received
    bytes become messages, a response becomes its result or the exception its error code names.

    ``Client`` drives it over a blocking socket, ``AsyncClient`` over a trio stream; neither knows the
    wire format.
    """

    def __init__(self) -> None:
        self._next_id = 1
        self._buf = bytearray()
        self.eof = False

    def take_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def request(self, op: str, fields: Mapping[str, Any], request_id: int | None = None) -> tuple[int, bytes]:
        """The id and the line of one request; fields set to None are left out."""
        rid = self.take_id() if request_id is None else request_id
        message: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "op": op}
        message.update((name, value) for name, value in fields.items() if value is not None)
        return rid, _encode(message)

    def receive(self, data: bytes) -> None:
        """Bytes read from the daemon; ``b""``: it closed the connection (``eof``)."""
        if not data:
            self.eof = True
            return
        self._buf += data
        if len(self._buf) > MAX_LINE_BYTES and b"\n" not in self._buf:
            raise ProtocolError(f"daemon sent a line longer than {MAX_LINE_BYTES} bytes")

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message received, or None until more bytes come (blank lines skipped)."""
        while (i := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:i])
            del self._buf[: i + 1]
            if line.strip():
                return _decode(line)
        return None

    @staticmethod
    def result(response: Mapping[str, Any], request_id: int) -> dict[str, Any]:
        """The result of the response to ``request_id``, or the exception it stands for."""
        _check_id(response, request_id)
        return raise_for_response(response)


def _not_running(path: str, e: OSError) -> errors.BeagledError:
    if isinstance(e, FileNotFoundError):
        return DaemonNotRunning(f"beagled is not running (no socket at {path})", path=path)
    if isinstance(e, ConnectionRefusedError):
        return DaemonNotRunning(f"connection refused at {path}", path=path)
    if isinstance(e, PermissionError):
        return errors.Forbidden(f"permission denied connecting to {path}")
    return errors.Unavailable(f"cannot connect to {path}: {e.strerror or e}")


def _lost(path: str, e: BaseException) -> ConnectionLost:
    return ConnectionLost(f"connection to beagled at {path} lost: {getattr(e, 'strerror', None) or e}")


def _closed_early(path: str) -> ConnectionLost:
    return ConnectionLost(f"beagled at {path} closed the connection before answering")


R = TypeVar("R")


class _Ops(Generic[R]):
    """The ops as methods, written once for both clients: each sends one request through ``_call``
    (the blocking client returns the result, the trio client an awaitable of it)."""

    def _call(self, op: str, fields: dict[str, Any]) -> R:
        raise NotImplementedError

    def ping(self) -> R:
        return self._call("ping", {})

    def submit(
        self,
        bad: str,
        good: str,
        *,
        voice: str = "default",
        prompt: str | None = None,
        quality: Mapping[str, float] | None = None,
        key: str | None = None,
        heldout: bool | None = None,
        system: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> R:
        """Submit a pair; ``system`` and ``messages`` are sent only when given (a daemon from before
        chat-shaped pairs refuses them)."""
        fields: dict[str, Any] = {"voice": voice, "bad": bad, "good": good, "prompt": prompt, "key": key}
        fields["quality"] = dict(quality) if quality is not None else None
        fields["heldout"] = heldout
        fields["system"] = system
        fields["messages"] = [dict(m) for m in messages] if messages is not None else None
        return self._call("submit", fields)

    def status(self) -> R:
        return self._call("status", {})

    def jobs(self, voice: str | None = None, state: str | None = None, limit: int | None = None) -> R:
        return self._call("jobs", {"voice": voice, "state": state, "limit": limit})

    def job(self, job_id: str) -> R:
        return self._call("job", {"job_id": job_id})

    def voices(self) -> R:
        return self._call("voices", {})

    def train(self, voice: str) -> R:
        return self._call("train", {"voice": voice})

    def rollback(self, voice: str, to: str | None = None) -> R:
        return self._call("rollback", {"voice": voice, "to": to})

    def pause(self, voice: str | None = None, *, cancel_running: bool = False) -> R:
        """Stop cutting new jobs: for the whole daemon, or for one voice; with ``cancel_running`` also
        cancel the jobs not yet trained (the running training is stopped, their pairs are pending again)."""
        return self._call("pause", {"voice": voice, "cancel_running": True if cancel_running else None})

    def resume(self, voice: str | None = None) -> R:
        return self._call("resume", {"voice": voice})

    def delete_voice(
        self, voice: str, *, remove_adapters: bool = False, erase_drafts: bool = False, force: bool = False
    ) -> R:
        """Remove a voice from the listing (its events stay); its adapters too if asked, and with
        ``erase_drafts`` its drafts are overwritten in the log (a ``DraftsErased`` event records it).
        ``force``: cancel the voice's unfinished jobs (stopping a running training) instead of refusing."""
        fields = {"voice": voice, "remove_adapters": remove_adapters, "erase_drafts": erase_drafts}
        fields["force"] = True if force else None
        return self._call("delete_voice", fields)


# --- blocking transport -------------------------------------------------------------------------


class _SyncConnection:
    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as e:
            sock.close()
            raise RequestTimeout(f"timed out connecting to {path}") from e
        except OSError as e:
            sock.close()
            raise _not_running(path, e) from e
        self.sock: socket.socket | None = sock
        self.proto = ClientProtocol()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _io(self) -> socket.socket:
        if self.sock is None:
            raise ConnectionLost(f"connection to {self.path} is closed")
        return self.sock

    @contextlib.contextmanager
    def _translated(self, timed_out: Callable[[], str]) -> Iterator[None]:
        """Socket errors as the client's (as httpx translates at its transport); the connection is
        dropped, since a late reply would answer the next request."""
        try:
            yield
        except TimeoutError as e:
            self.close()
            raise RequestTimeout(timed_out()) from e
        except OSError as e:
            self.close()
            raise _lost(self.path, e) from e

    def send(self, data: bytes) -> None:
        with self._translated(lambda: f"timed out sending to beagled at {self.path}"):
            self._io().sendall(data)

    def _recv(self) -> bytes:
        with self._translated(lambda: f"no answer from beagled at {self.path} within {self.timeout:g} s"):
            return self._io().recv(_CHUNK)
        raise AssertionError("unreachable")  # pragma: no cover - for the type checker

    def read_message(self) -> dict[str, Any] | None:
        """The next message, or None when the daemon closed the connection cleanly between lines."""
        while (message := self.proto.next_message()) is None and not self.proto.eof:
            self.proto.receive(self._recv())
        if message is None:
            self.close()
        return message

    def read_response(self) -> dict[str, Any]:
        message = self.read_message()
        if message is None:
            raise _closed_early(self.path)
        return message


class Client(_Ops[dict[str, Any]]):
    """Blocking client; one connection, reused for every request.

    ``timeout`` bounds connecting and each wait for an answer (None: wait forever). After a timeout
    or a lost connection the next request reconnects.
    """

    def __init__(self, socket_path: str | Path | None = None, *, timeout: float | None = 30.0) -> None:
        self.socket_path = str(socket_path if socket_path is not None else default_socket_path())
        self.timeout = timeout
        self._proto = ClientProtocol()  # request ids, shared by the request connection and watches
        self._conn: _SyncConnection | None = _SyncConnection(self.socket_path, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> _SyncConnection:
        if self._conn is None or self._conn.sock is None:
            self._conn = _SyncConnection(self.socket_path, self.timeout)
        return self._conn

    def _call(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        return self.request(op, **fields)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``result``; fields set to None are left out."""
        conn = self._connection()
        request_id, data = self._proto.request(op, fields)
        conn.send(data)
        return self._proto.result(conn.read_response(), request_id)

    def pipeline(self, requests: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Send every request, then read every response, in order.

        Returns the raw responses (``{"v", "id", "ok", "result"}`` or ``{..., "ok": false, "error"}``),
        one per request; a failed request does not stop the others. Use :func:`raise_for_response` to
        turn one into its result or exception.
        """
        if not requests:
            return []
        conn = self._connection()
        lines = [self._proto.request(op, fields) for op, fields in requests]
        conn.send(b"".join(data for _, data in lines))
        responses = []
        for request_id, _ in lines:
            response = conn.read_response()
            _check_id(response, request_id)
            responses.append(response)
        return responses

    def watch(self, from_seq: int | None = None) -> Generator[dict[str, Any], None, None]:
        """Yield each streamed message (``{"event": {...}}`` or ``{"progress": {...}}`` envelopes).

        Runs on a connection of its own, with no read timeout; ends when the daemon closes the stream,
        and closes that connection when the iteration is dropped. An error response raises. Any other
        non-stream message (an acknowledgement with a ``result``) is skipped.
        """
        conn = _SyncConnection(self.socket_path, self.timeout)
        try:
            conn.send(self._proto.request("watch", {"from_seq": from_seq})[1])
            if conn.sock is not None:
                conn.sock.settimeout(None)
            conn.timeout = None
            while (message := conn.read_message()) is not None:
                if (streamed := stream_message(message)) is not None:
                    yield streamed
        finally:
            conn.close()


# --- trio transport -----------------------------------------------------------------------------


class _AsyncConnection:
    def __init__(self, path: str, stream: trio.SocketStream) -> None:
        self.path = path
        self.stream: trio.SocketStream | None = stream
        self.proto = ClientProtocol()

    @classmethod
    async def open(cls, path: str, connect_limit_s: float | None) -> _AsyncConnection:
        try:
            with trio.fail_after(_deadline(connect_limit_s)):
                stream = await trio.open_unix_socket(path)
        except trio.TooSlowError as e:
            raise RequestTimeout(f"timed out connecting to {path}") from e
        except OSError as e:
            raise _not_running(path, e) from e
        return cls(path, stream)

    async def aclose(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await stream.aclose()

    def _drop(self) -> None:
        # Closing a trio socket stream without checkpointing: safe from an except/finally block.
        if self.stream is not None:
            self.stream.socket.close()
            self.stream = None

    def _io(self) -> trio.SocketStream:
        if self.stream is None:
            raise ConnectionLost(f"connection to {self.path} is closed")
        return self.stream

    async def send(self, data: bytes) -> None:
        try:
            await self._io().send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._drop()
            raise _lost(self.path, e) from e

    async def _recv(self) -> bytes:
        try:
            return await self._io().receive_some(_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._drop()
            raise _lost(self.path, e) from e

    async def read_message(self) -> dict[str, Any] | None:
        """As the blocking transport's."""
        while (message := self.proto.next_message()) is None and not self.proto.eof:
            self.proto.receive(await self._recv())
        if message is None:
            self._drop()
        return message


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout


class _AsyncClosing:
    """``async with`` ends in ``aclose``."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncClient(_Ops[Coroutine[Any, Any, dict[str, Any]]], _AsyncClosing):
    """trio client: ``async with await AsyncClient.connect(path) as client: await client.ping()``.

    Requests from concurrent tasks are serialised on the one connection (a request and its response
    hold a lock). ``timeout`` bounds each request; a timed-out request drops the connection and the
    next one reconnects.
    """

    def __init__(self, socket_path: str, conn: _AsyncConnection, timeout: float | None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._conn: _AsyncConnection | None = conn
        self._proto = ClientProtocol()
        self._lock = trio.Lock()

    @classmethod
    async def connect(
        cls,
        socket_path: str | Path | None = None,
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 -- the client's per-request timeout, kept for later
    ) -> Self:
        path = str(socket_path if socket_path is not None else default_socket_path())
        conn = await _AsyncConnection.open(path, timeout)
        return cls(path, conn, timeout)

    async def __aenter__(self) -> Self:
        return self

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def _connection(self) -> _AsyncConnection:
        if self._conn is None or self._conn.stream is None:
            self._conn = await _AsyncConnection.open(self.socket_path, self.timeout)
        return self._conn

    async def _exchange(self, messages: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
        async with self._lock:
            conn = await self._connection()
            ok = False
            try:
                with trio.fail_after(_deadline(self.timeout)):
                    await conn.send(b"".join(data for _, data in messages))
                    responses = []
                    for request_id, _ in messages:
                        response = await conn.read_message()
                        if response is None:
                            raise _closed_early(self.socket_path)
                        _check_id(response, request_id)
                        responses.append(response)
                ok = True
            except trio.TooSlowError as e:
                raise RequestTimeout(
                    f"no answer from beagled at {self.socket_path} within {self.timeout:g} s"
                ) from e
            finally:
                if not ok:
                    # Cancelled or failed mid-exchange: unread replies would answer later requests.
                    conn._drop()
            return responses

    def _call(self, op: str, fields: dict[str, Any]) -> Coroutine[Any, Any, dict[str, Any]]:
        return self.request(op, **fields)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        request_id, data = self._proto.request(op, fields)
        (response,) = await self._exchange([(request_id, data)])
        return raise_for_response(response)

    async def pipeline(self, requests: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Like :meth:`Client.pipeline`: raw responses, in order."""
        if not requests:
            return []
        return await self._exchange([self._proto.request(op, fields) for op, fields in requests])

    def watch(self, from_seq: int | None = None) -> AsyncWatch:
        """An async iterator over streamed messages, on a connection of its own.

        ``async with client.watch() as stream: async for message in stream: ...`` (the ``async with``
        closes the connection; iterating without it is fine too, then call ``await stream.aclose()``).
        """
        return AsyncWatch(
            self.socket_path, self.timeout, self._proto.request("watch", {"from_seq": from_seq})[1]
        )


class AsyncWatch(_AsyncClosing):
    """The stream of one ``watch`` request; see :meth:`AsyncClient.watch`."""

    def __init__(self, path: str, timeout: float | None, request: bytes) -> None:
        self._path = path
        self._timeout = timeout
        self._request = request
        self._conn: _AsyncConnection | None = None
        self._done = False

    async def __aenter__(self) -> Self:
        await self._start()
        return self

    async def aclose(self) -> None:
        self._done = True
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def _start(self) -> _AsyncConnection:
        if self._conn is None:
            if self._done:
                raise ConnectionLost("watch stream is closed")
            conn = await _AsyncConnection.open(self._path, self._timeout)
            self._conn = conn
            await conn.send(self._request)
        return self._conn

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        conn = await self._start()
        while True:
            message = await conn.read_message()
            if message is None:
                await self.aclose()
                raise StopAsyncIteration
            try:
                streamed = stream_message(message)
            except errors.BeagledError:
                await self.aclose()
                raise
            if streamed is not None:
                return streamed
