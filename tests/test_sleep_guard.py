"""The sleep guard's events where the server is down (a real HTTP client dialling a closed port) and
where an older build left its marker file; the real server's sleep cycle is in test_vllm_serving.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

from beagled import jobs
from beagled.reload.sleep import SleepGuard
from beagled.reload.vllm import VllmReloader
from beagled.store import MemoryStore
from tests.daemon_proc import free_port


class Recorder:
    """decide → append → evolve, as Engine.execute does."""

    def __init__(self) -> None:
        self.state = jobs.State()
        self.store = MemoryStore()

    async def __call__(self, cmd: jobs.Command) -> object:
        events = self.store.append(jobs.decide(self.state, cmd), time.time())
        for e in events:
            jobs.evolve(self.state, e)
        return events

    def types(self) -> list[str]:
        return [e.type for e in self.store.read(0)]


def guard(url: str, rec: Recorder, tmp_path: Path, **kw: float) -> tuple[SleepGuard, VllmReloader]:
    server = VllmReloader(url, timeout_s=2.0)
    g = SleepGuard([server], rec, lambda: rec.state.sleeping, marker=tmp_path / "sleeping.json", retry_s=0.05,
                   **kw)  # fmt: skip
    return g, server


async def test_a_server_down_stays_asleep_in_the_log_and_the_retry_backs_off(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: unreachable, as a server that is down
    rec = Recorder()
    g, server = guard(url, rec, tmp_path, wake_timeout_s=0.5)
    try:
        async with g.asleep("j1"):
            assert set(rec.state.sleeping) == {url}  # recorded before the request
        # the sleep was not answered (so not Slept), the wake gave up: still held asleep, for a retry
        assert rec.types() == ["SleepStarted", "WakeStarted", "WakeFailed"]
        failed = list(rec.store.read(0))[-1].payload
        assert "unreachable" in failed.error or "connect" in failed.error.lower(), failed  # type: ignore[attr-defined]
        assert rec.state.sleeping[url].phase == "asleep" and rec.state.sleeping[url].job_id == "j1"
        await g.retry()  # due at once: one more try, then backoff
        assert rec.types()[-2:] == ["WakeStarted", "WakeFailed"]
        n = len(rec.types())
        await g.retry()  # within the backoff: nothing is tried, nothing recorded (no storm)
        assert len(rec.types()) == n
    finally:
        await server.aclose()


async def test_an_older_build_s_marker_is_adopted_into_the_log_and_removed(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rec = Recorder()
    g, server = guard(url, rec, tmp_path, recover_timeout_s=0.3)
    marker = tmp_path / "sleeping.json"
    marker.write_text(json.dumps({"job_id": "old", "urls": [url + "/"], "at": 1.0}))
    try:
        await g.recover()  # the server is down: start-up goes on after recover_timeout_s
        assert not marker.exists()
        assert rec.types() == ["SleepStarted", "WakeStarted", "WakeFailed"]
        assert rec.state.sleeping[url].job_id == "old"
        await g.recover()  # once: the marker is gone, the log holds the server (still asleep)
        assert rec.types()[3:] == ["WakeStarted", "WakeFailed"]
    finally:
        await server.aclose()
