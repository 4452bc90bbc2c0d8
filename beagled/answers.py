"""The ordered answers of one connection: a position per request (``Entry``) and the queue its one
writer drains in order (``Output``), with the per-connection chain of changes (submits, commands) that
a later request waits on, so that it sees what was asked before it take effect first."""

from __future__ import annotations

from collections import deque

import trio


class Entry:
    """One response position in a connection's output order. ``data`` is set when the answer is ready;
    a ``watch`` entry instead streams ``lines`` until ``done``."""

    __slots__ = (
        "after",
        "data",
        "done",
        "lines",
        "next_write",
        "prev_write",
        "ready",
        "settled",
        "stream",
        "write",
    )

    def __init__(self, *, stream: bool = False) -> None:
        self.data: bytes | None = None
        self.stream = stream
        self.lines: deque[bytes] = deque()
        self.done = False
        # Changes (submit, commands) form a chain per connection; a write is *settled* once it and
        # every write before it are answered. A later request waits for the last write before it.
        self.write = False
        self.settled = False
        self.prev_write: Entry | None = None
        self.next_write: Entry | None = None
        self.after: Entry | None = None  # the last write dispatched before this request
        self.ready: trio.Event | None = None  # made by a request that waits for this write to settle


class Output:
    """The ordered answers of one connection and the wake-up of its one writer."""

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.changed = trio.Event()  # for the writer: an answer became ready
        self.drained = trio.Event()  # for the reader: the writer sent some answers
        self.flushed = trio.Event()  # for the connection's one watch: the writer sent its lines
        self.last_write: Entry | None = None  # the newest write of the chain (see ``Entry``)

    def wake(self) -> None:
        self.changed.set()

    async def wait(self) -> None:
        await self.changed.wait()
        self.changed = trio.Event()

    async def wait_drained(self) -> None:
        await self.drained.wait()
        self.drained = trio.Event()

    async def wait_flushed(self) -> None:
        await self.flushed.wait()
        self.flushed = trio.Event()

    def unsettled(self) -> bool:
        return self.last_write is not None and not self.last_write.settled

    def add_write(self, entry: Entry) -> None:
        entry.write = True
        entry.prev_write = self.last_write
        if self.last_write is not None:
            self.last_write.next_write = entry
        self.last_write = entry

    @staticmethod
    def settle(entry: Entry | None) -> None:
        """``entry`` was answered: settle it and every answered write after it whose turn it now is."""
        while (
            entry is not None
            and entry.data is not None
            and not entry.settled
            and (entry.prev_write is None or entry.prev_write.settled)
        ):
            entry.settled = True
            entry.prev_write = None  # nothing needs it any more
            if entry.ready is not None:
                entry.ready.set()
            entry = entry.next_write

    @staticmethod
    async def after_writes_before(entry: Entry) -> None:
        """Wait until every change queued before ``entry`` on this connection is answered."""
        w = entry.after
        entry.after = None
        if w is None or w.settled:
            return
        if w.ready is None:
            w.ready = trio.Event()
        await w.ready.wait()

    def take_ready(self) -> bytes:
        """Every answer ready at the head, in order, as one write (watch lines included)."""
        chunks: list[bytes] = []
        entries = self.entries
        while entries:
            head = entries[0]
            if head.stream:
                chunks.extend(head.lines)
                head.lines.clear()
                if not head.done:
                    break
            elif head.data is None:
                break
            else:
                chunks.append(head.data)
            entries.popleft()
        return b"".join(chunks)
