"""Test helpers around a real Prometheus: Debian's ``/usr/bin/prometheus`` and ``promtool``.

``start_prometheus`` runs a private Prometheus on a free 127.0.0.1 port with a temporary config and
TSDB under ``tmp_path``, waits for ``/-/ready`` and returns a ``PromServer`` with ``query`` (the HTTP
API's instant query) and ``wait_for`` (poll a query until a predicate holds: the first scrape lands a
second or a few after start, so tests poll and never sleep blindly). ``promtool_check_metrics`` lints
an exposition text.

Tests that need these call ``require_prometheus()`` / ``require_promtool()`` first, which skip with a
clear reason where the binaries are missing (CI installs the ``prometheus`` Debian package).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


# CONTRACT.md, "Metrics": name -> (type, labels).
CONTRACT_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "beagled_training_duration_seconds": ("histogram", ("backend", "outcome", "executor")),
    "beagled_reload_duration_seconds": ("histogram", ("method", "outcome")),
    "beagled_submit_ack_seconds": ("histogram", ()),
    "beagled_submissions_total": ("counter", ("outcome",)),
    "beagled_events_total": ("counter", ("type",)),
    "beagled_backend_fallbacks_total": ("counter", ("from_backend", "to_backend")),
    "beagled_jobs": ("gauge", ("state",)),
    "beagled_pending_pairs": ("gauge", ("voice",)),
    "beagled_voice_version": ("gauge", ("voice",)),
    "beagled_eval_loss": ("gauge", ("voice",)),
    "beagled_build_info": ("info", ("version",)),
    # "Additions of the next wave" (several daemons on one log; the lag gauge is this name)
    "beagled_leader": ("gauge", ()),
    "beagled_replication_lag_seconds": ("gauge", ()),
}
# Series names a query may use: histograms expose _bucket/_count/_sum; plus Prometheus' own `up`.
ALLOWED_SERIES: dict[str, tuple[str, ...]] = {"up": ("job", "instance")}
for _name, (_kind, _labels) in CONTRACT_METRICS.items():
    if _kind == "histogram":
        ALLOWED_SERIES[f"{_name}_bucket"] = (*_labels, "le")
        ALLOWED_SERIES[f"{_name}_count"] = _labels
        ALLOWED_SERIES[f"{_name}_sum"] = _labels
    else:
        ALLOWED_SERIES[_name] = _labels
TARGET_LABELS = ("job", "instance")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SERIES = re.compile(r"\b(beagled_[a-z0-9_]+|up)\b(?!\s*\()")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def check_expr_names(expr: str) -> list[str]:
    """Problems with the series and label names of one expr (empty list: fine)."""
    problems = []
    bare = _STRING.sub('""', expr)
    series = set(_SERIES.findall(bare))
    if not series:
        problems.append(f"{expr!r} references no beagled series")
    labels_known = set(TARGET_LABELS)
    for name in series:
        if name not in ALLOWED_SERIES:
            problems.append(f"{expr!r}: {name} is not a CONTRACT metric")
        else:
            labels_known.update(ALLOWED_SERIES[name])
    used = set()
    for group in _GROUPING.findall(bare):
        used.update(label.strip() for label in group.split(",") if label.strip())
    for selector in re.findall(r"\{([^}]*)\}", bare):
        used.update(_MATCHER_LABEL.findall(selector))
    for label in sorted(used - labels_known):
        problems.append(f"{expr!r}: label {label!r} is not a label of {sorted(series)}")
    return problems


def prometheus_binary() -> str | None:
    if Path(PROMETHEUS).exists():
        return PROMETHEUS
    return shutil.which("prometheus")


def promtool_binary() -> str | None:
    if Path(PROMTOOL).exists():
        return PROMTOOL
    return shutil.which("promtool")


def require_prometheus() -> str:
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    return binary


def require_promtool() -> str:
    binary = promtool_binary()
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    return binary


class PromQLError(AssertionError):
    """The HTTP API refused a query (a parse error, an evaluation error)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get_json(url: str, timeout: float = 5.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        # The API answers 400/422 with a JSON body that says why.
        body = e.read().decode("utf-8", "replace")
        try:
            return json.loads(body)
        except ValueError:
            raise PromQLError(f"GET {url}: HTTP {e.code}: {body}") from e


@dataclass
class PromServer:
    """A running private Prometheus; use as a context manager or call ``close()``."""

    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    log_path: Path
    _closed: bool = field(default=False, repr=False)

    def query(self, promql: str, at: float | None = None) -> list[Any]:
        """Instant query through ``/api/v1/query``; the result list (one entry for a scalar/string).

        Raises ``PromQLError`` with Prometheus' message when the query does not parse or evaluate.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = _get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        if body.get("status") != "success":
            raise PromQLError(f"{promql!r}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("vector", "matrix"):
            result: list[Any] = data["result"]
            return result
        return [data["result"]]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Any]], bool] = bool,
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[Any]:
        """Poll ``query(promql)`` until ``predicate(result)`` holds; the last result, or AssertionError."""
        deadline = time.monotonic() + timeout
        result: list[Any] = []
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{promql!r} did not satisfy the predicate within {timeout}s; last result: {result!r}"
                )
            self._check_alive()
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``/api/v1/targets``), with health and last error."""
        body = _get_json(f"{self.url}/api/v1/targets")
        active: list[dict[str, Any]] = body["data"]["activeTargets"]
        return active

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> PromServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_config(
    path: Path, targets: Sequence[str], scrape_interval: str, job: str, rule_files: Sequence[Path]
) -> None:
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    if rule_files:
        config["rule_files"] = [str(p) for p in rule_files]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def start_prometheus(
    tmp_path: Path,
    targets: list[str],
    scrape_interval: str = "1s",
    *,
    job: str = "beagled",
    rule_files: Sequence[Path] = (),
    ready_timeout: float = 30.0,
) -> PromServer:
    """Start Prometheus scraping ``targets`` ("host:port") as job ``job``; returns once it is ready."""
    binary = require_prometheus()
    directory = tmp_path / "prometheus"
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "prometheus.yml"
    write_config(config_path, targets, scrape_interval, job, rule_files)
    log_path = directory / "prometheus.log"
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between probing and binding: retry
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=directory,
            )
        server = PromServer(url=url, process=process, directory=directory, log_path=log_path)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        last_error = server.log()
        server.close()
        if "address already in use" not in last_error:
            break
    raise RuntimeError(f"prometheus did not become ready:\n{last_error}")


