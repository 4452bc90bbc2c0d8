"""The stored form of every event type, pinned: the ``stream``, ``type``, ``schema`` and ``data`` columns a
real ``SqliteStore`` writes for one example of each payload. Old logs are read by these bytes, so a change to
an event class (a field moved, renamed, given a base class) must leave this list as it is."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from beagled import events as ev
from beagled.store import SqliteStore

PAIR = ev.PairSubmitted(
    pair_id="p1", voice="v", bad="bad", good="good", key="k1", prompt="Write.", quality={"len": 1.0},
    heldout=True, uid=1000, system="You are Bea.", messages=({"role": "user", "content": "Hi"},),
)  # fmt: skip
SUCCEEDED = ev.TrainingSucceeded(
    job_id="j1", attempt=2, backend="mlx", adapter_dir="/a/j1", train_loss=0.5, eval_loss=1.0,
    baseline_eval_loss=1.5, base_eval_loss=2.0, duration_s=3.0, executor="ray", preference_accuracy=0.75,
    baseline_preference_accuracy=0.5, sibling_eval_loss=1.25, sibling_preference_accuracy=0.25,
)  # fmt: skip

EXAMPLES: list[ev.Payload] = [
    PAIR,
    ev.JobCreated(job_id="j1", voice="v", pair_ids=("p1", "p2"), replay_ids=("p0",), held_back_ids=("p3",)),
    ev.TrainingStarted(job_id="j1", attempt=1, backends=("peft", "mlx")),
    ev.TrainingFailed(job_id="j1", attempt=1, backend="peft", error="oom", timeout=True, duration_s=2.5),
    ev.AttemptFailed(job_id="j1", attempt=1, error="all failed", retry_at=105.0),
    ev.TrainingBlocked(job_id="j1", reason="no backend"),
    ev.TrainingUnblocked(job_id="j1", backends=("mlx",)),
    SUCCEEDED,
    ev.JobRejected(
        job_id="j1",
        eval_loss=2.0,
        baseline_eval_loss=1.0,
        tolerance=0.5,
        reason="loss",
        preference_accuracy=0.5,
        baseline_preference_accuracy=0.75,
    ),
    ev.PromotionStarted(job_id="j1", voice="v", version=1),
    ev.Promoted(job_id="j1", voice="v", version=1, adapter_path="/a/j1/adapter"),
    ev.ReloadStarted(job_id="j1", voice="v", version=1, method="vllm", reason="rollback"),
    ev.ReloadFailed(
        job_id="j1", voice="v", version=1, method="vllm", error="down", retry_at=110.0, retryable=False
    ),
    ev.Reloaded(job_id="j1", voice="v", version=1, method="vllm", served_name="v-1", duration_s=1.5),
    ev.JobFailed(job_id="j1", error="gave up"),
    ev.ExecutorUnreachable(job_id="j1", executor="ray", error="refused", retry_at=120.0),
    ev.ExecutorOutageEnded(job_id="j1", executor="ray", fallback="local"),
    ev.JobCancelled(job_id="j1", reason="pause", requeued=True),
    ev.RollbackStarted(voice="v", job_id="j0", version=1),
    ev.RolledBack(voice="v", job_id="j0", version=1, adapter_path="/a/j0/adapter"),
    ev.VoicePaused(voice="v"),
    ev.VoiceResumed(voice="v"),
    ev.VoiceDeleted(voice="v", remove_adapters=True),
    ev.DraftsErased(voice="v", pairs=3),
    ev.Paused(),
    ev.Resumed(),
    ev.SleepStarted(urls=("http://a", "http://b"), level=2, job_id="j1"),
    ev.Slept(urls=("http://a",), refused=("http://b",), duration_s=0.5),
    ev.WakeStarted(urls=("http://a",), reason="recovery"),
    ev.Woken(urls=("http://a",), duration_s=0.25),
    ev.WakeFailed(urls=("http://a",), error="still asleep"),
]

# one line an event: stream, type, schema and the data column, byte for byte. Never regenerate it to make
# the test pass: a difference means logs already written would read back differently.
STORED = Path(__file__).with_name("events_stored.txt")


def test_every_event_type_has_an_example() -> None:
    assert sorted(p.TYPE for p in EXAMPLES) == sorted(ev.PAYLOAD_TYPES)


def test_the_stored_form_of_every_event_type_is_pinned(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    store = SqliteStore(path)
    try:
        written = store.append(EXAMPLES, 1.0)
        assert [e.payload for e in store.read(0)] == EXAMPLES  # and they read back as written
    finally:
        store.close()
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT stream, type, schema, data FROM events ORDER BY seq").fetchall()
    finally:
        db.close()
    assert [e.stream for e in written] == [r[0] for r in rows]
    assert [f"{stream} {type_} {schema} {data}" for stream, type_, schema, data in rows] == (
        STORED.read_text(encoding="utf-8").splitlines()
    )
