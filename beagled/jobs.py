"""The pure core: job states, the one transition table, ``evolve`` and ``decide``. No I/O, no clock.

Theory of operation
-------------------
The daemon's state is a fold of its event log: ``State`` starts empty and ``evolve(state, event)``
applies one recorded event. Nothing else changes the state. Commands (what the engine wants to do)
go through ``decide(state, command)``, which checks them against the state and returns the payloads
to record, or raises ``IllegalTransition`` (a ``ClientError``-mapped conflict) and changes nothing.

Every side effect is bracketed: an *intent* event (``TrainingStarted``, ``PromotionStarted``,
``ReloadStarted``, ``RollbackStarted``, ``SleepStarted``, ``WakeStarted``) is committed before it, an
*outcome* event after it. After a crash the engine replays the log and finds intents without outcomes
(``pending_intent``, and the queries at the end of this module); each effect is idempotent, so it is
simply run again:

    queued -TrainingStarted-> training -TrainingSucceeded-> trained -Promoted-> promoted -Reloaded-> reloaded
                                |  ^ AttemptFailed, then TrainingStarted (a new attempt)
                                +--JobFailed--> failed        trained --JobRejected--> rejected

Only forward transitions exist, except ``training --TrainingStarted--> training``: a new attempt after a
failed or crash-interrupted one. ``State`` is a mutable projection owned by one writer (the engine),
updated in place for speed: ``Job`` records are frozen and replaced, ``Voice`` records (whose pair lists
grow with every submit) are updated in place; ``decide`` never mutates either.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from beagled import events as ev
from beagled.errors import IllegalTransition, NotFound


class JobState(enum.StrEnum):
    QUEUED = "queued"
    TRAINING = "training"
    TRAINED = "trained"
    PROMOTED = "promoted"
    RELOADED = "reloaded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"  # by an operator: pause with cancel_running, delete_voice with force


TERMINAL = frozenset({JobState.FAILED, JobState.REJECTED, JobState.RELOADED, JobState.CANCELLED})


class Intent(enum.StrEnum):
    """A job's intent event whose outcome is not yet recorded (``Job.pending_intent``): its value is
    the event's type, so it compares equal to the type's name."""

    TRAINING = ev.TrainingStarted.TYPE
    PROMOTION = ev.PromotionStarted.TYPE
    RELOAD = ev.ReloadStarted.TYPE


# The one transition table: (state before, event type) -> state after. Absent = illegal.
TRANSITIONS: dict[tuple[JobState | None, str], JobState] = {
    (None, "JobCreated"): JobState.QUEUED,
    (JobState.QUEUED, "TrainingStarted"): JobState.TRAINING,
    (JobState.QUEUED, "JobFailed"): JobState.FAILED,
    (JobState.TRAINING, "TrainingStarted"): JobState.TRAINING,  # a new attempt
    (JobState.TRAINING, "TrainingFailed"): JobState.TRAINING,  # one backend failed, the next is tried
    (JobState.TRAINING, "AttemptFailed"): JobState.TRAINING,  # every backend failed: retry after backoff
    (JobState.TRAINING, "TrainingSucceeded"): JobState.TRAINED,
    # no backend is available: the job waits where it is, one event each way (not one per probe)
    (JobState.QUEUED, "TrainingBlocked"): JobState.QUEUED,
    (JobState.QUEUED, "TrainingUnblocked"): JobState.QUEUED,
    (JobState.TRAINING, "TrainingBlocked"): JobState.TRAINING,
    (JobState.TRAINING, "TrainingUnblocked"): JobState.TRAINING,
    (JobState.TRAINING, "JobFailed"): JobState.FAILED,
    # the executor (a Ray cluster) is unreachable: the job waits, one event each way (not one per retry)
    (JobState.TRAINING, "ExecutorUnreachable"): JobState.TRAINING,
    (JobState.TRAINING, "ExecutorOutageEnded"): JobState.TRAINING,
    # an operator's cancel (pause with cancel_running, delete_voice with force): its training is stopped
    (JobState.QUEUED, "JobCancelled"): JobState.CANCELLED,
    (JobState.TRAINING, "JobCancelled"): JobState.CANCELLED,
    (JobState.TRAINED, "JobCancelled"): JobState.CANCELLED,
    (JobState.TRAINED, "JobRejected"): JobState.REJECTED,
    (JobState.TRAINED, "PromotionStarted"): JobState.TRAINED,
    (JobState.TRAINED, "Promoted"): JobState.PROMOTED,
    (JobState.TRAINED, "JobFailed"): JobState.FAILED,  # its adapter vanished or is corrupt
    (JobState.PROMOTED, "ReloadStarted"): JobState.PROMOTED,
    (JobState.PROMOTED, "ReloadFailed"): JobState.PROMOTED,
    (JobState.PROMOTED, "Reloaded"): JobState.RELOADED,
    # A job already served may be served again (rollback to it, reconcile after a server restart):
    (JobState.RELOADED, "ReloadStarted"): JobState.RELOADED,
    (JobState.RELOADED, "ReloadFailed"): JobState.RELOADED,
    (JobState.RELOADED, "Reloaded"): JobState.RELOADED,
}


def transition(state: JobState | None, event_type: str) -> JobState:
    try:
        return TRANSITIONS[(state, event_type)]
    except KeyError:
        raise IllegalTransition(f"{event_type} is not allowed in state {state or 'none'}") from None


class VoiceState(enum.StrEnum):
    """Where a voice's ``current`` stands: settled, or being rolled back (``Voice.rollback_to``)."""

    SETTLED = "settled"
    ROLLING_BACK = "rolling_back"


# The voice's transition table, as the job's: (state before, event type) -> state after. Absent = illegal.
VOICE_TRANSITIONS: dict[tuple[VoiceState, str], VoiceState] = {
    (VoiceState.SETTLED, "RollbackStarted"): VoiceState.ROLLING_BACK,
    (VoiceState.ROLLING_BACK, "RolledBack"): VoiceState.SETTLED,
}


