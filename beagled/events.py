"""Event types: frozen payloads, their schema versions, and (de)serialisation. Pure: no I/O.

An event is an envelope (global ``seq``, ``stream``, per-stream ``version``, ``at``, ``schema``) around
a typed, frozen payload. The store assigns ``seq`` and ``version``; everything else is decided by the
pure core (``jobs.decide``). Streams: ``voice:<name>`` (pairs, promotions of that voice), ``job:<id>``
(one job's life), ``daemon`` (pause/resume), ``inference`` (the servers the daemon put to sleep).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Payload:
    """Base of every event payload. ``TYPE`` names it in the log; ``SCHEMA`` versions its shape."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[int] = 1

    def stream(self) -> str:
        raise NotImplementedError

    def to_data(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


# --- pairs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSubmitted(Payload):
    """A pair as submitted. Schema 2 adds ``system`` and ``messages`` (the conversation before the
    draft, OpenAI chat format); schema-1 events are upcast with both absent (``_upcast_pair_v1``)."""

    TYPE: ClassVar[str] = "PairSubmitted"
    SCHEMA: ClassVar[int] = 2
    pair_id: str
    voice: str
    bad: str
    good: str
    key: str
    prompt: str | None = None
    quality: dict[str, float] | None = None
    heldout: bool = False
    uid: int | None = None  # the submitter's uid (None in logs from before roles)
    system: str | None = None
    messages: tuple[dict[str, str], ...] | None = None  # [{"role", "content"}, ...]; None: none given

    def stream(self) -> str:
        return f"voice:{self.voice}"


# --- a job's life -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEvent(Payload):
    """An event of one job's life (``job:<id>``), its first field the job."""

    job_id: str

    def stream(self) -> str:
        return f"job:{self.job_id}"


@dataclass(frozen=True)
class JobCreated(JobEvent):
    """A job is cut from ``voice``'s pending pairs (``reason``: what triggered it); ``replay_ids`` are
    earlier pairs trained again alongside them."""

    TYPE: ClassVar[str] = "JobCreated"
    voice: str
    pair_ids: tuple[str, ...]
    replay_ids: tuple[str, ...] = ()
    reason: str = "min_pairs"  # min_pairs | max_wait | manual
    # pending pairs held back from training to evaluate it (a voice's first job, with no held-out pair)
    held_back_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttemptEvent(JobEvent):
    """A step of the job's training attempt number ``attempt`` (1, 2, …)."""

    attempt: int


@dataclass(frozen=True)
class TrainingStarted(AttemptEvent):
    """Intent: an attempt begins (backends are tried in order inside it)."""

    TYPE: ClassVar[str] = "TrainingStarted"
    backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingFailed(AttemptEvent):
    """One backend failed within an attempt; the next one is tried."""

    TYPE: ClassVar[str] = "TrainingFailed"
    backend: str
    error: str
    timeout: bool = False
    duration_s: float = 0.0


@dataclass(frozen=True)
class AttemptFailed(AttemptEvent):
    """Every backend failed (or the attempt was interrupted); another attempt follows after ``retry_at``."""

    TYPE: ClassVar[str] = "AttemptFailed"
    error: str
    retry_at: float


@dataclass(frozen=True)
class TrainingBlocked(JobEvent):
    """No training backend is available: the job waits (recorded once, not per probe)."""

    TYPE: ClassVar[str] = "TrainingBlocked"
    reason: str


@dataclass(frozen=True)
class TrainingUnblocked(JobEvent):
    """A backend became available again for a blocked job."""

    TYPE: ClassVar[str] = "TrainingUnblocked"
    backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingSucceeded(AttemptEvent):
    """Outcome: ``backend`` wrote the adapter to ``adapter_dir``, with its held-out figures."""

    TYPE: ClassVar[str] = "TrainingSucceeded"
    backend: str
    adapter_dir: str
    train_loss: float | None = None
    eval_loss: float | None = None
    baseline_eval_loss: float | None = None
    base_eval_loss: float | None = None
    duration_s: float = 0.0
    executor: str = "local"  # local | ray: where it was trained
    # DPO implicit-reward accuracy on the held-out pairs (new adapter vs base; served vs base), and the
    # job's own held-out siblings measured apart (reports only); absent in older logs
    preference_accuracy: float | None = None
    baseline_preference_accuracy: float | None = None
    sibling_eval_loss: float | None = None
    sibling_preference_accuracy: float | None = None


@dataclass(frozen=True)
class JobRejected(JobEvent):
    """The evaluation gate refused it: the new adapter is worse than the one served."""

    TYPE: ClassVar[str] = "JobRejected"
    eval_loss: float | None
    baseline_eval_loss: float | None
    tolerance: float
    reason: str = ""
    preference_accuracy: float | None = None
    baseline_preference_accuracy: float | None = None


@dataclass(frozen=True)
class ServingEvent(JobEvent):
    """A step of serving the job's adapter as ``version`` of ``voice``: its promotion, then its reloads."""

    voice: str
    version: int


@dataclass(frozen=True)
class PromotionStarted(ServingEvent):
    """Intent: point the voice's ``current`` link at this job's adapter as ``version``."""

    TYPE: ClassVar[str] = "PromotionStarted"


@dataclass(frozen=True)
class Promoted(ServingEvent):
    """Outcome: the voice's ``current`` link points at ``adapter_path``, as ``version``."""

    TYPE: ClassVar[str] = "Promoted"
    adapter_path: str


@dataclass(frozen=True)
class ReloadStarted(ServingEvent):
    """Intent: make the inference server serve this job's adapter."""

    TYPE: ClassVar[str] = "ReloadStarted"
    method: str
    reason: str = "promotion"  # promotion | rollback | reconcile


@dataclass(frozen=True)
class ReloadFailed(ServingEvent):
    """The reload failed; it is tried again after ``retry_at`` unless not ``retryable``."""

    TYPE: ClassVar[str] = "ReloadFailed"
    method: str
    error: str
    retry_at: float
    retryable: bool = True  # False: only the operator can fix it (host key, routes missing, bad path)


@dataclass(frozen=True)
class Reloaded(ServingEvent):
    """Outcome: the inference server serves the adapter as ``served_name``."""

    TYPE: ClassVar[str] = "Reloaded"
    method: str
    served_name: str
    duration_s: float = 0.0
    reason: str = "promotion"


@dataclass(frozen=True)
class JobFailed(JobEvent):
    """The job gave up (its attempts spent, or it could not go on): it ends failed."""

    TYPE: ClassVar[str] = "JobFailed"
    error: str


@dataclass(frozen=True)
class ExecutorUnreachable(JobEvent):
    """The training executor (a Ray cluster) cannot be reached: the job waits for it. Recorded once
    when an outage starts for the job, not per retry (the retries are ``progress`` lines)."""

    TYPE: ClassVar[str] = "ExecutorUnreachable"
    executor: str
    error: str
    retry_at: float | None = None  # wall clock of the next connection attempt


@dataclass(frozen=True)
class ExecutorOutageEnded(JobEvent):
    """The executor answered again (``fallback`` empty), or the job went to the local trainer instead
    (``fallback = "local"``)."""

    TYPE: ClassVar[str] = "ExecutorOutageEnded"
    executor: str
    fallback: str = ""


@dataclass(frozen=True)
class JobCancelled(JobEvent):
    """An operator cancelled the job (``pause`` with ``cancel_running``, ``delete_voice`` with ``force``);
    its running training was stopped. ``requeued``: its pairs went back to the voice's pending pairs."""

    TYPE: ClassVar[str] = "JobCancelled"
    reason: str  # pause | delete_voice
    requeued: bool = False


# --- voices and the daemon ----------------------------------------------------------------------


@dataclass(frozen=True)
class VoiceEvent(Payload):
    """An event of one voice as a whole (``voice:<name>``), its first field the voice. ``PairSubmitted``
    shares the stream but not the base: its ``voice`` has always stood second in the log."""

    voice: str

    def stream(self) -> str:
        return f"voice:{self.voice}"


@dataclass(frozen=True)
class RollbackStarted(VoiceEvent):
    """Intent: point ``voice``'s ``current`` link back at an earlier job's adapter."""

    TYPE: ClassVar[str] = "RollbackStarted"
    job_id: str
    version: int


@dataclass(frozen=True)
class RolledBack(VoiceEvent):
    """Outcome: ``voice``'s ``current`` link points back at ``job_id``'s adapter."""

    TYPE: ClassVar[str] = "RolledBack"
    job_id: str
    version: int
    adapter_path: str


@dataclass(frozen=True)
class VoicePaused(VoiceEvent):
    """No new jobs are cut for this voice (pairs are still accepted)."""

    TYPE: ClassVar[str] = "VoicePaused"


@dataclass(frozen=True)
class VoiceResumed(VoiceEvent):
    """Jobs are cut for this voice again."""

    TYPE: ClassVar[str] = "VoiceResumed"


@dataclass(frozen=True)
class VoiceDeleted(VoiceEvent):
    """The voice leaves the listing; its events stay in the log, its adapters go only if asked."""

    TYPE: ClassVar[str] = "VoiceDeleted"
    remove_adapters: bool = False


@dataclass(frozen=True)
class DraftsErased(VoiceEvent):
    """The drafts of a deleted voice were overwritten in the log (``delete_voice`` with
    ``erase_drafts``): its ``PairSubmitted`` events keep their place, ids and keys, with ``bad`` and
    ``good`` empty and ``prompt`` null; the log stays append-only in shape."""

    TYPE: ClassVar[str] = "DraftsErased"
    pairs: int = 0


@dataclass(frozen=True)
class DaemonEvent(Payload):
    """The whole daemon's pause and resume (``daemon``): no fields."""

    def stream(self) -> str:
        return "daemon"


@dataclass(frozen=True)
class Paused(DaemonEvent):
    """No new jobs are cut for any voice."""

    TYPE: ClassVar[str] = "Paused"


@dataclass(frozen=True)
class Resumed(DaemonEvent):
    """Jobs are cut again."""

    TYPE: ClassVar[str] = "Resumed"


# --- inference servers asleep (reload.vllm.sleep_during_training) -------------------------------


@dataclass(frozen=True)
class ServerEvent(Payload):
    """Sleep and wake of inference servers (by URL): one stream for every server, whichever job."""

    urls: tuple[str, ...]

    def stream(self) -> str:
        return "inference"


@dataclass(frozen=True)
class SleepStarted(ServerEvent):
    """Intent: ``POST /sleep?level=N`` on ``urls`` while ``job_id`` trains (``job_id`` empty: adopted
    from an older build's ``sleeping.json`` marker). From here until ``Woken`` they may be asleep."""

    TYPE: ClassVar[str] = "SleepStarted"
    level: int = 1
    job_id: str = ""


@dataclass(frozen=True)
class Slept(ServerEvent):
    """Outcome: ``urls`` answered the sleep; ``refused`` did not (4xx: they are not asleep)."""

    TYPE: ClassVar[str] = "Slept"
    refused: tuple[str, ...] = ()
    duration_s: float = 0.0


@dataclass(frozen=True)
class WakeStarted(ServerEvent):
    """Intent: ``POST /wake_up`` on ``urls`` until ``/is_sleeping`` answers false."""

    TYPE: ClassVar[str] = "WakeStarted"
    reason: str = "trained"  # trained (the job's training ended) | recovery | retry


@dataclass(frozen=True)
class Woken(ServerEvent):
    """Outcome: ``urls`` answered ``/is_sleeping`` false."""

    TYPE: ClassVar[str] = "Woken"
    duration_s: float = 0.0


@dataclass(frozen=True)
class WakeFailed(ServerEvent):
    """Outcome: ``urls`` were still not awake when the wake gave up; they stay asleep in the state
    and the daemon tries again (reconcile, start-up)."""

    TYPE: ClassVar[str] = "WakeFailed"
    error: str = ""


DRAFT_FIELDS = ("bad", "good", "prompt", "system", "messages")  # what erasure blanks and watch elides


PAYLOAD_TYPES: dict[str, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        PairSubmitted,
        JobCreated,
        TrainingStarted,
        TrainingFailed,
        AttemptFailed,
        TrainingBlocked,
        TrainingUnblocked,
        TrainingSucceeded,
        JobRejected,
        PromotionStarted,
        Promoted,
        ReloadStarted,
        ReloadFailed,
        Reloaded,
        JobFailed,
        ExecutorUnreachable,
        ExecutorOutageEnded,
        JobCancelled,
        RollbackStarted,
        RolledBack,
        VoicePaused,
        VoiceResumed,
        VoiceDeleted,
        DraftsErased,
        Paused,
        Resumed,
        SleepStarted,
        Slept,
        WakeStarted,
        Woken,
        WakeFailed,
    )
}


