"""The ``Engine``: the facade that wires the rooms around one ``Context`` and owns what spans them —
recovery, the one writer's entry point (``execute``), following a shared log (catch-up, leadership),
and starting the loops. Every request the server makes is one method here, delegated to its room."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from beagled import events as ev
from beagled import jobs
from beagled.config import Config
from beagled.engine.commands import Commands
from beagled.engine.commit import GroupCommit, OnDone
from beagled.engine.context import Context
from beagled.engine.queries import Queries
from beagled.engine.reconcile import Reconcile
from beagled.engine.served_base import ServedBase
from beagled.engine.serving import Serving
from beagled.engine.snapshots import Snapshots
from beagled.engine.training import Scheduler, Training
from beagled.errors import AdapterError, StoreError
from beagled.ports import (
    AdapterStore,
    Clock,
    Leadership,
    Listener,
    MetricsSink,
    NullMetrics,
    Reloader,
    SleepGuardFactory,
    Store,
    SystemClock,
    Trainer,
)

log = logging.getLogger("beagled.engine")


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
        clock: Clock | None = None,
    ) -> None:
        self.ctx = ctx = Context(
            cfg,
            store,
            voices,
            trainer,
            reloader,
            # the projection: given when an observer (the metrics) must hold it before the engine exists
            state if state is not None else jobs.State(heldout_max=cfg.training.heldout_max),
            metrics if metrics is not None else NullMetrics(),  # None: tests
            clock if clock is not None else SystemClock(),
            leadership=leadership,
            node=node,
        )
        # reload.vllm.sleep_during_training; wakes what the log holds asleep (State.sleeping) either way
        self.sleep_guard = sleep_guard(ctx.execute, lambda: ctx.state.sleeping) if sleep_guard else None
        self.listener = listener
        self.metrics_listen: str | None = None  # HOST:PORT of the metrics endpoint (port 0: the OS's)
        self.recovery: dict[str, Any] | None = None  # what recover() did: replayed, snapshot_seq, seconds
        self._behind_since: float | None = None
        # the rooms
        self.snapshots = Snapshots(ctx)
        self.commit = GroupCommit(ctx, self.snapshots)
        self.queries = Queries(ctx)
        self.served_base = ServedBase(ctx)
        self.scheduler = Scheduler(ctx)
        self.training = Training(ctx, self.served_base, self.sleep_guard, base_model)
        self.serving = Serving(ctx)
        self.reconcile = Reconcile(ctx, self.serving, self.served_base, self.sleep_guard)
        self.commands = Commands(ctx, self.serving)

    # -- what the server and the daemon read -------------------------------------------------------
    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def state(self) -> jobs.State:
        return self.ctx.state

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def reloader(self) -> Reloader:
        return self.ctx.reloader

    @property
    def accepting(self) -> bool:
        return self.commit.accepting

    # -- recovery ----------------------------------------------------------------------------------
    def recover(self) -> int:
        """Rebuild the state (call before serving, off the event loop). Returns the events replayed.

        Loads the newest snapshot this build can read (``beagled.snapshot``), then replays only the
        events after its ``seq``; a damaged snapshot, one of another schema or record shape, or one
        taken under another ``training.heldout_max`` is skipped (with a warning) for an older one, and
        with none left the whole log is replayed. Start-up time follows the tail, not the history.
        """
        ctx = self.ctx
        started = ctx.clock.monotonic()
        base = self.snapshots.load()
        if base is not None:
            for f in dataclasses.fields(jobs.State):  # keep the State object: others hold a reference
                setattr(ctx.state, f.name, getattr(base, f.name))
        n = 0
        for e in ctx.store.read(ctx.state.seq):
            jobs.evolve(ctx.state, e)
            n += 1
        self.snapshots.seq = base.seq if base is not None else 0
        self.recovery = {
            "replayed": n,
            "snapshot_seq": base.seq if base is not None else None,
            "seconds": round(ctx.clock.monotonic() - started, 3),
        }
        if not ctx.shared:  # shared adapter storage: only the leader may touch it (see _elected)
            ctx.voices.clean_staging()
        return n

    async def repair_links(self) -> None:
        """Make every voice's ``current`` link agree with the log (a crash may have left it behind)."""
        voices = self.ctx.voices
        for v in list(self.ctx.state.voices.values()):
            want = v.current_job
            if want and voices.current_job(v.name) != want:
                try:
                    await trio.to_thread.run_sync(voices.promote, v.name, want)
                    log.warning("current link repaired", extra={"voice": v.name, "job_id": want})
                except (AdapterError, OSError) as e:
                    log.error("cannot repair current link: %s", e, extra={"voice": v.name, "job_id": want})

    async def execute(self, cmd: jobs.Command) -> list[ev.Event]:
        """Record ``cmd`` (decide → append → evolve), as the one writer."""
        return await self.ctx.execute(cmd)

    # -- several daemons on one log ----------------------------------------------------------------
    async def _tail_loop(self) -> None:
        """Follow the shared log: a ``NOTIFY`` (or a second without one) wakes a catch-up."""
        assert self.listener is not None
        ctx = self.ctx
        while True:
            head = await trio.to_thread.run_sync(self.listener.wait, 1.0, abandon_on_cancel=True)
            if head is not None and head > ctx.state.seq and self._behind_since is None:
                self._behind_since = ctx.now()
            try:
                async with ctx.lock:
                    await ctx.catch_up()
            except Exception as e:  # StoreError (the database is away), or a bug: never fatal
                if not isinstance(e, StoreError):
                    log.exception("catching up with the shared log failed")
                log.error("cannot read the shared log: %s", e)
                await trio.sleep(1.0)  # nothing to wait on while the database is away
                continue
            self._behind_since = None

    def current_lag_s(self) -> float:
        behind = self.ctx.now() - self._behind_since if self._behind_since is not None else 0.0
        return max(self.ctx.lag_s, behind)

    async def _elected(self, term: int) -> None:
        """This node now leads ``term``: fence its appends with it, catch up, then run as after a crash."""
        ctx = self.ctx
        ctx.store.term = term
        async with ctx.lock:
            await ctx.catch_up()
        await trio.to_thread.run_sync(ctx.voices.clean_staging)
        await self.repair_links()
        ctx.metrics.leader.set(1)

    def _deposed(self) -> None:
        self.ctx.metrics.leader.set(0)
        self.ctx.progress.clear()

    # -- submit (group commit) ---------------------------------------------------------------------
    async def submit(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Store a pair; returns once it is durable (after COMMIT)."""
        return await self.commit.submit(fields)

    def submit_nowait(self, fields: dict[str, Any], on_done: OnDone, *, uid: int | None = None) -> None:
        """Queue a pair for the next group commit (``GroupCommit.submit_nowait``)."""
        self.commit.submit_nowait(fields, on_done, uid=uid)

    def stop_accepting(self) -> None:
        self.commit.accepting = False

    async def drain_submits(self) -> None:
        """Wait until every submit that arrived before ``stop_accepting`` is committed and acked."""
        await self.commit.drain()

    # -- queries -----------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.queries.ping()

    def status(self) -> dict[str, Any]:
        return self.queries.status(metrics_listen=self.metrics_listen, lag_s=self.current_lag_s())

    def list_jobs(
        self, voice: str | None = None, state: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        return self.queries.list_jobs(voice, state, limit)

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self.queries.job(job_id)

    def list_voices(self) -> dict[str, Any]:
        return self.queries.list_voices()

    def watch(self, from_seq: int | None) -> AsyncIterator[dict[str, Any]]:
        """History from ``from_seq`` (exclusive), then live events and progress, until the caller stops."""
        return self.queries.watch(from_seq)

    # -- commands ----------------------------------------------------------------------------------
    async def train_now(self, voice: str) -> dict[str, Any]:
        return await self.commands.train_now(voice)

    async def rollback(self, voice: str, to: str | None) -> dict[str, Any]:
        return await self.commands.rollback(voice, to)

    async def set_paused(
        self, paused: bool, voice: str | None = None, cancel_running: bool = False
    ) -> dict[str, Any]:
        return await self.commands.set_paused(paused, voice, cancel_running)

    async def delete_voice(
        self, voice: str, remove_adapters: bool, erase_drafts: bool = False, force: bool = False
    ) -> dict[str, Any]:
        return await self.commands.delete_voice(voice, remove_adapters, erase_drafts, force)

    # -- loops -------------------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        ctx = self.ctx
        if self.sleep_guard is not None and ctx.leadership is None:  # before anything else: never
            await self.sleep_guard.recover()  # leave a server asleep (a leader does it when elected)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.commit.run)
            if ctx.leadership is None:
                ctx.metrics.leader.set(1)
                nursery.start_soon(self._effect_loops)
            else:
                nursery.start_soon(self._tail_loop)
                nursery.start_soon(ctx.leadership.run, self._elected, self._effect_loops, self._deposed)
            task_status.started()

    async def _effect_loops(self) -> None:
        """What only the leader runs: cutting jobs, training, promotion, reload, reconciliation."""
        if self.sleep_guard is not None and self.ctx.leadership is not None:
            await self.sleep_guard.recover()  # before training or loading: wake what the log holds asleep
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.scheduler.run)
            nursery.start_soon(self.training.run)
            nursery.start_soon(self.serving.run)
            if self.ctx.reloader.method != "none":
                nursery.start_soon(self.reconcile.run)
