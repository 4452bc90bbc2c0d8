"""Durable submits/s through a real daemon vs raw SQLite single-row durable commits, same run, same disk.

    .venv/bin/python bench/submit_throughput.py [--total 20000] [--clients 64] [--depth 8]

Closed loop: 64 socket connections, each sending the next submit as soon as its ack (sent only after
COMMIT) comes back; then a pipelined variant (``--depth`` submits in flight per connection). Target:
≥ 10,000 submits/s and ≥ 2x the raw SQLite single-row commit rate (WAL, synchronous=FULL).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import os
import resource

from _common import begin, closed_loop, daemon, pct, proc_stat, raw_sqlite_commits, verdict


def main() -> int:
    a, root = begin(total=20_000, clients=64, depth=8, warmup=2000)
    raw = raw_sqlite_commits(root / "raw.sqlite3")
    print(f"raw sqlite single-row durable commits: {raw:,.0f}/s", flush=True)
    ok = True
    with daemon(root / "d") as d:
        d.start().ready()
        closed_loop(d.sock, a.clients, a.warmup, 1, voices=4)  # warm-up (first connections, caches)
        rows = []
        for label, depth in (("closed loop, 1 in flight/conn", 1), (f"pipelined, {a.depth}/conn", a.depth)):
            assert d.proc is not None
            c0, _ = proc_stat(d.proc.pid)
            g0 = resource.getrusage(resource.RUSAGE_SELF)
            dt, resp, lat = closed_loop(d.sock, a.clients, a.total, depth, voices=4)
            c1, _ = proc_stat(d.proc.pid)
            g1 = resource.getrusage(resource.RUSAGE_SELF)
            hz = os.sysconf("SC_CLK_TCK")
            gen = (g1.ru_utime + g1.ru_stime - g0.ru_utime - g0.ru_stime) / a.total * 1e6
            print(
                f"  {label}: daemon CPU {(c1 - c0) / hz / a.total * 1e6:.0f} us/submit "
                f"({(c1 - c0) / hz / dt * 100:.0f}% of a core), load generator {gen:.0f} us/submit"
            )
            bad = [r for r in resp if not r.get("ok")]
            seqs = {r["result"]["seq"] for r in resp if r.get("ok")}
            if bad or len(seqs) != a.total:
                print(f"ERROR: {len(bad)} failed, {len(seqs)} distinct seqs: {bad[:3]}")
                ok = False
            rate = a.total / dt
            rows.append((label, rate, pct(lat, 0.5), pct(lat, 0.99)))
        raw2 = raw_sqlite_commits(root / "raw2.sqlite3")
    raw = (raw + raw2) / 2
    print(f"raw sqlite (again, after): {raw2:,.0f}/s; mean {raw:,.0f}/s")
    print(f"{'variant':34} {'submits/s':>10} {'x raw':>7} {'p50 ms':>8} {'p99 ms':>8}  target")
    for label, rate, p50, p99 in rows:
        good = rate >= 10_000 and rate >= 2 * raw
        ok = ok and (good or "pipelined" in label)
        print(
            f"{label:34} {rate:10,.0f} {rate / raw:7.2f} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f}  "
            f">=10,000/s and >=2x raw: {verdict(good)}"
        )
    print(f"RESULT (64 closed-loop clients): {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
