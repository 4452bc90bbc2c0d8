"""The operator's commands: ``train``, ``rollback``, ``pause``/``resume`` and ``delete_voice`` — each
recorded through the one writer, answered in the shapes the socket protocol documents."""

from __future__ import annotations

import logging
from typing import Any

import trio

from beagled import events as ev
from beagled import jobs, retention
from beagled.engine.context import Context
from beagled.engine.serving import Serving
from beagled.engine.training import cut_job
from beagled.errors import Conflict, IllegalTransition, NotFound

log = logging.getLogger("beagled.engine")


class Commands:
    def __init__(self, ctx: Context, serving: Serving) -> None:
        self.ctx = ctx
        self.serving = serving

    async def _record(self, cmd: jobs.Command) -> list[ev.Event]:
        """Record ``cmd``; an illegal one answers ``Conflict`` (with the pure core's reason)."""
        try:
            return await self.ctx.execute(cmd)
        except IllegalTransition as e:
            raise Conflict(str(e)) from None

    async def train_now(self, voice: str) -> dict[str, Any]:
        ctx = self.ctx
        if voice not in ctx.state.voices:
            raise NotFound(f"no voice {voice!r}")
        ctx.probes.asked = True  # a backend installed since the last probe is found now
        ctx.wake.train.set()
        events = await self._record(cut_job(ctx, voice, "manual"))
        return {"job_id": events[0].payload.job_id}  # type: ignore[attr-defined]

    async def rollback(self, voice: str, to: str | None) -> dict[str, Any]:
        """Record the rollback, then answer with the serve loop's outcome (it runs the swap)."""
        events = await self._record(jobs.Rollback(voice, to))
        p = events[0].payload
        assert isinstance(p, ev.RollbackStarted)
        outcome = self.serving.expect_rollback(voice, p.job_id)  # no checkpoint since it was applied
        await outcome.done.wait()
        if outcome.error is not None:
            raise outcome.error
        return {"job_id": p.job_id, "version": p.version}

    async def set_paused(self, paused: bool, voice: str | None, cancel_running: bool) -> dict[str, Any]:
        await self._stop_cancelled(await self.ctx.execute(jobs.SetPaused(paused, voice, cancel_running)))
        if voice is not None:
            return {"paused": self.ctx.state.voices[voice].paused, "voice": voice}
        return {"paused": self.ctx.state.paused}

    async def delete_voice(
        self, voice: str, remove_adapters: bool, erase_drafts: bool, force: bool
    ) -> dict[str, Any]:
        ctx = self.ctx
        recorded = await self._record(jobs.DeleteVoice(voice, remove_adapters, force))
        await self._stop_cancelled(recorded)  # before adapters go: no run writes into them any more
        erased = None
        if erase_drafts:  # the voice is gone from the state: no job can start on its pairs now
            async with ctx.lock:
                events = await trio.to_thread.run_sync(
                    ctx.store.erase_drafts, voice, ctx.now(), limiter=ctx.store_limiter
                )
                ctx.apply(events)
            erased = events[0].payload.pairs  # type: ignore[attr-defined]
        removed = False
        if remove_adapters:
            removed = await retention.remove_voice(
                ctx.voices, ctx.reloader, voice, lambda name: name in ctx.state.voices
            )
        ctx.verified_at.pop(voice, None)
        log.info("voice deleted", extra={"voice": voice, "adapters_removed": removed})
        out: dict[str, Any] = {"voice": voice, "deleted": True, "adapters_removed": removed}
        if erase_drafts:
            out["drafts_erased"] = erased
        return out

    async def _stop_cancelled(self, recorded: list[ev.Event]) -> None:
        """End the training of each job just recorded as cancelled (and wait until it has ended)."""
        for e in recorded:
            if isinstance(e.payload, ev.JobCancelled):
                stopped = await self.ctx.running.stop(e.payload.job_id)
                log.info(
                    "job cancelled",
                    extra={"job_id": e.payload.job_id, "reason": e.payload.reason, "was_running": stopped},
                )
        if any(isinstance(e.payload, ev.JobCancelled) for e in recorded):
            self.ctx.wake.sched.set()