def voice_transition(state: VoiceState, event_type: str) -> VoiceState:
    try:
        return VOICE_TRANSITIONS[(state, event_type)]
    except KeyError:
        raise IllegalTransition(f"{event_type} is not allowed while the voice is {state}") from None


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    job_id: str
    voice: str
    state: JobState
    pair_ids: tuple[str, ...]
    replay_ids: tuple[str, ...]
    created_at: float
    updated_at: float
    attempt: int = 0
    backend: str | None = None
    executor: str | None = None  # local | ray: where the adapter was trained
    error: str | None = None
    retry_at: float | None = None
    adapter_dir: str | None = None
    version: int | None = None
    served_name: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    baseline_eval_loss: float | None = None
    base_eval_loss: float | None = None
    preference_accuracy: float | None = None  # held-out share the adapter prefers the better draft
    baseline_preference_accuracy: float | None = None  # the served voice's, on the same pairs
    sibling_eval_loss: float | None = None  # the job's own held-out siblings (reports only)
    sibling_preference_accuracy: float | None = None
    reload_attempts: int = 0
    pending_intent: Intent | None = None  # the intent whose outcome is not yet recorded
    # The held-out pairs that judge this job: those of the voice's evaluation set when it was cut (never
    # its own siblings, so a batch cannot vouch for itself); for a voice's first job, with no set yet,
    # its siblings. ``sibling_ids``: held out from this job's own window, reported apart.
    eval_ids: tuple[str, ...] = ()
    sibling_ids: tuple[str, ...] = ()
    blocked: str | None = None  # why it waits: no training backend is available
    # while the executor (a Ray cluster) cannot be reached: the error, which executor, since, next retry
    executor_outage: str | None = None
    outage_executor: str | None = None
    outage_since: float | None = None
    outage_retry_at: float | None = None
    history: tuple[tuple[str, str, float, int], ...] = ()  # (event type, state after, at, seq)

    def public(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "voice": self.voice,
            "state": self.state.value,
            "attempt": self.attempt,
            "backend": self.backend,
            "executor": self.executor,
            "pairs": len(self.pair_ids),
            "replay_pairs": len(self.replay_ids),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
            "version": self.version,
            "served_name": self.served_name,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "baseline_eval_loss": self.baseline_eval_loss,
            "preference_accuracy": self.preference_accuracy,
            "baseline_preference_accuracy": self.baseline_preference_accuracy,
            "sibling_eval_loss": self.sibling_eval_loss,
            "sibling_preference_accuracy": self.sibling_preference_accuracy,
            "eval_pairs": len(self.eval_ids),
            "sibling_pairs": len(self.sibling_ids),
            "blocked": self.blocked,
            "waiting_for_executor": None
            if self.executor_outage is None
            else {
                "executor": self.outage_executor,
                "error": self.executor_outage,
                "since": self.outage_since,
                "retry_at": self.outage_retry_at,
            },
        }


TRAINED_MAX = 4096  # newest trained pair ids a voice remembers, for the replay window


@dataclass
class Voice:
    """A voice's projection. Unlike ``Job`` it is updated in place by ``evolve`` (its pair lists grow
    with every submit; copying them per event made replay quadratic); only the engine writes it."""

    name: str
    pending: list[tuple[str, float]] = field(default_factory=list)  # (pair_id, submitted at), oldest first
    # The evaluation set: held-out pairs of windows already cut into jobs, newest last, bounded by
    # heldout_max. Held-out pairs of the window still pending wait in ``heldout_window``: they join the
    # set when the window is cut, so they judge later jobs but never the job of their own batch.
    heldout: list[str] = field(default_factory=list)
    heldout_window: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # newest TRAINED_MAX pair ids cut into jobs (replay)
    pairs_total: int = 0
    current_job: str | None = None
    current_version: int = 0
    versions: int = 0  # highest version number handed out
    adapter_path: str | None = None
    eval_loss: float | None = None
    preference_accuracy: float | None = None  # of the voice now current
    served_job: str | None = None
    served_version: int = 0
    served_name: str | None = None
    last_trained_at: float = 0.0
    rollback_to: str | None = None  # the job a rollback started (RollbackStarted) swaps ``current`` to
    paused: bool = False  # no new jobs are cut for this voice

    @property
    def state(self) -> VoiceState:
        return VoiceState.SETTLED if self.rollback_to is None else VoiceState.ROLLING_BACK

    def public(self) -> dict[str, Any]:
        return {
            "voice": self.name,
            "current_job": self.current_job,
            "version": self.current_version,
            "pending_pairs": len(self.pending),
            "heldout_pairs": len(self.heldout) + len(self.heldout_window),
            "pairs_total": self.pairs_total,
            "adapter_path": self.adapter_path,
            "served_name": self.served_name,
            "served_version": self.served_version,
            "eval_loss": self.eval_loss,
            "preference_accuracy": self.preference_accuracy,
            "paused": self.paused,
        }


@dataclass(frozen=True)
class Sleeping:
    """An inference server the daemon put to sleep (``SleepStarted``) and has not seen awake since."""

    job_id: str  # the job it slept for ("" when adopted from an older build's marker file)
    level: int
    since: float
    phase: str  # sleeping (asked) | asleep (answered) | waking (wake asked)

    def public(self, url: str) -> dict[str, Any]:
        return {
            "url": url,
            "job_id": self.job_id or None,
            "level": self.level,
            "since": self.since,
            "phase": self.phase,
        }


@dataclass
class State:
    """The projection of the log. Compare two with ``==`` (the crash-and-replay property)."""

    seq: int = 0
    paused: bool = False
    jobs: dict[str, Job] = field(default_factory=dict)
    voices: dict[str, Voice] = field(default_factory=dict)
    heldout_max: int = 64
    # Finished jobs (failed, rejected, reloaded) kept per voice besides its current and served ones;
    # older ones leave the projection (their events stay: ``fold_job`` rebuilds one from its stream),
    # so memory and start-up follow the live work, not the history.
    keep_finished: int = 64
    archived: dict[str, int] = field(default_factory=dict)  # finished jobs out of memory, by state
    sleeping: dict[str, Sleeping] = field(default_factory=dict)  # by URL: servers the daemon put to sleep

    def job(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"no job {job_id!r}") from None

    def voice(self, name: str) -> Voice:
        return self.voices.get(name) or Voice(name=name)

    def counts(self) -> dict[str, int]:
        out = {s.value: self.archived.get(s.value, 0) for s in JobState}
        for j in self.jobs.values():
            out[j.state.value] += 1
        return out


# --- pure helpers -------------------------------------------------------------------------------


def is_heldout(pair_id: str, share: float) -> bool:
    """Deterministic by pair id: the same pair is always held out, or never."""
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big")
    return h / 2**64 < share


