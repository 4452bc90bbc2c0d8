"""Training: the scheduler that cuts jobs from pending pairs, and the trainer loop that runs one
training at a time (backends tried in order, attempts retried with backoff, progress published,
executor outages recorded, cancellable by an operator)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from beagled import availability, jobs, running
from beagled.engine.context import Context, guarded, new_id
from beagled.engine.probes import Probes
from beagled.engine.served_base import ServedBase
from beagled.engine.spec import build_spec
from beagled.errors import AdapterError, TrainingError
from beagled.faults import fault
from beagled.jobs import JobState
from beagled.ports import SleepGuard
from beagled.training_spec import TrainingSpec

log = logging.getLogger("beagled.engine")


def cut_job(ctx: Context, voice: str, reason: str) -> jobs.CutJob:
    """The command that cuts a job from ``voice``'s pending pairs (by the scheduler, or ``train``)."""
    limit = ctx.cfg.scheduler.max_pairs_per_job
    return jobs.CutJob(voice, new_id("j"), reason, ctx.cfg.training.replay_pairs, limit=limit)


class Scheduler:
    """Cuts jobs from pending pairs (``min_pairs``, ``max_wait_s``), unless paused."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        ctx, s = self.ctx, self.ctx.cfg.scheduler
        while True:
            if not ctx.state.paused:
                now = ctx.now()
                queued_voices = {j.voice for j in ctx.state.jobs.values() if j.state == JobState.QUEUED}
                for v in list(ctx.state.voices.values()):
                    reason = jobs.cut_reason(v, now=now, min_pairs=s.min_pairs, max_wait_s=s.max_wait_s)
                    if reason and v.name not in queued_voices:
                        await guarded(ctx.execute(cut_job(ctx, v.name, reason)), "cut job", voice=v.name)
            deadline = None if ctx.state.paused else jobs.next_cut_deadline(ctx.state, s.max_wait_s)
            await ctx.wake.sched.wait(deadline)


class Training:
    def __init__(
        self,
        ctx: Context,
        served_base: ServedBase,
        sleep_guard: SleepGuard | None,
        base_model: Callable[[], Path] | None,
    ) -> None:
        self.ctx = ctx
        self.probes = Probes(ctx)
        self.served_base = served_base
        self.sleep_guard = sleep_guard
        self.base_model = base_model

    async def run(self) -> None:
        ctx = self.ctx
        await self.probes.settle_blocked(await self.probes.probe(first=True))
        ctx.wake.train.set()
        while True:
            await self.probes.reprobe_if_blocked()
            await self.probes.reprobe_timed_out()
            job = jobs.next_training(ctx.state, ctx.now(), ctx.cfg.scheduler.min_pairs)
            if job is None:
                # while a job is blocked, also wake for the next re-probe (trio clock, backoff)
                reprobe = ctx.probes.next_at if jobs.blocked_jobs(ctx.state) else math.inf
                reprobe = min(reprobe, ctx.trainer.reprobe_at())  # and for a timed-out probe's retry
                with trio.move_on_at(reprobe):
                    await ctx.wake.train.wait(jobs.next_training_deadline(ctx.state))
                continue
            try:
                await self.train(job)
            except Exception:  # one job's failure must never stop the loop (or the daemon)
                log.exception(
                    "training step failed; retrying", extra={"job_id": job.job_id, "voice": job.voice}
                )
                await trio.sleep(1.0)  # back-off (a failing disk, a bug): nothing to poll for

    def _fail_attempt(self, job: jobs.Job, error: str) -> jobs.FailAttempt:
        s = self.ctx.cfg.scheduler
        return jobs.FailAttempt(
            job.job_id, error, self.ctx.now(), s.max_attempts, s.retry_backoff_s, s.retry_backoff_max_s
        )

    async def train(self, job: jobs.Job) -> None:
        ctx = self.ctx
        backends = ctx.trainer.available()
        if not backends:  # wait (one event), re-probed with backoff by the loop: no event per retry
            statuses = ctx.trainer.statuses()
            reasons = availability.unavailable_message((b.name, b.available, b.reason) for b in statuses)
            await ctx.execute(jobs.BlockTraining(job.job_id, f"no training backend is available ({reasons})"))
            ctx.probes.failed(trio.current_time())
            return
        if job.pending_intent == jobs.Intent.TRAINING:
            log.warning(
                "training was interrupted; starting a new attempt",
                extra={"job_id": job.job_id, "voice": job.voice, "attempt": job.attempt},
            )
        await ctx.execute(jobs.StartAttempt(job.job_id, tuple(backends)))
        job = ctx.state.job(job.job_id)
        log.info(
            "training started",
            extra={
                "job_id": job.job_id,
                "voice": job.voice,
                "attempt": job.attempt,
                "pairs": len(job.pair_ids),
                "backends": backends,
            },
        )
        fault("after_training_intent")
        try:
            served_base = await self.served_base.known()
            spec = await build_spec(ctx, job, self.base_model, served_base)
        except (TrainingError, OSError) as e:
            await ctx.execute(self._fail_attempt(job, f"cannot prepare training: {e}"))
            return
        errors = []
        for i, backend in enumerate(backends):
            staging = await trio.to_thread.run_sync(
                ctx.voices.staging_dir, job.voice, job.job_id, job.attempt, backend
            )
            out_dir = staging / "adapter"
            attempt = dataclasses.replace(spec, out_dir=str(out_dir))
            started = ctx.clock.monotonic()
            try:
                async with self.sleep_guard.asleep(job.job_id) if self.sleep_guard else _nothing():
                    ran = await self._run_training(job, backend, attempt)
                if ran is None:
                    return  # cancelled by an operator: JobCancelled is recorded, the run has ended
                result = ran
                fault("after_training_before_outcome")
                final = await trio.to_thread.run_sync(ctx.voices.finalize, job.voice, job.job_id, out_dir)
            except (TrainingError, AdapterError, OSError) as e:
                if not self._still_training(job.job_id):
                    return  # cancelled while it failed: nothing more to record
                timeout = isinstance(e, TrainingError) and e.timeout
                elapsed = ctx.clock.monotonic() - started
                ctx.metrics.training_duration.labels(
                    backend, "timeout" if timeout else "failure", ctx.trainer.executor
                ).observe(elapsed)
                msg = str(e) if not isinstance(e, AdapterError) else f"wrote an invalid adapter: {e}"
                errors.append(f"{backend}: {msg}")
                log.warning(
                    "backend failed: %s",
                    msg,
                    extra={"job_id": job.job_id, "voice": job.voice, "backend": backend},
                )
                await ctx.execute(jobs.BackendFailed(job.job_id, backend, msg[:2000], timeout, elapsed))
                if i + 1 < len(backends):
                    ctx.metrics.fallbacks.labels(backend, backends[i + 1]).inc()
                continue
            finally:
                ctx.progress.pop(job.job_id, None)
            elapsed = ctx.clock.monotonic() - started
            await self._finish(job, backend, result, str(final), elapsed)
            return
        await ctx.execute(self._fail_attempt(job, "every backend failed: " + " | ".join(errors)[:4000]))

    async def _finish(
        self, job: jobs.Job, backend: str, result: dict[str, Any], final: str, elapsed: float
    ) -> None:
        ctx = self.ctx
        executor = str(result.get("executor") or ctx.trainer.executor)
        ctx.metrics.training_duration.labels(backend, "success", executor).observe(elapsed)
        await ctx.execute(
            jobs.FinishTraining(
                job.job_id,
                backend,
                final,
                _num(result.get("train_loss")),
                _num(result.get("eval_loss")),
                _num(result.get("baseline_eval_loss")),
                _num(result.get("base_eval_loss")),
                elapsed,
                _num(result.get("preference_accuracy")),
                _num(result.get("baseline_preference_accuracy")),
                _num(result.get("sibling_eval_loss")),
                _num(result.get("sibling_preference_accuracy")),
                executor,
            )
        )
        log.info(
            "training finished",
            extra={
                "job_id": job.job_id,
                "voice": job.voice,
                "backend": backend,
                "duration_s": round(elapsed, 3),
                "eval_loss": result.get("eval_loss"),
            },
        )

    def _still_training(self, job_id: str) -> bool:
        job = self.ctx.state.jobs.get(job_id)
        return job is not None and job.state == JobState.TRAINING

    async def _run_training(self, job: jobs.Job, backend: str, spec: TrainingSpec) -> dict[str, Any] | None:
        """One try on the trainer, cancellable by an operator (None: cancelled); the executor outages
        its progress reports are recorded as they come, once each way (``running.outage_report``)."""
        ctx = self.ctx
        send, recv = trio.open_memory_channel[jobs.ReportOutage](64)
        progress = self._progress_cb(job, backend)

        def on_progress(msg: dict[str, Any]) -> None:
            report = running.outage_report(job.job_id, msg)
            if report is None:
                progress(msg)
                return
            if report.error is not None:
                progress(msg)  # watch shows the first failed connection too
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                send.send_nowait(report)

        async def record_outages() -> None:
            async for report in recv:
                await guarded(ctx.execute(report), "record executor outage", job_id=job.job_id)

        result: dict[str, Any] | None = None
        failed: Exception | None = None  # raised as itself, not inside the nursery's ExceptionGroup
        with ctx.running.start(job.job_id, lambda: self._still_training(job.job_id)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record_outages)
                try:
                    result = await ctx.trainer.run(backend, spec, on_progress)
                except Exception as e:
                    failed = e
                finally:
                    send.close()
        if failed is not None:
            raise failed
        return result if self._still_training(job.job_id) else None

    def _progress_cb(self, job: jobs.Job, backend: str) -> Callable[[dict[str, Any]], None]:
        ctx = self.ctx
        started = ctx.clock.monotonic()

        def on_progress(msg: dict[str, Any]) -> None:
            p = {k: msg.get(k) for k in ("step", "total", "loss", "tokens_per_s")}
            p.update({k: msg[k] for k in ("fault", "message") if k in msg})  # e.g. Ray unreachable: waiting
            elapsed = ctx.clock.monotonic() - started
            step, total = p["step"], p["total"]
            eta = (
                elapsed / step * (total - step)
                if isinstance(step, int) and isinstance(total, int) and step > 0
                else None
            )
            p.update(
                job_id=job.job_id,
                voice=job.voice,
                backend=backend,
                attempt=job.attempt,
                at=ctx.now(),
                elapsed_s=round(elapsed, 3),
                eta_s=None if eta is None else round(eta, 3),
            )
            ctx.progress[job.job_id] = p
            ctx.publish({"progress": p})
            if fault_point_due(p):
                fault("mid_training")

        return on_progress


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def fault_point_due(progress: dict[str, Any]) -> bool:
    step, total = progress.get("step"), progress.get("total")
    return isinstance(step, int) and isinstance(total, int) and step == max(1, total // 2)
