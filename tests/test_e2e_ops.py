"""Operating a real ``beagled serve`` process: a real Prometheus scraping it, sd_notify to a socket
standing in for systemd, ``beaglectl`` as a subprocess, and the structured log lines."""

from __future__ import annotations

import functools
import itertools
import json
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProc, fake_backend, notify_socket, poll
from tests.prom import (
    metrics_daemon_tables,
    promtool_check_metrics,
    require_prometheus,
    sample_values,
    start_prometheus,
    train_one_job,
)

# --- Prometheus ------------------------------------------------------------------------------------


def test_prometheus_scrapes_a_daemon_that_trained(make_daemon: Any, tmp_path: Path) -> None:
    require_prometheus()
    d = make_daemon(metrics_daemon_tables())
    target = f"127.0.0.1:{d.metrics_port}"
    with start_prometheus(tmp_path, [target]) as prom:
        prom.wait_for('up{job="beagled"} == 1', timeout=30)
        job1, nxt = train_one_job(d)
        # a histogram's first observation only creates its series; rate() needs a second one scraped
        prom.wait_for('beagled_training_duration_seconds_count{backend="fake",outcome="success"} >= 1')
        job2, _ = train_one_job(d, nxt)
        assert job1["backend"] == job2["backend"] == "fake"
        ran: list[tuple[str, list[Any]]] = []

        def q(promql: str, predicate: Any) -> list[Any]:
            result = prom.wait_for(promql, predicate, timeout=20)
            ran.append((promql, result))
            return result

        def by(result: list[Any], label: str) -> dict[str, float]:
            return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}

        q(
            "histogram_quantile(0.5, sum by (le, backend) "
            "(rate(beagled_training_duration_seconds_bucket[5m])))",
            lambda r: math.isfinite(by(r, "backend").get("fake", math.nan)),
        )
        jobs = by(q("beagled_jobs", lambda r: by(r, "state").get("reloaded") == 2), "state")
        every = {"queued", "training", "trained", "promoted", "reloaded", "failed", "rejected", "cancelled"}
        assert set(jobs) == every
        assert jobs["failed"] == 0
        q("rate(beagled_submissions_total[1m])", lambda r: by(r, "outcome").get("accepted", 0) > 0)
        fb = q("beagled_backend_fallbacks_total", bool)
        assert [(r["metric"]["from_backend"], r["metric"]["to_backend"]) for r in fb] == [("broken", "fake")]
        assert sample_values(fb) == [2.0]
        rl = q("beagled_reload_duration_seconds_count", bool)
        assert {(r["metric"]["method"], r["metric"]["outcome"]): float(r["value"][1]) for r in rl} == {
            ("command", "success"): 2.0,
            ("command", "failure"): 0.0,  # primed at start, so rate() sees the first failure
        }
        loss = q("beagled_eval_loss", bool)
        assert by(loss, "voice") == {"default": 1.0}  # the fake trainer's held-out loss
        print("\nPrometheus queries executed:")
        for promql, result in ran:
            shown = [(r["metric"], r["value"][1]) for r in result]
            print(f"  {promql}\n    -> {shown}")
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as r:
        text = r.read()
    rc, output = promtool_check_metrics(text)
    assert rc == 0 and output.strip() == "", output


