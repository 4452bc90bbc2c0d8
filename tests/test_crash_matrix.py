"""The crash matrix: SIGKILL at every named fault point, with real training and a real reloader.

For each point in ``beagled.faults.POINTS`` the daemon runs the MLX backend on the tiny local model (10
steps) and a reloader (a recording command, or the vLLM stand-in), with ``BEAGLED_FAULTS=<point>:kill:N``.
Pairs are submitted with keys until the daemon kills itself; it is restarted without the fault and
every invariant of ``tests.invariants`` must hold. Points in the serving path fire on the *second* job
(N = 2), so that the crash lands while a voice already has a served version to replace.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beagled import errors
from beagled.faults import POINTS
from tests.daemon_proc import DaemonProc, poll
from tests.invariants import Ack, check_all, check_no_orphans, command_reload_tables, reload_script
from tests.vllm_standin import VllmStandin

pytestmark = pytest.mark.slow

# (point, reloader, N): the fault fires the Nth time the point is reached. N = 2 puts the crash on the
# second job, while the voice already serves version 1 (the swap and the reload then replace something).
CASES = [
    ("after_commit_before_ack", "command", 1),
    ("after_training_intent", "command", 1),
    ("mid_training", "command", 1),
    ("after_training_before_outcome", "command", 1),
    ("mid_promotion", "command", 2),
    ("after_promotion_before_event", "command", 1),
    ("mid_reload", "command", 1),
    ("after_reload_before_event", "command", 1),
    ("after_reload_before_event", "vllm", 2),
]
TRAINING_POINTS = {"after_training_intent", "mid_training", "after_training_before_outcome"}


def test_every_fault_point_is_in_the_matrix() -> None:
    assert {p for p, _, _ in CASES} == set(POINTS)


@pytest.fixture
def standin() -> Iterator[VllmStandin]:
    with VllmStandin() as server:
        yield server


def _tables(tiny_model: Path) -> dict[str, dict[str, Any]]:
    return {
        "training": {
            "backends": ["mlx"],
            "base_model": str(tiny_model),
            "heldout_share": 0.0,
            "timeout_s": 120.0,
        },
        "training.hyper": {"steps": 10},
        "scheduler": {"min_pairs": 4, "max_wait_s": 300.0, "retry_backoff_s": 0.05},
    }


def _submit_batch(d: DaemonProc, tag: str, n: int, acked: list[Ack], inflight: list[str]) -> bool:
    """Submit ``n`` keyed pairs; False when the daemon went away (the last key is then in ``inflight``)."""
    try:
        with d.client(timeout=30) as c:
            for i in range(n):
                key = f"{tag}-{i}"
                inflight.append(key)
                r = c.submit(bad=f"{tag} draft {i} plain words", good=f"{tag} draft {i} in my voice", key=key)
                inflight.remove(key)
                acked.append(Ack(key, r["pair_id"], "default"))
    except errors.Unavailable:  # ConnectionLost / DaemonNotRunning / RequestTimeout: it died under us
        return False
    return True


def _jobs_or_none(d: DaemonProc) -> list[dict[str, Any]] | None:
    with d.client(timeout=10) as c:
        return c.jobs(limit=1000)["jobs"]  # type: ignore[no-any-return]


def run_point(
    make_daemon: Any,
    tiny_model: Path,
    tmp_path: Path,
    point: str,
    reloader: str,
    nth: int,
    standin: Any,
    database_url: str = "",
) -> dict[str, Any]:
    script, calls = reload_script(tmp_path)
    tables = _tables(tiny_model)
    if database_url:  # the log on PostgreSQL; the restart waits out the killed daemon's lease
        # a lease of 1 s is lost to any 1 s stall of a loaded machine (the daemon then, rightly, stops its
        # effects and takes a new term: an extra attempt this matrix does not expect); 5 s costs a few
        # seconds per restart and keeps the matrix about crashes, not about lease timing
        tables["daemon"] = {"database_url": database_url, "node_name": "solo", "leader_timeout_s": 5.0}
    if reloader == "command":
        tables.update(command_reload_tables(script))
    else:
        tables["reload"] = {"method": "vllm", "reconcile_interval_s": 3600.0, "retry_backoff_s": 0.05}
        tables["reload.vllm"] = {"url": standin.url, "keep": 1}
    d = make_daemon(tables, start=False)
    started = time.monotonic()
    d.start(env={"BEAGLED_FAULTS": f"{point}:kill:{nth}"})
    acked: list[Ack] = []
    inflight: list[str] = []
    final = ("reloaded", "failed", "rejected")
    for batch in range(nth):
        if not _submit_batch(d, f"{point}-b{batch}", 4, acked, inflight):
            break

        def settled(batch: int = batch) -> bool:
            if d.proc is not None and d.proc.poll() is not None:
                return True
            js = _jobs_or_none(d) or []
            return len(js) == batch + 1 and js[0]["state"] in final

        poll(settled, 180, 0.1, f"batch {batch} served or the daemon killed at {point}")
    rc = d.wait_exit(180)
    assert rc == -signal.SIGKILL, f"expected a SIGKILL at {point}, got {rc}:\n{d.log_text()[-3000:]}"
    check_no_orphans(str(d.state_dir / "specs"))  # no training group outlives its daemon for long
    d.start()  # no fault this time
    if point == "after_commit_before_ack":
        # the pair was committed but never acknowledged: it must be in the log all the same
        assert len(inflight) == 1 and not acked
        with d.client() as c:
            tag, _, i = inflight[0].rpartition("-")  # the retry of the same submit: same key, same drafts
            bad, good = f"{tag} draft {i} plain words", f"{tag} draft {i} in my voice"
            again = c.submit(bad=bad, good=good, key=inflight[0])
        assert again["duplicate"] is True
        acked.append(Ack(inflight[0], again["pair_id"], "default"))
        assert _submit_batch(d, f"{point}-after", 3, acked, [])
    else:
        assert not inflight, f"a submit was in flight at {point}: {inflight}"
    summary = check_all(
        d, acked, reloader=reloader, calls=calls, vllm_adapters=lambda: standin.adapters, timeout=180
    )
    jobs = summary["jobs"]
    assert len(jobs) == nth and all(j["state"] == "reloaded" for j in jobs), [
        (j["job_id"], j["state"], j["error"]) for j in jobs
    ]
    crashed = max(jobs, key=lambda j: j["created_at"])
    if point in TRAINING_POINTS:
        assert crashed["attempt"] == 2, "training interrupted by the crash resumes as attempt 2"
    else:
        assert crashed["attempt"] == 1, f"a crash after training ({point}) must not train again"
    (voice,) = summary["voices"]
    assert voice["version"] == nth and voice["current_job"] == crashed["job_id"]
    d.close()
    return {"point": point, "seconds": round(time.monotonic() - started, 1)}


@pytest.mark.parametrize(("point", "reloader", "nth"), CASES, ids=[f"{p}-{r}-{n}" for p, r, n in CASES])
def test_kill_at_fault_point(
    make_daemon: Any,
    tiny_model: Path,
    tmp_path: Path,
    standin: VllmStandin,
    point: str,
    reloader: str,
    nth: int,
) -> None:
    run_point(make_daemon, tiny_model, tmp_path, point, reloader, nth, standin)


# The same crashes with the log on PostgreSQL: inside training (resumed as attempt 2) and inside the
# promotion of a second version (each case trains for real: the list stays short).
PG_CASES = [("mid_training", "command", 1), ("mid_promotion", "command", 2)]


@pytest.mark.parametrize(("point", "reloader", "nth"), PG_CASES, ids=[f"{p}-{r}-{n}" for p, r, n in PG_CASES])
def test_kill_at_fault_point_postgres(
    make_daemon: Any,
    tiny_model: Path,
    tmp_path: Path,
    pg_server: Any,
    point: str,
    reloader: str,
    nth: int,
) -> None:
    run_point(make_daemon, tiny_model, tmp_path, point, reloader, nth, None, pg_server.fresh_url())
