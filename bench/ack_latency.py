"""Submit ack latency at a fixed offered load (open loop): p50 / p99 / max, target p99 ≤ 5 ms.

    .venv/bin/python bench/ack_latency.py [--rate 1000] [--seconds 10] [--clients 8]

Submits are scheduled at fixed times (``rate`` per second spread round-robin over ``clients``
connections) whether or not earlier ones were answered; latency runs from the scheduled send time to
the ack (so a stall is not hidden by sending late: no coordinated omission).
"""

from __future__ import annotations

import json
import selectors
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Conn, begin, daemon, pct, submit_line, verdict


def main() -> int:
    a, root = begin(rate=1000.0, seconds=10.0, clients=8)
    with daemon(root / "d") as d:
        d.start().ready()
        conns = [Conn(d.sock) for _ in range(a.clients)]
        sel = selectors.DefaultSelector()
        for c in conns:
            sel.register(c.sock, selectors.EVENT_READ, c)
        total = int(a.rate * a.seconds)
        interval = 1.0 / a.rate
        lat: list[float] = []
        errors = 0
        t0 = time.perf_counter() + 0.2
        i = 0
        while len(lat) + errors < total:
            now = time.perf_counter()
            while i < total and t0 + i * interval <= now:
                c = conns[i % len(conns)]
                c.inflight.append(t0 + i * interval)
                c.sock.setblocking(True)
                c.sock.sendall(submit_line(i, f"v{i % 4}", i))
                c.sock.setblocking(False)
                i += 1
            timeout = max(0.0, t0 + i * interval - time.perf_counter()) if i < total else 1.0
            for key, _ in sel.select(timeout):
                c = key.data
                lines = c.read_lines()
                t = time.perf_counter()
                for line in lines:
                    sent = c.inflight.pop(0)
                    if json.loads(line).get("ok"):
                        lat.append(t - sent)
                    else:
                        errors += 1
        for c in conns:
            c.sock.close()
    p50, p99, mx = pct(lat, 0.5), pct(lat, 0.99), max(lat)
    ok = p99 <= 0.005 and errors == 0
    print(f"offered {a.rate:,.0f} submits/s for {a.seconds:g}s over {a.clients} connections")
    print(f"acked {len(lat)}")
    print(f"ack latency ms: p50 {p50 * 1e3:.2f}  p99 {p99 * 1e3:.2f}  max {mx * 1e3:.2f}  errors {errors}")
    print(f"target p99 <= 5 ms: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
