"""The application service: recovery, group-committed submits, queries, and the loops that advance jobs.

The engine owns the projection (``jobs.State``) and is its one writer: every change goes through
``decide`` → the store → ``evolve``, under one lock, so the state is always the fold of the log. It
knows its collaborators only as ports (``beagled.ports``: the store, the adapter store, the trainer,
the reloader, the sleep guard, the metrics sink), wired by ``daemon``. Effects are bracketed by intent
and outcome events; after a crash, ``recover`` replays the log and the loops find each unfinished
intent and run it again (every effect is idempotent).

Loops (each a task in the daemon's nursery):
- ``_committer``: drains concurrent submits into one transaction, acks each after COMMIT;
- ``_scheduler``: cuts jobs from pending pairs (``min_pairs``, ``max_wait_s``), unless paused;
- ``_trainer_loop``: one training at a time, backends tried in order, attempts retried with backoff;
- ``_serve_loop``: evaluation gate, promotion, reload, rollback;
- ``_reconcile_loop``: checks the server still serves each voice, and serves it again if not.

Several daemons on one (PostgreSQL) log: every node runs the committer and ``_tail_loop``, which folds
in what the others append (woken by ``NOTIFY``, reading by position; ``lag_s``); only the leader
(``beagled.leader.Leadership``) runs the loops above, from ``_effect_loops``, cancelled the moment it
loses the lease. A follower refuses commands that write effects (``unavailable``, naming the leader).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from beagled import __version__, availability, hfcache, jobs, retention, running, snapshot
from beagled import events as ev
from beagled.config import Config
from beagled.errors import (
    AdapterError,
    BeagledError,
    Conflict,
    IllegalTransition,
    NotFound,
    ReloadError,
    StoreError,
    TrainingError,
    Unavailable,
)
from beagled.faults import fault
from beagled.jobs import JobState
from beagled.keys import scoped_key
from beagled.ports import (
    AdapterStore,
    Leadership,
    Listener,
    MetricsSink,
    NullMetrics,
    Reloader,
    ServeTarget,
    SleepGuardFactory,
    Store,
    Trainer,
)

log = logging.getLogger("beagled.engine")

MAX_BATCH = 2048
WATCH_BATCH = 256  # history events a watch reads per query


def new_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def idempotency_key(
    voice: str, bad: str, good: str, key: str | None, *, secret: bytes = b"", uid: int | None = None
) -> str:
    """The stored key: scoped to (uid, voice) and keyed with the log's secret (``store.scoped_key``)."""
    return scoped_key(secret, uid=uid, voice=voice, bad=bad, good=good, key=key)


def training_example(p: ev.PairSubmitted, prompt_template: str) -> dict[str, Any]:
    """A pair as a spec's training example. A chat-shaped pair carries its ``system`` and ``messages``
    (rendered by ``beagled.training.render``) and its ``prompt`` only when given; any other pair without
    a prompt gets ``training.prompt_template``."""
    out: dict[str, Any] = {"pair_id": p.pair_id, "chosen": p.good, "rejected": p.bad}
    if p.messages:
        out["prompt"] = p.prompt or ""
        out["messages"] = [dict(m) for m in p.messages]
    else:
        out["prompt"] = p.prompt if p.prompt is not None else prompt_template.format(bad=p.bad, voice=p.voice)
    if p.system is not None:
        out["system"] = p.system
    return out


