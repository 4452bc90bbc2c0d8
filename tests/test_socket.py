"""The socket protocol against a real daemon process: every op, pipelining, every bad input, limits."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Any

import pytest

from beagled.client import Client, DaemonNotRunning
from beagled.errors import BadRequest, NotFound
from tests.daemon_proc import DaemonProc, poll


def raw(d: DaemonProc, payload: bytes, *, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send raw bytes, read ``n`` response lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(d.socket))
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.split(b"\n") if line]


def req(**kw: Any) -> bytes:
    return (json.dumps({"v": 1, "id": 1, **kw}) + "\n").encode()


def test_ping_and_every_op(daemon: DaemonProc) -> None:
    with daemon.client() as c:
        assert c.ping()["version"]
        r = c.submit(bad="a plain draft", good="a draft in my voice", voice="alice")
        assert r["duplicate"] is False and r["pair_id"].startswith("p-") and r["seq"] >= 1
        st = c.status()
        assert st["event_seq"] >= 1 and st["paused"] is False and "queued" in st["jobs"]
        assert st["voices"]["alice"]["pending_pairs"] + st["voices"]["alice"]["heldout_pairs"] == 1
        assert [b["name"] for b in st["backends"]] == ["fake"]
        voices = c.voices()["voices"]
        assert voices[0]["voice"] == "alice" and "served_name" in voices[0]
        assert c.pause() == {"paused": True}
        assert c.status()["paused"] is True
        assert c.resume() == {"paused": False}
        assert c.jobs()["jobs"] == []
        with pytest.raises(NotFound):
            c.job("j-nope")
        with pytest.raises(NotFound):
            c.rollback("alice")
        with pytest.raises(NotFound):
            c.train("nobody")


def test_duplicate_by_key_and_by_content_survive_restart(daemon: DaemonProc) -> None:
    with daemon.client() as c:
        first = c.submit(bad="b1", good="g1", key="loop-1")
        again = c.submit(bad="b1", good="g1", key="loop-1")
        assert again == {**first, "duplicate": True}
        other = c.pipeline([("submit", {"bad": "other", "good": "text", "key": "loop-1"})])[0]
        assert other["error"]["code"] == "conflict" and first["pair_id"] in other["error"]["message"]
        by_content = c.submit(bad="b2", good="g2")
        assert c.submit(bad="b2", good="g2") == {**by_content, "duplicate": True}
        assert c.submit(bad="b2", good="g2", voice="other")["duplicate"] is False
        chat = [{"role": "user", "content": "Write to Ana."}]
        talk = c.submit(bad="b3", good="g3", key="loop-3", messages=chat, system="You are Bea.")
        assert c.submit(bad="b3", good="g3", key="loop-3", messages=chat, system="You are Bea.") == {
            **talk,
            "duplicate": True,
        }
        for changed in ({"messages": [{"role": "user", "content": "Write to Ben."}]}, {"system": "Holt."}):
            fields = {"bad": "b3", "good": "g3", "key": "loop-3", "messages": chat, "system": "You are Bea."}
            got = c.pipeline([("submit", {**fields, **changed})])[0]
            assert got["error"]["code"] == "conflict" and talk["pair_id"] in got["error"]["message"]
    daemon.kill()
    daemon.start()
    with daemon.client() as c:
        assert c.submit(bad="b1", good="g1", key="loop-1") == {**first, "duplicate": True}
        assert c.submit(bad="b2", good="g2") == {**by_content, "duplicate": True}
        again = c.submit(bad="b3", good="g3", key="loop-3", messages=chat, system="You are Bea.")
        assert again == {**talk, "duplicate": True}
        other = c.pipeline([("submit", {"bad": "b3", "good": "g3", "key": "loop-3", "messages": chat})])[0]
        assert other["error"]["code"] == "conflict"


def test_pipelined_requests_answered_in_order(daemon: DaemonProc) -> None:
    lines = b"".join(
        (json.dumps({"v": 1, "id": i, "op": op, **f}) + "\n").encode()
        for i, (op, f) in enumerate(
            [("ping", {})]
            + [("submit", {"bad": f"b{i}", "good": f"g{i}"}) for i in range(40)]
            + [("status", {})]
        )
    )
    out = raw(daemon, lines, n=42)
    assert [r["id"] for r in out] == list(range(42))
    assert all(r["ok"] for r in out)
    seqs = [r["result"]["seq"] for r in out[1:41]]
    assert len(set(seqs)) == 40


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"this is not json\n", "invalid_json"),
        (b"\xff\xfe{}\n", "invalid_json"),
        (b"[1, 2]\n", "bad_request"),
        (b'{"v": 1, "id": 1}\n', "bad_request"),
        (req(op="dance"), "unknown_op"),
        (b'{"v": 2, "id": 1, "op": "ping"}\n', "unsupported_version"),
        (b'{"v": 1, "id": [1], "op": "ping"}\n', "bad_request"),
        (b'{"v": 1, "id": 1.5, "op": "ping"}\n', "bad_request"),
        (req(op="submit", bad=1, good="x"), "bad_request"),
        (req(op="submit", bad="", good="x"), "bad_request"),
        (req(op="submit", bad="x", good="x"), "bad_request"),
        (req(op="submit", bad="x", good="y", voice="a/b"), "bad_request"),
        (req(op="submit", bad="x", good="y", voice=".."), "bad_request"),
        (req(op="submit", bad="x", good="y", voice="Alice"), "bad_request"),
        (req(op="submit", bad="x", good="y", voice="a" * 65), "bad_request"),
        (req(op="submit", bad="x", good="y", unknown=1), "bad_request"),
        (req(op="submit", bad="x", good="y", key="k" * 201), "bad_request"),
        (req(op="submit", bad="x", good="y", quality={"before": "no"}), "bad_request"),
        (req(op="submit", bad="x" * 262_145, good="y"), "too_large"),
        (req(op="jobs", limit="ten"), "bad_request"),
        (req(op="jobs", state="sleeping"), "bad_request"),
        (req(op="job"), "bad_request"),
        (req(op="job", job_id="j-unknown"), "not_found"),
        (req(op="rollback", voice="nobody"), "not_found"),
        (req(op="rollback", voice="x", to="j-unknown"), "not_found"),
    ],
)
def test_bad_input_gets_its_code_and_changes_nothing(daemon: DaemonProc, payload: bytes, code: str) -> None:
    with daemon.client() as c:
        if code == "not_found" and b"rollback" in payload and b'"x"' in payload:
            c.submit(bad="p", good="q", voice="x")
        before = c.status()["event_seq"]
    (resp,) = raw(daemon, payload)
    assert resp["ok"] is False
    assert resp["error"]["code"] == code, resp
    assert resp["error"]["message"]
    with daemon.client() as c:
        assert c.status()["event_seq"] == before
        assert c.ping()


def test_oversized_line_closes_only_that_connection(make_daemon: Any) -> None:
    d = make_daemon({"daemon": {"max_message_bytes": 4096, "max_draft_bytes": 1024}})
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.socket))
        s.sendall(b'{"v":1,"id":1,"op":"ping"}\n' + b"x" * 5000)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        lines = [json.loads(x) for x in data.splitlines()]
        assert lines[0]["ok"] is True
        assert lines[1]["error"]["code"] == "too_large"
    with d.client() as c:
        assert c.ping()


def test_socket_is_private(daemon: DaemonProc) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) & 0o077 == 0


def test_idle_client_is_disconnected(make_daemon: Any) -> None:
    d = make_daemon({"daemon": {"idle_timeout_s": 0.5}})
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.socket))
        started = time.monotonic()
        assert s.recv(1) == b""  # closed by the daemon
        assert time.monotonic() - started < 5


def non_reader(d: DaemonProc) -> socket.socket:
    """A connection that will never read: a small receive buffer, non-blocking sends."""
    hog = socket.socket(socket.AF_UNIX)
    hog.connect(str(d.socket))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setblocking(False)
    return hog


def test_client_that_never_reads_is_dropped_and_others_unaffected(make_daemon: Any) -> None:
    d = make_daemon({"daemon": {"write_timeout_s": 1.0}})
    hog = non_reader(d)
    line = req(op="status")
    sent = 0
    try:  # keep asking without reading until the daemon stops reading from us or drops us
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sent += hog.send(line * 64)
            except BlockingIOError:
                with d.client(timeout=5) as c:  # meanwhile everyone else is served
                    c.submit(bad=f"b{sent}", good=f"g{sent}")
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the daemon kept a client that never reads")
    finally:
        hog.close()
    with d.client() as c:
        assert c.ping()


def test_a_stalled_reader_never_holds_others_up(make_daemon: Any) -> None:
    """With a write timeout longer than the test, the stalled client is never dropped while we ask: a
    daemon that served others behind it would not answer at all (the client's timeout fails it)."""
    d = make_daemon({"daemon": {"write_timeout_s": 600.0}})
    hog = non_reader(d)
    line = req(op="status")
    try:
        stalled = 0
        while stalled < 5:
            try:
                hog.send(line * 64)
            except BlockingIOError:  # the daemon stopped reading from the hog: it is stalled on us
                stalled += 1
                with d.client(timeout=10) as c:
                    c.submit(bad=f"b{stalled}", good=f"g{stalled}")
                    assert c.ping()
                time.sleep(0.05)  # let the daemon try to write to the hog again
    finally:
        hog.close()


def test_max_connections(make_daemon: Any) -> None:
    d = make_daemon({"daemon": {"max_connections": 3}})
    held = []
    try:
        for _ in range(3):
            c = Client(d.socket)
            c.ping()
            held.append(c)
        (resp,) = raw(d, req(op="ping"))
        assert resp["error"]["code"] == "unavailable"
    finally:
        for c in held:
            c.close()
    poll(lambda: raw(d, req(op="ping"))[0]["ok"], 10, what="a slot frees up")


def test_not_running_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(DaemonNotRunning, match="not running"):
        Client(tmp_path / "nope.sock").ping()


def test_sigterm_exits_zero_quickly_and_keeps_acknowledged_pairs(daemon: DaemonProc) -> None:
    with daemon.client() as c:
        acked = [c.submit(bad=f"b{i}", good=f"g{i}", key=f"k{i}") for i in range(20)]
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - t0 < 10
    daemon.start()
    with daemon.client() as c:
        for i, a in enumerate(acked):
            assert c.submit(bad=f"b{i}", good=f"g{i}", key=f"k{i}") == {**a, "duplicate": True}


def test_watch_streams_events_live_and_from_seq(daemon: DaemonProc) -> None:
    with daemon.client() as c:
        first = c.submit(bad="w1", good="w2")
        stream = c.watch(from_seq=0)
        got = next(stream)
        assert got["event"]["seq"] == first["seq"] and got["event"]["type"] == "PairSubmitted"
        assert "bad" not in got["event"]["data"]  # drafts stay out of the stream
        with daemon.client() as c2:
            second = c2.submit(bad="w3", good="w4")
        got = next(stream)
        assert got["event"]["seq"] == second["seq"]
        stream.close()


def test_client_errors_carry_the_daemon_message(daemon: DaemonProc) -> None:
    with daemon.client() as c, pytest.raises(BadRequest, match="same draft"):
        c.submit(bad="same", good="same")


def _watch_once(d: DaemonProc) -> bool:
    """A watch client that reads its first line and closes for good: True if the watch was accepted."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.socket))
        s.sendall(b'{"v": 1, "id": 1, "op": "watch", "from_seq": 0}\n')
        first = json.loads(s.recv(65536).split(b"\n")[0])
    return "event" in first


def test_closed_watch_clients_are_noticed_on_a_quiet_daemon(make_daemon: Any) -> None:
    # a closed watch was noticed only at the next line written to it: on a quiet daemon (one event, then
    # nothing) closed watches kept counting against max_watches, and every new watch was refused
    d = make_daemon({"daemon": {"max_watches": 3, "max_watches_per_uid": 3}})
    with d.client() as c:
        c.submit(bad="a", good="b")
    for _ in range(9):  # three times the cap, one after another, each closed after its first line
        poll(lambda: _watch_once(d), 15, what="a watch accepted")
    poll(lambda: "client closed the connection" in d.log_text(), 10, what="the closes logged")
    assert "Traceback" not in d.log_text()
