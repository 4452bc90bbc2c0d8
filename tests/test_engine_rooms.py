"""The engine in-process, fast: the in-memory store, fake ports (a trainer that returns a result, a
reloader that can be told to fail, an adapter store that can refuse a swap) and trio's ``MockClock``,
so no test waits on real time. The loops run as in the daemon (``Engine.run``); tests wait on the
engine's own publish stream (``watch``), never on a sleep.

Threads and the mock clock: the engine hops to a thread for each store call, and while one runs trio
may jump the mock clock ahead (after ``AUTOJUMP_S`` of real idleness). Times are therefore asserted as
the pure core computed them (a retry's ``retry_at`` against the failure's own ``now``) and as lower bounds (no
retry before its time), never as exact gaps between two calls.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from beagled import events as ev
from beagled import jobs
from beagled.config import from_mapping
from beagled.engine import Engine
from beagled.errors import Conflict, ReloadError
from beagled.ports import BackendStatus, Progress, Reloader, ServeTarget
from beagled.store import MemoryStore
from beagled.training_spec import TrainingSpec

# not 0: with 0 the idle run loop spins through clock jumps without ever blocking, holding the GIL
# from the store's worker thread, so thousands of mock seconds pass before one store call returns
AUTOJUMP_S = 0.01
WALL = 1_700_000_000.0  # the fake wall clock starts here, then follows trio's (mock) clock


class TrioClock:
    """The engine's Clock port driven by trio's clock (a ``MockClock`` in these tests)."""

    def time(self) -> float:
        return WALL + trio.current_time()

    def monotonic(self) -> float:
        return trio.current_time()


class FakeTrainer:
    """One backend, always available; each run reports progress and returns a result."""

    executor = "local"

    def __init__(self) -> None:
        self.specs: list[dict[str, Any]] = []

    async def probe_all(self) -> list[BackendStatus]:
        return self.statuses()

    def reprobe_at(self) -> float:
        return float("inf")

    async def reprobe_due(self) -> None:
        return None

    def statuses(self) -> list[BackendStatus]:
        return [BackendStatus("fake", True, "")]

    def available(self) -> list[str]:
        return ["fake"]

    async def run(self, backend: str, spec: TrainingSpec, on_progress: Progress) -> dict[str, Any]:
        self.specs.append(spec.to_json())
        on_progress({"step": 1, "total": 2, "loss": 0.5})
        await trio.sleep(1.0)  # training takes (mock) time
        return {"train_loss": 0.4, "eval_loss": 0.5 - 0.01 * len(self.specs), "baseline_eval_loss": None}


class FakeReloader(Reloader):
    """Serves whatever it is told; ``fail`` more reloads fail (retryable) first; while ``hold`` is
    an unset event, a reload waits for it (the serve loop stays busy)."""

    method = "fake"
    reload_timeout_s = 30.0

    def __init__(self, clock: TrioClock) -> None:
        self.clock = clock
        self.fail = 0
        self.hold: trio.Event | None = None
        self.calls: list[tuple[str, float]] = []  # (job id, wall time of the call)

    async def reload(self, target: ServeTarget) -> str:
        self.calls.append((target.job_id, self.clock.time()))
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            self.fail -= 1
            raise ReloadError("server away", retryable=True)
        return f"{target.voice}-v{target.version}"

    async def verify(self, target: ServeTarget) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class FakeAdapters:
    """The adapter store in memory: ``current`` per voice; ``refuse`` names a job whose swap fails."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current: dict[str, str] = {}
        self.refuse: str | None = None
        self.served: dict[str, dict[str, Any]] = {}

    def voice_dir(self, voice: str) -> Path:
        return self.root / voice

    def adapter_dir(self, voice: str, job_id: str) -> Path:
        return self.root / voice / job_id

    def staging_dir(self, voice: str, job_id: str, attempt: int, backend: str) -> Path:
        return self.root / voice / ".staging" / f"{job_id}-a{attempt}-{backend}"

    def finalize(self, voice: str, job_id: str, out_dir: Path) -> Path:
        return self.adapter_dir(voice, job_id)

    def promote(self, voice: str, job_id: str) -> Path:
        if job_id == self.refuse:
            raise OSError(f"no space left to link {job_id}")
        self.current[voice] = job_id
        return self.adapter_dir(voice, job_id)

    def current_job(self, voice: str) -> str | None:
        return self.current.get(voice)

    def write_served(self, voice: str, info: dict[str, Any]) -> None:
        self.served[voice] = info

    def prunable(self, voice: str, keep: list[str]) -> list[str]:
        return []

    def prune(self, voice: str, keep: list[str]) -> list[str]:
        return []

    def mark_removal(self, voice: str) -> list[str]:
        return []

    def pending_removals(self) -> dict[str, list[str]]:
        return {}

    def finish_removal(
        self, voice: str, done: list[str], *, whole_voice: bool, keep_marker: bool = False
    ) -> None:
        return None

    def remove(self, voice: str) -> bool:
        return True

    def clean_staging(self) -> None:
        return None


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = TrioClock()
        self.cfg = from_mapping(
            {
                "daemon": {"state_dir": str(tmp_path / "state")},
                "metrics": {"listen": ""},
                "scheduler": {"min_pairs": 2, "max_wait_s": 1e9},
                "training": {"heldout_share": 0.0},
                "reload": {"retry_backoff_s": 5.0, "retry_backoff_max_s": 60.0, "reconcile_interval_s": 3600},
            }
        )
        self.store = MemoryStore()
        self.adapters = FakeAdapters(tmp_path / "voices")
        self.trainer = FakeTrainer()
        self.reloader = FakeReloader(self.clock)
        self.engine = Engine(
            self.cfg,
            self.store,
            self.adapters,
            self.trainer,
            self.reloader,
            base_model=lambda: tmp_path / "base",
            clock=self.clock,
        )
        self.watches: list[AsyncIterator[dict[str, Any]]] = []

    def watch(self) -> AsyncIterator[dict[str, Any]]:
        """The engine's publish stream from now on: the log after the present seq, then live (a watch
        subscribes when first iterated, so it replays what it missed); closed when the test ends."""
        w = self.engine.watch(self.engine.state.seq)
        self.watches.append(w)
        return w

    async def submit(self, n: int, start: int = 0, voice: str = "v") -> None:
        for i in range(start, start + n):
            await self.engine.submit({"voice": voice, "bad": f"bad {i}", "good": f"good {i}", "key": f"k{i}"})


