"""The pure core: the transition table, evolve/decide, and a crash-and-replay state machine."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from beagled import events as ev
from beagled import jobs
from beagled.errors import IllegalTransition, NotFound
from beagled.jobs import JobState


class Log:
    """Stamps payloads the way the store does: global seq, per-stream version, a fake clock."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self.versions: dict[str, int] = {}
        self.clock = 1000.0

    def record(self, state: jobs.State, payloads: list[ev.Payload]) -> list[ev.Event]:
        out = []
        for p in payloads:
            self.clock += 1
            self.versions[p.stream()] = self.versions.get(p.stream(), 0) + 1
            e = ev.Event(p, seq=len(self.events) + 1, version=self.versions[p.stream()], at=self.clock)
            jobs.evolve(state, e)
            self.events.append(e)
            out.append(e)
        return out


def submit(state: jobs.State, log: Log, voice: str, pid: str, heldout: bool = False) -> None:
    log.record(
        state, [ev.PairSubmitted(pair_id=pid, voice=voice, bad="b", good="g", key=pid, heldout=heldout)]
    )


def run(state: jobs.State, log: Log, cmd: jobs.Command) -> list[ev.Event]:
    return log.record(state, jobs.decide(state, cmd))


def test_happy_path_through_every_state() -> None:
    s, log = jobs.State(), Log()
    for i in range(3):
        submit(s, log, "v", f"p{i}")
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    assert s.jobs["j1"].state == JobState.QUEUED and s.voices["v"].pending == []
    run(s, log, jobs.StartAttempt("j1", ("mlx",)))
    run(s, log, jobs.FinishTraining("j1", "mlx", "/a", 0.5, 1.0, 2.0, 3.0, 1.0))
    assert s.jobs["j1"].state == JobState.TRAINED
    run(s, log, jobs.Gate("j1", 0.0))
    assert s.jobs["j1"].version == 1 and s.jobs["j1"].pending_intent == "PromotionStarted"
    run(s, log, jobs.FinishPromotion("j1", "/a"))
    assert s.voices["v"].current_job == "j1" and s.voices["v"].current_version == 1
    run(s, log, jobs.StartReload("j1", "vllm"))
    run(s, log, jobs.FinishReload("j1", "vllm", "v-v0001", 0.1))
    j = s.jobs["j1"]
    assert j.state == JobState.RELOADED and s.voices["v"].served_name == "v-v0001"
    assert [h[1] for h in j.history] == [
        "queued",
        "training",
        "trained",
        "trained",
        "promoted",
        "promoted",
        "reloaded",
    ]


def test_a_job_is_judged_on_the_heldout_pairs_that_existed_before_its_own() -> None:
    s, log = jobs.State(), Log()
    submit(s, log, "v", "a1")
    submit(s, log, "v", "h1", heldout=True)
    submit(s, log, "v", "a2")
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    # the first job of a voice has no evaluation set yet: its own held-out pairs are all there is
    assert s.jobs["j1"].eval_ids == ("h1",) and s.jobs["j1"].sibling_ids == ("h1",)
    assert s.voices["v"].heldout == ["h1"] and s.voices["v"].heldout_window == []
    submit(s, log, "v", "b1")
    submit(s, log, "v", "h2", heldout=True)  # a sibling of the second job's pairs (a poisoned one, say)
    submit(s, log, "v", "h3", heldout=True)
    assert s.voices["v"].public()["heldout_pairs"] == 3
    run(s, log, jobs.CutJob("v", "j2", "manual"))
    j2 = s.jobs["j2"]
    assert j2.eval_ids == ("h1",) and j2.sibling_ids == ("h2", "h3")  # never judged on its siblings
    assert j2.public()["eval_pairs"] == 1 and j2.public()["sibling_pairs"] == 2
    submit(s, log, "v", "c1")
    run(s, log, jobs.CutJob("v", "j3", "manual"))
    assert s.jobs["j3"].eval_ids == ("h1", "h2", "h3") and s.jobs["j3"].sibling_ids == ()  # later jobs


