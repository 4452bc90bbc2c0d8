"""The Ray executor (``training.executor = "ray"``): the ``Trainer`` port, with the training on a Ray cluster.

The daemon never imports Ray: every job runs through a driver subprocess (``beagled.training.ray_driver``)
that speaks the worker protocol, so progress, results, timeouts and process-group kills are the
local worker's (``runner.WarmWorker`` reads its lines). Warm mode keeps one driver per backend, and with
it one Ray actor holding the loaded base model; it is replaced after a failed job and after
``warm_max_jobs`` jobs, like the local warm worker. Cold mode starts a driver (and an actor) per try.

Faults: a cluster that cannot be reached makes the try wait with exponential backoff (``backoff_s`` up
to ``backoff_max_s``), each failed connection shown on ``watch`` as a progress line with a ``fault`` and
counted in ``beagled_executor_faults_total`` — the daemon keeps serving meanwhile; with
``fallback_local = true`` the try runs on the local trainer instead. The first failed connection of a
try is marked ``"outage": "started"`` and its first successful one (or the fallback) ``"outage":
"ended"``: the engine records one ``ExecutorUnreachable`` / ``ExecutorOutageEnded`` event for each.
A driver or actor lost mid-job fails the try (``TrainingFailed``, then the engine's next attempt gets
a fresh actor). Cancellation (job timeout, daemon shutdown, ``pause`` with ``cancel_running``,
``delete_voice`` with ``force``) SIGTERMs the driver, which kills its actor before it exits; a driver
killed outright takes its actor with it (Ray fate-sharing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from beagled.config import Config, RayConfig
from beagled.errors import TrainingError
from beagled.training.procs import kill_group, parse_line
from beagled.training.runner import (
    BackendStatus,
    Progress,
    Trainer,
    WarmStartError,
    WarmWorker,
    _warm_files,
    worker_env,
)
from beagled.training_spec import TrainingSpec

log = logging.getLogger("beagled.training.ray")

DRIVER = "beagled.training.ray_driver"


class RayUnreachable(Exception):
    """The cluster could not be reached; nothing ran."""


def ray_settings(cfg: RayConfig) -> dict[str, Any]:
    """What the driver subprocess needs to connect and to size its actor (``$BEAGLED_RAY``)."""
    return {
        "address": cfg.address,
        "namespace": cfg.namespace,
        "num_cpus": cfg.num_cpus,
        "num_gpus": cfg.num_gpus,
        "resources": dict(cfg.resources),
        "runtime_env": dict(cfg.runtime_env),
    }


class DriverProcess(WarmWorker):
    """A ``ray_driver serve BACKEND`` process: a WarmWorker whose start can say "unreachable"."""

    @classmethod
    async def start(cls, python: str, backend: str, spec_dir: Path, env: dict[str, str]) -> DriverProcess:
        token, err = _warm_files(spec_dir, f"ray-{backend}")
        with err:
            proc = await trio.lowlevel.open_process(
                [python, "-m", DRIVER, "serve", backend, str(token)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                env=worker_env({**env, "BEAGLED_PARENT_PID": str(os.getpid())}),
            )
        token.with_suffix(".pgid").write_text(f"{proc.pid}\n{token}")
        return cls(proc, backend, token)

    _exited_what = "ray driver "
    _slow_what = "ray actor "

    def _on_ready(self, msg: dict[str, Any]) -> None:
        self.actor_pid = msg.get("actor_pid")

    def _start_error(self, msg: dict[str, Any]) -> Exception:
        text = str(msg.get("message", "error"))[:2000]
        return RayUnreachable(text) if msg.get("unreachable") else WarmStartError(text)

    actor_pid: Any = None


class RayTrainer:
    """Trains on a Ray cluster through driver subprocesses; optionally falls back to a local trainer."""

    executor = "ray"

    def __init__(
        self,
        backends: list[str],
        cfg: RayConfig,
        *,
        spec_dir: Path,
        python: str = "",
        timeout_s: float = 900.0,
        probe_timeout_s: float = 120.0,
        warm: bool = True,
        warm_max_jobs: int = 20,
        fallback: Trainer | None = None,
        on_fault: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.order = list(backends)
        self.cfg = cfg
        self.spec_dir = spec_dir
        self.python = python or sys.executable
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.warm = warm
        self.warm_max_jobs = max(1, warm_max_jobs)
        self.fallback = fallback
        self._on_fault = on_fault or (lambda _kind: None)
        self.env = {**(env or {}), "BEAGLED_RAY": json.dumps(ray_settings(cfg))}
        self._drivers: dict[str, DriverProcess] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._probed = False
        self._status: dict[str, BackendStatus] = {
            n: BackendStatus(n, False, "ray: not probed yet") for n in self.order
        }

    # -- probes ------------------------------------------------------------------------------------
    async def probe_all(self) -> list[BackendStatus]:
        if self.fallback is not None:
            await self.fallback.probe_all()
        await self._probe()
        return self.statuses()

    async def _probe(self) -> bool:
        """Ask the cluster which backends its workers can run; False when it is unreachable."""
        argv = [self.python, "-m", DRIVER, "probe", *self.order]
        stderr = ""
        try:
            with trio.fail_after(self.probe_timeout_s):
                done = await trio.run_process(
                    argv,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=worker_env(self.env),
                    start_new_session=True,  # a probe that times out goes with all it started
                    deliver_cancel=kill_group,
                )
            stderr = done.stderr.decode(errors="replace")[-300:]
            lines = [parse_line(ln) for ln in done.stdout.splitlines()]
            answer: dict[str, Any] = next((m.body for m in reversed(lines) if m and m.body), {})
        except trio.TooSlowError:
            answer = {"type": "error", "message": f"ray probe timed out after {self.probe_timeout_s:.0f}s"}
        if answer.get("type") != "probe":
            reason = str(answer.get("message") or stderr or "no answer")
            self._on_fault("unreachable" if answer.get("unreachable") else "probe_failed")
            for n in self.order:
                self._status[n] = BackendStatus(n, False, f"ray: {reason} (jobs wait for it)")
            log.warning("ray cluster not probed: %s", reason)
            return False
        for item in answer.get("backends", []):
            name = str(item.get("name"))
            if name in self._status:
                self._status[name] = BackendStatus(
                    name, bool(item.get("available")), f"on ray: {item.get('reason')}"
                )
        self._probed = True
        log.info("ray cluster probed", extra={"backends": [s.public() for s in self.statuses()]})
        available = [n for n in self.order if self._status[n].available]
        if available and self.warm:
            await self._spawn(available[0])
        return True

    def reprobe_at(self) -> float:
        """The local fallback's timed-out probes are asked again; the cluster's probe is not timed here."""
        return self.fallback.reprobe_at() if self.fallback is not None else math.inf

    async def reprobe_due(self) -> None:
        if self.fallback is not None:
            await self.fallback.reprobe_due()

    def statuses(self) -> list[BackendStatus]:
        return [self._status[n] for n in self.order]

    def available(self) -> list[str]:
        """Backends the cluster said it runs; until it has answered, every configured one (a try then
        waits for the cluster, or falls back to the local trainer)."""
        if not self._probed:
            return list(self.order)
        return [n for n in self.order if self._status[n].available]

    # -- drivers -----------------------------------------------------------------------------------
    async def _spawn(self, backend: str) -> DriverProcess:
        driver = self._drivers.get(backend)
        if driver is not None and driver.alive:
            return driver
        if driver is not None:
            await self._retire(backend)
        driver = await DriverProcess.start(self.python, backend, self.spec_dir, self.env)
        if self.warm:
            self._drivers[backend] = driver
        return driver

    async def _retire(self, backend: str, *, graceful: bool = False) -> None:
        driver = self._drivers.pop(backend, None)
        if driver is not None:
            await driver.close(graceful=graceful)

    def actor_pid(self, backend: str) -> int | None:
        """The pid of ``backend``'s warm actor on its node (None if no ready driver)."""
        d = self._drivers.get(backend)
        return int(d.actor_pid) if d is not None and d.ready and d.actor_pid else None

    async def aclose(self) -> None:
        for backend in list(self._drivers):
            await self._retire(backend, graceful=True)
        if self.fallback is not None:
            closer = getattr(self.fallback, "aclose", None)
            if closer is not None:
                await closer()

    # -- a training try ----------------------------------------------------------------------------
    async def run(self, backend: str, spec: TrainingSpec, on_progress: Progress) -> dict[str, Any]:
        delay = self.cfg.backoff_s
        local = spec  # a local fallback reads the base model where the daemon's host has it
        if self.cfg.base_model:
            spec = dataclasses.replace(spec, base_model=self.cfg.base_model)
        outage = False  # this try has failed to connect: its first connection ends the outage

        def connected() -> None:
            nonlocal outage
            if outage:
                outage = False
                on_progress({"type": "progress", "outage": "ended", "executor": "ray"})

        while True:
            try:
                lock = self._locks.setdefault(backend, trio.Lock())
                async with lock:
                    return await self._run_once(backend, spec, on_progress, connected)
            except RayUnreachable as e:
                self._on_fault("unreachable")
                line: dict[str, Any] = {
                    "type": "progress", "fault": "ray_unreachable", "message": str(e)[:500], "executor": "ray"
                }  # fmt: skip
                if not outage:  # the first failure of an outage: the engine records it (once)
                    line.update(outage="started", retry_at=None if self.fallback else time.time() + delay)
                outage = True
                on_progress(line)
                if self.fallback is not None:
                    log.warning("ray unreachable, training locally: %s", e, extra={"backend": backend})
                    self._on_fault("fallback_local")
                    ended = {"type": "progress", "outage": "ended", "executor": "ray", "fallback": "local"}
                    on_progress(ended)
                    result = await self.fallback.run(backend, local, on_progress)
                    return {**result, "executor": "local", "fallback_reason": str(e)[:500]}
                log.warning("ray unreachable, waiting %.1fs: %s", delay, e, extra={"backend": backend})
                await trio.sleep(delay)  # backoff: there is nothing to wait on but time
                delay = min(delay * 2, self.cfg.backoff_max_s)

    async def _run_once(
        self,
        backend: str,
        spec: TrainingSpec,
        on_progress: Progress,
        connected: Callable[[], None] = lambda: None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        driver = await self._spawn(backend)
        try:
            try:
                await driver.wait_ready(self.cfg.connect_timeout_s)
            except WarmStartError as e:
                connected()  # it answered: whatever failed, the cluster is reachable
                self._on_fault("actor_start")
                raise TrainingError(f"ray: cannot start the training actor: {e}", backend=backend) from e
            connected()
            with trio.move_on_after(self.timeout_s) as scope:
                result, error, stray = await driver.run(spec.for_worker(backend), on_progress)
            if scope.cancelled_caught:
                raise TrainingError(f"timed out after {self.timeout_s:.0f}s", backend=backend, timeout=True)
            if result is None:
                with trio.move_on_after(2.0):
                    await driver.proc.wait()
                detail = error or (" | ".join(stray[-5:]) if stray else driver.stderr_tail())
                self._on_fault("worker_lost" if error and error.startswith("ray:") else "job_failed")
                raise TrainingError(f"on ray: {detail}"[:2000], backend=backend)
        except BaseException:  # failure, timeout, cancellation: the driver and its actor go
            await self._drop(backend, driver)
            raise
        if not self.warm or driver.jobs >= self.warm_max_jobs:
            await self._drop(backend, driver, graceful=True)
        if self.warm:
            with contextlib.suppress(OSError):
                await self._spawn(backend)  # the next job's actor loads while this result is used
        result.setdefault("duration_s", time.monotonic() - started)
        result["executor"] = "ray"
        return result

    async def _drop(self, backend: str, driver: DriverProcess, *, graceful: bool = False) -> None:
        if self._drivers.get(backend) is driver:
            self._drivers.pop(backend)
        await driver.close(graceful=graceful)


def build_ray_trainer(cfg: Config, local: Trainer, on_fault: Callable[[str], None]) -> RayTrainer:
    """The daemon's trainer for ``training.executor = "ray"``; ``local`` is the fallback when allowed."""
    t = cfg.training
    return RayTrainer(
        list(t.backends),
        t.ray,
        spec_dir=cfg.state_dir / "specs",
        python=t.python,
        timeout_s=t.timeout_s,
        probe_timeout_s=t.probe_timeout_s,
        warm=t.warm,
        warm_max_jobs=t.warm_max_jobs,
        fallback=local if t.ray.fallback_local else None,
        on_fault=on_fault,
    )
