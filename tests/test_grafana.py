"""The Grafana dashboard: its shape, and every panel's PromQL run through a real Prometheus.

Two scrape targets feed the PromQL check:
- ``contract_target``: a reference exposition built here with prometheus_client from CONTRACT.md's
  metric table (names, types, labels), growing at each scrape. It always runs, so a dashboard query that
  does not match the contract fails even before the daemon exists.
- ``metrics_target``: a real ``beagled serve`` process that has trained and reloaded (fake subprocess
  trainer, a backend fallback, held-out pairs, the command reloader), scraped on its own /metrics.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tests.prom import (
    CONTRACT_METRICS,
    PromQLError,
    PromServer,
    check_expr_names,
    metrics_daemon_tables,
    promtool_check_metrics,
    require_prometheus,
    start_prometheus,
    train_one_job,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "beagled.json"

# What the dashboard's variables become when the test runs its queries (scrapes every second).
SUBSTITUTIONS = {
    "${instance:regex}": ".*",
    "${instance}": ".*",
    "$instance": ".*",
    "${window}": "20s",
    "$window": "20s",
    "$__rate_interval": "10s",
    "$__interval": "2s",
    "$__range": "30s",
}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows; rows themselves excluded."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def panel_queries() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every target of every panel."""
    queries = []
    for panel in all_panels(load_dashboard()):
        for target in panel.get("targets", []):
            queries.append((f"{panel['title']} / {target.get('refId')}", target["expr"]))
    return queries


def substitute(expr: str) -> str:
    for key in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(key, SUBSTITUTIONS[key])
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


# --- the dashboard's shape ---------------------------------------------------------------------------


def test_dashboard_is_importable_json() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] == "beagled"
    assert dashboard["uid"] == "beagled"
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "an exported dashboard must not pin a database id"
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_has_a_datasource_variable_used_by_every_panel() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds_vars = [v for v in variables.values() if v["type"] == "datasource"]
    assert ds_vars, "no template variable of type datasource"
    assert ds_vars[0]["query"] == "prometheus"
    ref = "${" + ds_vars[0]["name"] + "}"
    for panel in all_panels(dashboard):
        assert panel["datasource"]["uid"] == ref, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ref, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == ref


def test_every_panel_has_a_target_with_contract_names_only() -> None:
    dashboard = load_dashboard()
    panels = all_panels(dashboard)
    assert len(panels) >= 10
    problems = []
    for panel in panels:
        targets = panel.get("targets", [])
        if not targets or not all(t.get("expr") for t in targets):
            problems.append(f"panel {panel['title']!r} has no target with an expr")
        for target in targets:
            problems.extend(check_expr_names(target.get("expr", "")))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            problems.extend(check_expr_names(query))
    assert not problems, "\n".join(problems)


def test_dashboard_covers_every_contract_metric() -> None:
    text = " ".join(expr for _, expr in panel_queries())
    missing = [name for name in CONTRACT_METRICS if not re.search(rf"\b{name}(_bucket|_count|_sum)?\b", text)]
    assert not missing, f"no panel shows {missing}"


def test_name_check_catches_mistakes() -> None:
    assert check_expr_names('sum by (voice) (beagled_pending_pairs{instance=~".*"})') == []
    assert check_expr_names("rate(beagled_submission_total[5m])")  # typo in the name
    assert check_expr_names("sum by (backend) (beagled_jobs)")  # label of another metric


# --- scrape targets ----------------------------------------------------------------------------------


