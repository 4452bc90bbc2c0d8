"""Training subprocesses that crash, hang, run out of memory, or write garbage are contained: the try
fails with a clear ``TrainingFailed`` event, the next backend (or a retry) follows, and the daemon's own
memory does not grow with the failures (``VmRSS``/``VmHWM`` from ``/proc/<pid>/status``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProc
from tests.invariants import check_no_orphans

FAULT_TRAINER = Path(__file__).resolve().parent / "fault_trainer.py"
SPEW_MB = 32


def backend(mode: str) -> list[str]:
    return [sys.executable, str(FAULT_TRAINER), "--mode", mode]


def mem_kb(d: DaemonProc, key: str = "VmRSS") -> int:
    assert d.proc is not None
    for ln in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if ln.startswith(key + ":"):
            return int(ln.split()[1])
    raise AssertionError(key)


def submit4(d: DaemonProc, tag: str) -> None:
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"{tag} bad {i}", good=f"{tag} good {i}", key=f"{tag}-{i}")


def failures(d: DaemonProc) -> list[dict[str, Any]]:
    return [e["data"] for e in d.events() if e["type"] == "TrainingFailed"]


FAULTS = {
    "crash": ("crash", "status 3"),
    "hang": ("hang", "timed out"),
    "oom": ("oom", "MemoryError"),
    "badjson": ("badjson", "invalid adapter"),
    "noadapter": ("noadapter", "invalid adapter"),
    "partial": ("partial", "no manifest.json"),
    "garbage": ("garbage", "does not match its manifest"),
}


def test_every_kind_of_failure_falls_through_to_the_next_backend(make_daemon: Any) -> None:
    names = [*FAULTS, "ok"]
    d = make_daemon(
        {
            "training": {"backends": names, "timeout_s": 2.0, "memory_limit_mb": 512, "heldout_share": 0.0},
            "training.custom_backends": {
                **{n: backend(m) for n, (m, _) in FAULTS.items()},
                "ok": backend("ok"),
            },
        }
    )
    submit4(d, "fallthrough")
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted", timeout=120)
    assert job["backend"] == "ok" and job["attempt"] == 1
    got = failures(d)
    assert [f["backend"] for f in got] == list(FAULTS)
    for f in got:
        expect = FAULTS[f["backend"]][1]
        assert expect in f["error"], (f["backend"], f["error"])
        assert f["timeout"] is (f["backend"] == "hang")
    check_no_orphans(str(FAULT_TRAINER))
    with d.client() as c:
        assert c.ping()


def test_a_trainer_spewing_garbage_on_stdout_costs_the_daemon_no_memory(make_daemon: Any) -> None:
    d = make_daemon(
        {
            "training": {"backends": ["spew", "ok"], "heldout_share": 0.0},
            "training.custom_backends": {"spew": backend(f"spew:{SPEW_MB}"), "ok": backend("ok")},
        }
    )
    with d.client() as c:
        c.ping()
    before = mem_kb(d, "VmHWM")
    submit4(d, "spew")
    d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted", timeout=120)
    (f,) = failures(d)
    assert f["backend"] == "spew" and "without a result" in f["error"], f
    assert len(f["error"]) <= 2000
    grew = (mem_kb(d, "VmHWM") - before) / 1024
    assert grew < 8, f"peak RSS grew {grew:.0f} MB while a trainer wrote {SPEW_MB} MB of garbage"


@pytest.mark.slow
def test_rss_stays_flat_across_20_failed_tries(make_daemon: Any) -> None:
    d = make_daemon(
        {
            "scheduler": {"max_attempts": 5, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.01},
            "training": {
                "backends": ["crash", "oom", "badjson", "garbage"],
                "memory_limit_mb": 512,
                "heldout_share": 0.0,
            },
            "training.custom_backends": {m: backend(m) for m in ("crash", "oom", "badjson", "garbage")},
        }
    )
    submit4(d, "warm")
    d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "failed", timeout=120)
    base = mem_kb(d)
    submit4(d, "rss")
    js = d.wait_jobs(lambda js: len(js) == 2 and js[0]["state"] == "failed", timeout=180)
    assert js[0]["attempt"] == 5 and "attempt 5/5" in js[0]["error"]
    tries = failures(d)
    assert len(tries) == 40  # 2 jobs x 5 attempts x 4 backends
    grew = (mem_kb(d) - base) / 1024
    print(f"\nRSS after 20 failed tries: {base / 1024:.1f} MB -> {mem_kb(d) / 1024:.1f} MB")
    assert grew < 8, f"daemon RSS grew {grew:.1f} MB across 20 failed tries"
    with d.client() as c:
        assert c.ping()
