"""Socket protocol v1, sans-IO: line framing, request validation, response encoding. Pure.

The server feeds bytes in and writes bytes out; everything about what a line means lives here, so it
can be tested (and fuzzed) without a socket. Validation raises the ``ClientError`` whose ``code`` is
the protocol's error code; ``encode_error`` turns any exception into a CONTRACT error response.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from beagled.config import VOICE_RE
from beagled.errors import (
    BadRequest,
    BeagledError,
    ClientError,
    InvalidJSON,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
)
from beagled.jobs import JobState
from beagled.training_spec import ROLES  # the turns a chat-shaped pair may hold

VERSION = 1
JOB_STATES = tuple(s.value for s in JobState)  # what ``jobs --state`` accepts: the pure core's states
#: A job in one of these states has no more training progress to show (``beaglectl watch``).
SETTLED_STATES = frozenset(JOB_STATES) - {JobState.QUEUED.value, JobState.TRAINING.value}
MAX_KEY_CHARS = 200
MAX_ID_CHARS = 200
MAX_MESSAGES = 64  # turns of a chat-shaped pair's conversation (submit's messages)


class LineBuffer:
    """Splits a byte stream into ``\\n``-terminated lines of at most ``max_bytes`` (newline excluded).

    A line over the limit ends the stream: ``feed`` still returns the complete lines before it, and
    ``overflow`` then holds the ``TooLarge`` error to answer with before closing.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self.overflow: TooLarge | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflow is not None:
            return []
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(self._buf[start:nl])
            if len(line) > self.max_bytes:
                self.overflow = TooLarge(f"request line is {len(line)} bytes; the limit is {self.max_bytes}")
                self._buf.clear()
                return lines
            lines.append(line[:-1] if line.endswith(b"\r") else line)
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > self.max_bytes:
            self.overflow = TooLarge(
                f"request line is over {self.max_bytes} bytes; the limit is {self.max_bytes}"
            )
            self._buf.clear()
        return lines

    @property
    def pending(self) -> int:
        return len(self._buf)


@dataclass(frozen=True)
class Request:
    id: str | int
    op: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Limits:
    max_draft_bytes: int = 262_144


# --- field validators -----------------------------------------------------------------------------