def run_engine(test: Callable[[Rig], Any]) -> Callable[[Path], None]:
    """Run ``test(rig)`` with the engine's loops started, on a mock clock; the loops end with it."""

    def runner(tmp_path: Path) -> None:
        async def main() -> None:
            rig = Rig(tmp_path)
            rig.engine.recover()
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.engine.run)
                with trio.fail_after(1e6):  # mock seconds (they run fast while threads work): no hang
                    await test(rig)
                for w in rig.watches:
                    await w.aclose()  # type: ignore[attr-defined]
                nursery.cancel_scope.cancel()

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=AUTOJUMP_S))

    return runner


async def until(
    watch: AsyncIterator[dict[str, Any]], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first published event (its public dict) for which ``done`` holds."""
    async for msg in watch:
        if "event" in msg and done(msg["event"]):
            return msg["event"]  # type: ignore[no-any-return]
    raise AssertionError("the watch ended")  # pragma: no cover


def reloaded(job_id: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "Reloaded" and (job_id is None or e["data"]["job_id"] == job_id)


def history(rig: Rig, job_id: str) -> list[str]:
    return [h[0] for h in rig.engine.state.job(job_id).history]


@run_engine
async def _pair_to_served(rig: Rig) -> None:
    watch = rig.watch()
    await rig.submit(1)
    assert rig.engine.state.jobs == {}  # 1 < min_pairs: nothing is cut
    await rig.submit(1, start=1)
    event = await until(watch, reloaded())
    job = rig.engine.state.job(event["data"]["job_id"])
    assert job.state == jobs.JobState.RELOADED and job.served_name == "v-v1"
    assert history(rig, job.job_id) == [
        "JobCreated",
        "TrainingStarted",
        "TrainingSucceeded",
        "PromotionStarted",
        "Promoted",
        "ReloadStarted",
        "Reloaded",
    ]
    (spec,) = rig.trainer.specs
    assert spec["job_id"] == job.job_id and len(spec["train"]) + len(spec["heldout"]) == 2
    v = rig.engine.state.voices["v"]
    assert v.current_job == v.served_job == job.job_id and rig.adapters.current["v"] == job.job_id
    assert rig.adapters.served["v"]["served_name"] == "v-v1"
    assert [c[0] for c in rig.reloader.calls] == [job.job_id]
    assert rig.engine.list_voices()["voices"][0]["served_version"] == 1


def test_a_pair_is_queued_trained_promoted_and_reloaded(tmp_path: Path) -> None:
    _pair_to_served(tmp_path)


async def two_versions(rig: Rig) -> tuple[str, str]:
    watch = rig.watch()
    await rig.submit(2)
    first = (await until(watch, reloaded()))["data"]["job_id"]
    await rig.submit(2, start=2)
    second = (await until(watch, reloaded()))["data"]["job_id"]
    assert rig.engine.state.voices["v"].current_version == 2
    return first, second


@run_engine
async def _rollback(rig: Rig) -> None:
    first, _ = await two_versions(rig)
    watch = rig.watch()
    answer = await rig.engine.rollback("v", None)
    assert answer == {"job_id": first, "version": 1}
    # answered after the outcome: the serve loop swapped current and recorded it
    v = rig.engine.state.voices["v"]
    assert v.rollback_to is None and v.current_job == first and rig.adapters.current["v"] == first
    assert (await until(watch, lambda e: e["type"] == "RolledBack"))["data"]["job_id"] == first
    # then the serve loop serves the old version again, for the reason it decided
    event = await until(watch, reloaded(first))
    assert event["data"]["reason"] == "rollback" and rig.engine.state.voices["v"].served_job == first


def test_rollback_is_recorded_by_the_handler_and_run_by_the_serve_loop(tmp_path: Path) -> None:
    _rollback(tmp_path)


@run_engine
async def _rollback_refused(rig: Rig) -> None:
    first, second = await two_versions(rig)
    rig.adapters.refuse = first  # the swap fails (a full disk)
    with pytest.raises(Conflict, match=f"cannot roll back to {first}: no space left"):
        await rig.engine.rollback("v", None)
    v = rig.engine.state.voices["v"]
    assert v.rollback_to == first and v.current_job == second  # the intent stays; current did not move
    with pytest.raises(Conflict, match="already being rolled back"):
        await rig.engine.rollback("v", None)
    watch = rig.watch()
    rig.adapters.refuse = None  # the disk has room again: the serve loop's retry finishes it
    assert (await until(watch, lambda e: e["type"] == "RolledBack"))["data"]["job_id"] == first
    assert rig.adapters.current["v"] == first and rig.engine.state.voices["v"].rollback_to is None


def test_a_failed_rollback_swap_answers_conflict_and_the_serve_loop_retries(tmp_path: Path) -> None:
    _rollback_refused(tmp_path)


async def overtaken_rollback(
    rig: Rig, other_writer: Callable[[str, str], ev.Payload]
) -> str | dict[str, Any]:
    """Ask for a rollback of ``v`` while the serve loop is busy with another voice; before the loop
    gets to it, another writer on the log records ``other_writer(target job, served job)`` (the pure
    core refuses such a change here). The rollback's answer (a ``Conflict``'s message or the result),
    not a wait forever."""
    first, second = await two_versions(rig)
    watch = rig.watch()
    rig.reloader.hold = trio.Event()  # the serve loop is busy reloading another voice's job
    await rig.submit(2, voice="w")
    await until(watch, lambda e: e["type"] == "ReloadStarted" and e["data"]["voice"] == "w")
    answers: list[str | dict[str, Any]] = []

    async def ask() -> None:
        try:
            answers.append(await rig.engine.rollback("v", None))
        except Conflict as e:
            answers.append(str(e))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await until(watch, lambda e: e["type"] == "RollbackStarted")
        ctx = rig.engine.ctx
        async with ctx.lock:
            ctx.apply(rig.store.append([other_writer(first, second)], ctx.now()))
        rig.reloader.hold.set()
    (answer,) = answers
    return answer


@run_engine
async def _rollback_of_a_deleted_voice(rig: Rig) -> None:
    answer = await overtaken_rollback(rig, lambda _first, _second: ev.VoiceDeleted(voice="v"))
    assert answer == "voice 'v' was deleted: no rollback to finish"
    assert "v" not in rig.engine.state.voices


def test_a_rollback_whose_voice_went_before_it_ran_answers_conflict(tmp_path: Path) -> None:
    _rollback_of_a_deleted_voice(tmp_path)


async def _rollback_another_writer_finished(rig: Rig, to_the_job_asked: bool) -> None:
    def other_writer(first: str, second: str) -> ev.Payload:
        job, version = (first, 1) if to_the_job_asked else (second, 2)
        return ev.RolledBack(voice="v", job_id=job, version=version, adapter_path="elsewhere")

    answer = await overtaken_rollback(rig, other_writer)
    v = rig.engine.state.voices["v"]
    if to_the_job_asked:  # what was asked happened: a Conflict would invite a retry one version further
        assert answer == {"job_id": v.current_job, "version": 1}
    else:
        assert answer == "voice 'v' has no rollback in progress any more"
    assert v.rollback_to is None


@pytest.mark.parametrize("to_the_job_asked", [True, False])
def test_a_rollback_another_writer_finished_first_answers_what_happened(
    tmp_path: Path, to_the_job_asked: bool
) -> None:
    run_engine(functools.partial(_rollback_another_writer_finished, to_the_job_asked=to_the_job_asked))(
        tmp_path
    )


@run_engine
async def _reload_backoff(rig: Rig) -> None:
    rig.reloader.fail = 3
    watch = rig.watch()
    await rig.submit(2)
    failed = []
    while len(failed) < 3:
        failed.append(await until(watch, lambda e: e["type"] == "ReloadFailed"))
    done = await until(watch, reloaded())
    calls = [at for _, at in rig.reloader.calls]
    assert len(calls) == 4 and done["data"]["job_id"] == failed[0]["data"]["job_id"]
    # retry_at = the failure's time + retry_backoff_s doubling per failed reload (5, 10, 20 s)
    assert [round(f["data"]["retry_at"] - at, 6) for f, at in zip(failed, calls, strict=False)] == [
        5.0,
        10.0,
        20.0,
    ]
    for f, next_call in zip(failed, calls[1:], strict=True):
        assert next_call >= f["data"]["retry_at"]  # never retried before its time
    assert rig.engine.state.job(done["data"]["job_id"]).reload_attempts == 3


def test_a_failed_reload_backs_off_on_the_clock(tmp_path: Path) -> None:
    _reload_backoff(tmp_path)
