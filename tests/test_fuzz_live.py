"""Hypothesis against a LIVE daemon: random bytes, random JSON, valid requests with one field corrupted,
huge and deeply nested values, partial lines (split writes) and many lines in one write.

Every response line must be JSON with ``ok`` and, when false, an error code from CONTRACT.md; each
non-blank line gets exactly one answer, in order; nothing hangs (socket timeouts); the daemon answers
``ping`` after every example and at the end. One connection is reused across examples (it is reopened
only after a ``too_large``, which closes it by contract).

Examples per test: ``BEAGLED_FUZZ_EXAMPLES`` (default 800 each, about 3,300 cases in all); e.g.
``BEAGLED_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_live.py -s`` runs over 10,000 and prints the count
and the rate.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beagled.errors import ERROR_CODES
from tests.daemon_proc import DaemonProc, fake_backend

EXAMPLES = int(os.environ.get("BEAGLED_FUZZ_EXAMPLES", "800"))
MAX_MESSAGE = 65_536  # a small limit, so that over-limit lines are cheap to send
MAX_DRAFT = 16_384
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
STATS = {"cases": 0, "lines": 0, "reconnects": 0}


class Conn:
    """One reusable connection: send bytes in chunks, read exactly the expected number of lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.ping_id = 0

    def open(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(self.path))
            self.sock, self.buf = s, b""
            STATS["reconnects"] += 1
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, chunks: list[bytes]) -> None:
        s = self.open()
        for c in chunks:
            s.sendall(c)

    def read_lines(self, n: int) -> list[bytes]:
        s = self.open()
        out = []
        while len(out) < n:
            i = self.buf.find(b"\n")
            if i >= 0:
                out.append(self.buf[:i])
                self.buf = self.buf[i + 1 :]
                continue
            data = s.recv(1 << 20)  # raises TimeoutError on a hang
            assert data, f"the daemon closed the connection after {len(out)} of {n} answers"
            self.buf += data
        return out

    def expect_closed(self) -> None:
        s = self.open()
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            self.buf += data
        assert not self.buf.strip(), f"unexpected data before the close: {self.buf[:200]!r}"
        self.close()

    def ping(self) -> None:
        self.ping_id += 1
        rid = f"ping-{self.ping_id}"
        self.send([json.dumps({"v": 1, "id": rid, "op": "ping"}).encode() + b"\n"])
        (line,) = self.read_lines(1)
        r = json.loads(line)
        assert r["ok"] is True and r["id"] == rid, r


def expected_answers(payload: bytes) -> tuple[int, bool]:
    """(answers, closed): one per non-blank line; a line over the limit is answered and closes."""
    n = 0
    for line in payload.split(b"\n")[:-1]:
        if len(line) > MAX_MESSAGE:
            return n + 1, True
        if line.strip():
            n += 1
    return n, False


def check_response(line: bytes) -> dict[str, Any]:
    r = json.loads(line)
    assert isinstance(r, dict) and r.get("v") == 1 and isinstance(r.get("ok"), bool), r
    if r["ok"]:
        assert isinstance(r.get("result"), dict), r
    else:
        err = r.get("error")
        assert isinstance(err, dict) and err.get("code") in ERROR_CODES, r
        assert isinstance(err.get("message"), str) and err["message"], r
        assert err["code"] != "internal", f"an input made the daemon fail internally: {r}"
    return r


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conn]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "base").mkdir()
    d = DaemonProc(
        root,
        {
            "daemon": {"max_message_bytes": MAX_MESSAGE, "max_draft_bytes": MAX_DRAFT},
            "training": {"backends": ["fake"], "base_model": str(root / "base")},
            "training.custom_backends": {"fake": fake_backend("ok")},
            "scheduler": {"min_pairs": 1_000_000, "max_wait_s": 1e9},  # fuzzed pairs are not trained
        },
    )
    d.start()
    conn = Conn(d.socket)
    started = time.monotonic()
    try:
        yield conn
        conn.close()
        conn.ping()  # on a fresh connection, at the end
        conn.close()
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        elapsed = time.monotonic() - started
        print(
            f"\nfuzz: {STATS['cases']} cases, {STATS['lines']} request lines in {elapsed:.1f}s "
            f"({STATS['cases'] / elapsed:.0f} cases/s), {STATS['reconnects']} connections"
        )
    finally:
        if d.proc is not None and d.proc.poll() is not None:
            print(d.log_text()[-5000:])
        d.close()