def settle_heldout(
    state: State, batch: Sequence[tuple[ev.PairSubmitted, bool]], min_pairs: int
) -> list[ev.PairSubmitted]:
    """The batch's pairs as they will be recorded, in order (``(payload, chosen_by_share)`` each).

    A pair held out by the hash of its id (``chosen_by_share``) trains instead when, with it, the voice's
    window since its last cut would reach ``min_pairs`` with no pair to train on: a user who submits
    ``min_pairs`` pairs gets a job, whatever the split (else such a window would wait for one more pair).
    A pair the client marked ``heldout`` keeps its mark. Decided once, before the pair is recorded, so a
    replay reads the same split.
    """
    counts: dict[str, tuple[int, int]] = {}
    out = []
    for given, chosen_by_share in batch:
        v = state.voice(given.voice)
        pending, window = counts.get(given.voice) or (len(v.pending), len(v.heldout_window))
        p = given
        if p.heldout and chosen_by_share and pending == 0 and window + 1 >= min_pairs:
            p = dataclasses.replace(p, heldout=False)
        counts[p.voice] = (pending, window + 1) if p.heldout else (pending + 1, window)
        out.append(p)
    return out


def held_back(pending: Sequence[str], v: Voice) -> tuple[str, ...]:
    """The pairs of a job to be cut that are held back to evaluate it: none when the voice already has
    a held-out pair (in its set or its pending window); else its newest pending pair, when at least
    two are pending, so that no job is promoted without an evaluation (with one pair there is nothing to
    spare: the gate rejects that job, and its pair is not lost to the voice's later jobs' replay)."""
    if v.heldout or v.heldout_window or len(pending) < 2:
        return ()
    return (pending[-1],)


def replay_sample(trained: Sequence[str], k: int, seed: str) -> tuple[str, ...]:
    """A deterministic sample of ``k`` earlier pairs (newest-biased: half newest, half spread)."""
    if k <= 0 or not trained:
        return ()
    if len(trained) <= k:
        return tuple(trained)
    n_new = k // 2
    newest = tuple(trained[len(trained) - n_new :]) if n_new else ()
    older = trained[: len(trained) - n_new]
    order = {p: i for i, p in enumerate(older)}
    ranked = heapq.nsmallest(k - n_new, older, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())
    return tuple(sorted(ranked, key=order.__getitem__)) + newest


# --- evolve -------------------------------------------------------------------------------------


NO_OUTAGE: dict[str, Any] = {
    "executor_outage": None,
    "outage_executor": None,
    "outage_since": None,
    "outage_retry_at": None,
}


def _job_update(job: Job, event: ev.Event, **changes: Any) -> Job:
    new_state = transition(job.state, event.type)
    return dataclasses.replace(
        job,
        state=new_state,
        updated_at=event.at,
        history=(*job.history, (event.type, new_state.value, event.at, event.seq)),
        **changes,
    )


def _new_job(p: ev.JobCreated, event: ev.Event) -> Job:
    return Job(
        job_id=p.job_id,
        voice=p.voice,
        state=JobState.QUEUED,
        pair_ids=p.pair_ids,
        replay_ids=p.replay_ids,
        created_at=event.at,
        updated_at=event.at,
        history=(("JobCreated", JobState.QUEUED.value, event.at, event.seq),),
    )


def _archive(state: State, voice: str) -> None:
    """Drop the voice's oldest finished jobs beyond ``keep_finished`` from memory (never its current
    or served job, nor one with an intent in flight)."""
    v = state.voices.get(voice)
    keep = {v.current_job, v.served_job} if v is not None else set()
    finished = [
        j
        for j in state.jobs.values()
        if j.voice == voice and j.state in TERMINAL and j.pending_intent is None and j.job_id not in keep
    ]
    for j in sorted(finished, key=lambda j: (j.created_at, j.job_id))[
        : max(0, len(finished) - state.keep_finished)
    ]:
        del state.jobs[j.job_id]
        state.archived[j.state.value] = state.archived.get(j.state.value, 0) + 1


def fold_job(events: Sequence[ev.Event]) -> Job:
    """One job rebuilt from its own stream (``job:<id>``): how an archived job is answered."""
    first = events[0].payload
    if not isinstance(first, ev.JobCreated):
        raise IllegalTransition(f"a job stream starts with JobCreated, not {events[0].type}")
    scratch = State()
    scratch.jobs[first.job_id] = _new_job(first, events[0])
    for e in events[1:]:
        if isinstance(e.payload, ev.JobEvent):
            _evolve_job(scratch, e, e.payload)
    return scratch.jobs[first.job_id]


def _stored_voice(state: State, name: str) -> Voice:
    v = state.voices.get(name)
    if v is None:
        v = state.voices[name] = Voice(name=name)
    return v


def evolve(state: State, event: ev.Event) -> State:
    """Apply one recorded event. Raises ``IllegalTransition`` (state unchanged) on an impossible one."""
    p = event.payload
    if isinstance(p, ev.PairSubmitted):
        v = _stored_voice(state, p.voice)
        if p.heldout:
            v.heldout_window.append(p.pair_id)
        else:
            v.pending.append((p.pair_id, event.at))
        v.pairs_total += 1
    elif isinstance(p, ev.JobCreated):
        if p.job_id in state.jobs:
            raise IllegalTransition(f"job {p.job_id} exists already")  # (an archived id is never reused)
        transition(None, p.TYPE)
        taken = set(p.pair_ids) | set(p.held_back_ids)
        pending = state.voices[p.voice].pending if p.voice in state.voices else []
        if not taken <= {pid for pid, _ in pending}:
            raise IllegalTransition(f"job {p.job_id} takes pairs that are not pending in voice {p.voice}")
        v = _stored_voice(state, p.voice)
        v.pending[:] = [x for x in v.pending if x[0] not in taken]
        v.trained.extend(p.pair_ids)
        if len(v.trained) > TRAINED_MAX:
            del v.trained[:-TRAINED_MAX]
        siblings = (*v.heldout_window, *p.held_back_ids)
        job = _new_job(p, event)
        state.jobs[p.job_id] = dataclasses.replace(
            job, eval_ids=tuple(v.heldout) or siblings, sibling_ids=siblings
        )
        v.heldout.extend(siblings)  # from now on they judge the voice's later jobs
        v.heldout_window.clear()
        if len(v.heldout) > state.heldout_max:
            del v.heldout[: -state.heldout_max]
    elif isinstance(p, ev.JobEvent):
        _evolve_job(state, event, p)
        job = state.jobs[p.job_id]
        if job.state in TERMINAL:
            _archive(state, job.voice)
    elif isinstance(p, ev.RollbackStarted):
        before = state.voices.get(p.voice)
        voice_transition(before.state if before else VoiceState.SETTLED, p.TYPE)  # before any change
        _stored_voice(state, p.voice).rollback_to = p.job_id
    elif isinstance(p, ev.RolledBack):
        before = state.voices.get(p.voice)
        voice_transition(before.state if before else VoiceState.SETTLED, p.TYPE)  # before any change
        v = _stored_voice(state, p.voice)
        target = state.jobs.get(p.job_id)
        v.current_job, v.current_version, v.adapter_path = p.job_id, p.version, p.adapter_path
        v.eval_loss = target.eval_loss if target else None
        v.preference_accuracy = target.preference_accuracy if target else None
        v.rollback_to = None
    elif isinstance(p, ev.VoicePaused | ev.VoiceResumed):
        _stored_voice(state, p.voice).paused = isinstance(p, ev.VoicePaused)
    elif isinstance(p, ev.VoiceDeleted):
        state.voices.pop(p.voice, None)
    elif isinstance(p, ev.DraftsErased):
        pass  # the drafts are not part of the projection
    elif isinstance(p, ev.Paused):
        state.paused = True
    elif isinstance(p, ev.Resumed):
        state.paused = False
    elif isinstance(p, ev.ServerEvent):
        _evolve_sleeping(state.sleeping, event, p)
    else:  # pragma: no cover - every payload type is handled above
        raise IllegalTransition(f"unknown event {event.type}")
    state.seq = max(state.seq, event.seq)
    return state


