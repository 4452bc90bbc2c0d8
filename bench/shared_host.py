"""Shared-host attacks of issue 18, measured on a real daemon: the watch attack, the metrics fd flood,
and a flood of one-pair voices against a real voice's job.

    .venv/bin/python bench/shared_host.py [--conns 8] [--watches 32] [--flood 1100] [--voices 30]

The attacks here run as the daemon's own uid (the operator: its watches see every event, the worst
case for memory); ``tests/test_shared_host.py`` replays the same attacks as other, real local users.
Targets: watch attack peak RSS < 150 MB and owner ``ping`` p99 < 50 ms; owner submits unaffected by
the fd flood; a real voice's job delayed by at most one job by the flood of voices.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import begin

from tests.attacks import FD_FLOOD, WATCH_ATTACK, Attack, ping_p99, rss_kb, seed_large_drafts, timed_submits
from tests.daemon_proc import DaemonProc, fake_backend


def new_daemon(root: Path, **tables: dict[str, object]) -> DaemonProc:
    (root / "base").mkdir(parents=True)
    t: dict[str, dict[str, object]] = {
        "training": {"backends": ["fake"], "base_model": str(root / "base"), "heldout_share": 0.0},
        "training.custom_backends": {"fake": fake_backend("ok")},
    }
    for k, v in tables.items():
        t.setdefault(k, {}).update(v)
    return DaemonProc(root, t)


def watch_attack(root: Path, conns: int, per: int) -> None:
    d = new_daemon(root, daemon={"write_timeout_s": 30.0})
    seed_large_drafts(d.state_dir)
    d.start()
    try:
        assert d.proc is not None
        pid = d.proc.pid
        base = rss_kb(pid, "VmRSS")
        quiet = ping_p99(d, 300)
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        att = Attack(WATCH_ATTACK, str(d.socket), str(conns), str(per))
        try:
            loaded = ping_p99(d, 300)
            peak = rss_kb(pid, "VmHWM")
        finally:
            att.stop()
        print(
            f"watch attack ({conns} connections x {per} watch from_seq:0, ~30 MB of drafts in the log): "
            f"RSS before {base / 1024:.0f} MB, peak during {peak / 1024:.0f} MB (target < 150); "
            f"owner ping p99 {loaded * 1000:.1f} ms (quiet {quiet * 1000:.1f} ms; target < 50)"
        )
    finally:
        d.close()


def fd_flood(root: Path, n: int) -> None:
    d = new_daemon(root).start()
    try:
        assert d.proc is not None
        fl = Attack(FD_FLOOD, str(d.metrics_port), str(n))
        try:
            held = fl.ready["held"]
            fds = len(list(Path(f"/proc/{d.proc.pid}/fd").iterdir()))
            times = timed_submits(d, 5)
            t = time.perf_counter()
            ok = False
            while not ok and time.perf_counter() - t < 15:  # the flood holds the cap until its deadline
                try:
                    with socket.create_connection(("127.0.0.1", d.metrics_port), timeout=5) as s:
                        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                        ok = s.recv(64).startswith(b"HTTP/1.1 200")
                except OSError:
                    time.sleep(0.1)
            scrape = time.perf_counter() - t
        finally:
            fl.stop()
        print(
            f"fd flood ({n} metrics connections opened, {held} connected, held open): "
            f"daemon fds {fds}; "
            f"5 of 5 owner submits ok, max {max(times) * 1000:.0f} ms; "
            f"a new scrape {'answered' if ok else 'FAILED'} "
            f"{scrape:.1f} s after (the flood's connections closed at the metrics deadline)"
        )
    finally:
        d.close()


def voice_flood(root: Path, voices: int) -> None:
    d = new_daemon(root, scheduler={"min_pairs": 4, "max_wait_s": 1.0, "retry_backoff_s": 0.05}).start()
    try:
        with d.client() as c:
            for i in range(voices):
                c.submit(bad=f"one {i}", good=f"pair {i}", voice=f"flood{i:03d}")
            d.wait_jobs(lambda js: len(js) >= voices, timeout=60)  # every one-pair voice is a job now
            for i in range(4):
                c.submit(bad=f"real {i}", good=f"real better {i}", voice="real")
            real = d.wait_jobs(lambda js: any(j["voice"] == "real" for j in js), timeout=60)
            real_id = next(j["job_id"] for j in real if j["voice"] == "real")
            d.wait_job(real_id, ("promoted", "reloaded", "failed", "rejected"), timeout=300)
            jobs = c.jobs(limit=10_000)["jobs"]
            hist = {j["job_id"]: c.job(j["job_id"])["job"]["history"] for j in jobs}
        start = {
            jid: next((h["at"] for h in hs if h["event"] == "TrainingStarted"), None)
            for jid, hs in hist.items()
        }
        created = next(h["at"] for h in hist[real_id] if h["event"] == "JobCreated")
        ahead = sum(
            1
            for jid, t in start.items()
            if jid != real_id and t is not None and created < t < (start[real_id] or 0)
        )
        waited = (start[real_id] or 0) - created
        print(
            f"flood of {voices} one-pair voices, then a real voice reaches min_pairs: {ahead} job(s) started "
            f"between the real job's creation and its start (target ≤ 1); it waited {waited:.2f} s"
        )
    finally:
        d.close()


def main() -> int:
    a, root = begin(conns=8, watches=32, flood=1100, voices=30)
    try:
        watch_attack(root / "w", a.conns, a.watches)
        fd_flood(root / "f", a.flood)
        voice_flood(root / "v", a.voices)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
