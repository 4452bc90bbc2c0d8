"""Idle daemon: RSS and CPU over 30 s, and no torch/mlx mapped into the daemon process.

    .venv/bin/python bench/idle.py [--seconds 30] [--events 0]

``--events N`` starts the daemon on a generated log of N events (``gen_log.py``) to show how the
projection's size moves the idle RSS. Targets: RSS ≤ 60 MB, CPU ≤ 0.5 % of a core, no torch/mlx.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import daemon, machine, proc_stat, verdict, vm_rss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--events", type=int, default=0)
    a = ap.parse_args()
    print(machine())
    root = Path(tempfile.mkdtemp(prefix="beagled-bench-"))
    if a.events:
        from gen_log import cached

        (root / "d" / "state").mkdir(parents=True)
        shutil.copy(cached(a.events), root / "d" / "state" / "events.sqlite3")
    with daemon(root / "d") as d:
        d.start().ready()
        assert d.proc is not None
        pid = d.proc.pid
        time.sleep(3)  # let start-up work (backend probe, first snapshot) finish
        hz = os.sysconf("SC_CLK_TCK")
        t_start, _ = proc_stat(pid)
        w0 = time.monotonic()
        peak = 0
        while time.monotonic() - w0 < a.seconds:
            peak = max(peak, vm_rss(pid))
            time.sleep(0.5)
        t_end, _ = proc_stat(pid)
        wall = time.monotonic() - w0
        cpu = (t_end - t_start) / hz / wall * 100
        rss = vm_rss(pid)
        maps = Path(f"/proc/{pid}/maps").read_text()
        bad = sorted({ln.split()[-1] for ln in maps.splitlines() if any(x in ln for x in ("torch", "mlx"))})
    ok_rss, ok_cpu, ok_libs = rss <= 60 * 2**20, cpu <= 0.5, not bad
    print(f"log: {a.events:,} events")
    print(f"idle RSS {rss / 2**20:.1f} MB (peak {peak / 2**20:.1f} MB), target <= 60 MB: {verdict(ok_rss)}")
    print(f"idle CPU {cpu:.3f} % of a core over {wall:.0f}s, target <= 0.5 %: {verdict(ok_cpu)}")
    print(f"torch/mlx libraries mapped: {bad or 'none'}: {verdict(ok_libs)}")
    ok = ok_rss and ok_cpu and ok_libs
    print(f"RESULT: {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
