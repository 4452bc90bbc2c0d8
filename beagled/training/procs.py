"""Worker processes, seen from both ends of their pipes: reading their lines and ending their groups.

Owns the reading of the worker protocol (docs/internals.md) in one place: ``parse_line`` turns one line
of a worker's stdout into a ``WorkerLine`` (or None for anything that is not a JSON object),
``LineBuffer`` cuts a byte stream into lines (optionally dropping over-long ones), ``JobLines`` follows
one job through its lines (progress passed on, ``log`` lines logged, its ``result`` or ``error`` kept,
anything else kept as stray output), and ``job_lines`` yields the jobs a warm worker reads on stdin.

And the one way a process group is ended: ``signal_group`` (a group that is gone, or not ours, is no
error) and ``kill_group`` (SIGTERM, a grace, SIGKILL, and SIGKILL again for children of the group that
outlive their leader). A process run to its end (a probe, a reload command) is run by
``trio.run_process(start_new_session=True, deliver_cancel=kill_group)``; a training try or a warm worker
does not fit ``run_process``: its group is killed after a normal exit too (its leader's children may
live on), and a warm worker outlives any one call.

Stdlib only at import time: the worker subprocess (``worker.py``, ``ray_driver.py``) imports this module
too, possibly in a Python environment without trio; ``kill_group`` imports trio when it runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio

log = logging.getLogger("beagled.training")

MAX_LINE_BYTES = 1 << 20  # a worker's stdout line longer than this is garbage, not protocol
STRAY_CHARS = 500  # how much of a line that is not protocol is kept
MESSAGE_CHARS = 2000  # how much of an ``error`` or ``log`` message is kept


@dataclass(frozen=True)
class WorkerLine:
    """One protocol line: its ``type`` and the whole JSON object (``body``, itself passed on)."""

    type: str
    body: dict[str, Any]

    def message(self, default: str = "") -> str:
        return str(self.body.get("message", default))[:MESSAGE_CHARS]


def parse_line(raw: bytes) -> WorkerLine | None:
    """One stdout line as a protocol line; None when it is not a JSON object (stray output)."""
    raw = raw.strip()
    if not raw.startswith(b"{"):
        return None
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return WorkerLine(str(msg.get("type", "")), msg) if isinstance(msg, dict) else None


class LineBuffer:
    """Cuts received chunks into lines. With ``max_bytes``, a line longer than that is dropped up to
    its newline and a note with its head goes to ``on_dropped`` instead."""

    def __init__(self, max_bytes: int | None = None, on_dropped: Callable[[str], None] = lambda _: None):
        self._buf = b""
        self._skipping = False  # inside a line over max_bytes: drop it up to its newline
        self._max = max_bytes
        self._on_dropped = on_dropped

    def feed(self, chunk: bytes | bytearray) -> list[bytes]:
        """The lines ``chunk`` completes (without their newlines)."""
        if self._skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                return []
            chunk, self._skipping = chunk[nl + 1 :], False
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if self._max is not None and len(self._buf) > self._max:  # no protocol line is this long
            head = self._buf[:200].decode(errors="replace")
            self._on_dropped(f"(stdout line over {self._max} bytes dropped) {head}")
            self._buf, self._skipping = b"", True
        return lines


class JobLines:
    """One job's lines as the daemon reads them: ``progress`` goes to ``on_progress``, ``log`` to the
    debug log; the ``result`` (its object) and the ``error`` (its message) are kept, and every line that
    is not protocol is appended to ``stray``."""

    def __init__(
        self, backend: str, on_progress: Callable[[dict[str, Any]], None], stray: MutableSequence[str]
    ) -> None:
        self.backend = backend
        self.on_progress = on_progress
        self.stray = stray
        self.result: dict[str, Any] | None = None
        self.error: str | None = None

    def take(self, raw: bytes) -> bool:
        """Read one line; True when it ended the job (its ``result`` or ``error`` line)."""
        line = parse_line(raw)
        if line is None:
            self.stray.append(raw.decode(errors="replace")[:STRAY_CHARS])
        elif line.type == "progress":
            self.on_progress(line.body)
        elif line.type == "result":
            self.result = line.body
            return True
        elif line.type == "error":
            self.error = line.message("error")
            return True
        elif line.type == "log":
            log.debug("worker: %s", line.message(), extra={"backend": self.backend})
        return False


def job_lines(stream: Iterable[bytes]) -> Iterator[bytes]:
    """The non-blank lines of a warm worker's stdin: one JSON job spec each."""
    for raw in stream:
        if raw.strip():
            yield raw


def how_it_ended(returncode: int | None) -> str:
    """A worker's end in words, from its exit status (None: it has not exited)."""
    if returncode is None:
        return "failed"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if there is no such group or it is not ours."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def kill_group(proc: trio.Process, grace_s: float = 2.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL it if it has not exited within
    ``grace_s``; shielded from cancellation (it is what a cancelled try does last)."""
    import trio

    with trio.CancelScope(shield=True):
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if proc.returncode is not None:
                break
            signal_group(proc.pid, sig)
            with trio.move_on_after(wait):
                await proc.wait()
        # the leader may be gone while children of its group live on
        signal_group(proc.pid, signal.SIGKILL)
