"""Which training backends are available: the probe at start-up, re-probes with backoff while a job
waits for a backend, and the retry of probes that timed out."""

from __future__ import annotations

import logging

import trio

from beagled import availability, jobs
from beagled.engine.context import Context

log = logging.getLogger("beagled.engine")


class Probes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def probe(self, *, first: bool = False) -> list[str]:
        """Probe the backends; log (at start-up, or when it changes) what is missing and what to install."""
        trainer = self.ctx.trainer
        before = trainer.available()
        statuses = await trainer.probe_all()
        for b in statuses:
            self.ctx.metrics.backend_available.labels(b.name).set(1 if b.available else 0)
        now = trainer.available()
        if first or now != before:
            missing = availability.unavailable_message((b.name, b.available, b.reason) for b in statuses)
            if missing:
                log.warning(
                    "training backends unavailable: %s",
                    missing,
                    extra={"available": now, "unavailable": [b.name for b in statuses if not b.available]},
                )
            if not now:
                log.warning("no training backend is available: jobs wait until one is installed")
        return now

    async def reprobe_if_blocked(self) -> None:
        if not jobs.blocked_jobs(self.ctx.state) or not self.ctx.probes.due(trio.current_time()):
            return
        await self.settle_blocked(await self.probe())

    async def reprobe_timed_out(self) -> None:
        """Ask again the backends whose probe timed out (longer each time, bounded by the trainer)."""
        trainer = self.ctx.trainer
        if trio.current_time() < trainer.reprobe_at():
            return
        before = trainer.available()
        await trainer.reprobe_due()
        for b in trainer.statuses():
            self.ctx.metrics.backend_available.labels(b.name).set(1 if b.available else 0)
        now = trainer.available()
        if now != before:
            log.info("training backends available after a re-probe: %s", now, extra={"available": now})
            if now and jobs.blocked_jobs(self.ctx.state):
                await self.settle_blocked(now)

    async def settle_blocked(self, backends: list[str]) -> None:
        if not backends:
            self.ctx.probes.failed(trio.current_time())
            return
        self.ctx.probes.succeeded()
        for j in jobs.blocked_jobs(self.ctx.state):
            await self.ctx.execute(jobs.UnblockTraining(j.job_id, tuple(backends)))