class _Exposition(BaseHTTPRequestHandler):
    produce: Callable[[], tuple[bytes, str]]

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body, content_type = type(self).produce()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def serve_exposition(produce: Callable[[], tuple[bytes, str]]) -> Iterator[str]:
    """Serve ``produce()`` (body, content type) on /metrics of a free 127.0.0.1 port; yields host:port."""
    handler = type("Handler", (_Exposition,), {"produce": staticmethod(produce)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _drive(step: int, observe: Callable[..., None]) -> None:
    """One scrape's worth of activity, the same for both targets (observe(kind, labels, value))."""
    observe("training", ("mlx", "success"), 40.0 + step % 7)
    observe("training", ("peft", "success"), 90.0 + step % 11)
    if step % 3 == 0:
        observe("training", ("mlx", "failure"), 3.0)
    observe("reload", ("vllm", "success"), 0.2 + (step % 5) / 10)
    if step % 4 == 0:
        observe("reload", ("vllm", "failure"), 5.0)
    observe("ack", (), 0.002 + (step % 10) / 1000)
    observe("submission", ("accepted",), 3)
    observe("submission", ("duplicate",), 1)
    observe("event", ("PairSubmitted",), 3)
    observe("event", ("JobCreated",), 1)
    observe("fallback", ("mlx", "peft"), 1)


@pytest.fixture
def contract_target() -> Iterator[str]:
    """A reference exposition of CONTRACT.md's metrics, made with prometheus_client."""
    registry = CollectorRegistry()
    training = Histogram(
        "beagled_training_duration_seconds",
        "training",
        ["backend", "outcome"],
        buckets=(10, 30, 60, 120, 300, 600),
        registry=registry,
    )
    reload = Histogram(
        "beagled_reload_duration_seconds",
        "reload",
        ["method", "outcome"],
        buckets=(0.1, 0.5, 1, 5, 30),
        registry=registry,
    )
    ack = Histogram("beagled_submit_ack_seconds", "ack", buckets=(0.001, 0.005, 0.01, 0.1), registry=registry)
    submissions = Counter("beagled_submissions", "submissions", ["outcome"], registry=registry)
    events = Counter("beagled_events", "events", ["type"], registry=registry)
    fallbacks = Counter(
        "beagled_backend_fallbacks", "fallbacks", ["from_backend", "to_backend"], registry=registry
    )
    jobs = Gauge("beagled_jobs", "jobs", ["state"], registry=registry)
    pending = Gauge("beagled_pending_pairs", "pending", ["voice"], registry=registry)
    version = Gauge("beagled_voice_version", "version", ["voice"], registry=registry)
    loss = Gauge("beagled_eval_loss", "loss", ["voice"], registry=registry)
    Info("beagled_build", "build", registry=registry).info({"version": "0.0.0-test"})
    Gauge("beagled_leader", "leader", registry=registry).set(1)
    Gauge("beagled_replication_lag_seconds", "lag", registry=registry).set(0.05)
    step = 0
    lock = threading.Lock()

    def observe(kind: str, labels: tuple[str, ...], value: float) -> None:
        if kind == "training":
            training.labels(*labels).observe(value)
        elif kind == "reload":
            reload.labels(*labels).observe(value)
        elif kind == "ack":
            ack.observe(value)
        elif kind == "submission":
            submissions.labels(*labels).inc(value)
        elif kind == "event":
            events.labels(*labels).inc(value)
        elif kind == "fallback":
            fallbacks.labels(*labels).inc(value)

    def produce() -> tuple[bytes, str]:
        nonlocal step
        with lock:
            step += 1
            _drive(step, observe)
            for state in ("queued", "training", "trained", "promoted", "reloaded", "failed", "rejected"):
                jobs.labels(state).set(step % 3)
            for voice in ("default", "formal"):
                pending.labels(voice).set(step % 5)
                version.labels(voice).set(1 + step // 10)
                loss.labels(voice).set(2.0 - step / 1000)
            return generate_latest(registry), CONTENT_TYPE_LATEST

    yield from serve_exposition(produce)


@pytest.fixture
def metrics_target(make_daemon: Callable[..., Any]) -> str:
    """A real ``beagled serve`` process that has trained a job (one backend crashing first, so a
    fallback; held-out pairs, so an eval loss; the command reloader, so reloads); returns its
    ``host:port``. Every contract series exists before Prometheus' first scrape."""
    d = make_daemon(metrics_daemon_tables())
    job, _ = train_one_job(d)
    assert job["backend"] == "fake" and job["eval_loss"] is not None
    return f"127.0.0.1:{d.metrics_port}"


# --- every panel through a real Prometheus ----------------------------------------------------------


def _run_all_panel_queries(prom: PromServer) -> None:
    # Enough scrapes for every rate window ($__rate_interval -> 10s) to hold several samples.
    prom.wait_for(
        'count_over_time(up{job="beagled"}[1m])', lambda r: bool(r) and float(r[0]["value"][1]) >= 4
    )
    up = prom.query('up{job="beagled"}')
    assert up, prom.targets()
    assert up[0]["value"][1] == "1", prom.targets()
    failures = []
    for title, expr in panel_queries():
        promql = substitute(expr)
        try:
            # Polls: a window may need one more scrape before a rate has two samples.
            prom.wait_for(promql, bool, timeout=15)
        except AssertionError as e:  # PromQLError (does not parse) is an AssertionError too
            failures.append(f"{title}: {e}")
    assert not failures, "\n".join(failures)


def _exposition_text(target: str) -> bytes:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
        body: bytes = response.read()
        return body


def test_every_panel_query_returns_data_from_the_contract_exposition(
    tmp_path: Path, contract_target: str
) -> None:
    require_prometheus()
    with start_prometheus(tmp_path, [contract_target]) as prom:
        _run_all_panel_queries(prom)


def test_every_panel_query_returns_data_from_a_real_trained_daemon(
    tmp_path: Path, metrics_target: str
) -> None:
    require_prometheus()
    with start_prometheus(tmp_path, [metrics_target]) as prom:
        _run_all_panel_queries(prom)


def test_daemon_exposition_passes_promtool_lint(metrics_target: str) -> None:
    rc, output = promtool_check_metrics(_exposition_text(metrics_target))
    assert rc == 0, output


def test_promql_errors_are_reported(tmp_path: Path, contract_target: str) -> None:
    """The check above would catch a query that does not parse (not just one without data)."""
    require_prometheus()
    with start_prometheus(tmp_path, [contract_target]) as prom, pytest.raises(PromQLError):
        prom.query("sum by (le (rate(beagled_submit_ack_seconds_bucket[1m]))")
