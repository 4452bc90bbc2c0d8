"""Snapshots of the projection: exact round-trip, and recovery from snapshot + tail == full replay.

Random event histories are decided by ``jobs.decide`` (illegal commands are simply skipped), written
through a real ``SqliteStore``, and recovered by a real ``Engine``. A damaged snapshot, one of an
unknown schema, or one of another record shape must fall back to an older snapshot or a full replay.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Any

import pytest

from beagled import events as ev
from beagled import jobs, snapshot
from beagled.adapter_dirs import AdapterDirs
from beagled.config import from_mapping
from beagled.engine import Engine
from beagled.errors import IllegalTransition, NotFound
from beagled.reload import NoneReloader
from beagled.store import MemoryStore, SqliteStore, Store
from beagled.training.runner import SubprocessTrainer

VOICES = ("a", "b", "c")
URLS = ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]


def random_history(
    store: Store, rnd: random.Random, steps: int, state: jobs.State | None = None, prefix: str = ""
) -> jobs.State:
    """Drive random commands through decide → store → evolve (continuing ``state``, new ids under
    ``prefix``); returns the live projection."""
    state = state if state is not None else jobs.State()
    clock = 1000.0 + state.seq * 2
    job_ids: list[str] = list(state.jobs)
    k = 0

    def record(payloads: list[ev.Payload]) -> None:
        for e in store.append(payloads, clock):
            jobs.evolve(state, e)

    for _ in range(steps):
        clock += rnd.choice([0.5, 1.0, 1.25])
        r = rnd.random()
        if r < 0.45:
            n = rnd.randint(1, 5)
            pairs = []
            for _ in range(n):
                k += 1
                voice = rnd.choice(VOICES)
                pairs.append(
                    ev.PairSubmitted(
                        pair_id=f"{prefix}p{k}",
                        voice=voice,
                        bad=f"bad {k} é",
                        good=f"good {k}",
                        key=f"{prefix}k{rnd.randint(0, k)}",  # some duplicates
                        quality={"before": 0.25, "after": 0.5} if k % 3 == 0 else None,
                        heldout=rnd.random() < 0.2,
                    )
                )
            for res in store.submit_batch(pairs, clock):
                if res.event is not None:
                    jobs.evolve(state, res.event)
            continue
        j = rnd.choice(job_ids) if job_ids else "none"
        cmd: Any
        cmd = rnd.choice(
            [
                jobs.CutJob(rnd.choice(VOICES), f"{prefix}j{len(job_ids)}", "manual", rnd.randint(0, 3)),
                jobs.StartAttempt(j, ("mlx", "peft")),
                jobs.BackendFailed(j, "mlx", "boom", rnd.random() < 0.5, 1.5),
                jobs.FailAttempt(j, "all failed", clock, rnd.randint(1, 3), 5.0, 300.0),
                jobs.FinishTraining(j, "peft", f"/a/{j}", 0.5, rnd.choice([None, 1.0, 2.0]), 1.5, 3.0, 2.0),
                jobs.Gate(j, rnd.choice([0.0, 0.5])),
                jobs.FinishPromotion(j, f"/a/{j}/adapter"),
                jobs.StartReload(j, "vllm"),
                jobs.FinishReload(j, "vllm", f"{j}-served", 0.1),
                jobs.FailReload(j, "vllm", "down", clock, 2.0, 60.0),
                jobs.FailJob(j, "gone"),
                jobs.Rollback(rnd.choice(VOICES)),
                jobs.SetPaused(rnd.random() < 0.5),
                jobs.StartSleep(tuple(rnd.sample(URLS, rnd.randint(1, 2))), rnd.choice([1, 2]), j),
                jobs.FinishSleep(tuple(rnd.sample(URLS, 1)), tuple(rnd.sample(URLS, rnd.randint(0, 1)))),
                jobs.StartWake(tuple(URLS), rnd.choice(["trained", "recovery"])),
                jobs.FinishWake(tuple(rnd.sample(URLS, rnd.randint(1, 2))), 1.5),
                jobs.FailWake(tuple(rnd.sample(URLS, 1)), "still asleep"),
            ]
        )
        try:
            payloads = jobs.decide(state, cmd)
        except (IllegalTransition, NotFound):
            continue
        if isinstance(cmd, jobs.CutJob):
            job_ids.append(cmd.job_id)
        record(payloads)
        if isinstance(cmd, jobs.Rollback):
            v = state.voice(cmd.voice)
            if v.rollback_to is not None and rnd.random() < 0.8:
                record(jobs.decide(state, jobs.FinishRollback(cmd.voice, "/a/rolled")))
    return state


def full_replay(store: Store) -> jobs.State:
    return jobs.replay(store.read(0))


def make_engine(tmp_path: Path, store: Store) -> Engine:
    cfg = from_mapping({"daemon": {"state_dir": str(tmp_path / "state")}, "metrics": {"listen": ""}})
    trainer = SubprocessTrainer([], spec_dir=tmp_path / "specs")
    return Engine(cfg, store, AdapterDirs(tmp_path / "voices"), trainer, NoneReloader())


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_is_exact(tmp_path: Path, seed: int) -> None:
    store = MemoryStore()
    state = random_history(store, random.Random(seed), 300)
    assert state == full_replay(store)
    blob = snapshot.to_snapshot(snapshot.view(state))
    assert snapshot.from_snapshot(blob) == state
    assert snapshot.from_snapshot(snapshot.to_snapshot(jobs.State())) == jobs.State()


def test_round_trip_carries_the_servers_asleep() -> None:
    state = jobs.State()
    store = MemoryStore()
    for cmd in (jobs.StartSleep(tuple(URLS), 2, "j1"), jobs.FinishSleep((URLS[0],), (URLS[1],), 0.5)):
        for e in store.append(jobs.decide(state, cmd), 1234.5):
            jobs.evolve(state, e)
    assert state.sleeping == {URLS[0]: jobs.Sleeping("j1", 2, 1234.5, "asleep")}
    assert snapshot.from_snapshot(snapshot.to_snapshot(snapshot.view(state))) == state
    header = snapshot.read_header(snapshot.to_snapshot(state))
    assert header["sleeping"] == {URLS[0]: ["j1", 2, 1234.5, "asleep"]}


@pytest.mark.parametrize("seed", range(4))
def test_snapshot_plus_tail_equals_full_replay_through_sqlite(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(100 + seed)
    store = SqliteStore(tmp_path / "events.sqlite3")
    state = random_history(store, rnd, 200)
    store.write_snapshot(state.seq, snapshot.SCHEMA, snapshot.to_snapshot(snapshot.view(state)))
    state = random_history(store, rnd, 120, state, prefix="t-")
    store.close()

    store = SqliteStore(tmp_path / "events.sqlite3")
    engine = make_engine(tmp_path, store)
    replayed = engine.recover()
    assert engine.recovery is not None and engine.recovery["snapshot_seq"] is not None
    assert replayed == store.last_seq() - engine.recovery["snapshot_seq"] < store.last_seq()
    assert engine.state == full_replay(store) == state
    store.close()


def _engine_after_snapshot(tmp_path: Path, tamper: Any) -> tuple[Engine, Store, jobs.State]:
    store = SqliteStore(tmp_path / "events.sqlite3")
    state = random_history(store, random.Random(7), 200)
    good_seq = state.seq
    store.write_snapshot(good_seq, snapshot.SCHEMA, snapshot.to_snapshot(snapshot.view(state)))
    store.append([ev.Paused()], 5000.0)
    jobs.evolve(state, list(store.read(good_seq))[-1])
    seq, schema, blob = tamper(state.seq, snapshot.SCHEMA, snapshot.to_snapshot(snapshot.view(state)))
    store.write_snapshot(seq, schema, blob)
    engine = make_engine(tmp_path, store)
    engine.recover()
    return engine, store, state


def test_a_damaged_newest_snapshot_falls_back_to_the_older_one(tmp_path: Path) -> None:
    def flip(seq: int, schema: int, blob: bytes) -> tuple[int, int, bytes]:
        b = bytearray(blob)
        b[-10] ^= 0x01  # inside the job records: only the checksum notices
        return seq, schema, bytes(b)

    engine, store, state = _engine_after_snapshot(tmp_path, flip)
    assert engine.recovery is not None and engine.recovery["replayed"] == 1  # from the older snapshot
    assert engine.state == state == full_replay(store)
    store.close()


def test_unknown_schema_or_shape_falls_back_to_a_full_replay(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.sqlite3")
    state = random_history(store, random.Random(3), 150)
    blob = snapshot.to_snapshot(snapshot.view(state))
    header, _, body = blob.partition(b"\n")
    h = json.loads(header)
    store.write_snapshot(state.seq - 2, 99, blob)  # a schema from the future
    h2 = {**h, "job_fields": [*h["job_fields"], "new_field"]}  # records of another shape
    store.write_snapshot(state.seq - 1, snapshot.SCHEMA, json.dumps(h2).encode() + b"\n" + body)
    store.write_snapshot(state.seq, snapshot.SCHEMA, b"\x00garbage")  # not a snapshot at all
    engine = make_engine(tmp_path, store)
    assert engine.recover() == store.last_seq()  # every event replayed
    assert engine.recovery is not None and engine.recovery["snapshot_seq"] is None
    assert engine.state == state == full_replay(store)
    store.close()


def test_snapshot_errors_are_specific() -> None:
    good = snapshot.to_snapshot(jobs.State(seq=3))
    with pytest.raises(snapshot.SnapshotError):
        snapshot.from_snapshot(good[:-1])
    with pytest.raises(snapshot.SnapshotError):
        snapshot.from_snapshot(zlib.compress(good))
    header, _, body = good.partition(b"\n")
    other = json.dumps({**json.loads(header), "schema": snapshot.SCHEMA + 1}).encode()
    with pytest.raises(snapshot.SnapshotError, match="schema"):
        snapshot.from_snapshot(other + b"\n" + body)


def test_store_keeps_the_newest_snapshots(tmp_path: Path) -> None:
    for store in (SqliteStore(tmp_path / "e.sqlite3"), MemoryStore()):
        for seq in (5, 10, 15):
            store.write_snapshot(seq, 1, f"blob{seq}".encode())
        assert [(s, b) for s, _, b in store.snapshots()] == [(15, b"blob15"), (10, b"blob10")]
        store.close()
