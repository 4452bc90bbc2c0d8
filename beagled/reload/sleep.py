"""One GPU for training and serving: put the vLLM server(s) to sleep while a job trains, wake after.

``reload.vllm.sleep_during_training = true``: before a job trains, ``POST /sleep?level=N`` on every
configured server; after training (success or failure) ``POST /wake_up``, then ``GET /is_sleeping``
must answer false before anything is loaded. The daemon never leaves a server asleep: the intent is
made durable *before* the sleep request (a file ``sleeping.json`` in ``state_dir``, fsynced, naming the
servers and the job) and cleared only after every server is verified awake; at start-up, before any
other work, ``recover`` wakes the servers a crashed daemon may have put to sleep.

A completion sent to a sleeping server waits until it wakes: this is for a single-GPU box where the
writing loop can stand a pause of one training; on CPU vLLM (``VLLM_SERVER_DEV_MODE=1``) the state is
real but no memory is freed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from beagled.errors import ReloadError

log = logging.getLogger("beagled.sleep")


class Sleeper(Protocol):
    url: str

    async def sleep(self, level: int) -> None: ...
    async def wake_up(self) -> None: ...
    async def is_sleeping(self) -> bool: ...


class SleepGuard:
    def __init__(
        self,
        servers: Sequence[Sleeper],
        marker: Path,
        *,
        level: int = 1,
        wake_timeout_s: float = 120.0,
        retry_s: float = 1.0,
    ) -> None:
        self.servers = list(servers)
        self.marker = marker
        self.level = level
        self.wake_timeout_s = wake_timeout_s
        self.retry_s = retry_s
        self.timings: dict[str, float] = {}  # the last cycle: sleep_s, wake_s (for status/benchmarks)

    def _write_marker(self, job_id: str) -> None:
        tmp = self.marker.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump({"job_id": job_id, "urls": [s.url for s in self.servers], "at": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.marker)
        fd = os.open(self.marker.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def pending(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def recover(self) -> None:
        """A crashed daemon may have left servers asleep: wake them (until they answer awake)."""
        if self.pending() is None:
            return
        log.warning("a previous run put the inference server to sleep: waking it", extra=self.pending())
        await self.wake()

    async def wake(self) -> None:
        """Wake every server and verify ``/is_sleeping`` is false; retried until it holds."""
        started = time.monotonic()
        awake: set[str] = set()
        while True:
            for server in self.servers:
                if server.url in awake:
                    continue
                try:
                    await server.wake_up()
                    if not await server.is_sleeping():
                        awake.add(server.url)
                except ReloadError as e:
                    log.warning("cannot wake vLLM at %s yet: %s", server.url, e)
            if len(awake) == len(self.servers):
                break
            await trio.sleep(self.retry_s)  # a server that is down gives no event to wait for
        await trio.to_thread.run_sync(lambda: self.marker.unlink(missing_ok=True))
        self.timings["wake_s"] = time.monotonic() - started

    @contextlib.asynccontextmanager
    async def asleep(self, job_id: str) -> AsyncIterator[None]:
        """Servers asleep for the body; awake (verified) after it, however it ends."""
        await trio.to_thread.run_sync(self._write_marker, job_id)
        started = time.monotonic()
        try:
            for server in self.servers:
                try:
                    await server.sleep(self.level)
                except ReloadError as e:  # a server that cannot sleep only costs the GPU memory
                    log.warning("cannot put vLLM at %s to sleep: %s", server.url, e)
            self.timings["sleep_s"] = time.monotonic() - started
            yield
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.wake_timeout_s) as scope:
                await self.wake()
            if scope.cancelled_caught:
                log.error(
                    "vLLM did not wake within %g s; the daemon keeps trying (at start-up and reconcile)",
                    self.wake_timeout_s,
                )


def guard_for(cfg: Any, reloader: Any) -> SleepGuard | None:
    """The guard ``reload.vllm.sleep_during_training`` asks for, else None."""
    v = cfg.reload.vllm
    servers = getattr(reloader, "servers", None)
    if cfg.reload.method != "vllm" or not v.sleep_during_training or not servers:
        return None
    return SleepGuard(servers, Path(cfg.state_dir) / "sleeping.json", level=v.sleep_level)