def test_series_exist_before_the_first_event(make_daemon: Any) -> None:
    d = make_daemon(
        {
            "training": {"backends": ["broken", "fake"]},
            "training.custom_backends": {"broken": fake_backend("crash")},
            "reload": {"method": "command", "reconcile_interval_s": 3600.0},
            "reload.command": {"argv": ["true"]},
        }
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    missing = [
        series
        for series in (
            'beagled_training_duration_seconds_count{backend="fake",executor="local",outcome="success"} 0.0',
            (
                'beagled_training_duration_seconds_count{backend="broken",executor="local",outcome="failure"}'
                " 0.0"
            ),
            'beagled_reload_duration_seconds_count{method="command",outcome="success"} 0.0',
            'beagled_reload_duration_seconds_count{method="command",outcome="failure"} 0.0',
            'beagled_backend_fallbacks_total{from_backend="broken",to_backend="fake"} 0.0',
        )
        if series not in text
    ]
    assert not missing, missing


# --- sd_notify -------------------------------------------------------------------------------------


def test_sd_notify_ready_status_watchdog_stopping(make_daemon: Any) -> None:
    # the watchdog deadline is WATCHDOG_USEC (2 s): the daemon pings every half of it, and the test asserts
    # each gap is inside the deadline systemd enforces (a loaded machine may stretch a gap, not past it)
    with notify_socket(20) as (sock, path):
        d = make_daemon(start=False)
        d.start(wait=False, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        got: list[tuple[float, str]] = []
        socket_seen_at_ready = None
        while True:
            msg = sock.recv(4096).decode()
            got.append((time.monotonic(), msg))
            if "READY=1" in msg.split("\n"):
                socket_seen_at_ready = d.socket.exists()
                break
        assert socket_seen_at_ready, "READY=1 came before the socket was bound"
        with d.client() as c:
            assert c.ping()["version"]
        ready_at = got[-1][0]
        watchdogs: list[float] = []
        while len(watchdogs) < 3:
            msg = sock.recv(4096).decode()
            got.append((time.monotonic(), msg))
            if msg == "WATCHDOG=1":
                watchdogs.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(watchdogs)]
        assert all(0.2 < g < 2.0 for g in gaps), gaps  # about every half of WATCHDOG_USEC, never past it
        assert watchdogs[0] - ready_at < 2.0  # the first ping comes within the deadline too
        statuses = [m for _, m in got for f in m.split("\n") if f.startswith("STATUS=")]
        assert any("recovering" in s for s in statuses), got
        assert any("voices" in s and "READY=1" in s for s in statuses), got  # READY carries a summary
        d.proc.send_signal(signal.SIGTERM)
        while True:
            msg = sock.recv(4096).decode()
            if "STOPPING=1" in msg.split("\n"):
                break
        assert d.wait_exit(15) == 0


# --- beaglectl -------------------------------------------------------------------------------------


def ctl(d: DaemonProc, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "beagled.ctl", "--socket", str(d.socket), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class Watcher:
    """``beaglectl watch`` in the background, its stdout lines collected."""

    def __init__(self, d: DaemonProc) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "beagled.ctl", "--socket", str(d.socket), "watch", "--from-seq", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(10)
        self._thread.join(5)
        self.close()
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def watcher() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for w in made:  # whatever the test did: no process and no pipe outlives it
        w.close()


def test_beaglectl_end_to_end(make_daemon: Any, watcher: list[Watcher]) -> None:
    d = make_daemon(
        {
            "training": {"heldout_share": 0.0},
            "reload": {"method": "command", "reconcile_interval_s": 3600.0},
            "reload.command": {"argv": ["true"]},
        },
        backend=fake_backend("slow:2"),
    )
    r = ctl(d, "ping")
    assert r.returncode == 0 and "is up" in r.stdout, r
    w = Watcher(d)
    watcher.append(w)
    r = ctl(d, "--json", "submit", stdin=json.dumps({"bad": "plain 0", "good": "voiced 0", "key": "k0"}))
    assert r.returncode == 0, r
    first = json.loads(r.stdout)
    assert first["duplicate"] is False and first["pair_id"].startswith("p-")
    r = ctl(d, "submit", stdin=json.dumps({"bad": "plain 0", "good": "voiced 0", "key": "k0"}))
    assert r.returncode == 0 and f"duplicate of pair {first['pair_id']}" in r.stdout, r
    with d.client() as c:  # the rest in-process: each beaglectl run costs ~0.3 s of interpreter start
        for i in range(1, 4):
            c.submit(bad=f"plain {i}", good=f"voiced {i}", key=f"k{i}")
    (job,) = d.wait_jobs(lambda js: len(js) == 1)
    jid = job["job_id"]
    poll(lambda: any("/4" in ln and "loss" in ln for ln in w.lines), 15, what="a progress line from watch")
    d.wait_job(jid, ("reloaded",), 30)
    poll(lambda: any("Reloaded" in ln and jid in ln for ln in w.lines), 10, what="Reloaded event line")
    assert w.stop() in (0, 130)
    assert any("PairSubmitted" in ln for ln in w.lines) and any("JobCreated" in ln for ln in w.lines)

    r = ctl(d, "jobs")
    assert r.returncode == 0 and "STATE" in r.stdout and jid in r.stdout and "reloaded" in r.stdout, r
    r = ctl(d, "jobs", "--json")
    assert [j["job_id"] for j in json.loads(r.stdout)["jobs"]] == [jid]
    r = ctl(d, "job", jid)
    assert r.returncode == 0 and "history" in r.stdout and "TrainingSucceeded" not in r.stderr, r
    assert "reloaded" in r.stdout
    r = ctl(d, "--json", "job", jid)
    assert [h["event"] for h in json.loads(r.stdout)["job"]["history"]][-1] == "Reloaded"
    r = ctl(d, "voices")
    assert r.returncode == 0 and "SERVED NAME" in r.stdout and "default-v0001" in r.stdout, r
    r = ctl(d, "voices", "--json")
    assert json.loads(r.stdout)["voices"][0]["served_name"] == "default-v0001"
    r = ctl(d, "status")
    assert r.returncode == 0 and "event seq" in r.stdout and "fake" in r.stdout, r
    r = ctl(d, "status", "--json")
    assert json.loads(r.stdout)["jobs"]["reloaded"] == 1

    r = ctl(d, "rollback", "default")
    assert r.returncode == 1 and "no earlier version" in r.stderr and "(not_found)" in r.stderr, r

    r = ctl(d, "pause")
    assert r.returncode == 0 and "paused" in r.stdout, r
    with d.client() as c:
        assert c.status()["paused"] is True
    with d.client() as c:
        c.submit(bad="x", good="y", voice="manual")
    r = ctl(d, "train", "manual")
    assert r.returncode == 0 and "queued for voice manual" in r.stdout, r
    r = ctl(d, "resume")
    assert r.returncode == 0 and "running" in r.stdout, r
    with d.client() as c:
        assert c.status()["paused"] is False

    assert d.stop() == 0
    r = ctl(d, "ping")
    assert r.returncode == 3 and "not running" in r.stderr, r


# --- logs ------------------------------------------------------------------------------------------


def test_log_lines_name_the_job_and_voice(make_daemon: Any) -> None:
    d = make_daemon({"training": {"heldout_share": 0.0}})
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"a{i}", good=f"b{i}", voice="poet")
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted")

    def records() -> list[dict[str, Any]]:
        out = []
        for line in d.log_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def line(msg: str) -> dict[str, Any] | None:
        return next((r for r in records() if r["msg"] == msg), None)

    for msg in ("training started", "voice updated"):
        rec = poll(functools.partial(line, msg), 10, what=msg)
        assert rec["job_id"] == job["job_id"] and rec["voice"] == "poet", rec
        assert rec["level"] == "info" and isinstance(rec["ts"], float)
    bad = [ln for ln in d.log_text().splitlines() if ln.strip() and not ln.startswith("{")]
    assert not bad, bad  # every line is JSON when stderr is not a TTY
