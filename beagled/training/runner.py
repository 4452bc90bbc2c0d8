"""Daemon side of training: runs backend workers as subprocesses and reads their JSON lines.

Each try runs in its own process session (a process group) with a timeout; on timeout, on shutdown or
when the daemon dies (``PR_SET_PDEATHSIG`` on Linux) the whole group is killed. Availability probes run
once, in subprocesses, so the daemon never imports an ML library; their answers are cached and shown in
``status``. Only this module and ``engine`` know what a backend is; the engine sees the ``Trainer`` port.
Reading a worker's lines and ending a process group are ``training.procs``'s.

Warm mode (``warm=True``, built-in backends in ``WARM_BACKENDS``): one long-lived worker per backend
(``python -m beagled.training.worker serve BACKEND TOKEN``, its own session, its pgid recorded like a
cold try's) keeps the base model loaded and takes jobs as JSON lines on its stdin. Any failure, timeout
or cancellation of a job kills its process group; it is also retired after ``warm_max_jobs`` jobs; a
fresh one is started in the background right away (and after the probes), so the next job finds its
imports done. A worker that cannot start makes that job (and the next ones, for a while) run cold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from beagled import bounds
from beagled.config import BUILTIN_BACKENDS
from beagled.errors import TrainingError
from beagled.ports import BackendStatus, Progress, Trainer
from beagled.training.procs import (
    MAX_LINE_BYTES,
    JobLines,
    LineBuffer,
    how_it_ended,
    kill_group,
    parse_line,
    signal_group,
)
from beagled.training_spec import TrainingSpec

# the port and its values live in beagled.ports (stdlib only); re-exported for older imports
__all__ = [
    "BackendStatus",
    "Progress",
    "SubprocessTrainer",
    "Trainer",
    "WarmStartError",
    "WarmWorker",
    "reap_orphans",
    "worker_env",
]

log = logging.getLogger("beagled.training")

WARM_BACKENDS = frozenset({"mlx", "peft", "unsloth"})  # built-in backends whose worker has a ``serve`` mode
WARM_RETRY_AFTER_S = 300.0  # after a warm worker failed to start, run cold this long before trying again
PROBE_RETRIES = 3  # a probe that timed out is asked again this many times, each timeout twice the last
PROBE_TIMEOUT_MAX_FACTOR = 8  # ... up to this multiple of ``probe_timeout_s``
PROBE_RETRY_BACKOFF_S = 5.0  # wait before the first re-probe of a timed-out backend (doubles each time)


def _limit_memory(mb: int) -> Callable[[], None]:
    def apply() -> None:  # pragma: no cover - runs in the child between fork and exec
        limit = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def reap_orphans(spec_dir: Path) -> int:
    """Kill training process groups left running by a daemon that died (SIGKILL, power loss).

    Each try (and each warm worker) records its process group in ``<spec_dir>/<name>.pgid`` with the
    spec path (the warm worker's token) it was given;
    a group is killed only if its leader still runs with that spec path on its command line (a pid that
    was reused by an unrelated process is left alone). Returns how many groups were killed.
    (``PR_SET_PDEATHSIG`` cannot do this: it fires when the *thread* that forked exits, and trio forks
    from worker threads that come and go.)
    """
    killed = 0
    for rec in spec_dir.glob("*.pgid") if spec_dir.is_dir() else []:
        try:
            pgid_s, spec = rec.read_text().split("\n", 1)
            pgid = int(pgid_s)
            cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if spec.strip() and spec.strip() in cmdline and signal_group(pgid, signal.SIGKILL):
                killed += 1
        except (OSError, ValueError):
            pass
        rec.unlink(missing_ok=True)
    for err in spec_dir.glob("warm-*.stderr") if spec_dir.is_dir() else []:
        if not err.with_suffix(".pgid").exists():  # a warm worker's stderr whose worker is gone
            err.unlink(missing_ok=True)
    return killed


def worker_env(extra: dict[str, str] | None = None, state_dir: Path | None = None) -> dict[str, str]:
    """A worker's environment: only what it needs of the daemon's (``bounds.worker_env``), with the
    Unsloth compile cache under ``state_dir``, plus ``extra``."""
    env = bounds.worker_env(state_dir)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    env.pop("BEAGLED_FAULTS", None)  # fault points are the daemon's, not the worker's
    if extra:
        env.update(extra)
    return env


async def _start_worker(
    argv: list[str], *, stdin: Any, stderr: Any, env: dict[str, str], state_dir: Path, memory_limit_mb: int
) -> trio.Process:
    """A worker in its own session (its process group), under the memory limit, told the daemon's pid."""
    return await trio.lowlevel.open_process(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_limit_memory(memory_limit_mb) if memory_limit_mb else None,
        env=worker_env({**env, "BEAGLED_PARENT_PID": str(os.getpid())}, state_dir),
        cwd=bounds.worker_cwd(state_dir),
    )


async def _watch(proc: trio.Process, timeout_s: float, job: JobLines, tail: deque[str]) -> bool:
    """Read a cold try's stdout (its lines, into ``job``) and stderr (into ``tail``) until it exits,
    then end its process group; True if it ran past ``timeout_s``."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    async def read_stdout() -> None:
        lines = LineBuffer(MAX_LINE_BYTES, on_dropped=tail.append)
        async for chunk in stdout:
            for raw in lines.feed(chunk):
                job.take(raw)

    async def read_stderr() -> None:
        buf = b""
        async for chunk in stderr:
            buf = (buf + chunk)[-65536:]
            *lines, buf = buf.split(b"\n")
            tail.extend(ln.decode(errors="replace")[:500] for ln in lines)

    try:
        with trio.move_on_after(timeout_s) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_stdout)
                nursery.start_soon(read_stderr)
                await proc.wait()
    finally:
        await kill_group(proc)
    return scope.cancelled_caught


def _warm_files(spec_dir: Path, backend: str) -> tuple[Path, Any]:
    """A fresh token path for a warm worker (on its command line) and its stderr file, opened."""
    spec_dir.mkdir(parents=True, exist_ok=True)
    token = spec_dir / f"warm-{backend}-{uuid.uuid4().hex[:12]}"
    return token, open(token.with_suffix(".stderr"), "ab")


class WarmStartError(Exception):
    """The warm worker did not come up (the job then runs cold)."""


class WarmWorker:
    """One ``worker serve BACKEND`` process: jobs in on stdin, the worker protocol's lines out on stdout.

    Its stderr goes to a file (nothing has to drain it between jobs); a failed job reports that file's
    tail. Not safe for concurrent jobs: the trainer holds a lock around each.
    """

    def __init__(self, proc: trio.Process, backend: str, token: Path) -> None:
        self.proc = proc
        self.backend = backend
        self.token = token
        self.jobs = 0
        self.ready = False
        self._split = LineBuffer()
        self._lines: deque[bytes] = deque()
        assert proc.stdin is not None
        assert proc.stdout is not None
        self._stdin, self._stdout = proc.stdin, proc.stdout

    @classmethod
    async def spawn(
        cls, python: str, backend: str, spec_dir: Path, env: dict[str, str], memory_limit_mb: int
    ) -> WarmWorker:
        token, err = _warm_files(spec_dir, backend)
        with err:
            proc = await _start_worker(
                [python, "-m", "beagled.training.worker", "serve", backend, str(token)],
                stdin=subprocess.PIPE,
                stderr=err,
                env=env,
                state_dir=spec_dir.parent,
                memory_limit_mb=memory_limit_mb,
            )
        token.with_suffix(".pgid").write_text(f"{proc.pid}\n{token}")
        log.info("warm worker started", extra={"backend": backend, "pid": proc.pid})
        return cls(proc, backend, token)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def _line(self) -> bytes | None:
        """The next stdout line, or None at end of file."""
        while not self._lines:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                return None
            self._lines.extend(self._split.feed(chunk))
        return self._lines.popleft()

    async def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        with trio.move_on_after(timeout_s):
            while True:
                raw = await self._line()
                if raw is None:
                    break
                line = parse_line(raw)
                if line is not None and line.type == "ready":
                    self.ready = True
                    self._on_ready(line.body)
                    return
                if line is not None and line.type == "error":
                    raise self._start_error(line.body)
            raise WarmStartError(f"{self._exited_what}exited before it was ready; {self.stderr_tail()}")
        raise WarmStartError(f"{self._slow_what}not ready after {timeout_s:.0f}s")

    # what a subclass (the Ray driver) changes of the start-up handshake
    _exited_what = ""
    _slow_what = ""

    def _on_ready(self, msg: dict[str, Any]) -> None:
        """The ``ready`` line arrived (nothing more to note for a local worker)."""

    def _start_error(self, msg: dict[str, Any]) -> Exception:
        return WarmStartError(str(msg.get("message", "error"))[:2000])

    async def run(
        self, spec: dict[str, Any], on_progress: Progress
    ) -> tuple[dict[str, Any] | None, str | None, list[str]]:
        """Send one job; read its lines up to its ``result``/``error`` line (or the end of stdout)."""
        self.jobs += 1
        stray: list[str] = []
        job = JobLines(self.backend, on_progress, stray)
        await self._stdin.send_all(json.dumps(spec).encode() + b"\n")
        while True:
            raw = await self._line()
            if raw is None:
                return None, None, stray
            if job.take(raw):
                return job.result, job.error, stray

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            with open(self.token.with_suffix(".stderr"), "rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - 16384, 0))
                tail = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "no output"
        return " | ".join(ln[:500] for ln in tail[-lines:]) or "no output"

    async def close(self, *, graceful: bool = False) -> None:
        """End the worker and its whole process group; ``graceful`` first closes its stdin (it exits 0)."""
        with trio.CancelScope(shield=True):
            if graceful and self.alive:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await self._stdin.aclose()
                with trio.move_on_after(5.0):
                    await self.proc.wait()
            await kill_group(self.proc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stdin.aclose()
            for suffix in (".pgid", ".stderr"):
                self.token.with_suffix(suffix).unlink(missing_ok=True)
        log.info(
            "warm worker stopped",
            extra={
                "backend": self.backend,
                "pid": self.proc.pid,
                "jobs": self.jobs,
                "status": self.proc.returncode,
            },
        )


class SubprocessTrainer:
    """Runs built-in backends (``python -m beagled.training.worker``) and custom backend commands."""

    executor = "local"  # runs on this host

    def __init__(
        self,
        backends: list[str],
        *,
        custom: dict[str, list[str]] | None = None,
        python: str = "",
        timeout_s: float = 900.0,
        probe_timeout_s: float = 120.0,
        spec_dir: Path,
        env: dict[str, str] | None = None,
        memory_limit_mb: int = 0,
        warm: bool = False,
        warm_max_jobs: int = 20,
    ) -> None:
        self.memory_limit_mb = memory_limit_mb
        self.warm = warm
        self.warm_max_jobs = max(1, warm_max_jobs)
        self._warm: dict[str, WarmWorker] = {}
        self._warm_locks: dict[str, trio.Lock] = {}
        self._warm_broken_until: dict[str, float] = {}
        self.order = list(backends)
        self.custom = dict(custom or {})
        self.python = python or sys.executable
        self.timeout_s = timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.spec_dir = spec_dir
        self.env = env or {}
        self._status: dict[str, BackendStatus] = {
            n: BackendStatus(n, False, "not probed yet") for n in self.order
        }
        self._probe_timeouts: dict[str, int] = {}  # consecutive timed-out probes of a backend
        self._reprobe: dict[str, float] = {}  # trio time of a timed-out backend's next probe

    def argv(self, backend: str) -> list[str]:
        if backend in self.custom:
            return list(self.custom[backend])
        if backend not in BUILTIN_BACKENDS:
            raise TrainingError(f"unknown backend {backend!r}", backend=backend)
        return [self.python, "-m", "beagled.training.worker"]

    # -- probes ------------------------------------------------------------------------------------
    async def probe_all(self) -> list[BackendStatus]:
        async with trio.open_nursery() as nursery:
            for name in self.order:
                nursery.start_soon(self._probe_one, name)
        available = self.available()
        if available:  # the first job will very likely use the first available backend: warm it now
            await self._prespawn(available[0])
        return self.statuses()

    async def _probe_one(self, name: str) -> None:
        if name in self.custom:
            exe = self.custom[name][0]
            found = await trio.to_thread.run_sync(lambda: shutil.which(exe) or os.path.isfile(exe))
            self._status[name] = BackendStatus(
                name, bool(found), f"custom command {exe}" if found else f"custom command {exe} not found"
            )
            return
        argv = [*self.argv(name), "probe", name]
        self._reprobe.pop(name, None)
        timeouts = self._probe_timeouts.get(name, 0)
        limit_s = self.probe_timeout_s * min(2**timeouts, PROBE_TIMEOUT_MAX_FACTOR)
        try:
            with trio.fail_after(limit_s):
                done = await trio.run_process(
                    argv,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=worker_env(self.env, self.spec_dir.parent),
                    cwd=bounds.worker_cwd(self.spec_dir.parent),
                    start_new_session=True,  # a probe that times out goes with all it started
                    deliver_cancel=kill_group,
                )
            lines = [ln for ln in done.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
            answer = json.loads(lines[-1]) if lines else {}
            status = BackendStatus(
                name,
                bool(answer.get("available")),
                str(answer.get("reason") or done.stderr.decode(errors="replace")[-300:] or "no answer"),
            )
            self._probe_timeouts.pop(name, None)
        except trio.TooSlowError:
            status = self._timed_out(name, limit_s, timeouts + 1)
        except (OSError, ValueError) as e:
            self._probe_timeouts.pop(name, None)
            status = BackendStatus(name, False, f"probe failed: {e}")
        self._status[name] = status
        log.info(
            "backend probed", extra={"backend": name, "available": status.available, "reason": status.reason}
        )

    def _timed_out(self, name: str, limit_s: float, timeouts: int) -> BackendStatus:
        """A probe ran past ``limit_s`` (a loaded machine, a slow import): ask again later, longer."""
        self._probe_timeouts[name] = timeouts
        reason = f"probe timed out after {limit_s:.0f}s"
        if timeouts > PROBE_RETRIES:  # bounded: no re-probe of its own (a blocked job or `train` still asks)
            return BackendStatus(name, False, f"{reason} ({timeouts} tries)")
        wait_s = PROBE_RETRY_BACKOFF_S * 2 ** (timeouts - 1)
        self._reprobe[name] = trio.current_time() + wait_s
        next_s = self.probe_timeout_s * min(2**timeouts, PROBE_TIMEOUT_MAX_FACTOR)
        again = f"asked again in {wait_s:.0f}s with a {next_s:.0f}s timeout"
        return BackendStatus(name, False, f"{reason}; {again}")

    def reprobe_at(self) -> float:
        """When (trio clock) a backend whose probe timed out is to be probed again; inf if none is."""
        return min(self._reprobe.values(), default=math.inf)

    async def reprobe_due(self) -> None:
        """Probe again each backend whose probe timed out and whose re-probe is due."""
        now = trio.current_time()
        due = [n for n, at in self._reprobe.items() if at <= now]
        async with trio.open_nursery() as nursery:
            for name in due:
                nursery.start_soon(self._probe_one, name)
        available = self.available()
        if due and available:
            await self._prespawn(available[0])

    def statuses(self) -> list[BackendStatus]:
        return [self._status[n] for n in self.order]

    def available(self) -> list[str]:
        return [n for n in self.order if self._status[n].available]

    # -- warm workers ------------------------------------------------------------------------------
    def warm_capable(self, backend: str) -> bool:
        return (
            self.warm
            and backend in WARM_BACKENDS
            and backend not in self.custom
            and time.monotonic() >= self._warm_broken_until.get(backend, 0.0)
        )

    def warm_pid(self, backend: str) -> int | None:
        """The pid (= pgid) of ``backend``'s warm worker, if one runs."""
        worker = self._warm.get(backend)
        return worker.proc.pid if worker is not None and worker.alive else None

    async def start_warm(self, backend: str) -> None:
        """Start ``backend``'s warm worker now (if warm mode applies and none runs); returns at once."""
        await self._prespawn(backend)

    async def _prespawn(self, backend: str) -> None:
        """Start a warm worker for ``backend`` if there is none (it imports while we do other things)."""
        if not self.warm_capable(backend) or backend in self._warm:
            return
        try:
            self._warm[backend] = await WarmWorker.spawn(
                self.python, backend, self.spec_dir, self.env, self.memory_limit_mb
            )
        except OSError as e:
            self._warm_broken_until[backend] = time.monotonic() + WARM_RETRY_AFTER_S
            log.warning("cannot start a warm worker: %s", e, extra={"backend": backend})

    async def _retire(self, backend: str, *, graceful: bool = False) -> None:
        worker = self._warm.pop(backend, None)
        if worker is not None:
            await worker.close(graceful=graceful)

    async def aclose(self) -> None:
        """Stop every warm worker (their process groups); call at shutdown."""
        for backend in list(self._warm):
            await self._retire(backend, graceful=True)

    async def _run_warm(self, backend: str, spec: TrainingSpec, on_progress: Progress) -> dict[str, Any]:
        """One try on the warm worker; raises WarmStartError (nothing ran: go cold) or TrainingError."""
        worker = self._warm.get(backend)
        if worker is not None and not worker.alive:
            await self._retire(backend)
            worker = None
        if worker is None:
            await self._prespawn(backend)
            worker = self._warm.get(backend)
            if worker is None:
                raise WarmStartError("cannot start a warm worker")
        started = time.monotonic()
        result: dict[str, Any] | None = None
        error: str | None = None
        stray: list[str] = []
        try:
            try:
                await worker.wait_ready(self.probe_timeout_s)
            except WarmStartError:
                self._warm_broken_until[backend] = time.monotonic() + WARM_RETRY_AFTER_S
                raise
            with trio.move_on_after(self.timeout_s) as scope:
                result, error, stray = await worker.run(spec.for_worker(backend), on_progress)
            if scope.cancelled_caught:
                raise TrainingError(f"timed out after {self.timeout_s:.0f}s", backend=backend, timeout=True)
            if result is None:
                with trio.move_on_after(2.0):  # it exits right after an error line: say how it ended
                    await worker.proc.wait()
                how = how_it_ended(worker.proc.returncode)
                detail = error or (" | ".join(stray[-5:]) if stray else worker.stderr_tail())
                raise TrainingError(f"warm worker {how}: {detail}"[:2000], backend=backend)
        except TrainingError:
            await self._retire(backend)  # its state is unknown: end its group, start a fresh one
            await self._prespawn(backend)
            raise
        except BaseException:  # cancellation (shutdown), a start failure, a bug: end it, start nothing
            await self._retire(backend)
            raise
        if worker.jobs >= self.warm_max_jobs:  # memory hygiene: a fresh process every N jobs
            await self._retire(backend)
        await self._prespawn(backend)  # (no-op while it lives) imports while the engine uses this result
        result.setdefault("duration_s", time.monotonic() - started)
        return result

    # -- a training try ----------------------------------------------------------------------------
    async def run(self, backend: str, spec: TrainingSpec, on_progress: Progress) -> dict[str, Any]:
        if self.warm_capable(backend):
            lock = self._warm_locks.setdefault(backend, trio.Lock())
            if not lock.locked():  # a second concurrent try of the same backend runs cold
                async with lock:
                    try:
                        return await self._run_warm(backend, spec, on_progress)
                    except WarmStartError as e:
                        log.warning(
                            "warm worker unavailable, training cold: %s", e, extra={"backend": backend}
                        )
        return await self._run_cold(backend, spec, on_progress)

    async def _run_cold(self, backend: str, spec: TrainingSpec, on_progress: Progress) -> dict[str, Any]:
        self.spec_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.spec_dir / f"{spec.job_id}-a{spec.attempt}-{backend}.json"
        spec_path.write_text(json.dumps(spec.for_worker(backend)), encoding="utf-8")
        argv = (
            [*self.argv(backend), "train", str(spec_path)]
            if backend not in self.custom
            else [*self.argv(backend), str(spec_path)]
        )
        started = time.monotonic()
        stderr_tail: deque[str] = deque(maxlen=40)
        job = JobLines(backend, on_progress, stderr_tail)
        proc = await _start_worker(
            argv,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
            state_dir=self.spec_dir.parent,
            memory_limit_mb=self.memory_limit_mb,
        )
        pgid_file = spec_path.with_suffix(".pgid")
        pgid_file.write_text(f"{proc.pid}\n{spec_path}")
        try:
            timed_out = await _watch(proc, self.timeout_s, job, stderr_tail)
        finally:
            spec_path.unlink(missing_ok=True)
            pgid_file.unlink(missing_ok=True)
        duration = time.monotonic() - started
        if timed_out:
            raise TrainingError(f"timed out after {self.timeout_s:.0f}s", backend=backend, timeout=True)
        result = job.result
        if proc.returncode != 0 or result is None:
            detail = job.error or (" | ".join(list(stderr_tail)[-5:]) or "no output")
            if proc.returncode == 0:
                detail = "exited without a result line; " + detail
            raise TrainingError(f"{how_it_ended(proc.returncode)}: {detail}"[:2000], backend=backend)
        result.setdefault("duration_s", duration)
        return result
