"""The per-uid submit quota: a submitter's pending pairs (queued submits not yet committed, plus the
pairs pending in the voices it submitted to) are capped at ``daemon.max_pending_per_uid``; operators
are not capped."""

from __future__ import annotations

from beagled.access import Policy
from beagled.engine import Engine
from beagled.errors import Unavailable


class SubmitQuota:
    """Submits in flight per uid, and the check a new submit passes first."""

    def __init__(self, engine: Engine, policy: Policy, max_pending: int) -> None:
        self.engine = engine
        self.policy = policy
        self.max_pending = max_pending
        self.queued: dict[int, int] = {}  # submits of a submitter not yet committed

    def check(self, uid: int) -> None:
        """Refuse (``Unavailable``) a submit of ``uid`` beyond its quota."""
        if self.policy.is_operator(uid):
            return
        voices = self.engine.state.voices
        pending = self.queued.get(uid, 0) + sum(
            len(voices[v].pending) for v in self.policy.submitted.get(uid, ()) if v in voices
        )
        if pending >= self.max_pending:
            raise Unavailable(
                f"uid {uid} has {pending} pending pairs (daemon.max_pending_per_uid = "
                f"{self.max_pending}); wait for a job to take them"
            )

    def queue(self, uid: int) -> None:
        self.queued[uid] = self.queued.get(uid, 0) + 1

    def committed(self, uid: int) -> None:
        """A queued submit of ``uid`` was answered (committed or failed)."""
        self.queued[uid] -= 1
        if not self.queued[uid]:
            del self.queued[uid]