def _evolve_job(state: State, event: ev.Event, p: ev.JobEvent) -> None:
    job = state.job(p.job_id)
    if isinstance(p, ev.TrainingStarted):
        if p.attempt != job.attempt + 1:
            raise IllegalTransition(f"attempt {p.attempt} does not follow attempt {job.attempt}")
        job = _job_update(job, event, attempt=p.attempt, retry_at=None, pending_intent=Intent.TRAINING)
        _stored_voice(state, job.voice).last_trained_at = event.at
    elif isinstance(p, ev.TrainingFailed):
        job = _job_update(job, event, backend=p.backend, error=f"{p.backend}: {p.error}")
    elif isinstance(p, ev.AttemptFailed):
        job = _job_update(job, event, error=p.error, retry_at=p.retry_at, pending_intent=None, **NO_OUTAGE)
    elif isinstance(p, ev.TrainingBlocked):
        job = _job_update(job, event, blocked=p.reason)
    elif isinstance(p, ev.TrainingUnblocked):
        job = _job_update(job, event, blocked=None)
    elif isinstance(p, ev.TrainingSucceeded):
        job = _job_update(
            job,
            event,
            backend=p.backend,
            executor=p.executor,
            adapter_dir=p.adapter_dir,
            train_loss=p.train_loss,
            eval_loss=p.eval_loss,
            baseline_eval_loss=p.baseline_eval_loss,
            base_eval_loss=p.base_eval_loss,
            preference_accuracy=p.preference_accuracy,
            baseline_preference_accuracy=p.baseline_preference_accuracy,
            sibling_eval_loss=p.sibling_eval_loss,
            sibling_preference_accuracy=p.sibling_preference_accuracy,
            error=None,
            pending_intent=None,
            **NO_OUTAGE,
        )
    elif isinstance(p, ev.JobRejected):
        job = _job_update(job, event, error=p.reason or "rejected by the evaluation gate")
    elif isinstance(p, ev.PromotionStarted):
        job = _job_update(job, event, version=p.version, pending_intent=Intent.PROMOTION)
        v = _stored_voice(state, job.voice)
        v.versions = max(v.versions, p.version)
    elif isinstance(p, ev.Promoted):
        job = _job_update(job, event, version=p.version, pending_intent=None)
        v = _stored_voice(state, job.voice)
        v.current_job, v.current_version, v.adapter_path = job.job_id, p.version, p.adapter_path
        v.eval_loss = job.eval_loss
        v.preference_accuracy = job.preference_accuracy
        v.versions = max(v.versions, p.version)
    elif isinstance(p, ev.ReloadStarted):
        job = _job_update(job, event, pending_intent=Intent.RELOAD)
    elif isinstance(p, ev.ReloadFailed):
        job = _job_update(
            job,
            event,
            error=p.error,
            retry_at=p.retry_at,
            reload_attempts=job.reload_attempts + 1,
            pending_intent=None,
        )
    elif isinstance(p, ev.Reloaded):
        job = _job_update(
            job, event, served_name=p.served_name, error=None, retry_at=None, pending_intent=None
        )
        v = _stored_voice(state, job.voice)
        v.served_job, v.served_version, v.served_name = job.job_id, p.version, p.served_name
    elif isinstance(p, ev.JobFailed):
        job = _job_update(job, event, error=p.error, pending_intent=None, retry_at=None, **NO_OUTAGE)
    elif isinstance(p, ev.ExecutorUnreachable):
        job = _job_update(
            job,
            event,
            executor_outage=p.error,
            outage_executor=p.executor,
            outage_since=event.at,
            outage_retry_at=p.retry_at,
        )
    elif isinstance(p, ev.ExecutorOutageEnded):
        job = _job_update(job, event, **NO_OUTAGE)
    elif isinstance(p, ev.JobCancelled):
        job = _job_update(
            job, event, error=f"cancelled ({p.reason})", pending_intent=None, retry_at=None, **NO_OUTAGE
        )
        _requeue(state, job, event.at if p.requeued else None)
    else:  # pragma: no cover
        raise IllegalTransition(f"unknown job event {event.type}")
    state.jobs[job.job_id] = job


def _evolve_sleeping(sleeping: dict[str, Sleeping], event: ev.Event, p: ev.ServerEvent) -> None:
    """Which servers may be asleep because of the daemon: from the intent until they are seen awake."""
    if isinstance(p, ev.SleepStarted):
        for url in p.urls:
            sleeping[url] = Sleeping(p.job_id, p.level, event.at, "sleeping")
        return
    for url in p.urls if not isinstance(p, ev.Slept) else (*p.urls, *p.refused):
        if url not in sleeping:
            continue
        if isinstance(p, ev.Woken) or (isinstance(p, ev.Slept) and url in p.refused):
            del sleeping[url]
        else:
            phase = "waking" if isinstance(p, ev.WakeStarted) else "asleep"  # Slept, WakeFailed
            sleeping[url] = dataclasses.replace(sleeping[url], phase=phase)


def _requeue(state: State, job: Job, at: float | None) -> None:
    """A cancelled job's pairs leave the voice's trained list; with ``at`` they are pending again, first
    in line (stamped with the job's creation: they have waited at least that long)."""
    v = state.voices.get(job.voice)
    if v is None:  # the voice was deleted (a forced delete records its cancels first: not reached)
        return
    mine = set(job.pair_ids)
    v.trained[:] = [pid for pid in v.trained if pid not in mine]
    if at is not None:
        have = {pid for pid, _ in v.pending}
        v.pending[:0] = [(pid, job.created_at) for pid in job.pair_ids if pid not in have]


