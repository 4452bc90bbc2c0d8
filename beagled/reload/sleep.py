"""One GPU for training and serving: put the vLLM server(s) to sleep while a job trains, wake after.

``reload.vllm.sleep_during_training = true``: before a job trains, ``POST /sleep?level=N`` on every
configured server; after training (success or failure) ``POST /wake_up``, then ``GET /is_sleeping``
must answer false before anything is loaded. The daemon never leaves a server asleep: each step is an
intent/outcome pair in the event log (``SleepStarted`` before the sleep request, ``Slept``;
``WakeStarted``, then ``Woken`` or ``WakeFailed``), folded by the pure projection into
``State.sleeping`` (the servers the daemon may have put to sleep). At start-up, before any other work
(training, loading), ``recover`` wakes every server the log holds asleep; the reconcile loop retries,
with backoff, a wake that gave up (a server that was down).

An older build kept the intent in a file ``<state_dir>/sleeping.json``; ``recover`` reads such a file
once, records its servers as ``SleepStarted`` (so the log now holds them) and removes it, then wakes
them like any other.

A completion sent to a sleeping server waits until it wakes: this is for a single-GPU box where the
writing loop can stand a pause of one training; on CPU vLLM (``VLLM_SERVER_DEV_MODE=1``) the state is
real but no memory is freed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from beagled import jobs
from beagled.errors import ReloadError

log = logging.getLogger("beagled.sleep")

Record = Callable[[jobs.Command], Awaitable[object]]  # decide → append → evolve (Engine.execute)


class Sleeper(Protocol):
    url: str

    async def sleep(self, level: int) -> None: ...
    async def wake_up(self) -> None: ...
    async def is_sleeping(self) -> bool: ...


class SleepGuard:
    def __init__(
        self,
        servers: Sequence[Sleeper],
        record: Record,
        sleeping: Callable[[], Mapping[str, jobs.Sleeping]],
        *,
        marker: Path | None = None,
        enabled: bool = True,
        level: int = 1,
        wake_timeout_s: float = 120.0,
        retry_s: float = 1.0,
        recover_timeout_s: float = 30.0,
        connect: Callable[[str], Sleeper] | None = None,
    ) -> None:
        self.servers = list(servers)
        self.record = record
        self.sleeping = sleeping
        self.marker = marker
        self.enabled = enabled
        self.level = level
        self.wake_timeout_s = wake_timeout_s
        self.retry_s = retry_s
        self.recover_timeout_s = recover_timeout_s
        self.connect = connect  # a server the log names that is no longer configured
        self.timings: dict[str, float] = {}  # the last cycle: sleep_s, wake_s (for status/benchmarks)
        self._by_url = {s.url: s for s in self.servers}
        self._training = False  # inside ``asleep``: the reconcile loop leaves the wake to it
        self._retry_at = 0.0
        self._waking = trio.Lock()  # held by a retried wake
        self._retry_backoff_s = 2.5

    def _server(self, url: str) -> Sleeper | None:
        if url not in self._by_url and self.connect is not None:
            self._by_url[url] = self.connect(url)
        return self._by_url.get(url)

    def pending(self) -> dict[str, Any] | None:
        """The marker file of an older build, if one is there."""
        if self.marker is None:
            return None
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def _adopt_marker(self) -> None:
        data = self.pending()
        if data is not None:
            urls = tuple(str(u).rstrip("/") for u in data.get("urls") or () if isinstance(u, str))
            if not urls:
                urls = tuple(self._by_url)
            log.warning("an older beagled left the inference server(s) asleep: %s", ", ".join(urls))
            await self.record(jobs.StartSleep(urls, self.level, str(data.get("job_id") or "")))
        marker = self.marker
        if marker is not None:  # the log holds them now (or nothing was there)
            await trio.to_thread.run_sync(lambda: marker.unlink(missing_ok=True))

    async def recover(self) -> None:
        """Wake every server the log (or an older build's marker) holds asleep, until each answers
        awake or ``recover_timeout_s`` passes (a server that is down must not keep the daemon from
        starting: it is recorded ``WakeFailed`` and the reconcile loop keeps trying)."""
        await self._adopt_marker()
        if self.sleeping():
            log.warning("a previous run put the inference server(s) to sleep: waking them")
            with trio.move_on_after(self.recover_timeout_s) as scope:
                await self.wake("recovery")
            if scope.cancelled_caught:
                log.error(
                    "vLLM did not wake within %g s of start-up; the reconcile loop keeps trying",
                    self.recover_timeout_s,
                )

    async def retry(self) -> None:
        """From the reconcile loop: a wake that gave up is tried again (never while a job trains), with
        backoff (5 s doubling to 5 min), so a server that stays down costs two events per try, not a storm."""
        now = time.monotonic()
        if not self.sleeping() or self._training or now < self._retry_at:
            return
        async with self._waking:
            with trio.move_on_after(self.wake_timeout_s):
                await self.wake("retry")
        if self.sleeping():
            self._retry_backoff_s = min(300.0, self._retry_backoff_s * 2)
            self._retry_at = time.monotonic() + self._retry_backoff_s
        else:
            self._retry_backoff_s = 2.5

    async def wake(self, reason: str) -> None:
        """Wake every server the state holds asleep and verify ``/is_sleeping`` is false; retried until
        it holds. Cancelled (a timeout): the servers not yet awake are recorded ``WakeFailed``."""
        urls = tuple(self.sleeping())
        if not urls:
            return
        started = time.monotonic()
        await self.record(jobs.StartWake(urls, reason))
        left = list(urls)
        errors: dict[str, str] = {}
        try:
            while left:
                awake = []
                for url in left:
                    server = self._server(url)
                    if server is None:
                        errors[url] = "not a configured server"
                        continue
                    try:
                        await server.wake_up()
                        if not await server.is_sleeping():
                            awake.append(url)
                    except ReloadError as e:
                        errors[url] = str(e)
                        log.warning("cannot wake vLLM at %s yet: %s", url, e)
                if awake:
                    left = [u for u in left if u not in awake]
                    await self.record(jobs.FinishWake(tuple(awake), time.monotonic() - started))
                if left:
                    await trio.sleep(self.retry_s)  # a server that is down gives no event to wait for
        finally:
            if left:
                with trio.CancelScope(shield=True):
                    error = "; ".join(errors.get(u, "still asleep") for u in left)
                    await self.record(jobs.FailWake(tuple(left), error[:2000] or "still asleep"))
        self.timings["wake_s"] = time.monotonic() - started

    @contextlib.asynccontextmanager
    async def asleep(self, job_id: str) -> AsyncIterator[None]:
        """Servers asleep for the body; awake (verified) after it, however it ends."""
        if not self.enabled:
            yield
            return
        self._training = True
        try:
            async with self._waking:  # a retried wake (reconcile) finishes before servers go to sleep
                pass
            urls = tuple(s.url for s in self.servers)
            await self.record(jobs.StartSleep(urls, self.level, job_id))  # durable before the request
            started = time.monotonic()
            try:
                slept, refused = [], []
                for server in self.servers:
                    try:
                        await server.sleep(self.level)
                        slept.append(server.url)
                    except ReloadError as e:  # a server that cannot sleep only costs the GPU memory
                        log.warning("cannot put vLLM at %s to sleep: %s", server.url, e)
                        if not e.retryable:  # it answered no: it is not asleep
                            refused.append(server.url)
                self.timings["sleep_s"] = time.monotonic() - started
                await self.record(jobs.FinishSleep(tuple(slept), tuple(refused), self.timings["sleep_s"]))
                yield
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(self.wake_timeout_s) as scope:
                    await self.wake("trained")
                if scope.cancelled_caught:
                    log.error(
                        "vLLM did not wake within %g s; the daemon keeps trying (reconcile, start-up)",
                        self.wake_timeout_s,
                    )
        finally:
            self._training = False


def guard_for(
    cfg: Any,
    reloader: Any,
    record: Record,
    sleeping: Callable[[], Mapping[str, jobs.Sleeping]],
) -> SleepGuard | None:
    """The guard for vLLM servers: it sleeps only if ``reload.vllm.sleep_during_training``, but always
    wakes what the log holds asleep (the option may have been turned off after a crash). Else None."""
    v = cfg.reload.vllm
    servers = getattr(reloader, "servers", None)
    if cfg.reload.method != "vllm" or not servers:
        return None

    def connect(url: str) -> Sleeper:
        from beagled.reload.vllm import VllmReloader

        return VllmReloader(url, timeout_s=v.timeout_s)

    return SleepGuard(
        servers,
        record,
        sleeping,
        marker=Path(cfg.state_dir) / "sleeping.json",
        enabled=bool(v.sleep_during_training),
        level=v.sleep_level,
        connect=connect,
    )
