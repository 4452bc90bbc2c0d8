"""Start-up to ready with a long log: exec of ``beagled serve`` to the first answered ping.

    .venv/bin/python bench/startup.py [--events 100000 1000000]

For each size: a generated log (``gen_log.py``, cached under /tmp), started three ways —
cold (no snapshot: the whole log is replayed, and the daemon writes its first snapshot), warm (the
snapshot the first run wrote, plus a tail), and the daemon's own ``startup_s`` from its "ready" log
line. Target: ≤ 2 s at 1,000,000 events.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import daemon, machine, verdict
from gen_log import cached


def snapshot_seq(db: Path) -> int | None:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT max(seq) FROM snapshots").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return row[0] if row else None


def run_once(root: Path, label: str) -> tuple[float, dict[str, object]]:
    with daemon(root) as d:
        d.start()
        t = d.ready(timeout=600)
        ready = d.log_lines("ready")
        rec = d.log_lines("recovered")
        info = {
            "startup_s": ready[-1].get("startup_s") if ready else None,
            "replayed": rec[-1].get("replayed", rec[-1].get("events")) if rec else None,
        }
        if label == "cold":  # let the daemon write its first snapshot before it is stopped
            deadline = time.monotonic() + 600
            while not d.log_lines("snapshot written") and time.monotonic() < deadline:
                time.sleep(0.2)
    return t, info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000])
    a = ap.parse_args()
    print(machine())
    ok = True
    for n in a.events:
        src = cached(n)
        root = Path(tempfile.mkdtemp(prefix="beagled-bench-"))
        state = root / "d" / "state"
        state.mkdir(parents=True)
        shutil.copy(src, state / "events.sqlite3")
        for label in ("cold", "warm"):
            t, info = run_once(root / "d", label)
            snap = snapshot_seq(state / "events.sqlite3")
            line = f"{n:>9,} events  {label:4}  exec->ping {t:6.2f}s  daemon startup_s {info['startup_s']}"
            line += f"  replayed {info['replayed']}  snapshot_seq {snap}"
            if label == "warm":
                good = t <= 2.0
                ok = ok and (good or n < 1_000_000)
                line += f"  target <= 2 s: {verdict(good)}"
            print(line, flush=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"RESULT: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
