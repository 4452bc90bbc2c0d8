"""Prometheus metrics on the daemon's own registry, and a tiny trio HTTP endpoint that serves them.

Counters and histograms are updated where things happen; gauges (jobs by state, pending pairs, voice
version, held-out loss) are computed at scrape time from the engine's state by a collector, so they are
never stale. Label values are bounded: backend and method names come from config, states and outcomes
from fixed sets, and at most ``max_voices`` voices get their own series (the rest are summed as
``_other``). Scrapes run on the trio thread, so the collector reads the state without locks.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from beagled import __version__
from beagled.jobs import JobState, State

log = logging.getLogger("beagled.metrics")

TRAIN_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
RELOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

# the per-voice gauges computed at scrape time, in the order the collector yields them after beagled_jobs
VOICE_GAUGES = (
    ("beagled_pending_pairs", "Pairs not yet in a job, by voice."),
    ("beagled_voice_version", "Version of the voice's current adapter."),
    ("beagled_eval_loss", "Held-out loss of the voice now served."),
    (
        "beagled_eval_preference_accuracy",
        "Held-out preference accuracy (DPO implicit reward) of the voice now served.",
    ),
)


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], State], max_voices: int) -> None:
        self._state = state
        self._max_voices = max_voices

    def collect(self) -> Iterable[Metric]:
        state = self._state()
        jobs = GaugeMetricFamily("beagled_jobs", "Jobs by state.", labels=["state"])
        for s, n in state.counts().items():
            jobs.add_metric([s], n)
        pending, version, loss, accuracy = (
            GaugeMetricFamily(name, doc, labels=["voice"]) for name, doc in VOICE_GAUGES
        )
        voices = sorted(state.voices.values(), key=lambda v: v.name)
        shown, rest = voices[: self._max_voices], voices[self._max_voices :]
        for v in shown:
            pending.add_metric([v.name], len(v.pending))
            version.add_metric([v.name], v.current_version)
            if v.eval_loss is not None:
                loss.add_metric([v.name], v.eval_loss)
            if v.preference_accuracy is not None:
                accuracy.add_metric([v.name], v.preference_accuracy)
        if rest:
            pending.add_metric(["_other"], sum(len(v.pending) for v in rest))
        yield from (jobs, pending, version, loss, accuracy)


class Metrics:
    def __init__(self, state: Callable[[], State] | None = None, *, max_voices: int = 100) -> None:
        # ``*_created`` series only double the scrape (Prometheus ignores them): off, process-wide
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # the standard process_* metrics (CPU, RSS, fds, start time)

        def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.training_duration = histogram(
            "beagled_training_duration_seconds",
            "Wall time of one backend's training try.",
            ["backend", "outcome", "executor"],
            TRAIN_BUCKETS,
        )
        self.reload_duration = histogram(
            "beagled_reload_duration_seconds",
            "Wall time of making the server serve an adapter.",
            ["method", "outcome"],
            RELOAD_BUCKETS,
        )
        self.submit_ack = histogram(
            "beagled_submit_ack_seconds",
            "From a submit's arrival to its durable acknowledgement.",
            [],
            ACK_BUCKETS,
        )
        self.submissions = counter("beagled_submissions", "Submitted pairs by outcome.", ["outcome"])
        self.events = counter("beagled_events", "Events appended to the log, by type.", ["type"])
        self.fallbacks = counter(
            "beagled_backend_fallbacks",
            "Moves to the next backend after one failed.",
            ["from_backend", "to_backend"],
        )
        self.executor_faults = counter(
            "beagled_executor_faults",
            "Faults of the training executor (Ray unreachable, actor lost, local fallback), by kind.",
            ["executor", "kind"],
        )
        self.backend_available = gauge(
            "beagled_backend_available",
            "1 if the training backend's last probe found it usable, else 0.",
            ["backend"],
        )
        Info("beagled_build", "beagled build.", registry=r).info({"version": __version__})
        self.leader = gauge("beagled_leader", "1 on the node that runs effects (the leader), else 0.", [])
        self.replication_lag = gauge(
            "beagled_replication_lag_seconds",
            "Age of the oldest event the last catch-up of the shared log folded in (0: caught up).",
            [],
        )
        for outcome in ("accepted", "duplicate", "rejected"):
            self.submissions.labels(outcome)
        if state is not None:
            r.register(_StateCollector(state, max_voices))

    def prime(self, backends: list[str], method: str, executor: str = "local") -> None:
        """Export every known label combination at zero from the start, so that ``rate()`` and
        ``increase()`` see a series' first event (a series born with its first sample hides it)."""
        for b in backends:
            self.backend_available.labels(b).set(0)
            for outcome in ("success", "failure", "timeout"):
                self.training_duration.labels(b, outcome, executor)
        if executor == "ray":
            for kind in ("unreachable", "probe_failed", "actor_start", "worker_lost", "job_failed"):
                self.executor_faults.labels("ray", kind)
        for a, b in itertools.pairwise(backends):
            self.fallbacks.labels(a, b)
        if method != "none":
            for outcome in ("success", "failure"):
                self.reload_duration.labels(method, outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    max_connections: int = 16,
    timeout_s: float = 2.0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (HTTP/1.0, one request per connection) until cancelled.

    Bounded (anyone on the host can connect to a TCP port): at most ``max_connections`` at once — one
    more is closed as soon as it is accepted — and each must send its request and take its answer
    within ``timeout_s``, so the endpoint can never hold more than ``max_connections`` descriptors."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname())
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= max_connections:
            await trio.aclose_forcefully(stream)  # at the cap: no answer, no wait, its descriptor back now
            return
        active += 1
        try:
            with trio.move_on_after(timeout_s):
                data = b""
                while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    data += chunk
                parts = data.split(b"\r\n", 1)[0].split()
                if (
                    len(parts) >= 2
                    and parts[0] in (b"GET", b"HEAD")
                    and parts[1].split(b"?")[0] in (b"/metrics", b"/")
                ):
                    body = metrics.exposition()
                    head = (
                        f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    ).encode()
                    await stream.send_all(head + (body if parts[0] == b"GET" else b""))
                else:
                    await stream.send_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            active -= 1
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)


__all__ = ["CONTENT_TYPE_LATEST", "JobState", "Metrics", "serve_metrics"]
