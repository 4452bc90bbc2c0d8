"""The ports: every collaborator the engine talks to, as a ``typing.Protocol``, and the values they pass.

Standard library only (and the pure core's ``events``/``jobs`` for the types it names), so that the
engine's import closure holds no database driver, no HTTP client, no subprocess and no metrics library.
The concrete adapters live elsewhere and meet only in the composition root (``beagled.daemon``)::

    port            what it owns                          adapters (wired by beagled.daemon)
    ----            ------------                          --------
    Store           the event log, snapshots, fencing     store.SqlStore/SqliteStore, store.MemoryStore
    AdapterStore    adapter directories, ``current``      adapter_dirs.AdapterDirs
    Trainer         training backends and their runs      training.runner.SubprocessTrainer,
                                                          training.executor_ray.RayTrainer
    Reloader        what the inference server serves      reload.NoneReloader, reload.command,
                                                          reload.ssh, reload.replicas.VllmReplicas
    SleepGuard      vLLM sleep mode around training       reload.sleep.SleepGuard
    MetricsSink     counters, gauges, histograms          metrics.Metrics (prometheus_client)
    Leadership      who leads a shared log                leader.Leadership, leader.Listener
    Clock           wall and monotonic time               SystemClock (below)

Capabilities only some adapters have (per-replica status, a base-model check, a leader term) are
declared here with their neutral default, so callers call them directly rather than probing with
``getattr``: an adapter that subclasses the Protocol inherits the default.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from beagled import events as ev
from beagled import jobs
from beagled.training_spec import TrainingSpec

__all__ = [
    "AdapterStore",
    "BackendStatus",
    "Clock",
    "LeaderInfo",
    "Leadership",
    "Listener",
    "MetricsSink",
    "NullMetrics",
    "Progress",
    "Reloader",
    "ServeTarget",
    "SleepGuard",
    "SleepGuardFactory",
    "Store",
    "SubmitResult",
    "SystemClock",
    "Trainer",
]


# -- values the ports pass -------------------------------------------------------------------------
@dataclass(frozen=True)
class SubmitResult:
    pair_id: str
    seq: int
    duplicate: bool
    event: ev.Event | None  # the new event, None for a duplicate
    conflict: bool = False  # the key is taken by other drafts (``pair_id``/``seq``: the stored pair)


@dataclass(frozen=True)
class ServeTarget:
    """One adapter to serve: ``adapter_dir`` is the job's own directory (not the ``current`` link)."""

    voice: str
    version: int
    job_id: str
    adapter_dir: Path


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "reason": self.reason}


@dataclass(frozen=True)
class LeaderInfo:
    node: str
    term: int


Progress = Callable[[dict[str, Any]], None]


# -- the event log ---------------------------------------------------------------------------------
class Store(Protocol):
    """The event log. Write methods are called by one writer at a time.

    ``term``: the leader term appends are fenced by (``None``: no fencing); set by the engine when it
    is elected on a shared log (``beagled.leader``)."""

    term: int | None

    def append(self, payloads: Sequence[ev.Payload], at: float) -> list[ev.Event]: ...
    def submit_batch(self, items: Sequence[ev.PairSubmitted], at: float) -> list[SubmitResult]: ...
    def read(self, from_seq: int = 0) -> Iterator[ev.Event]: ...
    def read_stream(self, stream: str) -> list[ev.Event]: ...
    def read_public(self, from_seq: int, limit: int) -> list[dict[str, Any]]: ...
    def get_pairs(self, pair_ids: Sequence[str]) -> dict[str, ev.PairSubmitted]: ...
    def key_secret(self) -> bytes: ...
    def erase_drafts(self, voice: str, at: float) -> list[ev.Event]: ...
    def submitters(self) -> list[tuple[int, str]]: ...
    def last_seq(self) -> int: ...
    def write_snapshot(self, seq: int, schema: int, blob: bytes) -> None: ...
    def snapshots(self) -> Iterator[tuple[int, int, bytes]]: ...
    def integrity_check(self) -> str: ...
    def close(self) -> None: ...


# -- the adapter directories -----------------------------------------------------------------------
class AdapterStore(Protocol):
    """Trained adapters on disk: staging, finalised job directories, the ``current`` link, removals."""

    def voice_dir(self, voice: str) -> Path: ...
    def adapter_dir(self, voice: str, job_id: str) -> Path: ...
    def staging_dir(self, voice: str, job_id: str, attempt: int, backend: str) -> Path: ...
    def finalize(self, voice: str, job_id: str, out_dir: Path) -> Path: ...
    def promote(self, voice: str, job_id: str) -> Path: ...
    def current_job(self, voice: str) -> str | None: ...
    def write_served(self, voice: str, info: dict[str, Any]) -> None: ...
    def prunable(self, voice: str, keep: list[str]) -> list[str]: ...
    def prune(self, voice: str, keep: list[str]) -> list[str]: ...
    def mark_removal(self, voice: str) -> list[str]: ...
    def pending_removals(self) -> dict[str, list[str]]: ...
    def finish_removal(
        self, voice: str, jobs: list[str], *, whole_voice: bool, keep_marker: bool = False
    ) -> None: ...
    def remove(self, voice: str) -> bool: ...
    def clean_staging(self) -> None: ...