class Wakeup:
    """Level-triggered wake-up for a loop: ``set`` from anywhere, ``wait`` until set or a deadline."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, deadline_wall: float | None = None) -> None:
        if deadline_wall is None:
            await self._event.wait()
        else:
            with trio.move_on_after(max(0.0, deadline_wall - time.time())):
                await self._event.wait()
        self._event = trio.Event()


@dataclass
class _PendingSubmit:
    payload: ev.PairSubmitted
    arrived: float
    on_done: Callable[[dict[str, Any] | None, BaseException | None], None]
    heldout_by_share: bool = False  # held out by the hash of its id, not by the client: may be settled


class Engine:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        voices: AdapterStore,
        trainer: Trainer,
        reloader: Reloader,
        *,
        state: jobs.State | None = None,
        metrics: MetricsSink | None = None,
        sleep_guard: SleepGuardFactory | None = None,
        base_model: Callable[[], Path] | None = None,
        leadership: Leadership | None = None,
        listener: Listener | None = None,
        node: str = "",
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.voices = voices
        self.trainer = trainer
        self.reloader = reloader
        # the projection: given when an observer (the metrics) must hold it before the engine exists
        self.state = state if state is not None else jobs.State(heldout_max=cfg.training.heldout_max)
        self.metrics: MetricsSink = metrics if metrics is not None else NullMetrics()  # None: tests
        self._base_model = base_model
        self.started_at = time.monotonic()
        self._lock = trio.Lock()  # the one writer: decide → append → evolve
        self._store_limiter = trio.CapacityLimiter(1)
        self._submits: list[_PendingSubmit] = []
        self._submit_wakeup = Wakeup()
        self._sched_wakeup = Wakeup()
        self._train_wakeup = Wakeup()
        self._serve_wakeup = Wakeup()
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self.progress: dict[str, dict[str, Any]] = {}
        self.probes = availability.ProbeSchedule()
        self.verified_at: dict[str, float] = {}
        self.accepting = True
        self.metrics_listen: str | None = (
            None  # HOST:PORT the metrics endpoint is bound to (port 0: the OS's)
        )
        # reload.vllm.sleep_during_training; wakes what the log holds asleep (State.sleeping) either way
        self.sleep_guard = sleep_guard(self.execute, lambda: self.state.sleeping) if sleep_guard else None
        self.leadership = leadership  # None: the only daemon on its log, always the leader
        self.listener = listener
        self.node = node
        self._shared = leadership is not None
        self.lag_s = 0.0  # how old the oldest event was when the last catch-up folded it in
        self._behind_since: float | None = None
        # watches read their history one batch at a time, all together: a crowd of watches replaying
        # a long log takes one core at most, never the event loop's
        self._watch_limiter = trio.CapacityLimiter(1)
        self._new_voices: set[str] = set()  # voices of queued, not yet committed submits (max_voices)
        self._key_secret: bytes | None = None
        self._rollback_lock = trio.Lock()  # one runner of a rollback's effect at a time
        self.running = running.RunningWork()  # the training run now, for cancels (pause, delete_voice)

    # -- recovery ----------------------------------------------------------------------------------
    def recover(self) -> int:
        """Rebuild the state (call before serving, off the event loop). Returns the events replayed.

        Loads the newest snapshot this build can read (``beagled.snapshot``), then replays only the
        events after its ``seq``; a damaged snapshot, one of another schema or record shape, or one
        taken under another ``training.heldout_max`` is skipped (with a warning) for an older one, and
        with none left the whole log is replayed. Start-up time follows the tail, not the history.
        """
        started = time.monotonic()
        base = self._load_snapshot()
        if base is not None:
            for f in dataclasses.fields(jobs.State):  # keep the State object: others hold a reference
                setattr(self.state, f.name, getattr(base, f.name))
        n = 0
        for e in self.store.read(self.state.seq):
            jobs.evolve(self.state, e)
            n += 1
        self._snap_seq = base.seq if base is not None else 0
        self.recovery = {
            "replayed": n,
            "snapshot_seq": base.seq if base is not None else None,
            "seconds": round(time.monotonic() - started, 3),
        }
        if not self._shared:  # shared adapter storage: only the leader may touch it (see _elected)
            self.voices.clean_staging()
        return n

    async def repair_links(self) -> None:
        """Make every voice's ``current`` link agree with the log (a crash may have left it behind)."""
        for v in list(self.state.voices.values()):
            want = v.current_job
            if want and self.voices.current_job(v.name) != want:
                try:
                    await trio.to_thread.run_sync(self.voices.promote, v.name, want)
                    log.warning("current link repaired", extra={"voice": v.name, "job_id": want})
                except (AdapterError, OSError) as e:
                    log.error("cannot repair current link: %s", e, extra={"voice": v.name, "job_id": want})

    # -- the one writer ----------------------------------------------------------------------------
    async def execute(self, cmd: jobs.Command) -> list[ev.Event]:
        if self.leadership is not None and not self.leadership.is_leader:
            who = self.leadership.leader
            raise Unavailable(
                f"this node ({self.node}) does not lead; "
                + (f"{who.node} does (term {who.term})" if who else "no leader yet")
            )
        async with self._lock:
            if self._shared:
                await self._catch_up()  # decide on everything in the log
            payloads = jobs.decide(self.state, cmd)
            if not payloads:
                return []
            events = await trio.to_thread.run_sync(
                self.store.append, payloads, time.time(), limiter=self._store_limiter
            )
            if self._shared:
                await self._catch_up()  # ours, in log order with whatever others appended first
            else:
                self._apply(events)
        return events

    async def _catch_up(self) -> None:
        """Fold in every event after the projection's position, in order (caller holds the lock)."""
        since = self.state.seq
        events = await trio.to_thread.run_sync(lambda: list(self.store.read(since)))
        now = time.time()
        pairs: list[ev.Event] = []
        for e in events:
            if isinstance(e.payload, ev.PairSubmitted):
                pairs.append(e)
                continue
            if pairs:
                self._apply_pairs(pairs)
                pairs = []
            self._apply([e])
        if pairs:
            self._apply_pairs(pairs)
        self.lag_s = max(0.0, now - events[0].at) if events else 0.0
        self.metrics.replication_lag.set(self.lag_s)

    async def _tail_loop(self) -> None:
        """Follow the shared log: a ``NOTIFY`` (or a second without one) wakes a catch-up."""
        assert self.listener is not None
        while True:
            head = await trio.to_thread.run_sync(self.listener.wait, 1.0, abandon_on_cancel=True)
            if head is not None and head > self.state.seq and self._behind_since is None:
                self._behind_since = time.time()
            try:
                async with self._lock:
                    await self._catch_up()
            except Exception as e:  # StoreError (the database is away), or a bug: never fatal
                if not isinstance(e, StoreError):
                    log.exception("catching up with the shared log failed")
                log.error("cannot read the shared log: %s", e)
                await trio.sleep(1.0)  # nothing to wait on while the database is away
                continue
            self._behind_since = None

    def current_lag_s(self) -> float:
        behind = time.time() - self._behind_since if self._behind_since is not None else 0.0
        return max(self.lag_s, behind)

    async def _elected(self, term: int) -> None:
        """This node now leads ``term``: fence its appends with it, catch up, then run as after a crash."""
        self.store.term = term
        async with self._lock:
            await self._catch_up()
        await trio.to_thread.run_sync(self.voices.clean_staging)
        await self.repair_links()
        self.metrics.leader.set(1)

    def _deposed(self) -> None:
        self.metrics.leader.set(0)
        self.progress.clear()

    def _apply(self, events: list[ev.Event]) -> None:
        for e in events:
            jobs.evolve(self.state, e)
            self.metrics.events.labels(e.type).inc()
            self._publish({"event": e.public()})
        self._sched_wakeup.set()
        self._train_wakeup.set()
        self._serve_wakeup.set()

    def _publish(self, message: dict[str, Any]) -> None:
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(message)
            except trio.WouldBlock:  # a watcher that does not keep up is dropped, never waited for
                self._subscribers.discard(ch)
                ch.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(ch)

    # -- submit (group commit) ---------------------------------------------------------------------
    async def submit(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Store a pair; returns once it is durable (after COMMIT)."""
        done = trio.Event()
        out: list[Any] = []

        def finished(result: dict[str, Any] | None, error: BaseException | None) -> None:
            out[:] = [result, error]
            done.set()

        self.submit_nowait(fields, finished)
        await done.wait()
        result, error = out
        if error is not None:
            raise error
        assert result is not None
        return result  # type: ignore[no-any-return]

    def submit_nowait(
        self,
        fields: dict[str, Any],
        on_done: Callable[[dict[str, Any] | None, BaseException | None], None],
        *,
        uid: int | None = None,
    ) -> None:
        """Queue a pair for the next group commit; ``on_done(result, error)`` runs after COMMIT (on the
        event loop). The server's fast path: no task, channel or event per request. ``uid``: the
        submitter, which scopes the idempotency key."""
        if not self.accepting:
            raise Unavailable("beagled is shutting down")
        arrived = time.monotonic()
        voice = fields["voice"]
        if voice not in self.state.voices and voice not in self._new_voices:
            if len(self.state.voices) + len(self._new_voices) >= self.cfg.daemon.max_voices:
                raise Unavailable(
                    f"too many voices (daemon.max_voices = {self.cfg.daemon.max_voices}); "
                    "submit to an existing voice or ask the operator to delete one"
                )
            self._new_voices.add(voice)
        if self._key_secret is None:
            self._key_secret = self.store.key_secret()
        pair_id = "p-" + secrets.token_hex(8)
        by_share, share = fields.get("heldout") is None, self.cfg.training.heldout_share
        payload = ev.PairSubmitted(
            pair_id=pair_id,
            voice=voice,
            bad=fields["bad"],
            good=fields["good"],
            key=idempotency_key(
                voice, fields["bad"], fields["good"], fields.get("key"), secret=self._key_secret, uid=uid
            ),
            prompt=fields.get("prompt"),
            quality=fields.get("quality"),
            heldout=jobs.is_heldout(pair_id, share) if by_share else fields["heldout"],
            uid=uid,
            system=fields.get("system"),
            messages=tuple(fields["messages"]) if fields.get("messages") else None,
        )
        self._submits.append(_PendingSubmit(payload, arrived, on_done, heldout_by_share=by_share))
        self._submit_wakeup.set()

    async def _committer(self) -> None:
        """Group commit: drain the waiting submits into one transaction, ack each after COMMIT.

        Per batch, not per pair: one thread hop, one store transaction (one idempotency SELECT, three
        ``executemany``), one metrics update per outcome; watchers get the events only if there are
        any. Pairs wake only the scheduler (they change pending pairs, not jobs), and only when a voice
        may now be due. A snapshot of the state is taken every ``daemon.snapshot_every`` events, in
        the background (see ``_snapshot``), never inside a submit's transaction.
        """
        async with trio.open_nursery() as nursery:
            while True:
                if not self._submits:
                    self._maybe_snapshot(nursery)
                    await self._submit_wakeup.wait(time.time() + self._SNAPSHOT_POLL_S)
                    continue
                batch, self._submits = self._submits[:MAX_BATCH], self._submits[MAX_BATCH:]
                settled = jobs.settle_heldout(
                    self.state, [(b.payload, b.heldout_by_share) for b in batch], self.cfg.scheduler.min_pairs
                )
                for b, payload in zip(batch, settled, strict=True):
                    b.payload = payload
                try:
                    async with self._lock:
                        results = await trio.to_thread.run_sync(
                            self.store.submit_batch,
                            [b.payload for b in batch],
                            time.time(),
                            limiter=self._store_limiter,
                        )
                        fresh = [r.event for r in results if r.event is not None]
                        if self._shared and fresh and fresh[0].seq != self.state.seq + 1:
                            await self._catch_up()  # others appended first: fold theirs, then ours
                        else:
                            self._apply_pairs(fresh)
                except Exception as e:  # StoreError, or anything unforeseen: answer, never die
                    if not isinstance(e, StoreError):
                        log.exception("submit batch failed")
                    log.error("submit batch not committed: %s", e)
                    self.metrics.submissions.labels("rejected").inc(len(batch))
                    for b in batch:
                        b.on_done(None, Unavailable(f"the pair was not stored: {e}"))
                    continue
                finally:
                    if self._new_voices:  # keep only new voices still waiting in the queue
                        queued = {b.payload.voice for b in self._submits}
                        known = self.state.voices
                        self._new_voices = {v for v in self._new_voices if v in queued and v not in known}
                fault("after_commit_before_ack")
                self._ack(batch, results)
                self._maybe_snapshot(nursery)

    # -- queries -----------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {"version": __version__, "uptime_s": time.monotonic() - self.started_at}

    def status(self) -> dict[str, Any]:
        voices = {}
        for name, v in sorted(self.state.voices.items()):
            voices[name] = self._with_replicas(
                {
                    **v.public(),
                    "last_verified_at": self.verified_at.get(name),
                    "waiting": availability.waiting_reason(self.state, name, self.cfg.scheduler.min_pairs),
                }
            )
        running = dict(self.progress)
        return {
            "event_seq": self.state.seq,
            "paused": self.state.paused,
            "jobs": self.state.counts(),
            "voices": voices,
            "backends": [b.public() for b in self.trainer.statuses()],
            "reload_method": self.reloader.method,
            "running": running,
            "sleeping": [rec.public(url) for url, rec in sorted(self.state.sleeping.items())],
            "metrics": self.metrics_listen,
            "version": __version__,
            "uptime_s": time.monotonic() - self.started_at,
            **self._leader_status(),
        }

    def _leader_status(self) -> dict[str, Any]:
        if self.leadership is None:
            return {
                "node": self.node,
                "leader": True,
                "leader_node": self.node,
                "term": 0,
                "lag_s": 0.0,
                "nodes": [self.node],
            }
        who = self.leadership.leader
        return {
            "node": self.node,
            "leader": self.leadership.is_leader,
            "leader_node": who.node if who else None,
            "term": who.term if who else None,
            "lag_s": round(self.current_lag_s(), 3),
            "nodes": self.leadership.nodes or [self.node],
        }

    def list_jobs(
        self, voice: str | None = None, state: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        sel = [
            j
            for j in self.state.jobs.values()
            if (voice is None or j.voice == voice) and (state is None or j.state.value == state)
        ]
        sel.sort(key=lambda j: (j.created_at, j.job_id), reverse=True)
        # older finished jobs are not listed (``job ID`` still answers for them)
        return {"jobs": [j.public() for j in sel[:limit]], "archived": sum(self.state.archived.values())}

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job with its state history; one that left memory is rebuilt from its own stream."""
        j = self.state.jobs.get(job_id)
        if j is None:
            stream = await trio.to_thread.run_sync(self.store.read_stream, f"job:{job_id}")
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
                "progress": self.progress.get(job_id),
                "history": history,
            }
        }

    def list_voices(self) -> dict[str, Any]:
        min_pairs = self.cfg.scheduler.min_pairs
        return {
            "voices": [
                self._with_replicas(
                    {**v.public(), "waiting": availability.waiting_reason(self.state, name, min_pairs)}
                )
                for name, v in sorted(self.state.voices.items())
            ]
        }

    def _with_replicas(self, voice: dict[str, Any]) -> dict[str, Any]:
        """Per-replica serving (url, served_name, verified_at), where the reloader knows replicas."""
        replicas = self.reloader.replicas(voice["voice"])
        return {**voice, "replicas": replicas} if replicas is not None else voice

    # -- commands ----------------------------------------------------------------------------------
    async def train_now(self, voice: str) -> dict[str, Any]:
        if voice not in self.state.voices:
            raise NotFound(f"no voice {voice!r}")
        self.probes.asked = True  # a backend installed since the last probe is found now
        self._train_wakeup.set()
        try:
            events = await self.execute(
                jobs.CutJob(
                    voice,
                    new_id("j"),
                    "manual",
                    self.cfg.training.replay_pairs,
                    limit=self.cfg.scheduler.max_pairs_per_job,
                )
            )
        except IllegalTransition as e:
            raise Conflict(str(e)) from None
        return {"job_id": events[0].payload.job_id}  # type: ignore[attr-defined]

    async def rollback(self, voice: str, to: str | None) -> dict[str, Any]:
        try:
            events = await self.execute(jobs.Rollback(voice, to))
        except IllegalTransition as e:
            raise Conflict(str(e)) from None
        p = events[0].payload
        assert isinstance(p, ev.RollbackStarted)
        await self._finish_rollback(voice)
        return {"job_id": p.job_id, "version": p.version}

    async def set_paused(
        self, paused: bool, voice: str | None = None, cancel_running: bool = False
    ) -> dict[str, Any]:
        await self._stop_cancelled(await self.execute(jobs.SetPaused(paused, voice, cancel_running)))
        if voice is not None:
            return {"paused": self.state.voices[voice].paused, "voice": voice}
        return {"paused": self.state.paused}

    async def delete_voice(
        self, voice: str, remove_adapters: bool, erase_drafts: bool = False, force: bool = False
    ) -> dict[str, Any]:
        try:
            recorded = await self.execute(jobs.DeleteVoice(voice, remove_adapters, force))
        except IllegalTransition as e:
            raise Conflict(str(e)) from None
        await self._stop_cancelled(recorded)  # before adapters go: no run writes into them any more
        erased = None
        if erase_drafts:  # the voice is gone from the state: no job can start on its pairs now
            async with self._lock:
                events = await trio.to_thread.run_sync(
                    self.store.erase_drafts, voice, time.time(), limiter=self._store_limiter
                )
                self._apply(events)
            erased = events[0].payload.pairs  # type: ignore[attr-defined]
        removed = False
        if remove_adapters:
            removed = await retention.remove_voice(
                self.voices, self.reloader, voice, lambda name: name in self.state.voices
            )
        self.verified_at.pop(voice, None)
        log.info("voice deleted", extra={"voice": voice, "adapters_removed": removed})
        out: dict[str, Any] = {"voice": voice, "deleted": True, "adapters_removed": removed}
        if erase_drafts:
            out["drafts_erased"] = erased
        return out

    async def _stop_cancelled(self, recorded: list[ev.Event]) -> None:
        """End the training of each job just recorded as cancelled (and wait until it has ended)."""
        for e in recorded:
            if isinstance(e.payload, ev.JobCancelled):
                stopped = await self.running.stop(e.payload.job_id)
                log.info(
                    "job cancelled",
                    extra={"job_id": e.payload.job_id, "reason": e.payload.reason, "was_running": stopped},
                )
        if any(isinstance(e.payload, ev.JobCancelled) for e in recorded):
            self._sched_wakeup.set()

    async def watch(self, from_seq: int | None) -> AsyncIterator[dict[str, Any]]:
        """History from ``from_seq`` (exclusive), then live events and progress, until the caller stops."""
        send, recv = trio.open_memory_channel[dict[str, Any]](4096)
        self._subscribers.add(send)
        try:
            last = self.state.seq if from_seq is None else from_seq
            while from_seq is not None:  # history in bounded batches, without drafts, one thread hop each
                batch = await trio.to_thread.run_sync(
                    self.store.read_public, last, WATCH_BATCH, limiter=self._watch_limiter
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
            self._subscribers.discard(send)
            send.close()

    # -- loops -------------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.sleep_guard is not None and self.leadership is None:  # before anything else: never
            await self.sleep_guard.recover()  # leave a server asleep (a leader does it when elected)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._committer)
            if self.leadership is None:
                self.metrics.leader.set(1)
                nursery.start_soon(self._effect_loops)
            else:
                nursery.start_soon(self._tail_loop)
                nursery.start_soon(self.leadership.run, self._elected, self._effect_loops, self._deposed)
            task_status.started()

    async def _effect_loops(self) -> None:
        """What only the leader runs: cutting jobs, training, promotion, reload, reconciliation."""
        if self.sleep_guard is not None and self.leadership is not None:
            await self.sleep_guard.recover()  # before training or loading: wake what the log holds asleep
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._scheduler)
            nursery.start_soon(self._trainer_loop)
            nursery.start_soon(self._serve_loop)
            if self.reloader.method != "none":
                nursery.start_soon(self._reconcile_loop)

    async def _scheduler(self) -> None:
        s = self.cfg.scheduler
        while True:
            if not self.state.paused:
                now = time.time()
                queued_voices = {j.voice for j in self.state.jobs.values() if j.state == JobState.QUEUED}
                for v in list(self.state.voices.values()):
                    reason = jobs.cut_reason(v, now=now, min_pairs=s.min_pairs, max_wait_s=s.max_wait_s)
                    if reason and v.name not in queued_voices:
                        await self._guarded(
                            self.execute(
                                jobs.CutJob(
                                    v.name,
                                    new_id("j"),
                                    reason,
                                    self.cfg.training.replay_pairs,
                                    limit=s.max_pairs_per_job,
                                )
                            ),
                            "cut job",
                            voice=v.name,
                        )
            deadline = None if self.state.paused else jobs.next_cut_deadline(self.state, s.max_wait_s)
            await self._sched_wakeup.wait(deadline)

    async def _guarded(self, coro: Any, what: str, **ctx: Any) -> Any:
        """Run one step; a failure is logged (and the step retried by its loop), never fatal."""
        try:
            return await coro
        except (BeagledError, OSError) as e:
            log.error("%s failed: %s", what, e, extra=ctx)
        except Exception:
            log.exception("%s failed", what, extra=ctx)
        return None

    async def _probe(self, *, first: bool = False) -> list[str]:
        """Probe the backends; log (at start-up, or when it changes) what is missing and what to install."""
        before = self.trainer.available()
        statuses = await self.trainer.probe_all()
        for b in statuses:
            self.metrics.backend_available.labels(b.name).set(1 if b.available else 0)
        now = self.trainer.available()
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

    async def _reprobe_if_blocked(self) -> None:
        blocked = jobs.blocked_jobs(self.state)
        if not blocked or not self.probes.due(trio.current_time()):
            return
        await self._settle_blocked(await self._probe())

    async def _reprobe_timed_out(self) -> None:
        """Ask again the backends whose probe timed out (longer each time, bounded by the trainer)."""
        if trio.current_time() < self.trainer.reprobe_at():
            return
        before = self.trainer.available()
        await self.trainer.reprobe_due()
        for b in self.trainer.statuses():
            self.metrics.backend_available.labels(b.name).set(1 if b.available else 0)
        now = self.trainer.available()
        if now != before:
            log.info("training backends available after a re-probe: %s", now, extra={"available": now})
            if now and jobs.blocked_jobs(self.state):
                await self._settle_blocked(now)

    async def _settle_blocked(self, backends: list[str]) -> None:
        if not backends:
            self.probes.failed(trio.current_time())
            return
        self.probes.succeeded()
        for j in jobs.blocked_jobs(self.state):
            await self.execute(jobs.UnblockTraining(j.job_id, tuple(backends)))

    async def _trainer_loop(self) -> None:
        await self._settle_blocked(await self._probe(first=True))
        self._train_wakeup.set()
        while True:
            await self._reprobe_if_blocked()
            await self._reprobe_timed_out()
            job = jobs.next_training(self.state, time.time(), self.cfg.scheduler.min_pairs)
            if job is None:
                # while a job is blocked, also wake for the next re-probe (trio clock, backoff)
                reprobe = self.probes.next_at if jobs.blocked_jobs(self.state) else math.inf
                reprobe = min(reprobe, self.trainer.reprobe_at())  # and for a timed-out probe's retry
                with trio.move_on_at(reprobe):
                    await self._train_wakeup.wait(jobs.next_training_deadline(self.state))
                continue
            try:
                await self._train(job)
            except Exception:  # one job's failure must never stop the loop (or the daemon)
                log.exception(
                    "training step failed; retrying", extra={"job_id": job.job_id, "voice": job.voice}
                )
                await trio.sleep(1.0)  # back-off (a failing disk, a bug): nothing to poll for

    def _base_model_path(self) -> str:
        if self.cfg.training.base_model:  # a directory, or a repo id in the local HF cache
            return str(hfcache.resolve(self.cfg.training.base_model))
        if self._base_model is None:
            raise TrainingError("no base model configured (training.base_model)")
        return str(self._base_model())

    async def _build_spec(self, job: jobs.Job) -> dict[str, Any]:
        t = self.cfg.training
        v = self.state.voice(job.voice)
        ids = list(job.pair_ids) + list(job.replay_ids)
        pairs = await trio.to_thread.run_sync(
            self.store.get_pairs, ids + list(job.eval_ids) + list(job.sibling_ids)
        )

        def example(pid: str) -> dict[str, Any]:
            p = pairs[pid]
            return training_example(p, t.prompt_template)

        current = self.voices.adapter_dir(job.voice, v.current_job) if v.current_job else None
        base = await trio.to_thread.run_sync(self._base_model_path)
        if self._served_base() is None and not self._base_checked:
            await self._check_served_base()  # the first job may be cut before reconcile has asked
        return {
            "job_id": job.job_id,
            "voice": job.voice,
            "attempt": job.attempt,
            "base_model": base,
            "served_base": self._served_base(),
            "init_adapter": str(current) if current and t.init == "current" else None,
            "served_adapter": str(current) if current else None,
            "objective": t.objective,
            "dpo_weight": t.dpo_weight,
            "train": [example(pid) for pid in ids if pid in pairs],
            # judged on the evaluation set as it was when the job was cut (never its own siblings,
            # unless the voice had no set yet); the siblings travel apart, for reports only
            "heldout": [example(pid) for pid in job.eval_ids if pid in pairs],
            "siblings": [example(pid) for pid in job.sibling_ids if pid in pairs],
            "hyper": {
                "rank": t.hyper.rank,
                "alpha": t.hyper.alpha,
                "dropout": t.hyper.dropout,
                "target_modules": list(t.hyper.target_modules),
                "num_layers": t.hyper.num_layers,
                "learning_rate": t.hyper.learning_rate,
                "steps": t.hyper.steps,
                "batch_size": t.hyper.batch_size,
                "max_seq_len": t.hyper.max_seq_len,
                "seed": t.hyper.seed,
            },
        }

    async def _train(self, job: jobs.Job) -> None:
        s = self.cfg.scheduler
        backends = self.trainer.available()
        if not backends:  # wait (one event), re-probed with backoff by the loop: no event per retry
            statuses = self.trainer.statuses()
            reasons = availability.unavailable_message((b.name, b.available, b.reason) for b in statuses)
            await self.execute(
                jobs.BlockTraining(job.job_id, f"no training backend is available ({reasons})")
            )
            self.probes.failed(trio.current_time())
            return
        if job.pending_intent == "TrainingStarted":
            log.warning(
                "training was interrupted; starting a new attempt",
                extra={"job_id": job.job_id, "voice": job.voice, "attempt": job.attempt},
            )
        await self.execute(jobs.StartAttempt(job.job_id, tuple(backends)))
        job = self.state.job(job.job_id)
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
            spec = await self._build_spec(job)
        except (TrainingError, OSError) as e:
            await self.execute(
                jobs.FailAttempt(
                    job.job_id,
                    f"cannot prepare training: {e}",
                    time.time(),
                    s.max_attempts,
                    s.retry_backoff_s,
                    s.retry_backoff_max_s,
                )
            )
            return
        errors = []
        for i, backend in enumerate(backends):
            staging = await trio.to_thread.run_sync(
                self.voices.staging_dir, job.voice, job.job_id, job.attempt, backend
            )
            spec["out_dir"] = str(staging / "adapter")
            started = time.monotonic()
            try:
                async with self.sleep_guard.asleep(job.job_id) if self.sleep_guard else _nothing():
                    ran = await self._run_training(job, backend, spec)
                if ran is None:
                    return  # cancelled by an operator: JobCancelled is recorded, the run has ended
                result = ran
                fault("after_training_before_outcome")
                final = await trio.to_thread.run_sync(
                    self.voices.finalize, job.voice, job.job_id, Path(spec["out_dir"])
                )
            except (TrainingError, AdapterError, OSError) as e:
                if not self._still_training(job.job_id):
                    return  # cancelled while it failed: nothing more to record
                timeout = isinstance(e, TrainingError) and e.timeout
                elapsed = time.monotonic() - started
                self.metrics.training_duration.labels(
                    backend, "timeout" if timeout else "failure", self.trainer.executor
                ).observe(elapsed)
                msg = str(e) if not isinstance(e, AdapterError) else f"wrote an invalid adapter: {e}"
                errors.append(f"{backend}: {msg}")
                log.warning(
                    "backend failed: %s",
                    msg,
                    extra={"job_id": job.job_id, "voice": job.voice, "backend": backend},
                )
                await self.execute(jobs.BackendFailed(job.job_id, backend, msg[:2000], timeout, elapsed))
                if i + 1 < len(backends):
                    self.metrics.fallbacks.labels(backend, backends[i + 1]).inc()
                continue
            finally:
                self.progress.pop(job.job_id, None)
            elapsed = time.monotonic() - started
            executor = str(result.get("executor") or self.trainer.executor)
            self.metrics.training_duration.labels(backend, "success", executor).observe(elapsed)
            await self.execute(
                jobs.FinishTraining(
                    job.job_id,
                    backend,
                    str(final),
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
            return
        await self.execute(
            jobs.FailAttempt(
                job.job_id,
                "every backend failed: " + " | ".join(errors)[:4000],
                time.time(),
                s.max_attempts,
                s.retry_backoff_s,
                s.retry_backoff_max_s,
            )
        )

    def _still_training(self, job_id: str) -> bool:
        job = self.state.jobs.get(job_id)
        return job is not None and job.state == JobState.TRAINING

    async def _run_training(self, job: jobs.Job, backend: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        """One try on the trainer, cancellable by an operator (None: cancelled); the executor outages
        its progress reports are recorded as they come, once each way (``running.outage_report``)."""
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
                await self._guarded(self.execute(report), "record executor outage", job_id=job.job_id)

        result: dict[str, Any] | None = None
        failed: Exception | None = None  # raised as itself, not inside the nursery's ExceptionGroup
        with self.running.start(job.job_id, lambda: self._still_training(job.job_id)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(record_outages)
                try:
                    result = await self.trainer.run(backend, spec, on_progress)
                except Exception as e:
                    failed = e
                finally:
                    send.close()
        if failed is not None:
            raise failed
        return result if self._still_training(job.job_id) else None

    def _progress_cb(self, job: jobs.Job, backend: str) -> Callable[[dict[str, Any]], None]:
        started = time.monotonic()

        def on_progress(msg: dict[str, Any]) -> None:
            p = {k: msg.get(k) for k in ("step", "total", "loss", "tokens_per_s")}
            p.update({k: msg[k] for k in ("fault", "message") if k in msg})  # e.g. Ray unreachable: waiting
            elapsed = time.monotonic() - started
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
                at=time.time(),
                elapsed_s=round(elapsed, 3),
                eta_s=None if eta is None else round(eta, 3),
            )
            self.progress[job.job_id] = p
            self._publish({"progress": p})
            if fault_point_due(p):
                fault("mid_training")

        return on_progress

    # -- serving -----------------------------------------------------------------------------------
    def _next_serve(self, now: float) -> tuple[str, Any] | None:
        for v in self.state.voices.values():
            if v.reload_intent is not None:
                return ("rollback", v.name)
        for trained in sorted(self.state.jobs.values(), key=lambda j: j.created_at):
            if trained.state == JobState.TRAINED:
                return ("promote", trained)
        if self.reloader.method == "none":
            return None
        for v in self.state.voices.values():
            if not v.current_job:
                continue
            j = self.state.jobs.get(v.current_job)
            if j is None:
                continue
            due = j.retry_at is None or j.retry_at <= now or j.pending_intent == "ReloadStarted"
            if (
                j.state == JobState.PROMOTED
                or v.served_job != j.job_id
                or v.served_version != v.current_version
            ) and due:
                return ("reload", j)
        return None

    def _next_serve_deadline(self) -> float | None:
        times = [
            j.retry_at
            for j in self.state.jobs.values()
            if j.retry_at is not None and j.state in (JobState.PROMOTED, JobState.RELOADED)
        ]
        return min(times) if times else None

    async def _serve_loop(self) -> None:
        while True:
            action = self._next_serve(time.time())
            if action is None:
                await self._serve_wakeup.wait(self._next_serve_deadline())
                continue
            kind, arg = action
            try:
                if kind == "rollback":
                    await self._finish_rollback(arg)
                elif kind == "promote":
                    await self._promote(arg)
                else:
                    await self._reload(arg, "rollback" if arg.state == JobState.RELOADED else "promotion")
            except Exception:  # one job's failure must never stop the loop (or the daemon)
                log.exception("serving step failed; retrying", extra={"action": kind})
                await trio.sleep(1.0)  # back-off (a failing disk, a bug): nothing to poll for

    async def _promote(self, job: jobs.Job) -> None:
        t = self.cfg.training
        await self.execute(jobs.Gate(job.job_id, t.eval_tolerance, t.gate, t.preference_tolerance))
        job = self.state.job(job.job_id)
        if job.state == JobState.REJECTED:
            log.info(
                "job rejected by the evaluation gate: %s",
                job.error,
                extra={"job_id": job.job_id, "voice": job.voice},
            )
            return
        try:
            path = await trio.to_thread.run_sync(self.voices.promote, job.voice, job.job_id)
        except (AdapterError, OSError) as e:
            await self.execute(jobs.FailJob(job.job_id, f"cannot promote: {e}"))
            return
        fault("after_promotion_before_event")
        await self.execute(jobs.FinishPromotion(job.job_id, str(path)))
        log.info(
            "voice updated",
            extra={
                "job_id": job.job_id,
                "voice": job.voice,
                "version": job.version,
                "eval_loss": job.eval_loss,
            },
        )
        await self._prune(job.voice)

    async def _prune(self, voice: str) -> None:
        promoted = sorted(
            (j for j in self.state.jobs.values() if j.voice == voice and j.version),
            key=lambda j: j.version or 0,
        )
        keep = [j.job_id for j in promoted[-self.cfg.voices.keep_versions :]]
        keep += [
            j.job_id
            for j in self.state.jobs.values()
            if j.voice == voice and j.state in (JobState.TRAINED, JobState.TRAINING, JobState.QUEUED)
        ]
        await retention.prune(self.voices, self.reloader, voice, keep)

    async def _finish_rollback(self, voice: str) -> None:
        # the request handler and the serve loop may both get here: one runs the effect, the other then
        # finds it finished (they swapped ``current`` at once before, and one failed on the other's link)
        async with self._rollback_lock:
            async with self._lock:
                v = self.state.voice(voice)
                target = v.reload_intent
            if target is None:
                return
            try:
                path = await trio.to_thread.run_sync(self.voices.promote, voice, target)
            except (AdapterError, OSError) as e:
                raise Conflict(f"cannot roll back to {target}: {e}") from e
            with contextlib.suppress(IllegalTransition):  # the voice changed meanwhile (deleted)
                await self.execute(jobs.FinishRollback(voice, str(path)))

    async def _reload(self, job: jobs.Job, reason: str) -> None:
        r = self.cfg.reload
        await self.execute(jobs.StartReload(job.job_id, self.reloader.method, reason))
        job = self.state.job(job.job_id)
        target = ServeTarget(
            job.voice, job.version or 0, job.job_id, self.voices.adapter_dir(job.voice, job.job_id)
        )
        fault("mid_reload")
        started = time.monotonic()
        try:
            with trio.fail_after(self.reloader.reload_timeout_s):
                served = await self.reloader.reload(target)
        except (ReloadError, trio.TooSlowError) as e:
            elapsed = time.monotonic() - started
            self.metrics.reload_duration.labels(self.reloader.method, "failure").observe(elapsed)
            msg = str(e) if isinstance(e, ReloadError) else "reload timed out"
            retryable = not isinstance(e, ReloadError) or e.retryable
            log.warning(
                "reload failed: %s",
                msg,
                extra={"job_id": job.job_id, "voice": job.voice, "retryable": retryable},
            )
            # an error that only the operator can fix (bad host key, routes missing) waits the longest
            backoff = r.retry_backoff_s if retryable else r.retry_backoff_max_s
            await self.execute(
                jobs.FailReload(
                    job.job_id,
                    self.reloader.method,
                    msg[:2000],
                    time.time(),
                    backoff,
                    r.retry_backoff_max_s,
                    retryable=retryable,
                )
            )
            return
        elapsed = time.monotonic() - started
        # served.json is part of the effect: durable before the outcome is recorded and published, so a
        # loop that polls the file and one that asks the socket never see two truths (a crash before the
        # outcome reruns the reload, which rewrites the file: idempotent).
        await trio.to_thread.run_sync(
            self.voices.write_served,
            job.voice,
            {
                "voice": job.voice,
                "served_name": served,
                "version": job.version,
                "job_id": job.job_id,
                "adapter_path": str(target.adapter_dir),
                "method": self.reloader.method,
                "at": time.time(),
            },
        )
        fault("after_reload_before_event")
        self.metrics.reload_duration.labels(self.reloader.method, "success").observe(elapsed)
        await self.execute(jobs.FinishReload(job.job_id, self.reloader.method, served, elapsed, reason))
        self.verified_at[job.voice] = time.time()
        log.info(
            "voice served",
            extra={
                "job_id": job.job_id,
                "voice": job.voice,
                "served_name": served,
                "duration_s": round(elapsed, 3),
            },
        )

    async def _reconcile_loop(self) -> None:
        interval = self.cfg.reload.reconcile_interval_s
        await self._check_served_base()
        for name in list(self.state.voices):  # a crash between an unload and its delete: finish it
            await self._guarded(self._prune(name), "retention", voice=name)
        while True:
            await self._guarded(
                retention.sweep(self.voices, self.reloader, lambda name: name in self.state.voices), "sweep"
            )
            await trio.sleep(interval)
            if self.sleep_guard is not None:
                await self._guarded(self.sleep_guard.retry(), "wake")  # a wake that gave up
            for v in list(self.state.voices.values()):
                if not v.served_job or v.served_job != v.current_job:
                    continue
                j = self.state.jobs[v.served_job]
                if j.retry_at is not None and j.retry_at > time.time():
                    continue  # a failed reload is backing off: do not hammer a server that is down
                target = ServeTarget(
                    v.name, j.version or 0, j.job_id, self.voices.adapter_dir(v.name, j.job_id)
                )
                try:
                    with trio.fail_after(self.reloader.reload_timeout_s):
                        ok = await self.reloader.verify(target)
                except (ReloadError, trio.TooSlowError) as e:
                    log.warning("cannot verify the served adapter: %s", e, extra={"voice": v.name})
                    continue
                if ok:
                    self.verified_at[v.name] = time.time()
                    continue
                log.warning("server no longer serves the voice; serving it again", extra={"voice": v.name})
                try:
                    await self._reload(j, "reconcile")
                except Exception:
                    log.exception("reconcile failed", extra={"voice": v.name})

    served_base_found: str | None = None  # the server's base entry id, found at start-up
    _base_checked = False

    def _served_base(self) -> str | None:
        """The name the inference server serves the base under, when known (reload.vllm.served_base,
        else the base entry found at start-up): trained adapters record it as their base."""
        if self.reloader.method != "vllm":
            return None
        return self.cfg.reload.vllm.served_base or self.served_base_found

    async def _check_served_base(self) -> None:
        """At start-up: is the server's base model the training base? A mismatch is logged loudly
        (each load checks again and fails with the same message)."""
        self._base_checked = True
        try:
            with trio.fail_after(self.reloader.reload_timeout_s):
                found = await self.reloader.check_base(self.cfg.training.base_model or None)
            if isinstance(found, str) and found:
                self.served_base_found = found  # written into adapters' base_model_name_or_path
        except ReloadError as e:
            if not e.retryable:
                log.error("the inference server's base model does not match: %s", e)
        except trio.TooSlowError:
            log.warning("cannot check the inference server's base model: no answer")

    # -- shutdown ----------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.accepting = False

    async def drain_submits(self) -> None:
        """Wait until every submit that arrived before ``stop_accepting`` is committed and acked."""
        while self._submits or self._lock.locked():
            async with self._lock:
                pass
            await trio.lowlevel.checkpoint()

    # -- group commit and snapshots (helpers of _committer and recover) ----------------------------
    _SNAPSHOT_POLL_S = 60.0  # an idle committer still looks, this often, for a snapshot that is due
    _snap_seq = 0  # seq of the newest snapshot written or loaded
    _snap_running = False
    _snap_not_before = 0.0  # monotonic time before which no new snapshot starts (duty-cycle bound)
    recovery: dict[str, Any] | None = None  # what recover() did: replayed, snapshot_seq, seconds

    def _apply_pairs(self, events: list[ev.Event]) -> None:
        """``_apply`` for a batch of committed pairs, with the per-event costs taken per batch."""
        if not events:
            return
        state = self.state
        for e in events:
            jobs.evolve(state, e)
        self.metrics.events.labels(ev.PairSubmitted.TYPE).inc(len(events))
        if self._subscribers:
            for e in events:
                self._publish({"event": e.public()})
        s = self.cfg.scheduler
        at = events[-1].at
        for name in {e.payload.voice for e in events}:  # type: ignore[attr-defined]
            v = state.voices.get(name)
            # wake the scheduler when a voice may be due now, or its max_wait clock just started
            if (
                v is not None
                and v.pending
                and (len(v.pending) + len(v.heldout_window) >= s.min_pairs or v.pending[0][1] == at)
            ):
                self._sched_wakeup.set()
                break

    def _ack(self, batch: list[_PendingSubmit], results: list[Any]) -> None:
        now = time.monotonic()
        observe = self.metrics.submit_ack.observe
        dup = conflicts = 0
        for b, r in zip(batch, results, strict=True):
            observe(now - b.arrived)
            if r.conflict:
                conflicts += 1
                b.on_done(
                    None,
                    Conflict(
                        f"key already used for pair {r.pair_id} (seq {r.seq}) with other drafts; "
                        "a key names one pair: use a new key for new drafts"
                    ),
                )
                continue
            dup += r.duplicate
            b.on_done({"pair_id": r.pair_id, "seq": r.seq, "duplicate": r.duplicate}, None)
        if conflicts:
            self.metrics.submissions.labels("rejected").inc(conflicts)
        if len(batch) - dup - conflicts:
            self.metrics.submissions.labels("accepted").inc(len(batch) - dup - conflicts)
        if dup:
            self.metrics.submissions.labels("duplicate").inc(dup)

    def _load_snapshot(self) -> jobs.State | None:
        """The newest stored snapshot that loads exactly, or None (then the whole log is replayed)."""
        try:
            for seq, schema, blob in self.store.snapshots():
                if schema != snapshot.SCHEMA:
                    log.warning("skipping a snapshot of another schema", extra={"seq": seq, "schema": schema})
                    continue
                try:
                    state = snapshot.from_snapshot(blob)
                except snapshot.SnapshotError as e:
                    log.warning("skipping an unreadable snapshot: %s", e, extra={"seq": seq})
                    continue
                if (
                    state.seq != seq
                    or state.heldout_max != self.state.heldout_max
                    or state.keep_finished != self.state.keep_finished
                ):
                    log.warning("skipping a snapshot that does not match", extra={"seq": seq})
                    continue
                return state
        except StoreError as e:
            log.warning("cannot read snapshots (replaying the whole log): %s", e)
        return None

    def _maybe_snapshot(self, nursery: trio.Nursery) -> None:
        every = self.cfg.daemon.snapshot_every
        if (
            self._snap_running
            or self.state.seq - self._snap_seq < every
            or time.monotonic() < self._snap_not_before
        ):
            return
        self._snap_running = True
        nursery.start_soon(self._snapshot, snapshot.view(self.state))

    async def _snapshot(self, view: jobs.State) -> None:
        """Serialise a consistent view in a worker thread (records are encoded one by one, so the
        event loop keeps the GIL between them), then store it as its own transaction by the one
        writer. Spaced so that snapshots take at most ~5% of the time (a big state costs seconds)."""
        started = time.monotonic()
        try:
            blob = await trio.to_thread.run_sync(snapshot.to_snapshot, view)
            await trio.to_thread.run_sync(
                self.store.write_snapshot, view.seq, snapshot.SCHEMA, blob, limiter=self._store_limiter
            )
            self._snap_seq = view.seq
            log.info(
                "snapshot written",
                extra={"seq": view.seq, "bytes": len(blob), "seconds": round(time.monotonic() - started, 3)},
            )
        except (StoreError, OSError) as e:
            log.error("snapshot not written: %s", e)
        finally:
            self._snap_running = False
            self._snap_not_before = time.monotonic() + 19 * (time.monotonic() - started)


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
