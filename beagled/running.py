"""The training run in progress: how an operator's cancel reaches it, and how executor outages it
reports become (bounded) events.

``RunningWork`` holds one cancel scope per job whose training runs now. The engine's trainer registers a
run (``start`` checks, with no await in between, that the job is still training: a cancel recorded just
before it is never missed); ``pause`` with ``cancel_running`` and ``delete_voice`` with ``force`` first
record ``JobCancelled`` and then ``stop`` the run, which cancels its scope — the trainer's own clean-up
then ends the work (the local worker's process group, or the Ray driver, which kills its actor) — and
waits until it has ended.

``outage_report`` reads a trainer's progress line: the Ray executor marks the first failed connection
of an outage ``"outage": "started"`` and its end ``"outage": "ended"`` (``fallback`` names the trainer
that took the job instead); the engine records one ``ExecutorUnreachable`` / ``ExecutorOutageEnded``
for each (``jobs.decide`` drops repeats), never one event per retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from beagled.jobs import ReportOutage

log = logging.getLogger("beagled.running")

STOP_WAIT_S = 60.0  # a stopped run's clean-up is bounded (SIGTERM, then SIGKILL of its group): a guard


@dataclass
class _Run:
    scope: trio.CancelScope
    ended: trio.Event = field(default_factory=trio.Event)


class RunningWork:
    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}

    @contextmanager
    def start(self, job_id: str, still_training: Callable[[], bool]) -> Iterator[trio.CancelScope]:
        """A cancel scope for the job's run, registered while it is open; cancelled at once when the
        job is no longer training (a cancel recorded before the run started)."""
        run = _Run(trio.CancelScope())
        self._runs[job_id] = run
        if not still_training():
            run.scope.cancel()
        try:
            with run.scope:
                yield run.scope
        finally:
            del self._runs[job_id]
            run.ended.set()

    def running(self) -> list[str]:
        return list(self._runs)

    async def stop(self, job_id: str) -> bool:
        """Cancel the job's run and wait until its clean-up has ended it; False if none ran."""
        run = self._runs.get(job_id)
        if run is None:
            return False
        run.scope.cancel()
        with trio.move_on_after(STOP_WAIT_S) as guard:
            await run.ended.wait()
        if guard.cancelled_caught:
            log.error("a cancelled training has not ended after %.0fs", STOP_WAIT_S, extra={"job_id": job_id})
        return True


def outage_report(job_id: str, msg: dict[str, Any]) -> ReportOutage | None:
    """The outage command a trainer's progress line asks for, or None."""
    mark = msg.get("outage")
    executor = str(msg.get("executor") or "ray")
    if mark == "started":
        retry_at = msg.get("retry_at")
        return ReportOutage(
            job_id,
            executor,
            str(msg.get("message") or "the executor is unreachable"),
            float(retry_at) if isinstance(retry_at, int | float) else None,
        )
    if mark == "ended":
        return ReportOutage(job_id, executor, None, fallback=str(msg.get("fallback") or ""))
    return None
