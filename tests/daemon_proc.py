"""Runs a real ``beagled serve`` process for tests: config written to a temp dir, socket under /tmp
(AF_UNIX paths are limited to ~108 bytes), readiness and conditions polled, never slept for."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from beagled.client import Client

REPO = Path(__file__).resolve().parent.parent
FAKE_TRAINER = REPO / "tests" / "fake_trainer.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    return repr(v)


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


@contextmanager
def notify_socket(timeout: float) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket (what systemd listens on for sd_notify) and its path, short for sun_path."""
    with tempfile.TemporaryDirectory(prefix="bn-", dir="/tmp") as directory:
        path = str(Path(directory) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(timeout)
        try:
            yield sock, path
        finally:
            sock.close()


class GaveUp(AssertionError):
    """Raised by a ``poll`` predicate when the condition can never hold (e.g. the process exited)."""


def poll(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except GaveUp:
            raise
        except Exception as e:  # the condition may not be checkable yet
            last_exc = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}; last error: {last_exc!r}"
    )


def fake_backend(mode: str = "ok", *extra: str) -> list[str]:
    return [sys.executable, str(FAKE_TRAINER), "--mode", mode, *extra]


class DaemonProc:
    def __init__(
        self, root: Path, tables: dict[str, dict[str, Any]], env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.sockdir = Path(tempfile.mkdtemp(prefix="bgd", dir="/tmp"))
        self.socket = self.sockdir / "s.sock"
        self.state_dir = root / "state"
        self._metrics_port: tuple[int, int] | None = None  # (daemon pid, port)
        base: dict[str, dict[str, Any]] = {
            "daemon": {"state_dir": str(self.state_dir), "socket": str(self.socket), "log_format": "json"},
            # port 0: the daemon binds a port the OS picks and says which in ``status`` (no window in
            # which another process could take a port picked here first)
            "metrics": {"listen": "127.0.0.1:0"},
        }
        for k, v in tables.items():
            base.setdefault(k, {}).update(v)
        self.tables = base
        self.config = root / "config.toml"
        self.config.write_text(to_toml(base))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> DaemonProc:
        log = self.root / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "beagled", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=self.root,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise GaveUp(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            with Client(self.socket, timeout=2) as c:
                c.ping()
            return True

        poll(up, timeout, what="daemon ready")

    @property
    def metrics_port(self) -> int:
        """The port this daemon process's metrics endpoint is bound to (from ``status``)."""
        assert self.proc is not None
        if self._metrics_port is None or self._metrics_port[0] != self.proc.pid:
            with self.client() as c:
                listen = c.status()["metrics"]
            assert listen, "the daemon serves no metrics"
            self._metrics_port = (self.proc.pid, int(listen.rpartition(":")[2]))
        return self._metrics_port[1]

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def restart(self, **kw: Any) -> DaemonProc:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        return self.start(**kw)

    def events(self, from_seq: int = 0) -> list[dict[str, Any]]:
        """Every event after ``from_seq`` up to now, read through ``watch`` (drafts elided)."""
        out: list[dict[str, Any]] = []
        with self.client() as c:
            last = c.status()["event_seq"]
            if last <= from_seq:
                return out
            for msg in c.watch(from_seq=from_seq):
                if "event" in msg:
                    out.append(msg["event"])
                    if msg["event"]["seq"] >= last:
                        break
        return out

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float = 60.0) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            with self.client() as c:
                j = c.job(job_id)["job"]
            return j if j["state"] in states else None

        return poll(done, timeout, 0.05, f"job {job_id} in {states}")  # type: ignore[no-any-return]

    def wait_jobs(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            with self.client() as c:
                js = c.jobs(limit=1000)["jobs"]
            return js if predicate(js) else None

        return poll(check, timeout, 0.05, "jobs condition")  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)