def test_the_evaluation_set_is_bounded_but_a_job_keeps_its_own() -> None:
    s, log = jobs.State(heldout_max=2), Log()
    for n in range(3):
        submit(s, log, "v", f"p{n}")
        submit(s, log, "v", f"h{n}", heldout=True)
        run(s, log, jobs.CutJob("v", f"j{n}", "manual"))
    assert s.voices["v"].heldout == ["h1", "h2"]
    assert s.jobs["j2"].eval_ids == ("h0", "h1")


def test_gate_rejects_a_worse_adapter_with_both_figures() -> None:
    s, log = jobs.State(), Log()
    submit(s, log, "v", "p0")
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    run(s, log, jobs.StartAttempt("j1", ("mlx",)))
    run(s, log, jobs.FinishTraining("j1", "mlx", "/a", 0.5, 2.5, 2.0, 3.0, 1.0))
    (rej,) = run(s, log, jobs.Gate("j1", 0.1))
    assert isinstance(rej.payload, ev.JobRejected)
    assert rej.payload.eval_loss == 2.5 and rej.payload.baseline_eval_loss == 2.0
    assert s.jobs["j1"].state == JobState.REJECTED and s.voices["v"].current_job is None


def trained_job(loss: tuple[float, float], accuracy: tuple[float, float] | None) -> tuple[jobs.State, Log]:
    """A voice's job trained with held-out loss (new, served) and preference accuracy (new, served)."""
    s, log = jobs.State(), Log()
    submit(s, log, "v", "p0")
    submit(s, log, "v", "h0", heldout=True)
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    run(s, log, jobs.StartAttempt("j1", ("peft",)))
    acc, old_acc = accuracy if accuracy is not None else (None, None)
    run(s, log, jobs.FinishTraining("j1", "peft", "/a", 0.5, *loss, 3.0, 1.0, acc, old_acc, 2.0, 0.5))
    return s, log


def test_gate_both_rejects_a_job_whose_loss_improves_but_preference_accuracy_falls() -> None:
    s, _ = trained_job(loss=(1.5, 2.0), accuracy=(0.25, 0.75))
    (rej,) = jobs.decide(s, jobs.Gate("j1", 0.0, "both", 0.1))
    assert isinstance(rej, ev.JobRejected)
    assert rej.preference_accuracy == 0.25 and rej.baseline_preference_accuracy == 0.75
    assert "preference accuracy 0.250 < served 0.750" in rej.reason
    # the loss gate alone (today's) lets it through; the preference gate alone does not
    assert isinstance(jobs.decide(s, jobs.Gate("j1", 0.0, "loss"))[0], ev.PromotionStarted)
    assert isinstance(jobs.decide(s, jobs.Gate("j1", 0.0, "preference"))[0], ev.JobRejected)
    # within the tolerance it passes
    assert isinstance(jobs.decide(s, jobs.Gate("j1", 0.0, "both", 0.5))[0], ev.PromotionStarted)


def test_gate_preference_lets_a_worse_loss_through_that_both_rejects() -> None:
    s, _ = trained_job(loss=(2.5, 2.0), accuracy=(0.75, 0.5))
    assert isinstance(jobs.decide(s, jobs.Gate("j1", 0.0, "preference"))[0], ev.PromotionStarted)
    assert isinstance(jobs.decide(s, jobs.Gate("j1", 0.0, "both"))[0], ev.JobRejected)


def test_no_job_is_promoted_without_an_evaluation() -> None:
    s, _ = trained_job(loss=(1.0, 2.0), accuracy=None)  # an older backend: loss only
    assert isinstance(jobs.decide(s, jobs.Gate("j1", 0.0, "both"))[0], ev.PromotionStarted)
    (rej,) = jobs.decide(s, jobs.Gate("j1", 0.0, "preference"))
    assert isinstance(rej, ev.JobRejected) and "no preference accuracy" in rej.reason
    s, log = jobs.State(), Log()
    submit(s, log, "v", "p0")  # one pair, nothing to hold back: trained, never promoted
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    assert s.jobs["j1"].eval_ids == ()
    run(s, log, jobs.StartAttempt("j1", ("mlx",)))
    run(s, log, jobs.FinishTraining("j1", "mlx", "/a", 0.5, None, None, None, 1.0))
    for gate in jobs.GATES:
        (rej,) = jobs.decide(s, jobs.Gate("j1", 0.0, gate))
        assert isinstance(rej, ev.JobRejected) and "no held-out evaluation" in rej.reason


