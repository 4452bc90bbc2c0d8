"""Shared helpers for the benchmarks: a real ``beagled serve`` on a temp config, a raw-socket load
generator (one process, many connections, no client-library overhead), and /proc readers.

Every bench prints the figures it compares and PASS/FAIL against the issue's target. They run on the
machine they report (``machine()``), side by side in one process tree, so ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = REPO / "tests" / "fake_trainer.py"
DRAFT = (
    "The quick brown fox jumps over the lazy dog while the writer searches for a better sentence, "
    "one that says the same thing in fewer words and with a voice that sounds like a person. "
)  # ~200 bytes


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} nproc={os.cpu_count()} cpu={cpu!r} python={platform.python_version()}"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> None:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    path.write_text("\n".join(out))


def bench_tables(state_dir: Path, sock: Path, **daemon: Any) -> dict[str, dict[str, Any]]:
    """A config where nothing but the measured path runs: no metrics endpoint, no job is ever cut,
    and the one training backend is the test suite's fake (its probe is a cheap subprocess)."""
    return {
        "daemon": {
            "state_dir": str(state_dir),
            "socket": str(sock),
            "log_format": "json",
            "max_connections": 1024,
            **daemon,
        },
        "metrics": {"listen": ""},
        "scheduler": {"min_pairs": 1_000_000_000, "max_wait_s": 1e9},
        "training": {
            "backends": ["fake"],
            "custom_backends": {"fake": [sys.executable, str(FAKE_TRAINER), "--mode", "ok"]},
            "heldout_share": 0.0,
        },
    }


class Daemon:
    """``python -m beagled serve`` as a child process; ``ready()`` polls the socket with ping."""

    def __init__(self, root: Path, **daemon: Any) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.sockdir = Path(tempfile.mkdtemp(prefix="bgb", dir="/tmp"))
        self.sock = self.sockdir / "s.sock"
        self.config = root / "config.toml"
        write_config(self.config, bench_tables(self.state_dir, self.sock, **daemon))
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Daemon:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.started_at = time.perf_counter()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "beagled", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
            )
        return self

    def ready(self, timeout: float = 120.0) -> float:
        """Seconds from exec to the first answered ping."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(str(self.sock))
                    s.sendall(b'{"v":1,"id":1,"op":"ping"}\n')
                    if b'"ok":true' in s.recv(4096):
                        return time.perf_counter() - self.started_at
            except OSError:
                pass
            time.sleep(0.002)
        raise RuntimeError("daemon not ready")

    def log_lines(self, msg: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if d.get("msg") == msg or d.get("message") == msg:
                out.append(d)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@contextmanager
def daemon(root: Path | None = None, **cfg: Any) -> Iterator[Daemon]:
    tmp = Path(tempfile.mkdtemp(prefix="beagled-bench-")) if root is None else root
    d = Daemon(tmp, **cfg)
    try:
        yield d
    finally:
        d.stop()
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)


def submit_line(rid: int, voice: str, i: int) -> bytes:
    return (
        json.dumps(
            {
                "v": 1,
                "id": rid,
                "op": "submit",
                "voice": voice,
                "bad": f"{i} {DRAFT}",
                "good": f"{i} better: {DRAFT}",
                "key": f"{voice}-{i}",
            },
            separators=(",", ":"),
        ).encode()
        + b"\n"
    )


class Conn:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.buf = b""
        self.out = b""
        self.inflight: list[float] = []  # send times of unanswered requests, in order

    def read_lines(self) -> list[bytes]:
        """The complete lines that have arrived (the socket is readable); a closed one is an error."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise RuntimeError("daemon closed a connection")
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return lines


def begin(prefix: str = "beagled-bench-", **defaults: Any) -> tuple[argparse.Namespace, Path]:
    """Every bench's start: its options (``--name`` per keyword, typed by its default; a ``False``
    default is a flag), a fresh work directory, and the machine and disk it reports."""
    ap = argparse.ArgumentParser()
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=type(default), default=default)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    print(machine())
    print(f"disk: {disk_of(root)}")
    return args, root


def closed_loop(
    path: Path | list[Path], clients: int, total: int, depth: int = 1, voices: int = 4
) -> tuple[float, list[dict[str, Any]], list[float]]:
    """``clients`` connections, each keeping ``depth`` submits in flight (1: wait for each ack).

    ``path`` may be several sockets (several daemons on one log): connections are spread over them
    round-robin. Returns (seconds, responses, latencies). One process, ``selectors``: cheap enough
    that the daemon, not the load generator, is what is measured (both share the machine's cores).
    """
    paths = path if isinstance(path, list) else [path]
    sel = selectors.DefaultSelector()
    conns = [Conn(paths[i % len(paths)]) for i in range(clients)]
    sent = 0
    responses: list[dict[str, Any]] = []
    lat: list[float] = []

    def fill(c: Conn) -> None:
        nonlocal sent
        while len(c.inflight) < depth and sent < total:
            c.out += submit_line(sent, f"v{sent % voices}", sent)
            c.inflight.append(time.perf_counter())
            sent += 1

    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    t0 = time.perf_counter()
    for c in conns:
        fill(c)
        c.sock.sendall(c.out)
        c.out = b""
    while len(responses) < total:
        for key, _ in sel.select(30):
            c = key.data
            lines = c.read_lines()
            now = time.perf_counter()
            for line in lines:
                responses.append(json.loads(line))
                lat.append(now - c.inflight.pop(0))
            fill(c)
            if c.out:
                c.sock.setblocking(True)
                c.sock.sendall(c.out)
                c.sock.setblocking(False)
                c.out = b""
    dt = time.perf_counter() - t0
    for c in conns:
        c.sock.close()
    return dt, responses, lat


def raw_sqlite_commits(path: Path, n: int = 3000) -> float:
    """Single-row durable commits/s: WAL, synchronous=FULL, BEGIN IMMEDIATE, one row each."""
    import sqlite3

    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, data TEXT NOT NULL)")
    row = json.dumps({"bad": DRAFT, "good": DRAFT})
    t0 = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (i, row))
        db.execute("COMMIT")
    dt = time.perf_counter() - t0
    db.close()
    return n / dt


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def disk_of(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True, check=False).stdout
        return " ".join(out.splitlines()[-1].split()[:2])
    except OSError:
        return "?"


def proc_stat(pid: int) -> tuple[int, int]:
    """(utime+stime in clock ticks, rss in bytes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return ticks, rss


def vm_rss(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r