def _str(name: str, v: Any, *, max_chars: int | None = None, non_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string")
    if non_empty and not v:
        raise BadRequest(f"{name} must not be empty")
    if max_chars is not None and len(v) > max_chars:
        raise BadRequest(f"{name} is longer than {max_chars} characters")
    return v


def _int(name: str, v: Any, *, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer")
    if v < lo or (hi is not None and v > hi):
        raise BadRequest(
            f"{name} must be between {lo} and {hi}" if hi is not None else f"{name} must be ≥ {lo}"
        )
    return v


def voice_name(v: Any, name: str = "voice") -> str:
    s = _str(name, v)
    if not VOICE_RE.fullmatch(s):
        raise BadRequest(
            f"{name} must match [a-z0-9][a-z0-9_-]{{0,63}} (lower case, no '/' or '..'), got {s[:80]!r}"
        )
    return s


def _draft(name: str, v: Any, limits: Limits) -> str:
    s = _str(name, v, non_empty=True)
    size = len(s.encode("utf-8", "surrogatepass"))
    if size > limits.max_draft_bytes:
        raise TooLarge(f"{name} is {size} bytes; the limit is {limits.max_draft_bytes}")
    if not s.strip():
        raise BadRequest(f"{name} must not be blank")
    return s


def _quality(v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or set(v) != {"before", "after"}:
        raise BadRequest('quality must be {"before": number, "after": number}')
    out: dict[str, float] = {}
    for k in ("before", "after"):
        x = v[k]
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise BadRequest(f"quality.{k} must be a finite number")
        out[k] = float(x)
    return out


def _submit(f: dict[str, Any], limits: Limits) -> dict[str, Any]:
    if "bad" not in f or "good" not in f:
        raise BadRequest("submit needs bad and good")
    out: dict[str, Any] = {
        "voice": voice_name(f.get("voice", "default")),
        "bad": _draft("bad", f["bad"], limits),
        "good": _draft("good", f["good"], limits),
    }
    if out["bad"] == out["good"]:
        raise BadRequest("bad and good are the same draft")
    if f.get("prompt") is not None:
        out["prompt"] = _draft("prompt", f["prompt"], limits)
    if f.get("quality") is not None:
        out["quality"] = _quality(f["quality"])
    if f.get("key") is not None:
        out["key"] = _str("key", f["key"], max_chars=MAX_KEY_CHARS, non_empty=True)
    out.update(_conversation(f, limits, has_prompt="prompt" in out))
    if f.get("heldout") is not None:  # the loop's own evaluation pairs; default: training.heldout_share
        if not isinstance(f["heldout"], bool):
            raise BadRequest("heldout must be true or false")
        out["heldout"] = f["heldout"]
    return out


def _messages(v: Any, limits: Limits) -> list[dict[str, str]]:
    if not isinstance(v, list):
        raise BadRequest(
            'messages must be a list of {"role": "system"|"user"|"assistant", "content": string}'
        )
    if len(v) > MAX_MESSAGES:
        raise BadRequest(f"messages holds {len(v)} messages; the limit is {MAX_MESSAGES}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(v):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f'{name} must be an object {{"role": ..., "content": ...}}')
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise BadRequest(
                f"{name} takes only role and content, not {', '.join(repr(k[:64]) for k in extra[:5])}"
            )
        if "role" not in m or "content" not in m:
            raise BadRequest(f"{name} needs role and content")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"{name}.role must be one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise BadRequest(f"{name}: a system message may only come first")
        out.append({"role": role, "content": _draft(f"{name}.content", m["content"], limits)})
    return out


def _conversation(f: dict[str, Any], limits: Limits, *, has_prompt: bool) -> dict[str, Any]:
    """``system`` and ``messages``: the conversation before the draft (see docs/protocol.md)."""
    out: dict[str, Any] = {}
    if f.get("system") is not None:
        out["system"] = _draft("system", f["system"], limits)
    messages = _messages(f["messages"], limits) if f.get("messages") is not None else []
    if not messages:
        return out
    if "system" in out and messages[0]["role"] == "system":
        raise BadRequest("give the system prompt once: as system or as messages[0], not both")
    last = messages[-1]["role"]
    if has_prompt and last == "user":
        raise BadRequest(
            "prompt is the last user turn after messages, and messages already ends with a user turn; "
            "leave prompt out (or end messages with an assistant turn)"
        )
    if not has_prompt and last != "user":
        raise BadRequest("messages must end with a user turn (the draft answers it), or give prompt")
    out["messages"] = messages
    return out


def _jobs(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.get("voice") is not None:
        out["voice"] = voice_name(f["voice"])
    if f.get("state") is not None:
        s = _str("state", f["state"])
        if s not in JOB_STATES:
            raise BadRequest(f"state must be one of {', '.join(JOB_STATES)}")
        out["state"] = s
    out["limit"] = _int("limit", f["limit"], lo=1, hi=10_000) if f.get("limit") is not None else 100
    return out


def _job(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    if "job_id" not in f:
        raise BadRequest("job needs job_id")
    return {"job_id": _str("job_id", f["job_id"], max_chars=MAX_ID_CHARS, non_empty=True)}


def _train(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    if "voice" not in f:
        raise BadRequest("train needs voice")
    return {"voice": voice_name(f["voice"])}


def _rollback(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    if "voice" not in f:
        raise BadRequest("rollback needs voice")
    out: dict[str, Any] = {"voice": voice_name(f["voice"])}
    if f.get("to") is not None:
        out["to"] = _str("to", f["to"], max_chars=MAX_ID_CHARS, non_empty=True)
    return out


def _watch(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    return {"from_seq": _int("from_seq", f["from_seq"]) if f.get("from_seq") is not None else None}


def _none(_f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    return {}


def _pause(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    return {"voice": voice_name(f["voice"])} if f.get("voice") is not None else {}


def _pause_cancel(f: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """``pause``: ``voice`` as for resume, and ``cancel_running`` (bool, default false)."""
    cancel = f.get("cancel_running", False)
    if not isinstance(cancel, bool):
        raise BadRequest("cancel_running must be true or false")
    return {**_pause(f, limits), "cancel_running": cancel}


def _delete_voice(f: dict[str, Any], _limits: Limits) -> dict[str, Any]:
    if "voice" not in f:
        raise BadRequest("delete_voice needs voice")
    remove = f.get("remove_adapters", False)
    if not isinstance(remove, bool):
        raise BadRequest("remove_adapters must be true or false")
    erase = f.get("erase_drafts", False)
    if not isinstance(erase, bool):
        raise BadRequest("erase_drafts must be true or false")
    force = f.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest("force must be true or false")
    return {"voice": voice_name(f["voice"]), "remove_adapters": remove, "erase_drafts": erase, "force": force}


Validator = Callable[[dict[str, Any], Limits], dict[str, Any]]


class Kind(enum.Enum):
    """How the server runs an op. A change (``EFFECT``, ``COMMIT``) joins its connection's chain of
    writes: a later request on that connection waits for it to be answered first."""

    QUICK = "quick"  # a read answered at once from memory: ``call(engine, fields) -> result``
    QUERY = "query"  # a read that awaits: ``await call(engine, fields) -> result``
    EFFECT = "effect"  # a change that awaits its outcome: ``await call(engine, fields) -> result``
    COMMIT = "commit"  # submit's fast path: ``call(engine, fields, done, uid)``, ``done`` after COMMIT
    STREAM = "stream"  # watch: ``call(engine, fields)`` is an async iterator of stream messages

    @property
    def writes(self) -> bool:
        return self in (Kind.EFFECT, Kind.COMMIT)


@dataclass(frozen=True)
class Op:
    """One operation of the protocol, declared once: its fields, their validation, how it runs and
    the ``Engine`` method it calls (``call``, with the validated fields; see ``Kind`` for its shape)."""

    name: str
    fields: frozenset[str]
    validate: Validator
    kind: Kind
    call: Callable[..., Any]


def _op(name: str, fields: str, validate: Validator, kind: Kind, call: Callable[..., Any]) -> Op:
    return Op(name, frozenset(fields.split()), validate, kind, call)


# The table of operations (CONTRACT.md "Operations"); ``Engine``'s methods are called by the server.
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        _op("ping", "", _none, Kind.QUICK, lambda e, f: e.ping()),
        _op(
            "submit",
            "voice bad good prompt quality key heldout system messages",
            _submit,
            Kind.COMMIT,
            lambda e, f, done, uid: e.submit_nowait(f, done, uid=uid),
        ),
        _op("status", "", _none, Kind.QUICK, lambda e, f: e.status()),
        _op(
            "jobs",
            "voice state limit",
            _jobs,
            Kind.QUICK,
            lambda e, f: e.list_jobs(f.get("voice"), f.get("state"), f["limit"]),
        ),
        _op("job", "job_id", _job, Kind.QUERY, lambda e, f: e.job(f["job_id"])),
        _op("voices", "", _none, Kind.QUICK, lambda e, f: e.list_voices()),
        _op("train", "voice", _train, Kind.EFFECT, lambda e, f: e.train_now(f["voice"])),
        _op("rollback", "voice to", _rollback, Kind.EFFECT, lambda e, f: e.rollback(f["voice"], f.get("to"))),
        _op(
            "pause",
            "voice cancel_running",
            _pause_cancel,
            Kind.EFFECT,
            lambda e, f: e.set_paused(True, f.get("voice"), f.get("cancel_running", False)),
        ),
        _op("resume", "voice", _pause, Kind.EFFECT, lambda e, f: e.set_paused(False, f.get("voice"))),
        _op(
            "delete_voice",
            "voice remove_adapters erase_drafts force",
            _delete_voice,
            Kind.EFFECT,
            lambda e, f: e.delete_voice(
                f["voice"], f["remove_adapters"], f.get("erase_drafts", False), f.get("force", False)
            ),
        ),
        _op("watch", "from_seq", _watch, Kind.STREAM, lambda e, f: e.watch(f.get("from_seq"))),
    )
}
ENVELOPE = frozenset({"v", "id", "op"})


class RequestError(ClientError):
    """A ``ClientError`` that also carries the request id it belongs to (or None when unknown)."""

    def __init__(self, cause: ClientError, request_id: str | int | None) -> None:
        super().__init__(str(cause))
        self.code = cause.code
        self.request_id = request_id


def _decode_json(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJSON(f"request is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidJSON("request JSON is nested too deeply") from None
    except ValueError as e:
        raise InvalidJSON(f"request is not valid JSON: {e}") from None
    if "\\u" in text:  # only an escape can smuggle in a lone surrogate (the raw text is valid UTF-8)
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJSON(
                "request holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode text"
            ) from None
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes, limits: Limits) -> Request:
    """Validate one line; raises ``RequestError`` (with the request id when it could be read)."""
    try:
        obj = _decode_json(line)
    except ClientError as e:
        raise RequestError(e, None) from None
    if not isinstance(obj, dict):
        raise RequestError(BadRequest("request must be a JSON object"), None)
    rid = obj.get("id")
    if (
        isinstance(rid, bool)
        or not isinstance(rid, str | int)
        or (isinstance(rid, str) and len(rid) > MAX_ID_CHARS)
    ):
        raise RequestError(BadRequest("id must be a string (≤ 200 characters) or an integer"), None)
    try:
        if "v" not in obj:
            raise BadRequest("v is required (this daemon speaks protocol version 1)")
        if obj["v"] != VERSION or isinstance(obj["v"], bool):
            raise UnsupportedVersion(f"protocol version {obj['v']!r} is not supported; this daemon speaks 1")
        op = obj.get("op")
        if not isinstance(op, str):
            raise BadRequest("op is required and must be a string")
        if op not in OPS:
            raise UnknownOp(f"unknown op {op[:64]!r} (known: {', '.join(OPS)})")
        spec = OPS[op]
        fields = {k: v for k, v in obj.items() if k not in ENVELOPE}
        unknown = sorted(set(fields) - spec.fields)
        if unknown:
            raise BadRequest(f"{op} does not take {', '.join(repr(u[:64]) for u in unknown[:5])}")
        return Request(id=rid, op=op, fields=spec.validate(fields, limits))
    except ClientError as e:
        raise RequestError(e, rid) from None


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode()


def encode_ok(request_id: str | int, result: dict[str, Any]) -> bytes:
    return _line({"v": VERSION, "id": request_id, "ok": True, "result": result})


def encode_stream(request_id: str | int, key: str, body: dict[str, Any]) -> bytes:
    """A ``watch`` stream message: ``key`` is ``event`` or ``progress``."""
    return _line({"v": VERSION, "id": request_id, "ok": True, key: body})


def error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, BeagledError) else "internal"


def encode_error(request_id: str | int | None, exc: BaseException) -> bytes:
    code = error_code(exc)
    message = (
        str(exc) if isinstance(exc, ClientError | BeagledError) else "internal error (see the daemon's log)"
    )
    return _line({"v": VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message}})