def test_a_voice_s_first_job_holds_back_its_newest_pair_to_be_judged_on() -> None:
    s, log = jobs.State(), Log()
    for n in range(4):
        submit(s, log, "v", f"p{n}")
    (e,) = run(s, log, jobs.CutJob("v", "j1", "manual"))
    assert isinstance(e.payload, ev.JobCreated) and e.payload.held_back_ids == ("p3",)
    j1 = s.jobs["j1"]
    assert j1.pair_ids == ("p0", "p1", "p2") and j1.eval_ids == ("p3",) and j1.sibling_ids == ("p3",)
    assert s.voices["v"].heldout == ["p3"] and s.voices["v"].pending == []
    assert jobs.replay(log.events) == s  # the held-back pair is in the log: replay agrees
    for n in range(4, 6):  # the voice has an evaluation set now: nothing more is held back
        submit(s, log, "v", f"p{n}")
    (e,) = run(s, log, jobs.CutJob("v", "j2", "manual"))
    assert isinstance(e.payload, ev.JobCreated) and e.payload.held_back_ids == ()
    assert s.jobs["j2"].eval_ids == ("p3",)
    # a first job whose window already holds a held-out pair holds nothing back
    s, log = jobs.State(), Log()
    submit(s, log, "w", "q0")
    submit(s, log, "w", "q1")
    submit(s, log, "w", "h", heldout=True)
    (e,) = run(s, log, jobs.CutJob("w", "k1", "manual"))
    assert isinstance(e.payload, ev.JobCreated) and e.payload.held_back_ids == ()


def test_promotion_and_rollback_carry_the_voice_s_preference_accuracy() -> None:
    s, log = trained_job(loss=(1.5, 2.0), accuracy=(0.75, 0.0))
    run(s, log, jobs.Gate("j1", 0.0))
    run(s, log, jobs.FinishPromotion("j1", "/a"))
    v = s.voices["v"]
    assert v.preference_accuracy == 0.75 and v.public()["preference_accuracy"] == 0.75
    pub = s.jobs["j1"].public()
    assert pub["preference_accuracy"] == 0.75 and pub["sibling_preference_accuracy"] == 0.5
    assert jobs.replay(log.events) == s


def test_attempts_back_off_then_fail() -> None:
    s, log = jobs.State(), Log()
    submit(s, log, "v", "p0")
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    retry_ats = []
    for _ in range(2):
        run(s, log, jobs.StartAttempt("j1", ("mlx",)))
        run(s, log, jobs.BackendFailed("j1", "mlx", "boom"))
        (e,) = run(s, log, jobs.FailAttempt("j1", "all failed", 100.0, 3, 5.0, 300.0))
        retry_ats.append(e.payload.retry_at)  # type: ignore[attr-defined]
    assert retry_ats == [105.0, 110.0]
    run(s, log, jobs.StartAttempt("j1", ("mlx",)))
    (e,) = run(s, log, jobs.FailAttempt("j1", "all failed", 100.0, 3, 5.0, 300.0))
    assert isinstance(e.payload, ev.JobFailed) and s.jobs["j1"].state == JobState.FAILED


