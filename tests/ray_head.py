"""A real local Ray head for tests: ``ray start --head --block`` on 127.0.0.1 with one or two CPUs.

Every port the head opens is a free 127.0.0.1 port chosen here, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
keeps Ray from swapping 127.0.0.1 for the machine's interface address, and the head runs in its own
session so that ``close()`` ends it (raylet, GCS, workers) by its process group: ``ray stop`` would kill
every Ray process on the machine. ``cluster()`` asks the head, from a driver subprocess, what it has.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_available() -> bool:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) is not None


class RayHead:
    def __init__(self, num_cpus: int = 2, port: int | None = None) -> None:
        """``port``: the GCS port (a head started again where drivers look for it); default a free one."""
        self.num_cpus = num_cpus
        self.env = {**os.environ, **LOOPBACK_ENV}
        for attempt in range(3):  # a free port can be taken between probing and binding: pick others
            self._start(port)
            try:
                self._wait_ready()
                return
            except BaseException as e:
                taken = isinstance(e, RuntimeError) and "in use" in self.log_tail().lower()
                self.close()
                if not taken or attempt == 2:
                    raise

    def _start(self, port: int | None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))  # short: AF_UNIX paths
        gcs, om, nm, agent_grpc, agent_http, metrics, rtenv, dash = _free_ports(8)
        gcs = port or gcs
        self.address = f"127.0.0.1:{gcs}"
        argv = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0", "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash),
            "--object-manager-port", str(om), "--node-manager-port", str(nm),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--dashboard-agent-listen-port", str(agent_http),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rtenv),
            "--min-worker-port", "0", "--max-worker-port", "0",  # workers: ports the OS assigns
            "--temp-dir", str(self.temp), "--disable-usage-stats",
        ]  # fmt: skip
        self.log = open(self.temp / "head.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {self.log_tail()}")
            try:
                if self.cluster(timeout=60).get("total", {}).get("CPU") == self.num_cpus:
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(0.5)  # the GCS port opens before it answers: poll again
        raise RuntimeError(f"ray head not ready after {timeout:.0f}s: {self.log_tail()}")

    def cluster(self, timeout: float = 60.0) -> dict[str, Any]:
        """``{"total": …, "available": …, "actors": [alive actors' class names and pids]}`` from a driver."""
        code = (
            "import json, ray, sys\n"
            "ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
            "from ray.util import list_named_actors\n"
            "print(json.dumps({'total': ray.cluster_resources(), 'available': ray.available_resources(),"
            " 'named': list_named_actors(all_namespaces=True)}))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, self.address],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"ray driver failed: {done.stderr[-800:]}")
        return dict(json.loads(lines[-1]))

    def worker_pids(self) -> list[int]:
        """Processes of this head's session whose title says they run a beagled training actor."""
        sid = os.getsid(self.proc.pid)
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "BeagledTrainActor" in cmd and os.getsid(int(d)) == sid:
                    out.append(int(d))
        return out

    def log_tail(self) -> str:
        self.log.flush()
        return (self.temp / "head.log").read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        """A lost node: every process of the head's session killed at once (no graceful stop)."""
        self._kill_session()
        self.close()

    def _kill_session(self) -> None:
        # raylet, GCS and workers share the head's session (start_new_session)
        sid = self.proc.pid
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError):
                    if os.getsid(int(d)) == sid:
                        os.kill(int(d), signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=3)  # `ray start --block` may not finish on SIGTERM: then SIGKILL all
        self._kill_session()  # whatever is left
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
