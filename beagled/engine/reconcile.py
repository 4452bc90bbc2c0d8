"""Reconcile: at start-up, check the server's base model and finish interrupted prunes; then, every
``reload.reconcile_interval_s``, sweep removed voices, retry a wake that gave up, and check that the
server still serves each voice — and, if not, ask the serve loop to serve it again."""

from __future__ import annotations

import logging

import trio

from beagled import retention
from beagled.engine.context import Context, guarded
from beagled.engine.served_base import ServedBase
from beagled.engine.serving import Serving
from beagled.errors import ReloadError
from beagled.ports import ServeTarget, SleepGuard

log = logging.getLogger("beagled.engine")


class Reconcile:
    def __init__(
        self, ctx: Context, serving: Serving, served_base: ServedBase, sleep_guard: SleepGuard | None
    ) -> None:
        self.ctx = ctx
        self.serving = serving
        self.served_base = served_base
        self.sleep_guard = sleep_guard

    async def run(self) -> None:
        ctx = self.ctx
        await self.served_base.check()
        for name in list(ctx.state.voices):  # a crash between an unload and its delete: finish it
            await guarded(self.serving.prune(name), "retention", voice=name)
        while True:
            await guarded(
                retention.sweep(ctx.voices, ctx.reloader, lambda name: name in ctx.state.voices), "sweep"
            )
            await trio.sleep(ctx.cfg.reload.reconcile_interval_s)
            if self.sleep_guard is not None:
                await guarded(self.sleep_guard.retry(), "wake")  # a wake that gave up
            for name in list(ctx.state.voices):
                await self._check(name)

    async def _check(self, name: str) -> None:
        ctx = self.ctx
        v = ctx.state.voices.get(name)
        if v is None or not v.served_job or v.served_job != v.current_job:
            return
        j = ctx.state.jobs[v.served_job]
        if j.retry_at is not None and j.retry_at > ctx.now():
            return  # a failed reload is backing off: do not hammer a server that is down
        target = ServeTarget(v.name, j.version or 0, j.job_id, ctx.voices.adapter_dir(v.name, j.job_id))
        try:
            with trio.fail_after(ctx.reloader.reload_timeout_s):
                ok = await ctx.reloader.verify(target)
        except (ReloadError, trio.TooSlowError) as e:
            log.warning("cannot verify the served adapter: %s", e, extra={"voice": v.name})
            return
        if ok:
            ctx.verified_at[v.name] = ctx.now()
            return
        log.warning("server no longer serves the voice; serving it again", extra={"voice": v.name})
        self.serving.ask_reload(j.job_id)  # the serve loop runs it: the one runner of reloads
