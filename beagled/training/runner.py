"""Daemon side of training: runs backend workers as subprocesses and reads their JSON lines.

Each try runs in its own process session (a process group) with a timeout; on timeout, on shutdown or
when the daemon dies (``PR_SET_PDEATHSIG`` on Linux) the whole group is killed. Availability probes run
once, in subprocesses, so the daemon never imports an ML library; their answers are cached and shown in
``status``. Only this module and ``engine`` know what a backend is; the engine sees the ``Trainer`` port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from beagled.config import BUILTIN_BACKENDS
from beagled.errors import TrainingError

log = logging.getLogger("beagled.training")

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "reason": self.reason}


class Trainer(Protocol):
    """The port the engine trains through."""

    async def probe_all(self) -> list[BackendStatus]: ...
    def statuses(self) -> list[BackendStatus]: ...
    def available(self) -> list[str]: ...
    async def run(self, backend: str, spec: dict[str, Any], on_progress: Progress) -> dict[str, Any]: ...


def _limit_memory(mb: int) -> Callable[[], None]:
    def apply() -> None:  # pragma: no cover - runs in the child between fork and exec
        limit = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def reap_orphans(spec_dir: Path) -> int:
    """Kill training process groups left running by a daemon that died (SIGKILL, power loss).

    Each try records its process group in ``<spec_dir>/<name>.pgid`` with the spec path it was given;
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
            if spec.strip() and spec.strip() in cmdline:
                os.killpg(pgid, signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            pass
        rec.unlink(missing_ok=True)
    return killed


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
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


async def _kill_group(proc: trio.Process, grace_s: float = 2.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited within ``grace_s``."""
    with trio.CancelScope(shield=True):
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if proc.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with trio.move_on_after(wait):
                await proc.wait()
        # the leader may be gone while children of its group live on
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class SubprocessTrainer:
    """Runs built-in backends (``python -m beagled.training.worker``) and custom backend commands."""

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
    ) -> None:
        self.memory_limit_mb = memory_limit_mb
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
        try:
            with trio.fail_after(self.probe_timeout_s):
                done = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False, env=worker_env(self.env)
                )
            lines = [ln for ln in done.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
            answer = json.loads(lines[-1]) if lines else {}
            status = BackendStatus(
                name,
                bool(answer.get("available")),
                str(answer.get("reason") or done.stderr.decode(errors="replace")[-300:] or "no answer"),
            )
        except trio.TooSlowError:
            status = BackendStatus(name, False, f"probe timed out after {self.probe_timeout_s:.0f}s")
        except (OSError, ValueError) as e:
            status = BackendStatus(name, False, f"probe failed: {e}")
        self._status[name] = status
        log.info(
            "backend probed", extra={"backend": name, "available": status.available, "reason": status.reason}
        )

    def statuses(self) -> list[BackendStatus]:
        return [self._status[n] for n in self.order]

    def available(self) -> list[str]:
        return [n for n in self.order if self._status[n].available]

    # -- a training try ----------------------------------------------------------------------------
    async def run(self, backend: str, spec: dict[str, Any], on_progress: Progress) -> dict[str, Any]:
        self.spec_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.spec_dir / f"{spec['job_id']}-a{spec['attempt']}-{backend}.json"
        spec_path.write_text(json.dumps({**spec, "backend": backend}), encoding="utf-8")
        argv = (
            [*self.argv(backend), "train", str(spec_path)]
            if backend not in self.custom
            else [*self.argv(backend), str(spec_path)]
        )
        started = time.monotonic()
        result: dict[str, Any] | None = None
        error: str | None = None
        stderr_tail: deque[str] = deque(maxlen=40)
        proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_limit_memory(self.memory_limit_mb) if self.memory_limit_mb else None,
            env=worker_env({**self.env, "BEAGLED_PARENT_PID": str(os.getpid())}),
        )
        pgid_file = spec_path.with_suffix(".pgid")
        pgid_file.write_text(f"{proc.pid}\n{spec_path}")
        assert proc.stdout is not None
        assert proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr

        async def read_stdout() -> None:
            nonlocal result, error
            buf = b""
            async for chunk in stdout:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    msg = _parse_line(raw)
                    if msg is None:
                        stderr_tail.append(raw.decode(errors="replace")[:500])
                    elif msg.get("type") == "progress":
                        on_progress(msg)
                    elif msg.get("type") == "result":
                        result = msg
                    elif msg.get("type") == "error":
                        error = str(msg.get("message", "error"))[:2000]
                    elif msg.get("type") == "log":
                        log.debug(
                            "worker: %s", str(msg.get("message", ""))[:2000], extra={"backend": backend}
                        )

        async def read_stderr() -> None:
            buf = b""
            async for chunk in stderr:
                buf = (buf + chunk)[-65536:]
                *lines, buf = buf.split(b"\n")
                stderr_tail.extend(ln.decode(errors="replace")[:500] for ln in lines)

        timed_out = False
        try:
            with trio.move_on_after(self.timeout_s) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_stdout)
                    nursery.start_soon(read_stderr)
                    await proc.wait()
            timed_out = scope.cancelled_caught
        finally:
            await _kill_group(proc)
            spec_path.unlink(missing_ok=True)
            pgid_file.unlink(missing_ok=True)
        duration = time.monotonic() - started
        if timed_out:
            raise TrainingError(f"timed out after {self.timeout_s:.0f}s", backend=backend, timeout=True)
        if proc.returncode != 0 or result is None:
            how = (
                f"killed by signal {-proc.returncode}"
                if proc.returncode and proc.returncode < 0
                else f"exited with status {proc.returncode}"
            )
            detail = error or (" | ".join(list(stderr_tail)[-5:]) or "no output")
            if proc.returncode == 0:
                detail = "exited without a result line; " + detail
            raise TrainingError(f"{how}: {detail}"[:2000], backend=backend)
        result.setdefault("duration_s", duration)
        return result


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    raw = raw.strip()
    if not raw.startswith(b"{"):
        return None
    try:
        msg = json.loads(raw)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None