@dataclass(frozen=True)
class Event:
    """A payload as recorded: ``seq`` is global and gapless per store, ``version`` counts per stream."""

    payload: Payload
    seq: int = 0
    version: int = 0
    at: float = 0.0
    schema: int = field(default=1)

    @property
    def type(self) -> str:
        return self.payload.TYPE

    @property
    def stream(self) -> str:
        return self.payload.stream()

    def public(self, *, with_drafts: bool = False) -> dict[str, Any]:
        """The shape clients see in ``watch`` and ``job`` histories (drafts elided unless asked)."""
        data = self.payload.to_data()
        if not with_drafts and isinstance(self.payload, PairSubmitted):
            for k in DRAFT_FIELDS:
                data.pop(k, None)
        return {"seq": self.seq, "type": self.type, "at": self.at, "data": data}


def _upcast_pair_v1(data: dict[str, Any]) -> dict[str, Any]:
    """PairSubmitted 1 -> 2: no conversation was recorded."""
    return {**data, "system": None, "messages": None}


# (type, schema) -> the function that turns that schema's data into the next one's
UPCASTERS: dict[tuple[str, int], Any] = {("PairSubmitted", 1): _upcast_pair_v1}


def decode(type_: str, schema: int, data: dict[str, Any]) -> Payload:
    """Rebuild a payload from the log, upgrading older schema versions where one exists."""
    try:
        cls = PAYLOAD_TYPES[type_]
    except KeyError as e:
        raise ValueError(f"unknown event type {type_!r} in the log") from e
    if schema > cls.SCHEMA:
        raise ValueError(f"{type_} schema {schema} is newer than this beagled understands ({cls.SCHEMA})")
    while schema < cls.SCHEMA:
        upcast = UPCASTERS.get((type_, schema))
        if upcast is not None:
            data = upcast(data)
        schema += 1
    kwargs: dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k in hints:
            kwargs[k] = tuple(v) if isinstance(v, list) and "tuple" in str(hints[k].type) else v
    return cls(**kwargs)
