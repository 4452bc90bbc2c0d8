"""Resource limits against a real daemon: message and draft size at their boundaries, idle and slow
clients, max connections, and a flood (hundreds of connections, a client that never reads, connection
churn) that must not push a well-behaved client's submit-ack p99 above a bound."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from beagled.client import Client
from tests.attacks import P99_BOUND_S
from tests.daemon_proc import DaemonProc, poll

MAX_MSG = 8192
MAX_DRAFT = 2048


def line(**kw: Any) -> bytes:
    return (json.dumps({"v": 1, "id": 1, **kw}, ensure_ascii=False) + "\n").encode()


def connect(d: DaemonProc, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(d.socket))
    return s


def read_all(s: socket.socket) -> list[dict[str, Any]]:
    """Read until the daemon closes the connection (a reset here would lose its last answer)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def read_n(s: socket.socket, n: int) -> list[dict[str, Any]]:
    data = b""
    while data.count(b"\n") < n:
        chunk = s.recv(65536)
        assert chunk, "closed early"
        data += chunk
    return [json.loads(x) for x in data.splitlines() if x.strip()]


@pytest.fixture
def small(make_daemon: Any) -> DaemonProc:
    return make_daemon(  # type: ignore[no-any-return]
        {
            "daemon": {"max_message_bytes": MAX_MSG, "max_draft_bytes": MAX_DRAFT, "idle_timeout_s": 1.0},
            "scheduler": {"min_pairs": 100_000},
        }
    )


def test_message_size_boundary_and_the_error_is_readable(small: DaemonProc) -> None:
    ping = b'{"v":1,"id":1,"op":"ping"}'
    with connect(small) as s:  # exactly the limit (newline excluded) is served, on an open connection
        s.sendall(ping + b" " * (MAX_MSG - len(ping)) + b"\n")
        (r,) = read_n(s, 1)
        assert r["ok"] is True
        s.sendall(ping + b"\n")
        assert read_n(s, 1)[0]["ok"] is True
    with connect(small) as s:  # one byte over: too_large, then closed
        s.sendall(ping + b" " * (MAX_MSG - len(ping) + 1) + b"\n")
        (r,) = read_all(s)
        assert r["error"]["code"] == "too_large"
    # far over the limit, still being sent when the daemon closes: the answer must still arrive
    # (closing with unread input used to reset the connection and lose it)
    for _ in range(5):
        with connect(small) as s:
            s.sendall(b'{"v":1,"id":1,"op":"submit","bad":"' + b"x" * (20 * MAX_MSG))
            s.shutdown(socket.SHUT_WR)
            (r,) = read_all(s)
            assert r["error"]["code"] == "too_large"
    with small.client() as c:
        assert c.ping()


def test_draft_size_boundary_counts_bytes(small: DaemonProc) -> None:
    with connect(small) as s:
        ok_draft = "é" * (MAX_DRAFT // 2)  # 2 bytes each: exactly the limit
        s.sendall(line(op="submit", bad=ok_draft, good="g"))
        s.sendall(line(op="submit", bad=ok_draft + "x", good="g"))
        s.sendall(line(op="submit", bad="b", good="g", prompt="p" * (MAX_DRAFT + 1)))
        s.sendall(line(op="ping"))
        a, b, c, d = read_n(s, 4)
    assert a["ok"] is True
    assert b["error"]["code"] == "too_large" and c["error"]["code"] == "too_large"
    assert d["ok"] is True  # a too-large draft does not close the connection


def test_a_slow_but_active_writer_is_not_idle(small: DaemonProc) -> None:
    req = line(op="ping")
    with connect(small) as s:
        started = time.monotonic()
        for b in req:  # one byte every 0.1 s: 3 s in all, with a 1 s idle timeout
            s.sendall(bytes([b]))
            time.sleep(0.1)  # the slowness is the stimulus
        (r,) = read_n(s, 1)
        assert r["ok"] is True and time.monotonic() - started > 1.0
        assert s.recv(1) == b""  # and then, idle, it is closed


def test_a_slow_reader_gets_everything(small: DaemonProc) -> None:
    n = 300
    with connect(small, timeout=30) as s, small.client(timeout=5) as other:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"".join(line(op="status") for _ in range(n)))
        data = b""
        next_probe = 0
        while (got := data.count(b"\n")) < n:
            chunk = s.recv(2048)
            assert chunk, f"dropped after {got} answers"
            data += chunk
            time.sleep(0.002)  # a slow consumer, still well within write_timeout_s
            if got >= next_probe:  # meanwhile another client is served promptly
                # answered while this very thread leaves the slow reader's answers unread: a daemon that
                # served the other client behind it would never answer (the client's timeout fails it)
                other.ping()
                next_probe += 50
    assert all(json.loads(x)["ok"] for x in data.splitlines())


