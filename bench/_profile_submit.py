"""Profile helper: start a daemon, run py-spy on it during a closed-loop submit load."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import closed_loop, daemon

total = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/prof.txt"
with daemon() as d:
    d.start().ready()
    closed_loop(d.sock, 64, 2000, 1)
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "-p",
            str(d.proc.pid),
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            out,
            "--threads",
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    dt, resp, lat = closed_loop(d.sock, 64, total, 1)
    print(f"{total / dt:,.0f}/s")
    spy.send_signal(2)
    spy.wait(30)