def promtool_check_metrics(text: str | bytes) -> tuple[int, str]:
    """``promtool check metrics`` on an exposition text: (exit status, combined output)."""
    binary = require_promtool()
    data = text.encode() if isinstance(text, str) else text
    proc = subprocess.run(
        [binary, "check", "metrics"], input=data, capture_output=True, timeout=60, check=False
    )
    return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")


def sample_values(result: list[Any]) -> list[float]:
    """The float values of an instant-vector result (NaN included)."""
    values: list[float] = []
    for entry in result:
        if isinstance(entry, dict) and "value" in entry:
            values.append(float(entry["value"][1]))
    return values


def has_finite_value(result: list[Any]) -> bool:
    return any(math.isfinite(v) for v in sample_values(result))


# --- a real daemon that has trained, for scraping ------------------------------------------------------


def metrics_daemon_tables() -> dict[str, dict[str, Any]]:
    """``make_daemon`` tables for a daemon whose metrics have every series: a backend that crashes
    (``broken``) before the fake one (a fallback), held-out pairs (an eval loss), the command reloader."""
    from tests.daemon_proc import fake_backend

    return {
        "training": {"backends": ["broken", "fake"], "heldout_share": 0.5},
        "training.custom_backends": {"broken": fake_backend("crash")},
        "reload": {"method": "command", "reconcile_interval_s": 3600.0},
        "reload.command": {"argv": ["true"]},
    }


def train_one_job(d: Any, start: int = 0, timeout: float = 30.0) -> tuple[dict[str, Any], int]:
    """Pause, submit pairs until the voice has ≥ 1 held-out and ≥ min_pairs pending ones, resume, and
    wait for the job they make to be ``reloaded``. Returns (the job, the next pair index)."""
    with d.client() as c:
        c.pause()
        before = {j["job_id"] for j in c.jobs(limit=1000)["jobs"]}
        i = start
        while True:
            c.submit(bad=f"plain draft {i}", good=f"draft {i} in my voice", key=f"m-{i}")
            i += 1
            v = c.voices()["voices"][0]
            if v["heldout_pairs"] >= 1 and v["pending_pairs"] >= 4:
                break
        c.resume()
    js = d.wait_jobs(lambda js: any(j["job_id"] not in before for j in js), timeout)
    (jid,) = [j["job_id"] for j in js if j["job_id"] not in before]
    return d.wait_job(jid, ("reloaded",), timeout), i
