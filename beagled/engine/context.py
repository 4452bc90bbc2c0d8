"""The context the engine's rooms share, and the one writer of the projection.

Every room (``commit``, ``snapshots``, ``training``, ``serving``, ``reconcile``, ``queries``,
``commands``) gets one ``Context``: the configuration, the projection (``jobs.State``), the ports
(store, adapter store, trainer, reloader, metrics sink, clock), the one lock, the loops' wake-ups, the
watchers' channels, and what the loops know beyond the log (training progress, last verified). No room
holds another; they meet here.

The one writer: every change goes through ``execute`` (``decide`` → the store → ``evolve``) under the
lock, so the state is always the fold of the log; ``apply`` and ``apply_pairs`` fold in what was
committed, publish it to watchers and wake the loops.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import trio

from beagled import availability, jobs, running
from beagled import events as ev
from beagled.config import Config
from beagled.errors import BeagledError, Unavailable
from beagled.ports import AdapterStore, Clock, Leadership, MetricsSink, Reloader, Store, Trainer

log = logging.getLogger("beagled.engine")


def new_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


class Wakeup:
    """Level-triggered wake-up for a loop: ``set`` from anywhere, ``wait`` until set or a deadline
    (wall time, read from ``clock``)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, deadline_wall: float | None = None) -> None:
        if deadline_wall is None:
            await self._event.wait()
        else:
            with trio.move_on_after(max(0.0, deadline_wall - self._clock.time())):
                await self._event.wait()
        self._event = trio.Event()


@dataclass
class Wakeups:
    """One per loop: the committer, the scheduler, the trainer, the serve loop."""

    submit: Wakeup
    sched: Wakeup
    train: Wakeup
    serve: Wakeup

    def effects(self) -> None:
        self.sched.set()
        self.train.set()
        self.serve.set()


@dataclass
class Context:
    cfg: Config
    store: Store
    voices: AdapterStore
    trainer: Trainer
    reloader: Reloader
    state: jobs.State
    metrics: MetricsSink
    clock: Clock
    leadership: Leadership | None = None  # None: the only daemon on its log, always the leader
    node: str = ""
    lock: trio.Lock = field(default_factory=trio.Lock)  # the one writer: decide → append → evolve
    store_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = field(default_factory=set)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)  # of the trainings running now
    verified_at: dict[str, float] = field(default_factory=dict)  # when each voice was last seen served
    probes: availability.ProbeSchedule = field(default_factory=availability.ProbeSchedule)
    running: running.RunningWork = field(default_factory=running.RunningWork)  # for cancels
    lag_s: float = 0.0  # how old the oldest event was when the last catch-up folded it in
    wake: Wakeups = field(init=False)

    def __post_init__(self) -> None:
        c = self.clock
        self.wake = Wakeups(Wakeup(c), Wakeup(c), Wakeup(c), Wakeup(c))

    @property
    def shared(self) -> bool:
        """Several daemons on one log (a leadership was given)."""
        return self.leadership is not None

    def now(self) -> float:
        return self.clock.time()

    # -- the one writer ----------------------------------------------------------------------------
    async def execute(self, cmd: jobs.Command) -> list[ev.Event]:
        if self.leadership is not None and not self.leadership.is_leader:
            who = self.leadership.leader
            raise Unavailable(
                f"this node ({self.node}) does not lead; "
                + (f"{who.node} does (term {who.term})" if who else "no leader yet")
            )
        async with self.lock:
            if self.shared:
                await self.catch_up()  # decide on everything in the log
            payloads = jobs.decide(self.state, cmd)
            if not payloads:
                return []
            events = await trio.to_thread.run_sync(
                self.store.append, payloads, self.now(), limiter=self.store_limiter
            )
            if self.shared:
                await self.catch_up()  # ours, in log order with whatever others appended first
            else:
                self.apply(events)
        return events

    async def catch_up(self) -> None:
        """Fold in every event after the projection's position, in order (caller holds the lock)."""
        since = self.state.seq
        events = await trio.to_thread.run_sync(lambda: list(self.store.read(since)))
        now = self.now()
        pairs: list[ev.Event] = []
        for e in events:
            if isinstance(e.payload, ev.PairSubmitted):
                pairs.append(e)
                continue
            if pairs:
                self.apply_pairs(pairs)
                pairs = []
            self.apply([e])
        if pairs:
            self.apply_pairs(pairs)
        self.lag_s = max(0.0, now - events[0].at) if events else 0.0
        self.metrics.replication_lag.set(self.lag_s)

    def apply(self, events: list[ev.Event]) -> None:
        for e in events:
            jobs.evolve(self.state, e)
            self.metrics.events.labels(e.type).inc()
            self.publish({"event": e.public()})
        self.wake.effects()

    def apply_pairs(self, events: list[ev.Event]) -> None:
        """``apply`` for a batch of committed pairs, with the per-event costs taken per batch."""
        if not events:
            return
        state = self.state
        for e in events:
            jobs.evolve(state, e)
        self.metrics.events.labels(ev.PairSubmitted.TYPE).inc(len(events))
        if self.subscribers:
            for e in events:
                self.publish({"event": e.public()})
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
                self.wake.sched.set()
                break

    def publish(self, message: dict[str, Any]) -> None:
        for ch in list(self.subscribers):
            try:
                ch.send_nowait(message)
            except trio.WouldBlock:  # a watcher that does not keep up is dropped, never waited for
                self.subscribers.discard(ch)
                ch.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.discard(ch)


async def guarded(coro: Awaitable[Any], what: str, **ctx: Any) -> Any:
    """Run one step; a failure is logged (and the step retried by its loop), never fatal."""
    try:
        return await coro
    except (BeagledError, OSError) as e:
        log.error("%s failed: %s", what, e, extra=ctx)
    except Exception:
        log.exception("%s failed", what, extra=ctx)
    return None