# -- training --------------------------------------------------------------------------------------
class Trainer(Protocol):
    """The port the engine trains through. ``executor``: where runs go by default (``local``, ``ray``),
    the label of ``beagled_training_duration_seconds`` when a result does not name its own."""

    executor: str

    async def probe_all(self) -> list[BackendStatus]: ...
    def reprobe_at(self) -> float: ...
    async def reprobe_due(self) -> None: ...
    def statuses(self) -> list[BackendStatus]: ...
    def available(self) -> list[str]: ...
    async def run(self, backend: str, spec: TrainingSpec, on_progress: Progress) -> dict[str, Any]:
        """Train ``spec`` (its ``out_dir`` set) on ``backend``; the worker's result line."""
        ...


# -- serving ---------------------------------------------------------------------------------------
@runtime_checkable
class Reloader(Protocol):
    """How the engine makes an inference server serve a promoted adapter (see ``beagled.reload``).

    ``reload_timeout_s``: how long the engine waits for one ``reload``, ``verify`` or ``check_base`` before it
    counts as timed out (each reloader knows its own budget: its command, upload and health checks)."""

    method: str
    reload_timeout_s: float

    async def reload(self, target: ServeTarget) -> str:
        """Make the server serve ``target``; return the model name clients must ask for."""
        ...

    async def verify(self, target: ServeTarget) -> bool:
        """Is ``target`` served now? ``False`` when it cannot be told (server unreachable)."""
        ...

    async def aclose(self) -> None: ...

    def replicas(self, voice: str) -> list[dict[str, Any]] | None:
        """Per-replica serving of ``voice`` (url, served_name, verified_at); None: no replicas."""
        return None

    async def release(self, dirs: Sequence[Path]) -> set[Path]:
        """Unload ``dirs`` where served; returns those no server lists any more (safe to delete).
        Default: all of them (a reloader that does not serve from the daemon's directories)."""
        return set(dirs)

    async def check_base(self, training_base: str | None) -> str | None:
        """At start-up: does the server serve the training base? Returns the server's base entry id
        when it can tell; raises a non-retryable ``ReloadError`` on a mismatch. Default: no check."""
        return None


class SleepGuard(Protocol):
    """Puts the inference servers to sleep around a training and wakes them (``reload.sleep``)."""

    async def recover(self) -> None: ...
    async def retry(self) -> None: ...
    def asleep(self, job_id: str) -> AbstractAsyncContextManager[None]: ...


Record = Callable[[jobs.Command], Awaitable[object]]  # decide → append → evolve (Engine.execute)
SleepingView = Callable[[], Mapping[str, jobs.Sleeping]]
SleepGuardFactory = Callable[[Record, SleepingView], SleepGuard | None]


# -- metrics ---------------------------------------------------------------------------------------
class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeChild(Protocol):
    def set(self, value: float) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterFamily(Protocol):
    def labels(self, *values: str) -> CounterChild: ...


class GaugeFamily(Protocol):
    def labels(self, *values: str) -> GaugeChild: ...


class HistogramFamily(Protocol):
    def labels(self, *values: str) -> HistogramChild: ...


class MetricsSink(Protocol):
    """What the engine records (``beagled.metrics.Metrics`` exports it to Prometheus)."""

    @property
    def training_duration(self) -> HistogramFamily: ...
    @property
    def reload_duration(self) -> HistogramFamily: ...
    @property
    def submit_ack(self) -> HistogramChild: ...
    @property
    def submissions(self) -> CounterFamily: ...
    @property
    def events(self) -> CounterFamily: ...
    @property
    def fallbacks(self) -> CounterFamily: ...
    @property
    def backend_available(self) -> GaugeFamily: ...
    @property
    def leader(self) -> GaugeChild: ...
    @property
    def replication_lag(self) -> GaugeChild: ...


class _Nothing:
    """Every metric child at once, recording nothing."""

    def labels(self, *values: str) -> _Nothing:
        return self

    def inc(self, amount: float = 1) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def observe(self, amount: float) -> None:
        return None


class NullMetrics:
    """A sink that records nothing: for an engine built without a metrics endpoint (tests)."""

    training_duration = reload_duration = submissions = events = fallbacks = backend_available = _Nothing()
    submit_ack = leader = replication_lag = _Nothing()


# -- several daemons on one log --------------------------------------------------------------------
class Leadership(Protocol):
    """Who leads a shared log (``beagled.leader.Leadership``)."""

    @property
    def is_leader(self) -> bool: ...
    @property
    def leader(self) -> LeaderInfo | None: ...
    @property
    def nodes(self) -> list[str]: ...

    async def run(
        self,
        on_elected: Callable[[int], Awaitable[None]],
        effects: Callable[[], Awaitable[None]],
        on_deposed: Callable[[], None],
    ) -> None: ...


class Listener(Protocol):
    """Wakes a follower when the shared log grows (``beagled.leader.Listener``)."""

    def wait(self, timeout_s: float) -> int | None: ...


# -- time ------------------------------------------------------------------------------------------
class Clock(Protocol):
    def time(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
