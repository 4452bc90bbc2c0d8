"""Group commit of submitted pairs: ``submit``/``submit_nowait`` queue a pair, the committer drains
the queue into one transaction and acks each pair after COMMIT; ``drain`` waits for the queue at
shutdown. Also the pair's stored idempotency key and ``daemon.max_voices`` for new voices."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
import trio.lowlevel

from beagled import events as ev
from beagled import jobs
from beagled.engine.context import Context
from beagled.engine.snapshots import Snapshots
from beagled.errors import Conflict, StoreError, Unavailable
from beagled.faults import fault
from beagled.keys import scoped_key
from beagled.ports import SubmitResult

log = logging.getLogger("beagled.engine")

MAX_BATCH = 2048

OnDone = Callable[[dict[str, Any] | None, BaseException | None], None]


def idempotency_key(
    voice: str, bad: str, good: str, key: str | None, *, secret: bytes = b"", uid: int | None = None
) -> str:
    """The stored key: scoped to (uid, voice) and keyed with the log's secret (``store.scoped_key``)."""
    return scoped_key(secret, uid=uid, voice=voice, bad=bad, good=good, key=key)


@dataclass
class _PendingSubmit:
    payload: ev.PairSubmitted
    arrived: float
    on_done: OnDone
    heldout_by_share: bool = False  # held out by the hash of its id, not by the client: may be settled


class GroupCommit:
    def __init__(self, ctx: Context, snapshots: Snapshots) -> None:
        self.ctx = ctx
        self.snapshots = snapshots
        self.accepting = True
        self._queue: list[_PendingSubmit] = []
        self._new_voices: set[str] = set()  # voices of queued, not yet committed submits (max_voices)
        self._key_secret: bytes | None = None

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

    def submit_nowait(self, fields: dict[str, Any], on_done: OnDone, *, uid: int | None = None) -> None:
        """Queue a pair for the next group commit; ``on_done(result, error)`` runs after COMMIT (on the
        event loop). The server's fast path: no task, channel or event per request. ``uid``: the
        submitter, which scopes the idempotency key."""
        if not self.accepting:
            raise Unavailable("beagled is shutting down")
        ctx = self.ctx
        arrived = ctx.clock.monotonic()
        voice = fields["voice"]
        if voice not in ctx.state.voices and voice not in self._new_voices:
            if len(ctx.state.voices) + len(self._new_voices) >= ctx.cfg.daemon.max_voices:
                raise Unavailable(
                    f"too many voices (daemon.max_voices = {ctx.cfg.daemon.max_voices}); "
                    "submit to an existing voice or ask the operator to delete one"
                )
            self._new_voices.add(voice)
        if self._key_secret is None:
            self._key_secret = ctx.store.key_secret()
        pair_id = "p-" + secrets.token_hex(8)
        by_share, share = fields.get("heldout") is None, ctx.cfg.training.heldout_share
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
        self._queue.append(_PendingSubmit(payload, arrived, on_done, heldout_by_share=by_share))
        ctx.wake.submit.set()

    async def run(self) -> None:
        """Group commit: drain the waiting submits into one transaction, ack each after COMMIT.

        Per batch, not per pair: one thread hop, one store transaction (one idempotency SELECT, three
        ``executemany``), one metrics update per outcome; watchers get the events only if there are
        any. Pairs wake only the scheduler (they change pending pairs, not jobs), and only when a voice
        may now be due. A snapshot of the state is taken every ``daemon.snapshot_every`` events, in
        the background (``Snapshots``), never inside a submit's transaction.
        """
        ctx = self.ctx
        async with trio.open_nursery() as nursery:
            while True:
                if not self._queue:
                    self.snapshots.maybe(nursery)
                    await ctx.wake.submit.wait(ctx.now() + self.snapshots.POLL_S)
                    continue
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                settled = jobs.settle_heldout(
                    ctx.state, [(b.payload, b.heldout_by_share) for b in batch], ctx.cfg.scheduler.min_pairs
                )
                for b, payload in zip(batch, settled, strict=True):
                    b.payload = payload
                try:
                    results = await self._commit(batch)
                except Exception as e:  # StoreError, or anything unforeseen: answer, never die
                    if not isinstance(e, StoreError):
                        log.exception("submit batch failed")
                    log.error("submit batch not committed: %s", e)
                    ctx.metrics.submissions.labels("rejected").inc(len(batch))
                    for b in batch:
                        b.on_done(None, Unavailable(f"the pair was not stored: {e}"))
                    continue
                finally:
                    if self._new_voices:  # keep only new voices still waiting in the queue
                        queued = {b.payload.voice for b in self._queue}
                        known = ctx.state.voices
                        self._new_voices = {v for v in self._new_voices if v in queued and v not in known}
                fault("after_commit_before_ack")
                self._ack(batch, results)
                self.snapshots.maybe(nursery)

    async def _commit(self, batch: list[_PendingSubmit]) -> list[SubmitResult]:
        ctx = self.ctx
        async with ctx.lock:
            results = await trio.to_thread.run_sync(
                ctx.store.submit_batch,
                [b.payload for b in batch],
                ctx.now(),
                limiter=ctx.store_limiter,
            )
            fresh = [r.event for r in results if r.event is not None]
            if ctx.shared and fresh and fresh[0].seq != ctx.state.seq + 1:
                await ctx.catch_up()  # others appended first: fold theirs, then ours
            else:
                ctx.apply_pairs(fresh)
        return results

    def _ack(self, batch: list[_PendingSubmit], results: list[SubmitResult]) -> None:
        now = self.ctx.clock.monotonic()
        metrics = self.ctx.metrics
        observe = metrics.submit_ack.observe
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
            metrics.submissions.labels("rejected").inc(conflicts)
        if len(batch) - dup - conflicts:
            metrics.submissions.labels("accepted").inc(len(batch) - dup - conflicts)
        if dup:
            metrics.submissions.labels("duplicate").inc(dup)

    async def drain(self) -> None:
        """Wait until every submit that arrived before ``accepting`` went false is committed and acked."""
        while self._queue or self.ctx.lock.locked():
            async with self.ctx.lock:
                pass
            await trio.lowlevel.checkpoint()
