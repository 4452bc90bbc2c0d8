"""Serving: the serve loop, the only runner of the serving effects — the evaluation gate and
promotion (then pruning old versions), reloading the inference server, and finishing rollbacks.

What to do next is the pure core's decision (``jobs.next_serve``, a typed ``jobs.ServeAction``); this
module runs it. A request handler never runs an effect: ``rollback`` records ``RollbackStarted`` and
waits here for the serve loop's outcome (``expect_rollback``); reconcile asks for a reload."""

from __future__ import annotations

import contextlib
import logging

import trio

from beagled import jobs, retention
from beagled.engine.context import Context
from beagled.errors import AdapterError, Conflict, IllegalTransition, ReloadError, Unavailable
from beagled.faults import fault
from beagled.jobs import JobState
from beagled.ports import ServeTarget

log = logging.getLogger("beagled.engine")


class _Outcome:
    """What a request handler waits on: the serve loop's run of the effect it recorded."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id  # the job the rollback makes ``current`` again
        self.done = trio.Event()
        self.error: BaseException | None = None


class Serving:
    """The serve loop and the effects only it runs. Request handlers record an intent (a rollback)
    and wait for its outcome here (``expect_rollback``); reconcile asks for a reload (``ask_reload``)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._rollbacks: dict[str, list[_Outcome]] = {}  # voice -> handlers waiting for its rollback
        self._reconcile: set[str] = set()  # job ids reconcile found no longer served

    def expect_rollback(self, voice: str, job_id: str) -> _Outcome:
        """Register for the outcome of the voice's rollback to ``job_id`` (call with no checkpoint
        between the recording of ``RollbackStarted`` and this: the serve loop cannot have run it yet)."""
        outcome = _Outcome(job_id)
        self._rollbacks.setdefault(voice, []).append(outcome)
        return outcome

    def ask_reload(self, job_id: str) -> None:
        """Serve ``job_id`` again (reconcile found the server no longer serves it)."""
        self._reconcile.add(job_id)
        self.ctx.wake.serve.set()

    def _settle(self, voice: str, error: BaseException | None) -> None:
        for outcome in self._rollbacks.pop(voice, []):
            outcome.error = error
            outcome.done.set()

    def _settle_orphans(self) -> None:
        """Answer the handlers that wait on a rollback nothing will run any more: their voice went, or
        its rollback is no longer pending (the log changed before the serve loop got to it). A rollback
        another writer finished to the same job succeeded: a ``Conflict`` would invite a retry that rolls
        back one version more."""
        for voice in list(self._rollbacks):
            v = self.ctx.state.voices.get(voice)
            if v is None:
                self._settle(voice, Conflict(f"voice {voice!r} was deleted: no rollback to finish"))
            elif v.rollback_to is None:
                for outcome in self._rollbacks.pop(voice):
                    if outcome.job_id != v.current_job:
                        outcome.error = Conflict(f"voice {voice!r} has no rollback in progress any more")
                    outcome.done.set()

    async def run(self) -> None:
        ctx = self.ctx
        try:
            while True:
                action = jobs.next_serve(
                    ctx.state,
                    ctx.now(),
                    reloads=ctx.reloader.method != "none",
                    reconcile=frozenset(self._reconcile),
                )
                self._settle_orphans()  # waiters whose rollback this decision can no longer find
                if action is None:
                    self._reconcile.clear()  # nothing asked is still due (deleted, or served anew)
                    await ctx.wake.serve.wait(jobs.next_serve_deadline(ctx.state))
                    continue
                try:
                    await self._run(action)
                except Exception:  # one job's failure must never stop the loop (or the daemon)
                    log.exception("serving step failed; retrying", extra={"action": type(action).__name__})
                    await trio.sleep(1.0)  # back-off (a failing disk, a bug): nothing to poll for
        finally:  # deposed or shutting down: nobody will run what the handlers wait for
            for voice in list(self._rollbacks):
                self._settle(voice, Unavailable("the rollback was recorded; the next leader finishes it"))

    async def _run(self, action: jobs.ServeAction) -> None:
        if isinstance(action, jobs.CompleteRollback):
            try:
                await self.finish_rollback(action.voice)
            except Exception as e:
                self._settle(action.voice, e)
                raise
            self._settle(action.voice, None)
        elif isinstance(action, jobs.Promote):
            await self.promote(self.ctx.state.job(action.job_id))
        else:
            self._reconcile.discard(action.job_id)
            await self.reload(self.ctx.state.job(action.job_id), action.reason)

    async def promote(self, job: jobs.Job) -> None:
        ctx, t = self.ctx, self.ctx.cfg.training
        await ctx.execute(jobs.Gate(job.job_id, t.eval_tolerance, t.gate, t.preference_tolerance))
        job = ctx.state.job(job.job_id)
        if job.state == JobState.REJECTED:
            log.info(
                "job rejected by the evaluation gate: %s",
                job.error,
                extra={"job_id": job.job_id, "voice": job.voice},
            )
            return
        try:
            path = await trio.to_thread.run_sync(ctx.voices.promote, job.voice, job.job_id)
        except (AdapterError, OSError) as e:
            await ctx.execute(jobs.FailJob(job.job_id, f"cannot promote: {e}"))
            return
        fault("after_promotion_before_event")
        await ctx.execute(jobs.FinishPromotion(job.job_id, str(path)))
        log.info(
            "voice updated",
            extra={
                "job_id": job.job_id,
                "voice": job.voice,
                "version": job.version,
                "eval_loss": job.eval_loss,
            },
        )
        await self.prune(job.voice)

    async def prune(self, voice: str) -> None:
        state = self.ctx.state
        promoted = sorted(
            (j for j in state.jobs.values() if j.voice == voice and j.version),
            key=lambda j: j.version or 0,
        )
        keep = [j.job_id for j in promoted[-self.ctx.cfg.voices.keep_versions :]]
        keep += [
            j.job_id
            for j in state.jobs.values()
            if j.voice == voice and j.state in (JobState.TRAINED, JobState.TRAINING, JobState.QUEUED)
        ]
        await retention.prune(self.ctx.voices, self.ctx.reloader, voice, keep)

    async def finish_rollback(self, voice: str) -> None:
        """Swap ``current`` to the rollback's target, then record ``RolledBack``."""
        ctx = self.ctx
        v = ctx.state.voices.get(voice)
        target = v.rollback_to if v is not None else None
        if target is None:
            return
        try:
            path = await trio.to_thread.run_sync(ctx.voices.promote, voice, target)
        except (AdapterError, OSError) as e:
            raise Conflict(f"cannot roll back to {target}: {e}") from e
        with contextlib.suppress(IllegalTransition):  # the voice changed meanwhile (deleted)
            await ctx.execute(jobs.FinishRollback(voice, str(path)))

    async def reload(self, job: jobs.Job, reason: str) -> None:
        ctx, r = self.ctx, self.ctx.cfg.reload
        reloader = ctx.reloader
        await ctx.execute(jobs.StartReload(job.job_id, reloader.method, reason))
        job = ctx.state.job(job.job_id)
        target = ServeTarget(
            job.voice, job.version or 0, job.job_id, ctx.voices.adapter_dir(job.voice, job.job_id)
        )
        fault("mid_reload")
        started = ctx.clock.monotonic()
        try:
            with trio.fail_after(reloader.reload_timeout_s):
                served = await reloader.reload(target)
        except (ReloadError, trio.TooSlowError) as e:
            elapsed = ctx.clock.monotonic() - started
            ctx.metrics.reload_duration.labels(reloader.method, "failure").observe(elapsed)
            msg = str(e) if isinstance(e, ReloadError) else "reload timed out"
            retryable = not isinstance(e, ReloadError) or e.retryable
            log.warning(
                "reload failed: %s",
                msg,
                extra={"job_id": job.job_id, "voice": job.voice, "retryable": retryable},
            )
            # an error that only the operator can fix (bad host key, routes missing) waits the longest
            backoff = r.retry_backoff_s if retryable else r.retry_backoff_max_s
            await ctx.execute(
                jobs.FailReload(
                    job.job_id,
                    reloader.method,
                    msg[:2000],
                    ctx.now(),
                    backoff,
                    r.retry_backoff_max_s,
                    retryable=retryable,
                )
            )
            return
        elapsed = ctx.clock.monotonic() - started
        # served.json is part of the effect: durable before the outcome is recorded and published, so a
        # loop that polls the file and one that asks the socket never see two truths (a crash before the
        # outcome reruns the reload, which rewrites the file: idempotent).
        await trio.to_thread.run_sync(
            ctx.voices.write_served,
            job.voice,
            {
                "voice": job.voice,
                "served_name": served,
                "version": job.version,
                "job_id": job.job_id,
                "adapter_path": str(target.adapter_dir),
                "method": reloader.method,
                "at": ctx.now(),
            },
        )
        fault("after_reload_before_event")
        ctx.metrics.reload_duration.labels(reloader.method, "success").observe(elapsed)
        await ctx.execute(jobs.FinishReload(job.job_id, reloader.method, served, elapsed, reason))
        ctx.verified_at[job.voice] = ctx.now()
        log.info(
            "voice served",
            extra={
                "job_id": job.job_id,
                "voice": job.voice,
                "served_name": served,
                "duration_s": round(elapsed, 3),
            },
        )