def replay(events: Iterable[ev.Event], state: State | None = None) -> State:
    state = state if state is not None else State()
    for e in events:
        evolve(state, e)
    return state


# --- commands and decide ------------------------------------------------------------------------


# Each command asks ``decide`` for one step; it names what the caller knows (ids, outcomes, the clock and
# settings it was decided under), and ``decide`` adds what the state knows (attempt numbers, versions).
# Positional order is part of their use (``FailAttempt(job_id, error, now, ...)``): new fields go last.


@dataclass(frozen=True)
class JobCommand:
    """A command about one job, named first."""

    job_id: str


@dataclass(frozen=True)
class VoiceCommand:
    """A command about one voice as a whole, named first."""

    voice: str


@dataclass(frozen=True)
class ServerCommand:
    """A command about inference servers put to sleep or woken (by URL), whichever job."""

    urls: tuple[str, ...]


@dataclass(frozen=True)
class CutJob(VoiceCommand):
    """Make a job of the voice's pending pairs (with ``replay_pairs`` earlier ones trained again)."""

    job_id: str
    reason: str
    replay_pairs: int = 0
    limit: int | None = None  # at most this many pending pairs (oldest first)


@dataclass(frozen=True)
class StartAttempt(JobCommand):
    """Begin the job's next training attempt, trying ``backends`` in order."""

    backends: tuple[str, ...]


@dataclass(frozen=True)
class BackendFailed(JobCommand):
    """One backend failed within the running attempt (the next one is tried): ``TrainingFailed``, with
    the attempt number the state holds."""

    backend: str
    error: str
    timeout: bool = False
    duration_s: float = 0.0


@dataclass(frozen=True)
class FailAttempt(JobCommand):
    """The attempt failed: retry with backoff from ``now``, or fail the job after ``max_attempts``."""

    error: str
    now: float
    max_attempts: int
    backoff_s: float
    backoff_max_s: float


@dataclass(frozen=True)
class BlockTraining(JobCommand):
    """No backend is available: the job waits (recorded once)."""

    reason: str


@dataclass(frozen=True)
class UnblockTraining(JobCommand):
    """``backends`` are available again for a blocked job."""

    backends: tuple[str, ...]


@dataclass(frozen=True)
class FinishTraining(JobCommand):
    """The attempt succeeded: ``backend`` wrote ``adapter_dir``, with these held-out figures
    (``TrainingSucceeded``, with the attempt number the state holds)."""

    backend: str
    adapter_dir: str
    train_loss: float | None
    eval_loss: float | None
    baseline_eval_loss: float | None
    base_eval_loss: float | None
    duration_s: float
    preference_accuracy: float | None = None
    baseline_preference_accuracy: float | None = None
    sibling_eval_loss: float | None = None
    sibling_preference_accuracy: float | None = None
    executor: str = "local"


GATES = ("loss", "preference", "both")


@dataclass(frozen=True)
class Gate(JobCommand):
    """Promote if the job was evaluated at all, and (``gate``): its held-out loss is no worse than the
    served voice's by more than ``tolerance`` (``loss``), its preference accuracy no lower than the served
    voice's by more than ``preference_tolerance`` (``preference``), or both (``both``)."""

    tolerance: float
    gate: str = "both"
    preference_tolerance: float = 0.0


@dataclass(frozen=True)
class FinishPromotion(JobCommand):
    """The voice's ``current`` link points at ``adapter_path`` now: the promotion is done."""

    adapter_path: str


@dataclass(frozen=True)
class ReloadCommand(JobCommand):
    """A step of making the inference server serve the job's adapter by ``method``."""

    method: str


@dataclass(frozen=True)
class StartReload(ReloadCommand):
    """Begin a reload (``reason``: after a promotion, a rollback, or to reconcile)."""

    reason: str = "promotion"


@dataclass(frozen=True)
class FinishReload(ReloadCommand):
    """The server serves the adapter as ``served_name``."""

    served_name: str
    duration_s: float
    reason: str = "promotion"


@dataclass(frozen=True)
class FailReload(ReloadCommand):
    """The reload failed: retry with backoff from ``now`` (unless not ``retryable``: the operator must)."""

    error: str
    now: float
    backoff_s: float
    backoff_max_s: float
    retryable: bool = True


@dataclass(frozen=True)
class FailJob(JobCommand):
    """Give the job up (``error`` says why); refused once it is settled or promoted."""

    error: str


@dataclass(frozen=True)
class Rollback(VoiceCommand):
    """Point the voice back at a promoted job's adapter (``to``; None: the version before the current)."""

    to: str | None = None


@dataclass(frozen=True)
class FinishRollback(VoiceCommand):
    """The voice's ``current`` link points at ``adapter_path`` now: the rollback is done."""

    adapter_path: str


@dataclass(frozen=True)
class SetPaused:
    """Pause or resume cutting jobs, for one voice or the whole daemon."""

    paused: bool
    voice: str | None = None  # None: the whole daemon
    # pausing also cancels the jobs not yet trained (queued or training); their pairs are pending again
    cancel_running: bool = False


@dataclass(frozen=True)
class DeleteVoice(VoiceCommand):
    """Delete the voice (its adapters too if ``remove_adapters``); refused while it has work in progress."""

    remove_adapters: bool = False
    force: bool = False  # cancel the voice's jobs not yet promoted instead of refusing


@dataclass(frozen=True)
class ReportOutage(JobCommand):
    """The executor could not be reached for a training job (``error``), or (``error`` None) it answered
    again / the job fell back to ``fallback``. Records nothing when the job already shows that."""

    executor: str
    error: str | None
    retry_at: float | None = None
    fallback: str = ""


@dataclass(frozen=True)
class StartSleep(ServerCommand):
    """Intent before ``POST /sleep``: ``urls`` may be asleep from the moment it is recorded."""

    level: int
    job_id: str = ""


@dataclass(frozen=True)
class FinishSleep:
    """The sleep's outcome: ``slept`` answered it, ``refused`` did not (only servers held asleep count)."""

    slept: tuple[str, ...]
    refused: tuple[str, ...] = ()
    duration_s: float = 0.0


@dataclass(frozen=True)
class StartWake(ServerCommand):
    """Intent before ``POST /wake_up`` on those of ``urls`` held asleep."""

    reason: str = "trained"


@dataclass(frozen=True)
class FinishWake(ServerCommand):
    """Those of ``urls`` held asleep answered that they are awake."""

    duration_s: float = 0.0


@dataclass(frozen=True)
class FailWake(ServerCommand):
    """Those of ``urls`` held asleep did not wake; they stay listed for the next try."""

    error: str