def test_connections_over_the_limit_are_refused_then_freed(make_daemon: Any) -> None:
    d = make_daemon({"daemon": {"max_connections": 50}})
    held = [connect(d) for _ in range(50)]
    try:
        poll(lambda: _ping_code(d) == "unavailable", 10, what="the 51st connection is refused")
    finally:
        for s in held:
            s.close()
    poll(lambda: _ping_code(d) == "ok", 10, what="slots free again")


def _ping_code(d: DaemonProc) -> str:
    with connect(d) as s:
        s.sendall(line(op="ping"))
        (r,) = read_n(s, 1)
        return "ok" if r["ok"] else str(r["error"]["code"])


FLOOD = r"""
import socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
def conn(blocking=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.setblocking(blocking)
    return s
hog = conn(False)  # never reads: pipelines status requests until the daemon stops reading or drops it
hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
held = []
for i in range(n):  # hundreds of connections: idle, or holding a partial line forever
    try:
        s = conn()
        if i % 2:
            s.sendall(b'{"v":1,"id":1,"op":"sta')
        held.append(s)
    except OSError:
        pass
print("ready", len(held), flush=True)
burst = b'{"v":1,"id":1,"op":"status"}\n' * 64
while True:
    try:
        hog.send(burst)
    except BlockingIOError:
        pass
    except OSError:
        hog = conn(False)
    try:  # churn: connect, ask, hang up without reading (about 200 a second)
        s = conn()
        s.sendall(b'{"v":1,"id":1,"op":"ping"}\n')
        s.close()
    except OSError:
        pass
    time.sleep(0.005)
"""


def submit_p99(c: Client, tag: str, n: int = 200) -> float:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        c.submit(bad=f"{tag} bad {i}", good=f"{tag} good {i}", key=f"{tag}-{i}")
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[int(0.99 * (n - 1))]


@pytest.mark.slow
def test_flood_does_not_slow_a_well_behaved_client(make_daemon: Any) -> None:
    d = make_daemon({"daemon": {"write_timeout_s": 2.0}, "scheduler": {"min_pairs": 100_000}})
    with d.client(timeout=10) as c:
        c.ping()
        submit_p99(c, "warm", 20)
        quiet = submit_p99(c, "quiet")
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, str(d.socket), "400"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert flood.stdout is not None
            ready = flood.stdout.readline().split()
            assert ready[0] == "ready" and int(ready[1]) >= 200, ready
            loaded = submit_p99(c, "flood")
            assert flood.poll() is None
        finally:
            flood.kill()
            flood.wait()
            if flood.stdout is not None:
                flood.stdout.close()
    print(f"\nsubmit ack p99: {quiet * 1000:.1f} ms quiet, {loaded * 1000:.1f} ms during the flood")
    # Every ack above came while the flood held its connections (the flood is still alive): nobody is
    # starved. The latency bound is a speed target, measured on a quiet machine, not on whatever load
    # shares this one: BEAGLED_P99_BOUND_MS=50 turns it on (docs/reliability.md).
    if P99_BOUND_S is not None:
        assert loaded < max(P99_BOUND_S, 3 * quiet), (quiet, loaded)
    poll(lambda: _ping_code(d) == "ok", 15, what="the flood's connections are gone")
