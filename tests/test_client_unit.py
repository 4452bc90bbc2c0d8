"""The client and beaglectl against a fake daemon: a real AF_UNIX socket speaking protocol v1 lines.

The fake answers from a table of canned results and records every request it read, so the tests see
exactly what went over the wire. End-to-end tests against the real daemon live elsewhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import trio

from beagled import config, ctl, errors, paths, protocol
from beagled.client import (
    AsyncClient,
    Client,
    ClientProtocol,
    ConnectionLost,
    DaemonNotRunning,
    ProtocolError,
    RequestTimeout,
    _Ops,
    default_socket_path,
    raise_for_response,
)

Handler = Callable[[dict[str, Any], "Conn"], None]


class Conn:
    """One accepted connection of the fake daemon."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def ok(self, request: dict[str, Any], result: dict[str, Any]) -> None:
        self.send({"v": 1, "id": request.get("id"), "ok": True, "result": result})

    def fail(self, request: dict[str, Any], code: str, message: str) -> None:
        self.send({"v": 1, "id": request.get("id"), "ok": False, "error": {"code": code, "message": message}})


class FakeDaemon:
    """A thread serving protocol lines on a Unix socket; ``results[op]`` answers an op."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, tuple[str, str]] = {}
        self.handlers: dict[str, Handler] = {}
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.batch = 1  # answer only after this many requests arrived (proves pipelining)
        self.stream: list[dict[str, Any]] = []  # what `watch` sends before closing
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self.connections += 1
                self._socks.append(sock)
                t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                t.start()
                self._threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        conn = Conn(sock)
        pending: list[dict[str, Any]] = []
        try:
            with sock.makefile("rb") as lines:
                for line in lines:
                    try:
                        request = json.loads(line)
                    except ValueError:
                        conn.send(
                            {
                                "v": 1,
                                "id": None,
                                "ok": False,
                                "error": {"code": "invalid_json", "message": "not JSON"},
                            }
                        )
                        continue
                    self.requests.append(request)
                    pending.append(request)
                    if len(pending) < self.batch:
                        continue
                    for req in pending:
                        if not self._answer(req, conn):
                            return
                    pending.clear()
        except OSError:
            pass
        finally:
            sock.close()

    def _answer(self, request: dict[str, Any], conn: Conn) -> bool:
        op = request.get("op", "")
        if op in self.handlers:
            self.handlers[op](request, conn)
            return True
        if op == "watch":
            for message in self.stream:
                conn.send({"v": 1, "id": request["id"], "ok": True, **message})
            return False  # close: the stream ends
        if op in self.errors:
            conn.fail(request, *self.errors[op])
        elif op in self.results:
            conn.ok(request, self.results[op])
        else:
            conn.fail(request, "unknown_op", f"unknown op {op!r}")
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self._listener.close()
        self._accept.join(timeout=5)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=5)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="bgc")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sockdir: Path) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(str(sockdir / "beagled.sock"))
    daemon.results = {
        "ping": {"version": "0.1.0", "uptime_s": 3725.0},
        "submit": {"pair_id": "p-1", "seq": 7, "duplicate": False},
        "status": STATUS,
        "jobs": {"jobs": JOBS},
        "job": {"job": JOBS[0]},
        "voices": {"voices": VOICES},
        "train": {"job_id": "j-3"},
        "rollback": {"job_id": "j-1"},
        "pause": {"paused": True},
        "resume": {"paused": False},
    }
    yield daemon
    daemon.close()


STATUS: dict[str, Any] = {
    "event_seq": 42,
    "paused": False,
    "jobs": {"queued": 1, "training": 1, "reloaded": 3, "failed": 0},
    "voices": {
        "default": {"version": 7, "served_name": "default-v0007", "pending_pairs": 2, "current_job": "j-1"}
    },
    "backends": [
        {"name": "mlx", "available": True, "reason": ""},
        {"name": "peft", "available": False, "reason": "torch is not installed"},
    ],
}
JOBS: list[dict[str, Any]] = [
    {
        "job_id": "j-2",
        "voice": "default",
        "state": "training",
        "attempt": 1,
        "backend": "mlx",
        "pairs": ["p-1", "p-2", "p-3", "p-4"],
        "created_at": 0,
        "updated_at": 60,
        "error": None,
    },
    {
        "job_id": "j-1",
        "voice": "poetry",
        "state": "failed",
        "attempt": 3,
        "backend": "peft",
        "pairs": 12,
        "created_at": "1970-01-01T00:00:00Z",
        "updated_at": "1970-01-01T00:02:00+00:00",
        "error": "boom\x1b[31m",
    },
]
VOICES: list[dict[str, Any]] = [
    {
        "voice": "default",
        "current_job": "j-1",
        "version": 7,
        "pending_pairs": 2,
        "adapter_path": "/s/voices/default/v0007",
        "served_name": "default-v0007",
    }
]


# --- pure formatting ----------------------------------------------------------------------------


def test_format_jobs_aligns_columns_and_counts_pairs() -> None:
    text = ctl.format_jobs(JOBS, tz=UTC)
    lines = text.splitlines()
    assert lines[0].split() == ["JOB", "VOICE", "STATE", "ATTEMPT", "BACKEND", "PAIRS", "UPDATED", "ERROR"]
    # every column starts at the same offset on every row
    assert lines[1].index("default") == lines[2].index("poetry") == lines[0].index("VOICE")
    assert lines[1].index("training") == lines[0].index("STATE")
    assert " 4 " in lines[1]  # a list of pair ids is shown by its length
    assert " 12 " in lines[2]
    assert "1970-01-01 00:01:00" in lines[1]  # epoch seconds
    assert "1970-01-01 00:02:00" in lines[2]  # ISO 8601
    assert "\x1b" not in text  # control characters from the daemon never reach the terminal raw
    assert "boom\\x1b[31m" in lines[2]


def test_format_jobs_empty() -> None:
    assert ctl.format_jobs([]) == "no jobs"


def test_format_status_has_every_section() -> None:
    text = ctl.format_status(STATUS)
    assert "event seq  42" in text
    assert "paused     no" in text
    assert "queued 1, training 1, reloaded 3" in text
    assert "failed" not in text  # zero counts are left out
    assert "default-v0007" in text
    voice_line = next(line for line in text.splitlines() if "default-v0007" in line)
    assert voice_line.split() == ["default", "7", "default-v0007", "2", "j-1"]
    peft = next(line for line in text.splitlines() if "peft" in line)
    assert peft.split()[:2] == ["peft", "no"]
    assert "torch is not installed" in peft
    mlx = next(line for line in text.splitlines() if line.strip().startswith("mlx"))
    assert mlx.split() == ["mlx", "yes"]


def test_format_status_tolerates_missing_keys() -> None:
    text = ctl.format_status({})
    assert "jobs       none" in text
    assert "voices     none" in text
    assert "backends   none" in text


def test_format_job_shows_history() -> None:
    job = dict(JOBS[0], history=[{"at": 0, "state": "queued"}, {"at": 30, "state": "training", "attempt": 1}])
    text = ctl.format_job(job, tz=UTC)
    assert "job_id      j-2" in text
    assert "1970-01-01 00:00:30  training  attempt=1" in text


def test_format_job_says_when_it_waits_for_its_executor() -> None:
    outage = {"executor": "ray", "error": "ray at h:1 is unreachable", "since": 60, "retry_at": 64}
    text = ctl.format_job(dict(JOBS[0], waiting_for_executor=outage), tz=UTC)
    assert "waiting_for_executor  ray since 1970-01-01 00:01:00: ray at h:1 is unreachable" in text


def test_pause_cancel_running_and_delete_force_flags() -> None:
    parser = ctl._build_parser()
    assert parser.parse_args(["pause", "--cancel-running"]).cancel_running is True
    assert parser.parse_args(["pause", "v"]).cancel_running is False
    assert parser.parse_args(["delete", "v", "--force"]).force is True


def test_format_voices() -> None:
    text = ctl.format_voices(VOICES)
    assert text.splitlines()[1].split() == [
        "default",
        "7",
        "default-v0007",
        "2",
        "j-1",
        "/s/voices/default/v0007",
    ]
    assert ctl.format_voices([]) == "no voices"


def test_render_progress_full() -> None:
    line = ctl.render_progress(
        {"job_id": "j-2", "step": 25, "total": 100, "loss": 1.23456, "tokens_per_s": 2500, "eta_s": 65}, 80
    )
    assert line.startswith("j-2 [")
    assert "25/100" in line
    assert "loss 1.2346" in line
    assert "2.5k tok/s" in line
    assert "ETA 1m05s" in line
    bar = line[line.index("[") + 1 : line.index("]")]
    assert bar.count("#") == len(bar) // 4
    assert len(line) <= 80


@pytest.mark.parametrize("width", [20, 30, 40, 60, 120])
def test_render_progress_fits_width(width: int) -> None:
    line = ctl.render_progress({"job_id": "job-" + "x" * 30, "step": 1, "total": 3, "loss": 2.0}, width)
    assert len(line) <= width


def test_render_progress_missing_keys() -> None:
    assert ctl.render_progress({}, 80) == "?"
    assert ctl.render_progress({"job_id": "j", "step": 5}, 80) == "j step 5"
    # ETA from elapsed time when the daemon does not give one
    line = ctl.render_progress({"job_id": "j", "step": 10, "total": 40, "elapsed_s": 20}, 80)
    assert "ETA 1m00s" in line
    assert "[" in line


def test_render_progress_clamps_bar() -> None:
    line = ctl.render_progress({"job_id": "j", "step": 150, "total": 100}, 60)
    bar = line[line.index("[") + 1 : line.index("]")]
    assert set(bar) == {"#"}


def test_progress_tracker_estimates_eta() -> None:
    tracker = ctl.ProgressTracker()
    first = tracker.update({"job_id": "j", "step": 10, "total": 110}, now=100.0)
    assert "eta_s" not in first
    later = tracker.update({"job_id": "j", "step": 20, "total": 110}, now=110.0)
    assert later["eta_s"] == pytest.approx(90.0)  # 1 step/s, 90 left
    given = tracker.update({"job_id": "j", "step": 30, "total": 110, "eta_s": 5}, now=120.0)
    assert given["eta_s"] == 5


def test_format_event_line() -> None:
    event = {
        "seq": 9,
        "type": "job_state",
        "at": 3661,
        "data": {"job_id": "j-2", "voice": "default", "state": "trained", "bad": "x" * 500, "loss": 0.5},
    }
    line = ctl.format_event(event, tz=UTC)
    assert line.startswith("01:01:01 #9 job_state")
    assert "job=j-2 voice=default state=trained loss=0.5" in line
    assert "xxx" not in line  # drafts are not dumped into the event stream
    assert ctl.format_event({}).startswith("- #-")


def test_progress_board_tty_redraws_in_place() -> None:
    out = io.StringIO()
    board = ctl.ProgressBoard(out, tty=True, width=60, tz=UTC)
    board.progress({"job_id": "a", "step": 1, "total": 10}, now=0.0)
    board.progress({"job_id": "b", "step": 1, "total": 10}, now=0.0)
    board.progress({"job_id": "a", "step": 2, "total": 10}, now=1.0)
    board.event({"seq": 1, "type": "job_trained", "at": 0, "data": {"job_id": "a"}})
    board.close()
    text = out.getvalue()
    assert "\r" in text
    assert "\x1b[1A\x1b[J" in text  # two bars: up one line, erase, redraw
    assert list(board.bars) == ["b"]  # a finished job's bar goes away
    assert text.endswith("\n")


def test_progress_board_plain_lines_when_not_tty() -> None:
    out = io.StringIO()
    board = ctl.ProgressBoard(out, tty=False, width=60, tz=UTC)
    board.progress({"job_id": "a", "step": 1, "total": 10}, now=0.0)
    board.event({"seq": 1, "type": "x", "at": 0, "data": {}})
    board.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("a [")
    assert "\r" not in out.getvalue()
    assert "\x1b" not in out.getvalue()


# --- submit input parsing -----------------------------------------------------------------------


def test_parse_submission_valid() -> None:
    data = ctl.parse_submission(
        '{"bad": "a", "good": "b", "voice": "v", "quality": {"before": 1, "after": 2}}'
    )
    assert data == {"bad": "a", "good": "b", "voice": "v", "quality": {"before": 1, "after": 2}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no input"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"bad": "a"}', '"good"'),
        ('{"bad": "a", "good": 3}', '"good"'),
        ('{"bad": "a", "good": "b", "vioce": "x"}', "vioce"),
        ('{"bad": "a", "good": "b", "voice": 1}', '"voice"'),
        ('{"bad": "a", "good": "b", "quality": 1}', '"quality"'),
    ],
)
def test_parse_submission_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ctl.UsageError) as info:
        ctl.parse_submission(text)
    assert fragment in str(info.value)


# --- the blocking client ------------------------------------------------------------------------


def test_requests_reuse_one_connection_with_increasing_ids(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        assert client.ping() == {"version": "0.1.0", "uptime_s": 3725.0}
        assert client.submit("bad", "good", key="k1") == {"pair_id": "p-1", "seq": 7, "duplicate": False}
        client.jobs(voice="default", limit=5)
        client.rollback("default")
    assert fake.connections == 1
    assert [r["id"] for r in fake.requests] == [1, 2, 3, 4]
    assert all(r["v"] == 1 for r in fake.requests)
    # None fields are left out; defaults are sent
    assert fake.requests[1] == {
        "v": 1,
        "id": 2,
        "op": "submit",
        "voice": "default",
        "bad": "bad",
        "good": "good",
        "key": "k1",
    }
    assert fake.requests[2] == {"v": 1, "id": 3, "op": "jobs", "voice": "default", "limit": 5}
    assert fake.requests[3] == {"v": 1, "id": 4, "op": "rollback", "voice": "default"}


def test_every_convenience_method(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        assert client.status() == STATUS
        assert client.jobs()["jobs"] == JOBS
        assert client.job("j-2")["job"] == JOBS[0]
        assert client.voices()["voices"] == VOICES
        assert client.train("default") == {"job_id": "j-3"}
        assert client.rollback("default", to="j-1") == {"job_id": "j-1"}
        assert client.pause() == {"paused": True}
        assert client.resume() == {"paused": False}
        client.submit("a", "b", voice="v", prompt="p", quality={"before": 1.0, "after": 2.0})
    ops = [(r["op"], {k: v for k, v in r.items() if k not in ("v", "id", "op")}) for r in fake.requests]
    assert ops == [
        ("status", {}),
        ("jobs", {}),
        ("job", {"job_id": "j-2"}),
        ("voices", {}),
        ("train", {"voice": "default"}),
        ("rollback", {"voice": "default", "to": "j-1"}),
        ("pause", {}),
        ("resume", {}),
        (
            "submit",
            {"voice": "v", "bad": "a", "good": "b", "prompt": "p", "quality": {"before": 1.0, "after": 2.0}},
        ),
    ]


def test_unicode_round_trip(fake: FakeDaemon) -> None:
    fake.handlers["submit"] = lambda req, conn: conn.ok(req, {"echo": req["good"]})
    with Client(fake.path) as client:
        assert (
            client.request("submit", bad="a", good="naïve — 日本語 \u2028 line")["echo"]
            == "naïve — 日本語 \u2028 line"
        )


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_json", errors.InvalidJSON),
        ("bad_request", errors.BadRequest),
        ("unknown_op", errors.UnknownOp),
        ("unsupported_version", errors.UnsupportedVersion),
        ("too_large", errors.TooLarge),
        ("forbidden", errors.Forbidden),
        ("not_found", errors.NotFound),
        ("conflict", errors.Conflict),
        ("unavailable", errors.Unavailable),
        ("internal", errors.BeagledError),
        ("brand_new_code", errors.BeagledError),
    ],
)
def test_error_code_maps_to_exception_class(fake: FakeDaemon, code: str, cls: type[Exception]) -> None:
    fake.errors["job"] = (code, f"the daemon says {code}")
    with Client(fake.path) as client:
        with pytest.raises(cls) as info:
            client.job("nope")
        assert type(info.value) is cls
        assert str(info.value) == f"the daemon says {code}"
        assert info.value.code == code  # type: ignore[attr-defined]
        assert client.ping()["version"] == "0.1.0"  # an error does not spoil the connection


def test_error_with_null_id_is_accepted(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        assert client._conn is not None
        assert client._conn.sock is not None
        client._conn.sock.sendall(b"{garbage\n")  # the fake answers id: null, invalid_json
        assert client._conn.read_response()["error"]["code"] == "invalid_json"


def test_pipeline_sends_all_then_reads_in_order(fake: FakeDaemon) -> None:
    fake.batch = 3  # the fake answers nothing until all three requests arrived
    fake.errors["job"] = ("not_found", "no job nope")
    with Client(fake.path, timeout=5) as client:
        responses = client.pipeline([("ping", {}), ("job", {"job_id": "nope"}), ("voices", {})])
    assert [r["id"] for r in responses] == [1, 2, 3]
    assert raise_for_response(responses[0])["version"] == "0.1.0"
    assert responses[1]["ok"] is False
    assert responses[1]["error"] == {"code": "not_found", "message": "no job nope"}
    with pytest.raises(errors.NotFound, match="no job nope"):
        raise_for_response(responses[1])
    assert raise_for_response(responses[2]) == {"voices": VOICES}
    assert fake.connections == 1


def test_pipeline_empty(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        assert client.pipeline([]) == []


def test_mismatched_id_is_a_protocol_error(fake: FakeDaemon) -> None:
    fake.handlers["ping"] = lambda req, conn: conn.send({"v": 1, "id": 999, "ok": True, "result": {}})
    with Client(fake.path) as client, pytest.raises(errors.BeagledError, match="does not match"):
        client.ping()


def test_missing_socket_is_daemon_not_running(sockdir: Path) -> None:
    path = sockdir / "nothing.sock"
    with pytest.raises(DaemonNotRunning) as info:
        Client(path)
    assert str(info.value) == f"beagled is not running (no socket at {path})"
    assert isinstance(info.value, errors.Unavailable)
    assert info.value.code == "unavailable"


def test_stale_socket_is_daemon_not_running(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a crashed daemon leaves
    assert path.exists()
    with pytest.raises(DaemonNotRunning, match=f"connection refused at {path}"):
        Client(path)


def test_connection_lost_then_reconnects(fake: FakeDaemon) -> None:
    def hang_up(req: dict[str, Any], conn: Conn) -> None:
        conn.sock.shutdown(socket.SHUT_RDWR)

    fake.handlers["pause"] = hang_up
    with Client(fake.path) as client:
        with pytest.raises(ConnectionLost):
            client.pause()
        assert client.ping()["version"] == "0.1.0"
    assert fake.connections == 2


def test_timeout(fake: FakeDaemon) -> None:
    fake.handlers["pause"] = lambda req, conn: None  # never answers
    with Client(fake.path, timeout=0.2) as client:
        with pytest.raises(RequestTimeout):
            client.pause()
        assert client.ping()["version"] == "0.1.0"  # a fresh connection: no stale answer


def test_watch_yields_events_and_progress(fake: FakeDaemon) -> None:
    fake.stream = [
        {"result": {"watching": True}},  # an acknowledgement, if the daemon sends one, is skipped
        {"event": {"seq": 1, "type": "pair_submitted", "at": 0, "data": {"voice": "default"}}},
        {"progress": {"job_id": "j-2", "step": 1, "total": 4}},
        {"event": {"seq": 2, "type": "job_queued", "at": 1, "data": {"job_id": "j-2"}}},
    ]
    with Client(fake.path) as client:
        messages = list(client.watch(from_seq=1))
        assert client.ping()["version"] == "0.1.0"  # the request connection is untouched
    assert [("event" in m, "progress" in m) for m in messages] == [
        (True, False),
        (False, True),
        (True, False),
    ]
    assert messages[0]["event"]["seq"] == 1
    watch = next(r for r in fake.requests if r["op"] == "watch")
    assert watch["from_seq"] == 1


def test_watch_error_raises(fake: FakeDaemon) -> None:
    fake.handlers["watch"] = lambda req, conn: conn.fail(req, "bad_request", "from_seq must be >= 0")
    with Client(fake.path) as client, pytest.raises(errors.BadRequest, match="from_seq"):
        next(client.watch(from_seq=-1))


# --- the trio client ----------------------------------------------------------------------------


async def test_async_client_requests_and_errors(fake: FakeDaemon) -> None:
    fake.errors["job"] = ("not_found", "no job x")
    async with await AsyncClient.connect(fake.path) as client:
        assert (await client.ping())["version"] == "0.1.0"
        assert (await client.submit("a", "b"))["pair_id"] == "p-1"
        with pytest.raises(errors.NotFound, match="no job x"):
            await client.job("x")
        assert (await client.status()) == STATUS
        responses = await client.pipeline([("voices", {}), ("job", {"job_id": "x"})])
        assert [r["ok"] for r in responses] == [True, False]
    assert [r["id"] for r in fake.requests] == [1, 2, 3, 4, 5, 6]
    assert fake.connections == 1


async def test_async_client_concurrent_requests_stay_paired(fake: FakeDaemon) -> None:
    fake.handlers["job"] = lambda req, conn: conn.ok(req, {"job": {"job_id": req["job_id"]}})
    results: dict[str, str] = {}
    async with await AsyncClient.connect(fake.path) as client:

        async def one(job_id: str) -> None:
            results[job_id] = (await client.job(job_id))["job"]["job_id"]

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, f"j-{i}")
    assert results == {f"j-{i}": f"j-{i}" for i in range(20)}


async def test_async_client_not_running(sockdir: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="no socket at"):
        await AsyncClient.connect(sockdir / "none.sock")


async def test_async_client_timeout_then_reconnect(fake: FakeDaemon) -> None:
    fake.handlers["pause"] = lambda req, conn: None
    async with await AsyncClient.connect(fake.path, timeout=0.2) as client:
        with pytest.raises(RequestTimeout):
            await client.pause()
        assert (await client.ping())["version"] == "0.1.0"


async def test_async_watch(fake: FakeDaemon) -> None:
    fake.stream = [
        {"event": {"seq": 1, "type": "a", "at": 0, "data": {}}},
        {"progress": {"job_id": "j", "step": 1, "total": 2}},
    ]
    async with await AsyncClient.connect(fake.path) as client, client.watch() as stream:
        messages = [m async for m in stream]
    assert [next(iter(k for k in m if k in ("event", "progress"))) for m in messages] == ["event", "progress"]


# --- socket path resolution ---------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("BEAGLED_SOCKET", raising=False)
    monkeypatch.delenv("BEAGLED_CONFIG", raising=False)
    for var in ("STATE_DIRECTORY", "XDG_STATE_HOME", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_socket_path_default(clean_env: Path) -> None:
    assert default_socket_path() == Path("~/.local/state/beagled/beagled.sock").expanduser()


def test_default_socket_path_env_socket_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "config.toml").write_text('[daemon]\nsocket = "/from/config.sock"\n')
    monkeypatch.setenv("BEAGLED_SOCKET", "/from/env.sock")
    assert default_socket_path() == Path("/from/env.sock")


def test_default_socket_path_from_config(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "config.toml").write_text('[daemon]\nstate_dir = "/var/lib/b"\n')
    assert default_socket_path() == Path("/var/lib/b/beagled.sock")  # ./config.toml
    other = clean_env / "other.toml"
    other.write_text('[daemon]\nsocket = "/run/b.sock"\nstate_dir = "/x"\n')
    monkeypatch.setenv("BEAGLED_CONFIG", str(other))
    assert default_socket_path() == Path("/run/b.sock")  # $BEAGLED_CONFIG
    assert default_socket_path(clean_env / "config.toml") == Path("/var/lib/b/beagled.sock")  # explicit


def test_default_socket_path_bad_config(clean_env: Path) -> None:
    with pytest.raises(errors.ConfigError, match="not found"):
        default_socket_path(clean_env / "missing.toml")
    bad = clean_env / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        default_socket_path(bad)
    bad.write_text("[daemon]\nsocket = 3\n")
    with pytest.raises(errors.ConfigError, match=r"daemon\.socket"):
        default_socket_path(bad)


@pytest.mark.parametrize(
    ("env", "toml", "expected"),
    [
        ({}, "", "~/.local/state/beagled/beagled.sock"),
        ({"XDG_STATE_HOME": "/xdg/state"}, "", "/xdg/state/beagled/beagled.sock"),
        ({"STATE_DIRECTORY": "/var/lib/beagled:/other"}, "", "/var/lib/beagled/beagled.sock"),
        ({"XDG_STATE_HOME": "/xdg/state"}, '[daemon]\nstate_dir = "/cfg/state"\n', "/cfg/state/beagled.sock"),
        ({"STATE_DIRECTORY": "/var/lib/b"}, '[daemon]\nsocket = "/cfg/b.sock"\n', "/cfg/b.sock"),
    ],
    ids=["neither", "xdg-state-home", "state-directory", "config-state-dir", "config-socket"],
)
def test_client_and_daemon_resolve_the_same_socket(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], toml: str, expected: str
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    if toml:
        (clean_env / "config.toml").write_text(toml)
    daemon_side = config.load().socket_path  # what the daemon binds
    want = Path(expected).expanduser()
    assert daemon_side == want
    assert default_socket_path() == want  # what the client connects to
    section = tomllib.loads(toml).get("daemon", {}) if toml else {}
    assert paths.socket_path(section.get("socket", ""), section.get("state_dir", "")) == want


# --- the sans-IO client protocol and the table of operations --------------------------------------


def test_client_protocol_turns_calls_into_lines_and_lines_into_results() -> None:
    proto = ClientProtocol()
    rid, line = proto.request("jobs", {"voice": "default", "state": None, "limit": 5})
    assert json.loads(line) == {"v": 1, "id": rid, "op": "jobs", "voice": "default", "limit": 5}
    assert line.endswith(b"\n")
    assert proto.request("ping", {})[0] == rid + 1
    proto.receive(b'{"v":1,"id":1,"ok":true,"res')
    assert proto.next_message() is None  # not a whole line yet
    proto.receive(
        b'ult":{"jobs":[]}}\n\n{"v":1,"id":2,"ok":false,"error":{"code":"not_found","message":"no"}}\n'
    )
    assert proto.result(proto.next_message() or {}, 1) == {"jobs": []}
    with pytest.raises(errors.NotFound, match="no"):
        proto.result(proto.next_message() or {}, 2)
    assert proto.next_message() is None
    with pytest.raises(ProtocolError, match="does not match"):
        proto.result({"v": 1, "id": 9, "ok": True, "result": {}}, 3)
    assert not proto.eof
    proto.receive(b"")  # the daemon closed the connection
    assert proto.eof
    proto.receive(b"not json\n")
    with pytest.raises(ProtocolError, match="not JSON"):
        proto.next_message()


def test_every_client_method_and_ctl_command_names_an_op_of_the_table() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    class Recorder(_Ops[None]):
        def _call(self, op: str, fields: dict[str, Any]) -> None:
            sent.append((op, fields))

    r = Recorder()
    for name in ("ping", "status", "voices"):
        getattr(r, name)()
    r.submit("b", "g")
    r.jobs()
    r.job("j")
    r.train("v")
    r.rollback("v")
    r.pause()
    r.resume()
    r.delete_voice("v")
    assert {op for op, _ in sent} == set(protocol.OPS) - {"watch"}
    for op, fields in sent:
        assert set(fields) <= protocol.OPS[op].fields, op
    assert {c.op for c in ctl.COMMANDS.values()} == set(protocol.OPS) - {"watch"}


# --- beaglectl ----------------------------------------------------------------------------------


def run_ctl(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: str | None = None,
) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = ctl.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_ctl_ping_and_json(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_ctl(["--socket", fake.path, "ping"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert out == "beagled 0.1.0 is up (1h02m)\n"
    code, out, _ = run_ctl(["--socket", fake.path, "--json", "status"], capsys, monkeypatch)
    assert code == 0
    assert json.loads(out) == STATUS
    # --json also accepted after the command
    code, out, _ = run_ctl(
        ["--socket", fake.path, "jobs", "--json", "--voice", "default"], capsys, monkeypatch
    )
    assert json.loads(out) == {"jobs": JOBS}
    assert fake.requests[-1]["voice"] == "default"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status"], "event seq  42"),
        (["jobs"], "JOB"),
        (["job", "j-2"], "job_id"),
        (["voices"], "default-v0007"),
        (["train", "default"], "job j-3 queued for voice default"),
        (["rollback", "default", "--to", "j-1"], "voice default now serves job j-1"),
        (["pause"], "paused"),
        (["resume"], "running"),
    ],
)
def test_ctl_human_output(
    fake: FakeDaemon,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    expected: str,
) -> None:
    code, out, err = run_ctl(["--socket", fake.path, *argv], capsys, monkeypatch)
    assert (code, err) == (0, "")
    assert expected in out


def test_ctl_daemon_error_exit_1(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.errors["job"] = ("not_found", "no job j-9")
    code, out, err = run_ctl(["--socket", fake.path, "job", "j-9"], capsys, monkeypatch)
    assert code == 1
    assert out == ""
    assert "no job j-9" in err


def test_ctl_not_running_exit_3(
    sockdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sockdir / "gone.sock"
    code, out, err = run_ctl(["--socket", str(path), "status"], capsys, monkeypatch)
    assert code == 3
    assert out == ""
    assert err == f"beaglectl: beagled is not running (no socket at {path})\n"


def test_ctl_socket_from_config(
    fake: FakeDaemon, clean_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = clean_env / "c.toml"
    cfg.write_text(f"[daemon]\nsocket = {json.dumps(fake.path)}\n")
    code, out, _ = run_ctl(["--config", str(cfg), "ping"], capsys, monkeypatch)
    assert code == 0
    assert "is up" in out
    code, _, err = run_ctl(["--config", str(clean_env / "nope.toml"), "ping"], capsys, monkeypatch)
    assert code == 2
    assert "config file not found" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["job"], ["jobs", "--limit", "many"], ["--timeout", "0", "ping"]],
)
def test_ctl_usage_errors_exit_2(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    code, out, err = run_ctl(["--socket", fake.path, *argv], capsys, monkeypatch)
    assert code == 2
    assert out == ""
    assert err.startswith("beaglectl: ")


def test_ctl_help_exit_0(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_ctl(["--help"], capsys, monkeypatch)
    assert code == 0
    assert "watch" in out


def test_ctl_submit_from_stdin(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = json.dumps(
        {"bad": "old", "good": "new", "voice": "poetry", "key": "k", "quality": {"before": 1, "after": 2}}
    )
    code, out, err = run_ctl(["--socket", fake.path, "submit", "--prompt", "P"], capsys, monkeypatch, stdin)
    assert (code, err) == (0, "")
    assert out == "accepted pair p-1 (seq 7)\n"
    sent = fake.requests[-1]
    assert {k: sent[k] for k in ("op", "bad", "good", "voice", "key", "prompt", "quality")} == {
        "op": "submit",
        "bad": "old",
        "good": "new",
        "voice": "poetry",
        "key": "k",
        "prompt": "P",
        "quality": {"before": 1, "after": 2},
    }


def test_ctl_submit_duplicate_json(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.results["submit"] = {"pair_id": "p-1", "seq": 7, "duplicate": True}
    code, out, _ = run_ctl(
        ["--socket", fake.path, "submit"], capsys, monkeypatch, '{"bad": "a", "good": "b"}'
    )
    assert code == 0
    assert out == "duplicate of pair p-1 (seq 7)\n"
    code, out, _ = run_ctl(
        ["--socket", fake.path, "--json", "submit"], capsys, monkeypatch, '{"bad": "a", "good": "b"}'
    )
    assert json.loads(out) == {"pair_id": "p-1", "seq": 7, "duplicate": True}


def test_ctl_submit_from_files(
    fake: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bad.txt").write_text("the worse draft\n", encoding="utf-8")
    (tmp_path / "good.txt").write_text("the better draft — ✓\n", encoding="utf-8")
    argv = ["--socket", fake.path, "submit", "--bad-file", str(tmp_path / "bad.txt")]
    argv += ["--good-file", str(tmp_path / "good.txt"), "--voice", "v", "--key", "k"]
    code, _, err = run_ctl(argv, capsys, monkeypatch)
    assert (code, err) == (0, "")
    sent = fake.requests[-1]
    assert (sent["bad"], sent["good"], sent["voice"], sent["key"]) == (
        "the worse draft\n",
        "the better draft — ✓\n",
        "v",
        "k",
    )


def test_ctl_submit_a_conversation(
    fake: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    convo = [{"role": "user", "content": "Tell Ana the report is late."}]
    (tmp_path / "convo.json").write_text(json.dumps(convo), encoding="utf-8")
    argv = ["--socket", fake.path, "submit", "--system", "You write short emails."]
    argv += ["--messages-file", str(tmp_path / "convo.json")]
    code, _, err = run_ctl(argv, capsys, monkeypatch, '{"bad": "a", "good": "b"}')
    assert (code, err) == (0, "")
    sent = fake.requests[-1]
    assert (sent["system"], sent["messages"]) == ("You write short emails.", convo)
    # the stdin JSON may carry them too; without them the request holds neither (an older daemon refuses them)
    stdin = json.dumps({"bad": "a", "good": "b", "system": "S", "messages": convo})
    assert run_ctl(["--socket", fake.path, "submit"], capsys, monkeypatch, stdin)[0] == 0
    assert (fake.requests[-1]["system"], fake.requests[-1]["messages"]) == ("S", convo)
    assert (
        run_ctl(["--socket", fake.path, "submit"], capsys, monkeypatch, '{"bad": "a", "good": "b"}')[0] == 0
    )
    assert "system" not in fake.requests[-1] and "messages" not in fake.requests[-1]


@pytest.mark.parametrize(
    ("extra", "stdin", "fragment"),
    [
        ([], "{oops", "not valid JSON"),
        (["--messages-file", "/no/such/convo.json"], '{"bad": "a", "good": "b"}', "no such file"),
        (["--messages-file", "-"], '{"bad": "a", "good": "b"}', "stdin is taken"),
        ([], '{"bad": "a", "good": "b", "messages": "hi"}', '"messages" must be a list'),
        ([], '{"bad": "a", "good": "b", "system": 1}', '"system" must be a string'),
        ([], "", "no input"),
        ([], '{"bad": "a"}', '"good"'),
        (["--bad-file", "x.txt"], "", "go together"),
        (["--bad-file", "/no/such/bad", "--good-file", "/no/such/good"], "", "no such file"),
    ],
)
def test_ctl_submit_bad_input_exit_2(
    sockdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    stdin: str,
    fragment: str,
) -> None:
    # no daemon at all: bad input is reported as such, before connecting
    code, out, err = run_ctl(
        ["--socket", str(sockdir / "none.sock"), "submit", *extra], capsys, monkeypatch, stdin
    )
    assert code == 2
    assert out == ""
    assert fragment in err


def test_ctl_watch_plain(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.stream = [
        {"event": {"seq": 1, "type": "job_queued", "at": 0, "data": {"job_id": "j-2", "voice": "default"}}},
        {"progress": {"job_id": "j-2", "step": 2, "total": 8, "loss": 1.5}},
        {"progress": {"job_id": "j-2"}},  # missing keys are fine
        {"event": {"seq": 2, "type": "job_trained", "at": 1, "data": {"job_id": "j-2"}}},
    ]
    code, out, err = run_ctl(["--socket", fake.path, "watch", "--from-seq", "1"], capsys, monkeypatch)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 4
    assert "#1 job_queued" in lines[0]
    assert "job=j-2 voice=default" in lines[0]
    assert lines[1].startswith("j-2 [")
    assert "2/8" in lines[1]
    assert "loss 1.5000" in lines[1]
    assert lines[2] == "j-2"
    assert "#2 job_trained" in lines[3]
    assert "\r" not in out
    assert next(r for r in fake.requests if r["op"] == "watch")["from_seq"] == 1


def test_ctl_watch_json_lines(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.stream = [
        {"event": {"seq": 1, "type": "a", "at": 0, "data": {}}},
        {"progress": {"job_id": "j", "step": 1}},
    ]
    code, out, _ = run_ctl(["--socket", fake.path, "--json", "watch"], capsys, monkeypatch)
    assert code == 0
    messages = [json.loads(line) for line in out.splitlines()]
    assert [m.get("event", m.get("progress")) for m in messages] == [
        {"seq": 1, "type": "a", "at": 0, "data": {}},
        {"job_id": "j", "step": 1},
    ]


def test_ctl_watch_ctrl_c_exits_130(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.stream = [{"event": {"seq": 1, "type": "a", "at": 0, "data": {}}}] * 3
    calls = 0
    real = ctl.ProgressBoard.event

    def interrupt(self: ctl.ProgressBoard, event: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        real(self, event)
        raise KeyboardInterrupt

    monkeypatch.setattr(ctl.ProgressBoard, "event", interrupt)
    code, out, err = run_ctl(["--socket", fake.path, "watch"], capsys, monkeypatch)
    assert (code, err) == (130, "")  # the shell's Ctrl-C status (issue 14), not success
    assert calls == 1
    assert len(out.splitlines()) == 1


def test_ctl_module_runs_without_daemon_env(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BEAGLED_SOCKET", str(sockdir / "env.sock"))
    code, _, err = run_ctl(["ping"], capsys, monkeypatch)
    assert code == 3
    assert os.fspath(sockdir / "env.sock") in err