Command = (
    CutJob
    | StartAttempt
    | BackendFailed
    | FailAttempt
    | BlockTraining
    | UnblockTraining
    | FinishTraining
    | Gate
    | FinishPromotion
    | StartReload
    | FinishReload
    | FailReload
    | FailJob
    | Rollback
    | FinishRollback
    | SetPaused
    | DeleteVoice
    | StartSleep
    | FinishSleep
    | StartWake
    | FinishWake
    | FailWake
    | ReportOutage
)


def _require(job: Job, *states: JobState) -> None:
    if job.state not in states:
        allowed = " or ".join(s.value for s in states)
        raise IllegalTransition(f"job {job.job_id} is {job.state.value}, not {allowed}")


def backoff(attempt: int, base: float, cap: float) -> float:
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


def decide(state: State, cmd: Command) -> list[ev.Payload]:
    """What to record for ``cmd`` given ``state``; raises and records nothing when it is illegal."""
    if isinstance(cmd, StartSleep | FinishSleep | StartWake | FinishWake | FailWake):
        return _decide_sleep(state, cmd)
    if isinstance(cmd, CutJob):
        v = state.voice(cmd.voice)
        if not v.pending:
            raise IllegalTransition(f"voice {cmd.voice!r} has no pending pairs")
        pending = v.pending if cmd.limit is None else v.pending[: cmd.limit]
        ids = [pid for pid, _ in pending]
        back = held_back(ids, v)
        return [
            ev.JobCreated(
                job_id=cmd.job_id,
                voice=cmd.voice,
                pair_ids=tuple(pid for pid in ids if pid not in back),
                replay_ids=replay_sample(v.trained, cmd.replay_pairs, cmd.job_id),
                reason=cmd.reason,
                held_back_ids=back,
            )
        ]
    if isinstance(cmd, SetPaused):
        cancels = _cancel_untrained(state, cmd.voice, "pause") if cmd.paused and cmd.cancel_running else []
        if cmd.voice is not None:
            if cmd.voice not in state.voices:
                raise NotFound(f"no voice {cmd.voice!r}")
            if state.voices[cmd.voice].paused == cmd.paused:
                return cancels
            pause: ev.Payload = (
                ev.VoicePaused(voice=cmd.voice) if cmd.paused else ev.VoiceResumed(voice=cmd.voice)
            )
            return [pause, *cancels]
        if cmd.paused == state.paused:
            return cancels
        return [ev.Paused() if cmd.paused else ev.Resumed(), *cancels]
    if isinstance(cmd, DeleteVoice) and cmd.force:
        return _decide_forced_delete(state, cmd)
    if isinstance(cmd, DeleteVoice):
        if cmd.voice not in state.voices:
            raise NotFound(f"no voice {cmd.voice!r}")
        busy = [
            j.job_id
            for j in state.jobs.values()
            if j.voice == cmd.voice
            and (
                j.state in (JobState.QUEUED, JobState.TRAINING, JobState.TRAINED)
                or j.pending_intent is not None
            )
        ]
        if busy or state.voices[cmd.voice].rollback_to is not None:
            raise IllegalTransition(
                f"voice {cmd.voice!r} has work in progress ({', '.join(busy) or 'a rollback'})"
            )
        return [ev.VoiceDeleted(voice=cmd.voice, remove_adapters=cmd.remove_adapters)]
    if isinstance(cmd, Rollback):
        return _decide_rollback(state, cmd)
    if isinstance(cmd, FinishRollback):
        v = state.voice(cmd.voice)
        if v.rollback_to is None:
            raise IllegalTransition(f"voice {cmd.voice!r} has no rollback in progress")
        target = state.job(v.rollback_to)
        return [
            ev.RolledBack(
                voice=cmd.voice,
                job_id=target.job_id,
                version=target.version or 0,
                adapter_path=cmd.adapter_path,
            )
        ]

    job = state.job(cmd.job_id)
    if isinstance(cmd, ReportOutage):
        if job.state != JobState.TRAINING:
            return []  # it ended meanwhile (cancelled, failed): nothing waits any more
        if cmd.error is not None:
            if job.executor_outage is not None:
                return []
            return [
                ev.ExecutorUnreachable(
                    job_id=job.job_id, executor=cmd.executor, error=cmd.error[:2000], retry_at=cmd.retry_at
                )
            ]
        if job.executor_outage is None:
            return []
        return [ev.ExecutorOutageEnded(job_id=job.job_id, executor=cmd.executor, fallback=cmd.fallback)]
    if isinstance(cmd, StartAttempt):
        _require(job, JobState.QUEUED, JobState.TRAINING)
        return [ev.TrainingStarted(job_id=job.job_id, attempt=job.attempt + 1, backends=cmd.backends)]
    if isinstance(cmd, BackendFailed):
        _require(job, JobState.TRAINING)
        return [
            ev.TrainingFailed(
                job_id=job.job_id,
                attempt=job.attempt,
                backend=cmd.backend,
                error=cmd.error,
                timeout=cmd.timeout,
                duration_s=cmd.duration_s,
            )
        ]
    if isinstance(cmd, FailAttempt):
        _require(job, JobState.TRAINING)
        if job.attempt >= cmd.max_attempts:
            return [
                ev.JobFailed(
                    job_id=job.job_id, error=f"attempt {job.attempt}/{cmd.max_attempts}: {cmd.error}"
                )
            ]
        retry_at = cmd.now + backoff(job.attempt, cmd.backoff_s, cmd.backoff_max_s)
        return [ev.AttemptFailed(job_id=job.job_id, attempt=job.attempt, error=cmd.error, retry_at=retry_at)]
    if isinstance(cmd, BlockTraining):
        _require(job, JobState.QUEUED, JobState.TRAINING)
        return [] if job.blocked else [ev.TrainingBlocked(job_id=job.job_id, reason=cmd.reason)]
    if isinstance(cmd, UnblockTraining):
        _require(job, JobState.QUEUED, JobState.TRAINING)
        return [ev.TrainingUnblocked(job_id=job.job_id, backends=cmd.backends)] if job.blocked else []
    if isinstance(cmd, FinishTraining):
        _require(job, JobState.TRAINING)
        return [
            ev.TrainingSucceeded(
                job_id=job.job_id,
                attempt=job.attempt,
                backend=cmd.backend,
                adapter_dir=cmd.adapter_dir,
                train_loss=cmd.train_loss,
                eval_loss=cmd.eval_loss,
                baseline_eval_loss=cmd.baseline_eval_loss,
                base_eval_loss=cmd.base_eval_loss,
                duration_s=cmd.duration_s,
                executor=cmd.executor,
                preference_accuracy=cmd.preference_accuracy,
                baseline_preference_accuracy=cmd.baseline_preference_accuracy,
                sibling_eval_loss=cmd.sibling_eval_loss,
                sibling_preference_accuracy=cmd.sibling_preference_accuracy,
            )
        ]
    if isinstance(cmd, Gate):
        _require(job, JobState.TRAINED)
        if job.pending_intent == Intent.PROMOTION:
            return []  # already past the gate; the promotion is being redone
        reason = gate_verdict(job, cmd)
        if reason is not None:
            return [
                ev.JobRejected(
                    job_id=job.job_id,
                    eval_loss=job.eval_loss,
                    baseline_eval_loss=job.baseline_eval_loss,
                    tolerance=cmd.tolerance,
                    reason=reason,
                    preference_accuracy=job.preference_accuracy,
                    baseline_preference_accuracy=job.baseline_preference_accuracy,
                )
            ]
        v = state.voice(job.voice)
        return [ev.PromotionStarted(job_id=job.job_id, voice=job.voice, version=v.versions + 1)]
    if isinstance(cmd, FinishPromotion):
        _require(job, JobState.TRAINED)
        if job.pending_intent != Intent.PROMOTION or job.version is None:
            raise IllegalTransition(f"job {job.job_id} has no promotion in progress")
        return [
            ev.Promoted(
                job_id=job.job_id, voice=job.voice, version=job.version, adapter_path=cmd.adapter_path
            )
        ]
    if isinstance(cmd, StartReload):
        _require(job, JobState.PROMOTED, JobState.RELOADED)
        return [
            ev.ReloadStarted(
                job_id=job.job_id,
                voice=job.voice,
                version=job.version or 0,
                method=cmd.method,
                reason=cmd.reason,
            )
        ]
    if isinstance(cmd, FinishReload):
        _require(job, JobState.PROMOTED, JobState.RELOADED)
        return [
            ev.Reloaded(
                job_id=job.job_id,
                voice=job.voice,
                version=job.version or 0,
                method=cmd.method,
                served_name=cmd.served_name,
                duration_s=cmd.duration_s,
                reason=cmd.reason,
            )
        ]
    if isinstance(cmd, FailReload):
        _require(job, JobState.PROMOTED, JobState.RELOADED)
        retry_at = cmd.now + backoff(job.reload_attempts + 1, cmd.backoff_s, cmd.backoff_max_s)
        return [
            ev.ReloadFailed(
                job_id=job.job_id,
                voice=job.voice,
                version=job.version or 0,
                method=cmd.method,
                error=cmd.error,
                retry_at=retry_at,
                retryable=cmd.retryable,
            )
        ]
    if isinstance(cmd, FailJob):
        if job.state in TERMINAL or job.state == JobState.PROMOTED:
            raise IllegalTransition(f"job {job.job_id} is {job.state.value}: it cannot fail now")
        return [ev.JobFailed(job_id=job.job_id, error=cmd.error)]
    raise IllegalTransition(f"unknown command {cmd!r}")  # pragma: no cover


