"""The serve loop's decision, pure: ``jobs.next_serve`` on states built by replaying events (no trio),
and the voice's transition table (an illegal transition raises and changes nothing)."""

from __future__ import annotations

import dataclasses

import pytest

from beagled import events as ev
from beagled import jobs, snapshot
from beagled.errors import IllegalTransition

AT = 1000.0


def record(state: jobs.State, cmd: jobs.Command) -> None:
    for p in jobs.decide(state, cmd):
        jobs.evolve(state, ev.Event(seq=state.seq + 1, at=AT, payload=p))


def pair(state: jobs.State, i: int) -> None:
    p = ev.PairSubmitted(pair_id=f"p{i}", voice="v", bad="b", good="g", key=f"k{i}", heldout=False)
    jobs.evolve(state, ev.Event(seq=state.seq + 1, at=AT, payload=p))


def trained(state: jobs.State, job_id: str) -> None:
    for i in range(2):
        pair(state, state.seq * 10 + i)
    record(state, jobs.CutJob("v", job_id, "min_pairs"))
    record(state, jobs.StartAttempt(job_id, ("fake",)))
    record(state, jobs.FinishTraining(job_id, "fake", "/a", 0.5, 0.5, None, None, 1.0))


def served(state: jobs.State, job_id: str) -> None:
    trained(state, job_id)
    record(state, jobs.Gate(job_id, 0.0))
    record(state, jobs.FinishPromotion(job_id, "/a"))
    record(state, jobs.StartReload(job_id, "fake"))
    record(state, jobs.FinishReload(job_id, "fake", "v-v", 1.0))


def test_trained_job_is_promoted_then_reloaded_for_promotion() -> None:
    s = jobs.State()
    trained(s, "j1")
    assert jobs.next_serve(s, AT) == jobs.Promote("j1")
    record(s, jobs.Gate("j1", 0.0))
    record(s, jobs.FinishPromotion("j1", "/a"))
    assert jobs.next_serve(s, AT) == jobs.Reload("j1", "promotion")
    assert jobs.next_serve(s, AT, reloads=False) is None  # reload.method = none
    record(s, jobs.StartReload("j1", "fake"))
    record(s, jobs.FinishReload("j1", "fake", "v-v1", 1.0))
    assert jobs.next_serve(s, AT) is None


def test_failed_reload_waits_for_its_retry_at_and_an_interrupted_one_is_redone() -> None:
    s = jobs.State()
    trained(s, "j1")
    record(s, jobs.Gate("j1", 0.0))
    record(s, jobs.FinishPromotion("j1", "/a"))
    record(s, jobs.StartReload("j1", "fake"))
    assert jobs.next_serve(s, AT) == jobs.Reload("j1", "promotion")  # intent without outcome: redo
    record(s, jobs.FailReload("j1", "fake", "away", AT, 5.0, 60.0))
    assert s.job("j1").retry_at == AT + 5.0 and jobs.next_serve_deadline(s) == AT + 5.0
    assert jobs.next_serve(s, AT + 4.9) is None
    assert jobs.next_serve(s, AT + 5.0) == jobs.Reload("j1", "promotion")


def test_rollback_comes_first_then_the_old_version_is_reloaded_for_rollback() -> None:
    s = jobs.State()
    served(s, "j1")
    served(s, "j2")
    record(s, jobs.Rollback("v"))
    trained(s, "j3")  # a trained job waits behind the rollback
    assert s.voices["v"].state == jobs.VoiceState.ROLLING_BACK
    assert jobs.next_serve(s, AT) == jobs.CompleteRollback("v")
    record(s, jobs.FinishRollback("v", "/a/j1"))
    assert s.voices["v"].state == jobs.VoiceState.SETTLED
    assert jobs.next_serve(s, AT) == jobs.Promote("j3")
    record(s, jobs.Gate("j3", 1.0))
    record(s, jobs.FailJob("j3", "gone"))
    assert jobs.next_serve(s, AT) == jobs.Reload("j1", "rollback")


def test_reconcile_asks_only_for_a_served_current_job() -> None:
    s = jobs.State()
    served(s, "j1")
    assert jobs.next_serve(s, AT) is None
    assert jobs.next_serve(s, AT, reconcile=frozenset({"j1"})) == jobs.Reload("j1", "reconcile")
    assert jobs.next_serve(s, AT, reconcile=frozenset({"nope"})) is None


def test_an_illegal_voice_transition_raises_and_changes_nothing() -> None:
    s = jobs.State()
    served(s, "j1")
    before = snapshot.view(s)
    done = ev.Event(
        seq=s.seq + 1, at=AT, payload=ev.RolledBack(voice="v", job_id="j1", version=1, adapter_path="/x")
    )
    with pytest.raises(IllegalTransition, match="RolledBack is not allowed while the voice is settled"):
        jobs.evolve(s, done)
    assert s == before
    assert jobs.voice_transition(jobs.VoiceState.SETTLED, "RollbackStarted") == jobs.VoiceState.ROLLING_BACK


def test_a_snapshot_with_the_old_rollback_field_name_still_loads() -> None:
    s = jobs.State()
    served(s, "j1")
    served(s, "j2")
    record(s, jobs.Rollback("v"))
    blob = snapshot.to_snapshot(s)
    old = blob.replace(b'"rollback_to"', b'"reload_intent"', 1)
    assert old != blob
    loaded = snapshot.from_snapshot(old)
    assert loaded == s and loaded.voices["v"].rollback_to == "j1"
    assert isinstance(loaded.jobs["j2"].pending_intent, jobs.Intent | type(None))
    assert dataclasses.replace(loaded.jobs["j2"]) == s.jobs["j2"]
