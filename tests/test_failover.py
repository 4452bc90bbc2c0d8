"""Three real daemons on one real PostgreSQL log: one leads, the others follow; the leader is lost.

Each scenario submits over all three sockets (keyed, every ack recorded) while the leader trains (the
fake trainer, slow), then loses the leader: ``kill -9``, its lease connection terminated
(``pg_terminate_backend``), or the database restarted. Afterwards: a new leader within the lease
timeout, no acked pair lost or duplicated, every job terminal, each voice's current adapter complete,
and no effect event written under a deposed term.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from beagled import errors, manifest
from beagled.leader import LOCK_KEY
from tests.daemon_proc import DaemonProc, fake_backend, poll
from tests.invariants import (
    FINAL_WITH_RELOADER,
    Ack,
    all_jobs,
    check_acked,
    check_pairs_trained_once,
    check_shared_log,
    command_reload_tables,
    reload_script,
)
from tests.pg import PgServer

pytestmark = pytest.mark.slow

TIMEOUT_S = 2.0  # daemon.leader_timeout_s in these tests


def status(d: DaemonProc) -> dict[str, Any] | None:
    try:
        with d.client(timeout=5) as c:
            return c.status()
    except (errors.BeagledError, OSError):
        return None


def leaders(ds: list[DaemonProc]) -> list[tuple[DaemonProc, dict[str, Any]]]:
    out = []
    for d in ds:
        s = status(d)
        if s is not None and s["leader"]:
            out.append((d, s))
    return out


class Submitter:
    """Client threads, one per daemon, submitting keyed pairs; a refused or cut submit is re-sent
    (same key) as a user's loop would; only acknowledgements are recorded."""

    def __init__(self, ds: list[DaemonProc]) -> None:
        self.ds = ds
        self.acked: list[Ack] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(len(ds))]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            key = f"t{i}-{n}"
            try:
                with self.ds[i].client(timeout=10) as c:
                    r = c.submit(bad=f"{key} plain", good=f"{key} in my voice", voice="default", key=key)
            except (errors.BeagledError, OSError):
                if self.ds[i].proc is not None and self.ds[i].proc.poll() is not None:
                    return  # this daemon was killed
                self.stop.wait(0.05)
                continue
            with self.lock:
                self.acked.append(Ack(key, r["pair_id"], "default"))
            n += 1
            self.stop.wait(0.02)

    def __enter__(self) -> Submitter:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def make_team(
    make_daemon: Callable[..., DaemonProc], pg_server: PgServer, tmp_path: Path, fault: str = ""
) -> tuple[list[DaemonProc], str, Path]:
    """Three daemons on a fresh database; with ``fault``, the first one leads and dies at that point."""
    url = pg_server.fresh_url()
    shared = tmp_path / "adapters"
    script, _ = reload_script(tmp_path)
    ds = [
        make_daemon(
            {
                "daemon": {
                    "database_url": url,
                    "node_name": f"n{i}",
                    "leader_timeout_s": TIMEOUT_S,
                    "adapters_dir": str(shared),
                },
                "scheduler": {"min_pairs": 6, "max_wait_s": 300.0},
                "training": {"heldout_share": 0.0},
                **command_reload_tables(script),
            },
            backend=fake_backend("slow:1.5"),
            start=False,
        )
        for i in range(3)
    ]
    if fault:
        ds[0].start(env={"BEAGLED_FAULTS": f"{fault}:kill:1"})
        poll(lambda: (status(ds[0]) or {}).get("leader"), 30, 0.05, "the first daemon leads")
    for d in ds[1 if fault else 0 :]:  # started together, as a team's hosts would be
        d.start(wait=False)
    for d in ds:
        d.wait_ready()
    return ds, url, shared


def check_current(leader: DaemonProc, shared: Path) -> None:
    with leader.client() as c:
        voices = c.voices()["voices"]
    for v in voices:
        link = shared / v["voice"] / "current"
        if v["current_job"] is None:
            continue
        assert link.resolve().name == v["current_job"]
        manifest.verify(link.resolve())


