"""Queries and watch: the answers to ``ping``, ``status``, ``jobs``, ``job`` and ``voices`` (their
response shapes, in one place), and ``watch``'s stream of history then live events and progress."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio

from beagled import __version__, availability, jobs
from beagled.engine.context import Context
from beagled.errors import NotFound

WATCH_BATCH = 256  # history events a watch reads per query


class Queries:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.started_at = ctx.clock.monotonic()
        # watches read their history one batch at a time, all together: a crowd of watches replaying
        # a long log takes one core at most, never the event loop's
        self._watch_limiter = trio.CapacityLimiter(1)

    def uptime_s(self) -> float:
        return self.ctx.clock.monotonic() - self.started_at

    def ping(self) -> dict[str, Any]:
        return {"version": __version__, "uptime_s": self.uptime_s()}

    def status(self, *, metrics_listen: str | None, lag_s: float) -> dict[str, Any]:
        ctx = self.ctx
        voices = {}
        for name, v in sorted(ctx.state.voices.items()):
            voices[name] = self._with_replicas(
                {
                    **v.public(),
                    "last_verified_at": ctx.verified_at.get(name),
                    "waiting": availability.waiting_reason(ctx.state, name, ctx.cfg.scheduler.min_pairs),
                }
            )
        return {
            "event_seq": ctx.state.seq,
            "paused": ctx.state.paused,
            "jobs": ctx.state.counts(),
            "voices": voices,
            "backends": [b.public() for b in ctx.trainer.statuses()],
            "reload_method": ctx.reloader.method,
            "running": dict(ctx.progress),
            "sleeping": [rec.public(url) for url, rec in sorted(ctx.state.sleeping.items())],
            "metrics": metrics_listen,
            "version": __version__,
            "uptime_s": self.uptime_s(),
            **self._leader_status(lag_s),
        }

    def _leader_status(self, lag_s: float) -> dict[str, Any]:
        ctx = self.ctx
        if ctx.leadership is None:
            return {
                "node": ctx.node,
                "leader": True,
                "leader_node": ctx.node,
                "term": 0,
                "lag_s": 0.0,
                "nodes": [ctx.node],
            }
        who = ctx.leadership.leader
        return {
            "node": ctx.node,
            "leader": ctx.leadership.is_leader,
            "leader_node": who.node if who else None,
            "term": who.term if who else None,
            "lag_s": round(lag_s, 3),
            "nodes": ctx.leadership.nodes or [ctx.node],
        }

    def list_jobs(self, voice: str | None, state: str | None, limit: int) -> dict[str, Any]:
        s = self.ctx.state
        sel = [
            j
            for j in s.jobs.values()
            if (voice is None or j.voice == voice) and (state is None or j.state.value == state)
        ]
        sel.sort(key=lambda j: (j.created_at, j.job_id), reverse=True)
        # older finished jobs are not listed (``job ID`` still answers for them)
        return {"jobs": [j.public() for j in sel[:limit]], "archived": sum(s.archived.values())}

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job with its state history; one that left memory is rebuilt from its own stream."""
        j = self.ctx.state.jobs.get(job_id)
        if j is None:
            stream = await trio.to_thread.run_sync(self.ctx.store.read_stream, f"job:{job_id}")
            if not stream:
                raise NotFound(f"no job {job_id!r}")
            j = jobs.fold_job(stream)
        history = [{"event": t, "state": s, "at": at, "seq": seq} for t, s, at, seq in j.history]
        return {
            "job": {
                **j.public(),
                "pair_ids": list(j.pair_ids),
                "replay_ids": list(j.replay_ids),
                "adapter_dir": j.adapter_dir,
                "base_eval_loss": j.base_eval_loss,
                "progress": self.ctx.progress.get(job_id),
                "history": history,
            }
        }

    def list_voices(self) -> dict[str, Any]:
        s, min_pairs = self.ctx.state, self.ctx.cfg.scheduler.min_pairs
        return {
            "voices": [
                self._with_replicas(
                    {**v.public(), "waiting": availability.waiting_reason(s, name, min_pairs)}
                )
                for name, v in sorted(s.voices.items())
            ]
        }

    def _with_replicas(self, voice: dict[str, Any]) -> dict[str, Any]:
        """Per-replica serving (url, served_name, verified_at), where the reloader knows replicas."""
        replicas = self.ctx.reloader.replicas(voice["voice"])
        return {**voice, "replicas": replicas} if replicas is not None else voice

    async def watch(self, from_seq: int | None) -> AsyncIterator[dict[str, Any]]:
        """History from ``from_seq`` (exclusive), then live events and progress, until the caller stops."""
        ctx = self.ctx
        send, recv = trio.open_memory_channel[dict[str, Any]](4096)
        ctx.subscribers.add(send)
        try:
            last = ctx.state.seq if from_seq is None else from_seq
            while from_seq is not None:  # history in bounded batches, without drafts, one thread hop each
                batch = await trio.to_thread.run_sync(
                    ctx.store.read_public, last, WATCH_BATCH, limiter=self._watch_limiter
                )
                for pub in batch:
                    last = pub["seq"]
                    yield {"event": pub}
                if len(batch) < WATCH_BATCH:
                    break
            async for msg in recv:
                if "event" in msg:
                    if msg["event"]["seq"] <= last:
                        continue
                    last = msg["event"]["seq"]
                yield msg
        finally:
            ctx.subscribers.discard(send)
            send.close()