def exchange(conn: Conn, payload: bytes, splits: list[int] | None = None) -> list[dict[str, Any]]:
    """Send ``payload`` (terminated, so that a partial last line is answered too), check every answer."""
    if not payload.endswith(b"\n"):
        payload += b"\n"
    n, closes = expected_answers(payload)
    if closes:  # everything after the over-limit line is never read: do not send it
        cut = 0
        for line in payload.split(b"\n"):
            cut += len(line) + 1
            if len(line) > MAX_MESSAGE:
                break
        payload = payload[:cut]
    cuts = sorted({min(max(0, c), len(payload)) for c in (splits or [])} | {0, len(payload)})
    chunks = [payload[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    try:
        conn.send(chunks)
    except (BrokenPipeError, ConnectionResetError):
        assert closes, "the daemon closed a connection that broke no limit"
    answers = [check_response(x) for x in conn.read_lines(n)]
    if closes:
        assert answers[-1]["error"]["code"] == "too_large", answers[-1]
        conn.expect_closed()
    conn.ping()
    STATS["cases"] += 1
    STATS["lines"] += n
    return answers


# --- strategies -----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
strings = st.text(max_size=60) | st.sampled_from(
    ["", " ", "\n", "default", "a/b", "..", "Alice", "\u2028", "💥"]
)

VALID: dict[str, dict[str, Any]] = {
    "ping": {},
    "status": {},
    "voices": {},
    "jobs": {"voice": "fz", "state": "queued", "limit": 5},
    "job": {"job_id": "j-none"},
    "submit": {"voice": "fz", "bad": "a bad draft", "good": "a good draft", "prompt": "p",
               "quality": {"before": 1, "after": 2}, "key": "k"},
    "train": {"voice": "fz"},
    "rollback": {"voice": "fz"},
    "pause": {},
    "resume": {},
}  # fmt: skip


@st.composite
def corrupted_requests(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from(sorted(VALID)))
    req: dict[str, Any] = {"v": 1, "id": draw(st.integers(0, 10**6) | st.text(max_size=20)), "op": op}
    req.update(VALID[op])
    if op == "submit":
        req["key"] = draw(st.text(min_size=1, max_size=30))
        req["bad"] = draw(st.text(min_size=1, max_size=50)) + " bad"
    field = draw(st.sampled_from([*sorted(req), "<new>"]))
    how = draw(st.sampled_from(["replace", "delete", "huge"]))
    if field == "<new>":
        req[draw(st.text(max_size=10))] = draw(json_values)
    elif how == "delete":
        del req[field]
    elif how == "huge":
        req[field] = draw(
            st.sampled_from(["x" * (MAX_DRAFT + 1), "y" * (MAX_MESSAGE // 2), 10**300, [[[[]]]] * 1000])
        )
    else:
        req[field] = draw(json_values | strings)
    if op == "watch":  # pragma: no cover - never drawn: a watch stream owns its connection
        raise AssertionError
    return json.dumps(req, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "dict":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"v":1,"id":1,"op":"submit","bad":' + b"[" * depth + b"]" * depth + b',"good":"g"}'


# --- the fuzz tests -------------------------------------------------------------------------------


@FUZZ
@given(payload=st.binary(max_size=2048), newlines=st.lists(st.integers(0, 2048), max_size=6))
def test_random_bytes(live: Conn, payload: bytes, newlines: list[int]) -> None:
    b = bytearray(payload)
    for i in sorted(newlines, reverse=True):
        b[min(i, len(b)) : min(i, len(b))] = b"\n"
    exchange(live, bytes(b))


@FUZZ
@given(value=json_values)
def test_random_json(live: Conn, value: Any) -> None:
    exchange(live, json.dumps(value).encode())


@FUZZ
@given(line=corrupted_requests())
def test_valid_request_with_one_field_corrupted(live: Conn, line: bytes) -> None:
    exchange(live, line)


@FUZZ
@given(
    lines=st.lists(
        corrupted_requests() | st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")), max_size=40
    ),
    splits=st.lists(st.integers(0, 20_000), max_size=30),
    crlf=st.booleans(),
)
def test_many_lines_one_write_and_split_writes(
    live: Conn, lines: list[bytes], splits: list[int], crlf: bool
) -> None:
    exchange(live, b"".join(x + (b"\r\n" if crlf else b"\n") for x in lines), splits)


@settings(FUZZ, max_examples=max(20, EXAMPLES // 10))
@given(
    kind=st.sampled_from(["list", "dict", "field"]),
    depth=st.integers(1, 30_000),
    size=st.integers(0, MAX_MESSAGE * 3),
    over=st.booleans(),
)
def test_huge_and_deeply_nested(live: Conn, kind: str, depth: int, size: int, over: bool) -> None:
    exchange(live, nested(depth, kind)[:MAX_MESSAGE])
    body = b'{"v":1,"id":2,"op":"submit","bad":"' + b"b" * size + b'","good":"g"}'
    exchange(live, body if over else body[: MAX_MESSAGE - 1])


@pytest.mark.parametrize("field", ["id", "bad", "good", "key", "prompt", "job_id"])
def test_lone_surrogate_is_refused_and_the_daemon_lives(make_daemon: Any, field: str) -> None:
    """JSON can escape a lone surrogate (``"\\ud800"``), which is no Unicode character and cannot be
    encoded as UTF-8 (SQLite, the response line). Each must be refused with a client error on an open
    connection; found by this file: a draft or key with one killed the daemon, an id one dropped the
    connection without an answer."""
    d = make_daemon({"scheduler": {"min_pairs": 1000}})
    conn = Conn(d.socket)
    req: dict[str, Any] = {"v": 1, "id": 7, "op": "job" if field == "job_id" else "submit"}
    if req["op"] == "submit":
        req.update(bad="a bad one", good="a good one", key="surrogate-key")
    req[field] = "x\ud800y"
    try:
        (answer,) = exchange(conn, json.dumps(req).encode())
    except (AssertionError, OSError) as e:
        conn.close()
        alive = _still_serving(d)
        raise AssertionError(
            f"no answer to a lone surrogate in {field!r} ({e}); the daemon "
            + ("still serves others" if alive else "DIED:\n" + d.log_text()[-1500:])
        ) from None
    conn.close()
    assert answer["ok"] is False, answer  # and not "internal" (checked by exchange)
    assert answer["error"]["code"] in ("bad_request", "invalid_json", "not_found"), answer


def _still_serving(d: DaemonProc) -> bool:
    try:
        with d.client(timeout=5) as c:
            c.ping()
        return True
    except Exception:
        assert d.proc is not None
        d.proc.wait(10)  # it is going down: let it finish, so that its log is complete
        return False
