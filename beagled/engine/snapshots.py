"""Snapshots of the projection: the newest readable one loaded at recovery, new ones written in the
background every ``daemon.snapshot_every`` events (the format is ``beagled.snapshot``'s)."""

from __future__ import annotations

import logging
import time

import trio

from beagled import jobs, snapshot
from beagled.engine.context import Context
from beagled.errors import StoreError

log = logging.getLogger("beagled.engine")


class Snapshots:
    POLL_S = 60.0  # an idle committer still looks, this often, for a snapshot that is due

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seq = 0  # seq of the newest snapshot written or loaded
        self._running = False
        self._not_before = 0.0  # monotonic time before which no new snapshot starts (duty-cycle bound)

    def load(self) -> jobs.State | None:
        """The newest stored snapshot that loads exactly, or None (then the whole log is replayed)."""
        want = self.ctx.state
        try:
            for seq, schema, blob in self.ctx.store.snapshots():
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
                    or state.heldout_max != want.heldout_max
                    or state.keep_finished != want.keep_finished
                ):
                    log.warning("skipping a snapshot that does not match", extra={"seq": seq})
                    continue
                return state
        except StoreError as e:
            log.warning("cannot read snapshots (replaying the whole log): %s", e)
        return None

    def maybe(self, nursery: trio.Nursery) -> None:
        """Start a snapshot in ``nursery`` when one is due (and none is being written)."""
        every = self.ctx.cfg.daemon.snapshot_every
        if (
            self._running
            or self.ctx.state.seq - self.seq < every
            or self.ctx.clock.monotonic() < self._not_before
        ):
            return
        self._running = True
        nursery.start_soon(self.write, snapshot.view(self.ctx.state))

    async def write(self, view: jobs.State) -> None:
        """Serialise a consistent view in a worker thread (records are encoded one by one, so the
        event loop keeps the GIL between them), then store it as its own transaction by the one
        writer. Spaced so that snapshots take at most ~5% of the time (a big state costs seconds)."""
        started = time.monotonic()
        try:
            blob = await trio.to_thread.run_sync(snapshot.to_snapshot, view)
            await trio.to_thread.run_sync(
                self.ctx.store.write_snapshot,
                view.seq,
                snapshot.SCHEMA,
                blob,
                limiter=self.ctx.store_limiter,
            )
            self.seq = view.seq
            log.info(
                "snapshot written",
                extra={"seq": view.seq, "bytes": len(blob), "seconds": round(time.monotonic() - started, 3)},
            )
        except (StoreError, OSError) as e:
            log.error("snapshot not written: %s", e)
        finally:
            self._running = False
            spent = time.monotonic() - started
            self._not_before = self.ctx.clock.monotonic() + 19 * spent