@pytest.mark.parametrize("loss", ["kill", "cut", "db_restart", "mid_promotion", "mid_reload"])
def test_leader_lost(
    make_daemon: Callable[..., DaemonProc], pg_server: PgServer, tmp_path: Path, loss: str
) -> None:
    """kill -9 while training, cut from the database while training, the database restarted while it
    trains; or the leader SIGKILLs itself inside a promotion or a reload (a fault point)."""
    fault = loss if loss.startswith("mid_") else ""
    ds, url, shared = make_team(make_daemon, pg_server, tmp_path, fault)
    (first, s0), *others = poll(lambda: leaders(ds) or None, 30, 0.1, "a leader")
    assert not others, "two leaders"
    poll(  # every node knows who leads
        lambda: {(st or {}).get("leader_node") for st in map(status, ds)} == {s0["node"]}, 30, 0.05
    )
    poll(lambda: (status(ds[-1]) or {}).get("nodes") == ["n0", "n1", "n2"], 30, 0.05, "the node list")
    follower = next(d for d in ds if d is not first)
    with follower.client() as c, pytest.raises(errors.Unavailable, match=f"{s0['node']} does"):
        c.pause()  # effects are the leader's: a follower names it
    with Submitter(ds) as sub:
        if fault:
            assert first is ds[0]
            first.wait_exit(120)  # it kills itself at the fault point
        else:
            first.wait_jobs(lambda js: any(j["state"] == "training" for j in js), timeout=60)
        lost_at = time.monotonic()
        if fault:
            pass
        elif loss == "kill":
            first.kill()
        elif loss == "cut":
            db = url.split("/")[3].split("?", maxsplit=1)[0]
            pg_server.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                f"WHERE locktype = 'advisory' AND objid = {LOCK_KEY} AND granted",
                db,
            )
        else:
            pg_server.restart("fast")
            lost_at = time.monotonic()

        def new_leader() -> tuple[DaemonProc, dict[str, Any]] | None:
            ls = [(d, s) for d, s in leaders(ds) if s["term"] > s0["term"]]
            return ls[0] if len(ls) == 1 else None

        leader, _ = poll(new_leader, 30, 0.05, "a new leader")
        took = time.monotonic() - lost_at
        alive = [d for d in ds if d.proc is not None and d.proc.poll() is None]
        poll(lambda: len(sub.acked) > 30, 60, 0.05, "submits after the loss")
    assert took < TIMEOUT_S * 2 + 3, f"new leader after {took:.1f}s"
    assert len(leaders(alive)) == 1
    with leader.client() as c, contextlib.suppress(errors.BeagledError):
        c.train("default")  # the pending remainder makes one more job (none left: conflict)

    def settled() -> bool:
        with leader.client() as c:
            return all(j["state"] in FINAL_WITH_RELOADER for j in all_jobs(c))

    poll(settled, 120, 0.2, "every job terminal")
    for d in alive:  # every follower's projection caught up, every acked key in the log once
        poll(lambda d=d: (status(d) or {}).get("event_seq") == status(leader)["event_seq"] or None, 30, 0.05)
        with d.client() as c:
            check_acked(c, sub.acked)
    with leader.client() as c:
        jobs = all_jobs(c)
    check_pairs_trained_once(jobs)
    assert any(j["state"] == "reloaded" for j in jobs)
    check_current(leader, shared)
    check_shared_log(url)
    promoted: dict[int, set[str]] = {}  # exactly one adapter per version
    for e in leader.events():
        if e["type"] == "Promoted":
            promoted.setdefault(e["data"]["version"], set()).add(e["data"]["job_id"])
    assert sorted(promoted) == list(range(1, len(promoted) + 1)), promoted
    assert all(len(jobs) == 1 for jobs in promoted.values()), promoted


def test_beaglectl_status_shows_the_node_and_who_leads() -> None:
    from beagled.ctl import format_status

    text = format_status(
        {"node": "n1", "leader": False, "leader_node": "n0", "term": 3, "lag_s": 0.02, "nodes": ["n0", "n1"]}
    )
    assert "node       n1 (follower; leader n0, term 3, lag 0.02 s)" in text
    assert "nodes      n0 *, n1" in text
