"""Functional checks behind the benchmarks (no timing assertions): many concurrent clients' submits
are all committed with distinct seqs and survive a crash; snapshots are written every
``snapshot_every`` events and recovery then replays only the tail."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from typing import Any

from tests.daemon_proc import DaemonProc, poll

NO_JOBS = {"scheduler": {"min_pairs": 1_000_000, "max_wait_s": 1e9}}


def log_records(d: DaemonProc, msg: str) -> list[dict[str, Any]]:
    out = []
    for line in d.log_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == msg:
            out.append(rec)
    return out


def test_64_concurrent_clients_get_distinct_seqs_that_survive_a_crash(
    make_daemon: Callable[..., DaemonProc],
) -> None:
    d = make_daemon(NO_JOBS)
    per_client, clients = 10, 64
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(n: int) -> None:
        try:
            with d.client() as c:
                barrier.wait()
                for i in range(per_client):
                    r = c.submit(
                        bad=f"plain {n}/{i}", good=f"voiced {n}/{i}", voice=f"v{n % 4}", key=f"{n}-{i}"
                    )
                    with lock:
                        results.append(r)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    seqs = [r["seq"] for r in results]
    assert len(seqs) == len(set(seqs)) == clients * per_client
    assert not any(r["duplicate"] for r in results)
    d.stop(signal.SIGKILL)  # acks were sent after COMMIT: a crash loses none of them
    d.start()
    with d.client() as c:
        st = c.status()
        assert st["event_seq"] >= max(seqs)
        assert sum(v["pairs_total"] for v in st["voices"].values()) == clients * per_client
        again = c.submit(bad="plain 0/0", good="voiced 0/0", voice="v0", key="0-0")
        assert again["duplicate"] is True and again["seq"] in seqs


def test_snapshot_is_written_every_n_events_and_used_on_restart(
    make_daemon: Callable[..., DaemonProc],
) -> None:
    d = make_daemon({**NO_JOBS, "daemon": {"snapshot_every": 50}})
    with d.client() as c:
        c.pipeline(
            [("submit", {"bad": f"plain {i}", "good": f"voiced {i}", "key": str(i)}) for i in range(120)]
        )
    snaps = poll(lambda: log_records(d, "snapshot written"), 30, what="a snapshot")
    snap_seq = max(s["seq"] for s in snaps)
    assert snap_seq >= 50
    with d.client() as c:
        before = c.status()
    d.stop(signal.SIGKILL)
    d.start()
    recovered = log_records(d, "recovered")[-1]
    assert recovered["events"] == 120 - snap_seq  # only the tail after the snapshot was replayed
    with d.client() as c:
        after = c.status()
    assert after["event_seq"] == before["event_seq"] == 120
    assert after["voices"] == before["voices"] | {
        name: {**v, "last_verified_at": after["voices"][name]["last_verified_at"]}
        for name, v in before["voices"].items()
    }