def _decide_sleep(
    state: State, cmd: StartSleep | FinishSleep | StartWake | FinishWake | FailWake
) -> list[ev.Payload]:
    """Sleep and wake: an outcome names only servers the state holds asleep (others are dropped)."""
    if isinstance(cmd, StartSleep):
        if not cmd.urls:
            return []
        if cmd.level not in (1, 2):
            raise IllegalTransition(f"sleep level {cmd.level} is not 1 or 2")
        return [ev.SleepStarted(urls=cmd.urls, level=cmd.level, job_id=cmd.job_id)]
    if isinstance(cmd, FinishSleep):
        slept = tuple(u for u in cmd.slept if u in state.sleeping)
        refused = tuple(u for u in cmd.refused if u in state.sleeping)
        if not slept and not refused:
            return []
        return [ev.Slept(urls=slept, refused=refused, duration_s=cmd.duration_s)]
    urls = tuple(u for u in cmd.urls if u in state.sleeping)
    if not urls:
        return []
    if isinstance(cmd, StartWake):
        return [ev.WakeStarted(urls=urls, reason=cmd.reason)]
    if isinstance(cmd, FinishWake):
        return [ev.Woken(urls=urls, duration_s=cmd.duration_s)]
    return [ev.WakeFailed(urls=urls, error=cmd.error)]


def _cancel_untrained(state: State, voice: str | None, reason: str) -> list[ev.Payload]:
    """``JobCancelled`` (pairs requeued) for every queued or training job of ``voice`` (None: all)."""
    return [
        ev.JobCancelled(job_id=j.job_id, reason=reason, requeued=True)
        for j in sorted(state.jobs.values(), key=lambda j: (j.created_at, j.job_id))
        if (voice is None or j.voice == voice) and j.state in (JobState.QUEUED, JobState.TRAINING)
    ]


def _decide_forced_delete(state: State, cmd: DeleteVoice) -> list[ev.Payload]:
    """Cancel the voice's queued, training and trained jobs, then delete it; a promotion, reload or
    rollback in flight (short, and not stoppable halfway) still refuses, as a plain delete does."""
    if cmd.voice not in state.voices:
        raise NotFound(f"no voice {cmd.voice!r}")
    mine = sorted(
        (j for j in state.jobs.values() if j.voice == cmd.voice), key=lambda j: (j.created_at, j.job_id)
    )
    busy = [j.job_id for j in mine if j.pending_intent not in (None, Intent.TRAINING)]
    if busy or state.voices[cmd.voice].rollback_to is not None:
        raise IllegalTransition(
            f"voice {cmd.voice!r} has a promotion or reload in progress ({', '.join(busy) or 'a rollback'}):"
            " try again when it has finished"
        )
    cancels: list[ev.Payload] = [
        ev.JobCancelled(job_id=j.job_id, reason="delete_voice")
        for j in mine
        if j.state in (JobState.QUEUED, JobState.TRAINING, JobState.TRAINED)
    ]
    return [*cancels, ev.VoiceDeleted(voice=cmd.voice, remove_adapters=cmd.remove_adapters)]