@pytest.mark.parametrize(
    "cmd",
    [
        jobs.FinishTraining("j1", "mlx", "/a", None, None, None, None, 0.0),
        jobs.Gate("j1", 0.0),
        jobs.FinishPromotion("j1", "/a"),
        jobs.StartReload("j1", "vllm"),
        jobs.FinishReload("j1", "vllm", "n", 0.0),
        jobs.BackendFailed("j1", "mlx", "x"),
    ],
)
def test_illegal_commands_raise_and_change_nothing(cmd: jobs.Command) -> None:
    s, log = jobs.State(), Log()
    submit(s, log, "v", "p0")
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    before = copy.deepcopy(s)
    with pytest.raises(IllegalTransition):
        jobs.decide(s, cmd)
    assert s == before


def test_illegal_event_raises_and_changes_nothing() -> None:
    s, log = jobs.State(), Log()
    submit(s, log, "v", "p0")
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    before = copy.deepcopy(s)
    bad = ev.Event(
        ev.Promoted(job_id="j1", voice="v", version=1, adapter_path="/x"), seq=99, version=9, at=1.0
    )
    with pytest.raises(IllegalTransition):
        jobs.evolve(s, bad)
    assert s == before
    with pytest.raises(IllegalTransition):  # a pair cannot be cut into two jobs
        jobs.evolve(s, ev.Event(ev.JobCreated(job_id="j2", voice="v", pair_ids=("p0",)), seq=100, at=2.0))
    assert s == before


def test_every_transition_in_the_table_is_forward_or_a_new_attempt() -> None:
    order = [JobState.QUEUED, JobState.TRAINING, JobState.TRAINED, JobState.PROMOTED, JobState.RELOADED]
    for (before, etype), after in jobs.TRANSITIONS.items():
        if before is None or after in (JobState.FAILED, JobState.REJECTED, JobState.CANCELLED):
            continue
        assert order.index(after) >= order.index(before), (before, etype, after)
        if after == before:
            assert etype in {
                "TrainingStarted",
                "TrainingFailed",
                "AttemptFailed",
                "TrainingBlocked",  # no backend: the job waits where it is
                "TrainingUnblocked",
                "ExecutorUnreachable",  # the Ray cluster is down: the job waits where it is
                "ExecutorOutageEnded",
                "PromotionStarted",
                "ReloadStarted",
                "ReloadFailed",
                "Reloaded",
            }


