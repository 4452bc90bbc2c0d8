"""The event log on PostgreSQL beside SQLite, same run, same disk; fail-over time; follower lag.

    .venv/bin/python bench/postgres.py [--total 20000] [--clients 64] [--trials 20] [--leader-timeout 2]

1. Durable submits/s and ack p99, 64 closed-loop clients (each sends its next submit when the ack of
   the last, sent only after COMMIT, comes back): one daemon on SQLite; one daemon on PostgreSQL; three
   daemons on one PostgreSQL database, the clients spread over the three sockets. During the three-
   daemon run each follower's ``status.lag_s`` is sampled every 50 ms (median and max reported).
2. Fail-over: three daemons (fake trainer, 30 s per job), ``daemon.leader_timeout_s`` = --leader-timeout.
   Per trial: make the leader train, ``kill -9`` it, and time until the new leader's first effect event
   (the first event in the log stamped with the new term, by its ``at``); restart the killed daemon.

PostgreSQL: a private server (``initdb`` + ``pg_ctl``, Unix socket, default settings: ``fsync=on``,
``synchronous_commit=on``) in a temp dir, as in the tests.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import FAKE_TRAINER, begin, closed_loop, daemon, pct, write_config

from tests.pg import PgServer


def request(sock: Path, op: str, **fields: Any) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(json.dumps({"v": 1, "id": 1, "op": op, **fields}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError("closed")
            buf += chunk
    out: dict[str, Any] = json.loads(buf)
    return out


def status(sock: Path) -> dict[str, Any] | None:
    try:
        r = request(sock, "status")
    except (OSError, RuntimeError):
        return None
    return r["result"] if r.get("ok") else None


def sample_lag(socks: list[Path], stop: threading.Event, lags: list[float]) -> None:
    while not stop.is_set():
        for s in socks:
            st = status(s)
            if st is not None and not st["leader"]:
                lags.append(float(st["lag_s"]))
        stop.wait(0.05)


def throughput(pg: PgServer, root: Path, a: argparse.Namespace) -> None:
    print(f"{'variant':34} {'submits/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    runs: list[tuple[str, dict[str, Any] | None, int]] = [
        ("SQLite, 1 daemon", None, 1),
        ("PostgreSQL, 1 daemon", {"database_url": pg.fresh_url()}, 1),
        ("PostgreSQL, 3 daemons", {"database_url": pg.fresh_url()}, 3),
    ]
    for label, extra, n in runs:
        ds = []
        try:
            for i in range(n):
                cfg = {**extra, "node_name": f"n{i}"} if extra else {}
                cm = daemon(root / f"{label[:3]}{n}-{i}", **cfg)
                ds.append((cm, cm.__enter__()))
            for _, d in ds:
                d.start()
            for _, d in ds:
                d.ready()
            socks = [d.sock for _, d in ds]
            closed_loop(socks, a.clients, a.warmup)
            lags: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample_lag, args=(socks, stop, lags))
            if n > 1:
                sampler.start()
            dt, responses, lat = closed_loop(socks, a.clients, a.total)
            ok = sum(r.get("ok") is True for r in responses)
            stop.set()
            if n > 1:
                sampler.join()
            print(
                f"{label:34} {a.total / dt:10,.0f} {pct(lat, 0.5) * 1e3:8.2f} {pct(lat, 0.99) * 1e3:8.2f}"
                + ("" if ok == a.total else f"  ERROR: {a.total - ok} failed"),
                flush=True,
            )
            if lags:
                print(
                    f"  follower lag under that load: median {statistics.median(lags) * 1e3:.0f} ms, "
                    f"p99 {pct(lags, 0.99) * 1e3:.0f} ms, max {max(lags) * 1e3:.0f} ms ({len(lags)} samples)"
                )
        finally:
            for cm, _ in ds:
                cm.__exit__(None, None, None)


def failover(pg: PgServer, root: Path, a: argparse.Namespace) -> None:
    url = pg.fresh_url()
    fake = [sys.executable, str(FAKE_TRAINER), "--mode", "slow:30"]
    ds = []
    for i in range(3):
        cm = daemon(root / f"fo{i}", database_url=url, node_name=f"n{i}", leader_timeout_s=a.leader_timeout)
        d = cm.__enter__()
        tables = json.loads(json.dumps(_tables(d)))
        tables["scheduler"] = {"min_pairs": 2, "max_wait_s": 1e9}
        tables["training"]["custom_backends"] = {"fake": fake}
        write_config(d.config, tables)
        ds.append((cm, d))
    try:
        for _, d in ds:
            d.start()
        for _, d in ds:
            d.ready()
        times: list[float] = []
        for trial in range(a.trials):
            leader = _wait_leader([d for _, d in ds])
            term = status(leader.sock)["term"]  # type: ignore[index]
            for k in range(2):  # a job: the leader cuts it and starts training
                request(leader.sock, "submit", voice="fo", bad=f"b{trial}-{k}", good=f"g{trial}-{k}")
            while not any(j["state"] == "training" for j in request(leader.sock, "jobs")["result"]["jobs"]):
                time.sleep(0.02)
            assert leader.proc is not None
            leader.proc.kill()
            killed_at = time.time()
            leader.proc.wait()
            first = None
            while first is None:
                rows = pg.sql(
                    f"SELECT min(at) FROM events WHERE term > {term}", url.split("/")[3].split("?")[0]
                )
                first = rows[0][0]
                if first is None:
                    time.sleep(0.02)
            times.append(float(first) - killed_at)  # type: ignore[arg-type]
            print(f"  trial {trial + 1}: first effect {times[-1]:.2f} s after kill -9", flush=True)
            leader.start()  # back as a follower
            leader.ready()
        print(
            f"fail-over (leader kill -9 -> new leader's first effect), leader_timeout_s={a.leader_timeout}, "
            f"{len(times)} trials: median {statistics.median(times):.2f} s, max {max(times):.2f} s, "
            f"min {min(times):.2f} s"
        )
    finally:
        for cm, _ in ds:
            cm.__exit__(None, None, None)


def _tables(d: Any) -> dict[str, dict[str, Any]]:
    import tomllib

    return tomllib.loads(d.config.read_text())


def _wait_leader(ds: list[Any]) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for d in ds:
            st = status(d.sock)
            if st is not None and st["leader"]:
                return d
        time.sleep(0.02)
    raise RuntimeError("no leader")


def main() -> int:
    a, root = begin(
        total=20_000, warmup=2000, clients=64, trials=20, leader_timeout=2.0, skip_throughput=False
    )
    pg = PgServer()
    try:
        print(f"PostgreSQL: {pg.sql('SHOW server_version')[0][0]}, fsync {pg.sql('SHOW fsync')[0][0]}")
        if not a.skip_throughput:
            throughput(pg, root, a)
        if a.trials:
            failover(pg, root, a)
    finally:
        pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