def gate_verdict(job: Job, cmd: Gate) -> str | None:
    """Why the gate rejects ``job``, or None when it may be promoted."""
    if cmd.gate not in GATES:
        raise IllegalTransition(f"unknown gate {cmd.gate!r} (one of {', '.join(GATES)})")
    new, old = job.eval_loss, job.baseline_eval_loss
    acc, old_acc = job.preference_accuracy, job.baseline_preference_accuracy
    if new is None and acc is None:
        return "no held-out evaluation (the voice has no held-out pair this job could be judged on)"
    reasons = []
    if cmd.gate in ("loss", "both"):
        if new is None:
            return "no held-out loss to judge the job on"
        if old is not None and new > old + cmd.tolerance:
            reasons.append(f"held-out loss {new:.4f} > served {old:.4f} + tolerance {cmd.tolerance}")
    if cmd.gate in ("preference", "both"):
        if acc is None and cmd.gate == "preference":
            return "no preference accuracy to judge the job on (the backend did not report one)"
        if acc is not None and old_acc is not None and acc < old_acc - cmd.preference_tolerance:
            reasons.append(
                f"preference accuracy {acc:.3f} < served {old_acc:.3f} - tolerance {cmd.preference_tolerance}"
            )
    return "; ".join(reasons) or None


def _decide_rollback(state: State, cmd: Rollback) -> list[ev.Payload]:
    v = state.voices.get(cmd.voice)
    if v is None:
        raise NotFound(f"no voice {cmd.voice!r}")
    if v.rollback_to is not None:
        raise IllegalTransition(f"voice {cmd.voice!r} is already being rolled back")
    promoted = sorted(
        (
            j
            for j in state.jobs.values()
            if j.voice == cmd.voice and j.version and j.state in (JobState.PROMOTED, JobState.RELOADED)
        ),
        key=lambda j: j.version or 0,
    )
    if cmd.to is not None:
        target = state.job(cmd.to)
        if target.voice != cmd.voice or target not in promoted:
            raise NotFound(f"job {cmd.to!r} was never promoted for voice {cmd.voice!r}")
    else:
        earlier = [j for j in promoted if (j.version or 0) < v.current_version]
        if not earlier:
            raise NotFound(f"voice {cmd.voice!r} has no earlier version to roll back to")
        target = earlier[-1]
    return [ev.RollbackStarted(voice=cmd.voice, job_id=target.job_id, version=target.version or 0)]


# --- what to do next (pure queries the engine's loops ask) ---------------------------------------


def cut_reason(v: Voice, *, now: float, min_pairs: int, max_wait_s: float) -> str | None:
    """Why the voice's pending pairs should become a job now, or None (never for a paused voice).

    ``min_pairs`` counts what the user submitted since the last cut: the pairs the job trains on and
    their held-out siblings (``heldout_window``) together; a window that is all held out waits.
    """
    if not v.pending or v.paused:
        return None
    if len(v.pending) + len(v.heldout_window) >= min_pairs:
        return "min_pairs"
    if now - v.pending[0][1] >= max_wait_s:
        return "max_wait"
    return None


def next_cut_deadline(state: State, max_wait_s: float) -> float | None:
    deadlines = [v.pending[0][1] + max_wait_s for v in state.voices.values() if v.pending and not v.paused]
    return min(deadlines) if deadlines else None


def next_training(state: State, now: float, min_pairs: int = 0) -> Job | None:
    """The job to train next: queued or due for retry; fair between voices (least recently trained first).

    Jobs with at least ``min_pairs`` pairs (held-out siblings included) go before smaller ones (cut by
    ``max_wait``): a flood of one-pair voices, which would all sort first as never trained, delays a
    full job by at most the one job already training."""
    ready = [
        j
        for j in state.jobs.values()
        if j.blocked is None
        and (
            j.state == JobState.QUEUED
            or (j.state == JobState.TRAINING and (j.pending_intent is not None or (j.retry_at or 0) <= now))
        )
    ]
    if not ready:
        return None
    return min(
        ready,
        key=lambda j: (
            j.pending_intent is None,
            len(j.pair_ids) + len(j.sibling_ids) < min_pairs,  # as min_pairs counts: held-out ones too
            state.voice(j.voice).last_trained_at,
            j.created_at,
        ),
    )


def blocked_jobs(state: State) -> list[Job]:
    """Jobs waiting for a training backend to become available."""
    return [j for j in state.jobs.values() if j.blocked is not None]


def next_training_deadline(state: State) -> float | None:
    times = [
        j.retry_at
        for j in state.jobs.values()
        if j.state == JobState.TRAINING and j.retry_at is not None and j.blocked is None
    ]
    return min(times) if times else None


# --- what to serve next (the serve loop's pure decision) -----------------------------------------


@dataclass(frozen=True)
class Promote:
    """Gate the trained job and, if it passes, make it the voice's ``current``."""

    job_id: str


@dataclass(frozen=True)
class Reload:
    """Make the inference server serve the job; ``reason`` is recorded with the reload's events."""

    job_id: str
    reason: str  # promotion | rollback | reconcile


@dataclass(frozen=True)
class CompleteRollback:
    """Swap the voice's ``current`` to ``Voice.rollback_to`` and record ``RolledBack``."""

    voice: str


ServeAction = Promote | Reload | CompleteRollback


def next_serve(
    state: State, now: float, *, reloads: bool = True, reconcile: frozenset[str] = frozenset()
) -> ServeAction | None:
    """What the serve loop does next, in order: finish a rollback; gate and promote the oldest trained
    job; reload a voice whose ``current`` is not what is served (``promotion`` for a job never served,
    ``rollback`` for a job served before, that a rollback made current again) unless its last reload
    failed and is backing off (an interrupted reload is redone at once); reload a served job that
    reconcile found the server no longer serves (``reconcile``: job ids). ``reloads`` False: the
    daemon has no inference server to reload (``reload.method = none``)."""
    for v in state.voices.values():
        if v.rollback_to is not None:
            return CompleteRollback(v.name)
    for trained in sorted(state.jobs.values(), key=lambda j: j.created_at):
        if trained.state == JobState.TRAINED:
            return Promote(trained.job_id)
    if not reloads:
        return None
    asked = None
    for v in state.voices.values():
        j = state.jobs.get(v.current_job) if v.current_job else None
        if j is None:
            continue
        due = j.retry_at is None or j.retry_at <= now or j.pending_intent == Intent.RELOAD
        stale = (
            j.state == JobState.PROMOTED or v.served_job != j.job_id or v.served_version != v.current_version
        )
        if stale and due:
            return Reload(j.job_id, "rollback" if j.state == JobState.RELOADED else "promotion")
        if asked is None and j.job_id in reconcile and v.served_job == j.job_id and due:
            asked = Reload(j.job_id, "reconcile")
    return asked


def next_serve_deadline(state: State) -> float | None:
    """When a reload that failed (and backs off) is due again."""
    times = [
        j.retry_at
        for j in state.jobs.values()
        if j.retry_at is not None and j.state in (JobState.PROMOTED, JobState.RELOADED)
    ]
    return min(times) if times else None