def test_heldout_is_deterministic_and_near_its_share() -> None:
    ids = [f"p-{i:05d}" for i in range(4000)]
    share = sum(jobs.is_heldout(p, 0.2) for p in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert [jobs.is_heldout(p, 0.2) for p in ids] == [jobs.is_heldout(p, 0.2) for p in ids]
    assert not any(jobs.is_heldout(p, 0.0) for p in ids)


def _pair(voice: str, pid: str, heldout: bool) -> ev.PairSubmitted:
    return ev.PairSubmitted(pair_id=pid, voice=voice, bad="b", good="g", key=pid, heldout=heldout)


def test_a_window_of_min_pairs_is_never_all_held_out() -> None:
    """Were every pair of a window held out by the split, ``min_pairs`` pairs would make no job."""
    state, log = jobs.State(), Log()
    batch = [(_pair("v", f"p{i}", True), True) for i in range(4)]  # the split held all four out
    settled = jobs.settle_heldout(state, batch, min_pairs=4)
    assert [p.heldout for p in settled] == [True, True, True, False]  # the one that completes it trains
    log.record(state, list(settled))
    assert jobs.cut_reason(state.voices["v"], now=log.clock, min_pairs=4, max_wait_s=1e9) == "min_pairs"
    (created,) = run(state, log, jobs.CutJob("v", "j1", "min_pairs"))
    assert isinstance(created.payload, ev.JobCreated) and created.payload.pair_ids == ("p3",)
    # a window that already has a pair to train on keeps the split as it fell; so does the client's mark
    state = jobs.State()
    submit(state, Log(), "v", "t0")
    held = [(_pair("v", f"h{i}", True), True) for i in range(3)]
    assert all(p.heldout for p in jobs.settle_heldout(state, held, min_pairs=4))
    marked = [(_pair("w", f"m{i}", True), False) for i in range(4)]
    assert all(p.heldout for p in jobs.settle_heldout(jobs.State(), marked, min_pairs=4))
    # counted per voice across the batch, and from what the voice's window already holds
    state = jobs.State()
    for i in range(2):
        submit(state, Log(), "x", f"x{i}", heldout=True)
    mixed = [(_pair("x", "x2", True), True), (_pair("y", "y0", True), True), (_pair("x", "x3", True), True)]
    assert [p.heldout for p in jobs.settle_heldout(state, mixed, min_pairs=4)] == [True, True, False]


def test_replay_sample_is_bounded_deterministic_and_from_earlier_pairs() -> None:
    trained = tuple(f"p{i}" for i in range(100))
    a = jobs.replay_sample(trained, 10, "j1")
    assert len(a) == 10 and set(a) <= set(trained) and len(set(a)) == 10
    assert a == jobs.replay_sample(trained, 10, "j1")
    assert trained[-5:] == a[-5:]  # the newest half is always replayed
    assert jobs.replay_sample(trained[:3], 10, "j") == trained[:3]
    assert jobs.replay_sample(trained, 0, "j") == ()


def test_rollback_targets_the_previous_version() -> None:
    s, log = jobs.State(), Log()
    for n in (1, 2):
        submit(s, log, "v", f"p{n}")
        run(s, log, jobs.CutJob("v", f"j{n}", "manual"))
        run(s, log, jobs.StartAttempt(f"j{n}", ("mlx",)))
        run(s, log, jobs.FinishTraining(f"j{n}", "mlx", "/a", None, 1.0, 1.0, 3.0, 1.0))
        run(s, log, jobs.Gate(f"j{n}", 0.0))
        run(s, log, jobs.FinishPromotion(f"j{n}", f"/a{n}"))
    (e,) = run(s, log, jobs.Rollback("v"))
    assert e.payload == ev.RollbackStarted(voice="v", job_id="j1", version=1)
    with pytest.raises(IllegalTransition):
        jobs.decide(s, jobs.Rollback("v"))
    run(s, log, jobs.FinishRollback("v", "/a1"))
    assert s.voices["v"].current_job == "j1" and s.voices["v"].current_version == 1
    with pytest.raises(NotFound):
        jobs.decide(s, jobs.Rollback("v"))  # nothing earlier than v1


def test_finished_jobs_leave_memory_but_stay_countable_and_foldable() -> None:
    s, log = jobs.State(keep_finished=2), Log()
    for n in range(1, 6):
        submit(s, log, "v", f"p{n}")
        run(s, log, jobs.CutJob("v", f"j{n}", "manual"))
        run(s, log, jobs.StartAttempt(f"j{n}", ("mlx",)))
        if n == 3:  # one job fails instead
            run(s, log, jobs.FailJob("j3", "boom"))
            continue
        run(s, log, jobs.FinishTraining(f"j{n}", "mlx", "/a", None, 1.0, 1.0, 3.0, 1.0))
        run(s, log, jobs.Gate(f"j{n}", 0.0))
        run(s, log, jobs.FinishPromotion(f"j{n}", f"/a{n}"))
        run(s, log, jobs.StartReload(f"j{n}", "vllm"))
        run(s, log, jobs.FinishReload(f"j{n}", "vllm", f"v-{n}", 0.1))
    # kept: the two newest finished jobs besides the current/served one (j5)
    assert sorted(s.jobs) == ["j3", "j4", "j5"]
    assert s.archived == {"reloaded": 2}
    assert s.counts()["reloaded"] == 4 and s.counts()["failed"] == 1
    assert jobs.replay(log.events, jobs.State(keep_finished=2)) == s
    j1 = jobs.fold_job([e for e in log.events if e.stream == "job:j1"])
    assert j1.state == JobState.RELOADED and j1.served_name == "v-1" and len(j1.history) == 7


# --- the crash-and-replay state machine -----------------------------------------------------------


def training_job(pairs: int = 3) -> tuple[jobs.State, Log]:
    s, log = jobs.State(), Log()
    for i in range(pairs):
        submit(s, log, "v", f"p{i}")
    submit(s, log, "v", "h", heldout=True)
    run(s, log, jobs.CutJob("v", "j1", "manual"))
    run(s, log, jobs.StartAttempt("j1", ("mlx",)))
    return s, log


def test_an_executor_outage_is_one_event_each_way_and_shows_on_the_job() -> None:
    s, log = training_job()
    first = run(s, log, jobs.ReportOutage("j1", "ray", "ray at h:1 is unreachable", 1234.5))
    assert [e.type for e in first] == ["ExecutorUnreachable"]
    for _ in range(5):  # every later retry of the same outage records nothing
        assert jobs.decide(s, jobs.ReportOutage("j1", "ray", "still unreachable", 2000.0)) == []
    shown = s.jobs["j1"].public()["waiting_for_executor"]
    assert shown == {"executor": "ray", "error": "ray at h:1 is unreachable", "since": first[0].at,
                     "retry_at": 1234.5}  # fmt: skip
    assert s.jobs["j1"].state == JobState.TRAINING
    assert [e.type for e in run(s, log, jobs.ReportOutage("j1", "ray", None))] == ["ExecutorOutageEnded"]
    assert jobs.decide(s, jobs.ReportOutage("j1", "ray", None)) == []
    assert s.jobs["j1"].public()["waiting_for_executor"] is None
    run(s, log, jobs.ReportOutage("j1", "ray", "down again"))
    run(s, log, jobs.FinishTraining("j1", "mlx", "/a", 0.5, 1.0, 2.0, 3.0, 1.0, executor="local"))
    assert s.jobs["j1"].executor_outage is None  # trained (locally, say): it no longer waits
    assert jobs.decide(s, jobs.ReportOutage("j1", "ray", "late")) == []  # not training: nothing to say
    assert jobs.replay(log.events) == s


def test_pause_with_cancel_running_cancels_untrained_jobs_and_requeues_their_pairs() -> None:
    s, log = training_job()
    assert jobs.decide(s, jobs.SetPaused(True, "v")) == [ev.VoicePaused(voice="v")]  # the default: it runs on
    out = run(s, log, jobs.SetPaused(True, "v", cancel_running=True))
    assert [e.type for e in out] == ["VoicePaused", "JobCancelled"]
    j, v = s.jobs["j1"], s.voices["v"]
    assert j.state == JobState.CANCELLED and j.pending_intent is None and "pause" in (j.error or "")
    assert [pid for pid, _ in v.pending] == list(j.pair_ids) and not set(j.pair_ids) & set(v.trained)
    assert jobs.next_training(s, now=1e9) is None
    # already paused: cancel_running still cancels what was cut since (a queued job of the voice)
    run(s, log, jobs.CutJob("v", "j2", "manual"))
    assert [e.type for e in run(s, log, jobs.SetPaused(True, "v", cancel_running=True))] == ["JobCancelled"]
    assert jobs.replay(log.events) == s


def test_delete_voice_refuses_busy_work_unless_forced_and_then_cancels_it() -> None:
    s, log = training_job()
    with pytest.raises(IllegalTransition, match="work in progress"):
        jobs.decide(s, jobs.DeleteVoice("v"))
    out = run(s, log, jobs.DeleteVoice("v", force=True))
    assert [e.type for e in out] == ["JobCancelled", "VoiceDeleted"]
    assert s.jobs["j1"].state == JobState.CANCELLED and "v" not in s.voices
    # a promotion in flight is not stopped halfway: a forced delete still refuses
    s, log = training_job()
    run(s, log, jobs.FinishTraining("j1", "mlx", "/a", 0.5, 1.0, None, 3.0, 1.0))
    run(s, log, jobs.Gate("j1", 0.0))
    with pytest.raises(IllegalTransition, match="promotion or reload"):
        jobs.decide(s, jobs.DeleteVoice("v", force=True))


VOICES = st.sampled_from(["a", "b"])


A, B = "http://127.0.0.1:8000", "http://127.0.0.1:8001"


def test_sleep_and_wake_fold_into_the_servers_the_daemon_put_to_sleep() -> None:
    s, log = jobs.State(), Log()
    run(s, log, jobs.StartSleep((A, B), 1, "j1"))  # the intent: both may be asleep from here
    assert {u: r.phase for u, r in s.sleeping.items()} == {A: "sleeping", B: "sleeping"}
    assert s.sleeping[A] == jobs.Sleeping("j1", 1, log.clock, "sleeping")
    (e,) = run(s, log, jobs.FinishSleep((A,), refused=(B,), duration_s=0.25))
    assert e.type == "Slept" and e.stream == "inference"
    assert {u: r.phase for u, r in s.sleeping.items()} == {A: "asleep"}  # B said no: it is not asleep
    run(s, log, jobs.StartWake((A, B), "trained"))  # B is not asleep: the intent names A only
    assert log.events[-1].payload == ev.WakeStarted(urls=(A,), reason="trained")
    assert s.sleeping[A].phase == "waking"
    run(s, log, jobs.FailWake((A,), "vLLM at A is down"))
    assert s.sleeping[A].phase == "asleep" and s.sleeping[A].job_id == "j1"
    run(s, log, jobs.StartWake((A,), "retry"))
    run(s, log, jobs.FinishWake((A,), 2.0))
    assert s.sleeping == {}
    # outcomes about servers not asleep record nothing; a crash-and-replay folds to the same state
    assert jobs.decide(s, jobs.FinishWake((A,), 1.0)) == []
    assert jobs.decide(s, jobs.StartWake((A, B))) == []
    assert jobs.replay(log.events) == s
    with pytest.raises(IllegalTransition):
        jobs.decide(s, jobs.StartSleep((A,), 3, "j2"))


def test_a_crash_while_asleep_or_waking_leaves_the_servers_listed_for_recovery() -> None:
    s, log = jobs.State(), Log()
    run(s, log, jobs.StartSleep((A,), 1, "j1"))
    assert set(jobs.replay(log.events).sleeping) == {A}  # crashed before the sleep was answered
    run(s, log, jobs.FinishSleep((A,)))
    run(s, log, jobs.StartWake((A,), "trained"))
    replayed = jobs.replay(log.events)  # crashed while waking
    assert replayed == s and replayed.sleeping[A].phase == "waking"
    run(s, log, jobs.StartSleep((A,), 2, ""))  # an older build's marker adopted at start-up
    assert s.sleeping[A] == jobs.Sleeping("", 2, log.clock, "sleeping")
    assert s.sleeping[A].public(A)["job_id"] is None


class JobMachine(RuleBasedStateMachine):
    """Random commands through decide/evolve; ``crash`` rebuilds the state from the log alone."""

    jobs_b = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.state = jobs.State(keep_finished=1)  # archive early, so that random runs exercise it
        self.log = Log()
        self.n = 0

    def attempt(self, cmd: jobs.Command) -> None:
        before = copy.deepcopy(self.state)
        try:
            payloads = jobs.decide(self.state, cmd)
        except (IllegalTransition, NotFound):
            assert self.state == before  # refused: nothing changed
            return
        assert self.state == before  # decide never mutates
        self.log.record(self.state, payloads)

    @rule(voice=VOICES, heldout=st.booleans())
    def submit(self, voice: str, heldout: bool) -> None:
        self.n += 1
        submit(self.state, self.log, voice, f"p{self.n}", heldout)

    @rule(target=jobs_b, voice=VOICES, replay=st.integers(0, 3))
    def cut(self, voice: str, replay: int) -> str:
        self.n += 1
        jid = f"j{self.n}"
        self.attempt(jobs.CutJob(voice, jid, "manual", replay))
        return jid

    @rule(j=jobs_b)
    def start(self, j: str) -> None:
        self.attempt(jobs.StartAttempt(j, ("mlx", "peft")))

    @rule(j=jobs_b, timeout=st.booleans())
    def backend_failed(self, j: str, timeout: bool) -> None:
        self.attempt(jobs.BackendFailed(j, "mlx", "boom", timeout))

    @rule(j=jobs_b, max_attempts=st.integers(1, 3))
    def fail_attempt(self, j: str, max_attempts: int) -> None:
        self.attempt(jobs.FailAttempt(j, "all failed", self.log.clock, max_attempts, 1.0, 10.0))

    @rule(j=jobs_b, new=st.none() | st.floats(0, 5), old=st.none() | st.floats(0, 5))
    def finish_training(self, j: str, new: float | None, old: float | None) -> None:
        self.attempt(jobs.FinishTraining(j, "peft", f"/ad/{j}", 1.0, new, old, 4.0, 2.0))

    @rule(j=jobs_b, tol=st.sampled_from([0.0, 0.5]))
    def gate(self, j: str, tol: float) -> None:
        self.attempt(jobs.Gate(j, tol))

    @rule(j=jobs_b)
    def promote(self, j: str) -> None:
        self.attempt(jobs.FinishPromotion(j, f"/ad/{j}"))

    @rule(j=jobs_b)
    def start_reload(self, j: str) -> None:
        self.attempt(jobs.StartReload(j, "vllm"))

    @rule(j=jobs_b, ok=st.booleans())
    def end_reload(self, j: str, ok: bool) -> None:
        if ok:
            self.attempt(jobs.FinishReload(j, "vllm", f"name-{j}", 0.1))
        else:
            self.attempt(jobs.FailReload(j, "vllm", "down", self.log.clock, 1.0, 10.0))

    @rule(j=consumes(jobs_b))
    def fail_job(self, j: str) -> None:
        self.attempt(jobs.FailJob(j, "gave up"))

    @rule(voice=VOICES)
    def rollback(self, voice: str) -> None:
        self.attempt(jobs.Rollback(voice))
        self.attempt(jobs.FinishRollback(voice, "/ad/rolled"))

    @rule(paused=st.booleans(), voice=st.none() | VOICES, cancel=st.booleans())
    def pause(self, paused: bool, voice: str | None, cancel: bool) -> None:
        self.attempt(jobs.SetPaused(paused, voice, cancel))

    @rule(voice=VOICES, remove=st.booleans(), force=st.booleans())
    def delete_voice(self, voice: str, remove: bool, force: bool) -> None:
        self.attempt(jobs.DeleteVoice(voice, remove, force))

    @rule(j=jobs_b, down=st.booleans())
    def outage(self, j: str, down: bool) -> None:
        self.attempt(jobs.ReportOutage(j, "ray", "unreachable" if down else None, self.log.clock + 5))

    @precondition(lambda self: bool(self.log.events))
    @rule()
    def crash_and_replay(self) -> None:
        replayed = jobs.replay(self.log.events, jobs.State(keep_finished=1))
        assert replayed == self.state
        self.state = replayed

    @invariant()
    def pairs_are_in_one_place(self) -> None:
        for v in self.state.voices.values():
            pending = {p for p, _ in v.pending}
            assert not pending & set(v.trained)
            assert not pending & set(v.heldout)
            assert not set(v.heldout) & set(v.heldout_window)
            assert len(v.trained) == len(set(v.trained))
            assert v.current_version <= v.versions

    @invariant()
    def no_job_is_judged_on_its_own_siblings_once_a_set_exists(self) -> None:
        for j in self.state.jobs.values():
            assert not set(j.eval_ids) & set(j.pair_ids)
            if j.eval_ids != j.sibling_ids:  # the voice had an evaluation set when the job was cut
                assert not set(j.eval_ids) & set(j.sibling_ids)

    @invariant()
    def histories_follow_the_table(self) -> None:
        for j in self.state.jobs.values():
            prev: JobState | None = None
            for etype, after, _at, _seq in j.history:
                assert jobs.TRANSITIONS[(prev, etype)].value == after
                prev = JobState(after)
            assert prev == j.state


TestJobMachine = JobMachine.TestCase
TestJobMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
