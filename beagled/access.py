"""Who may do which op on which voice: the roles of a shared host. Pure (no I/O, no trio).

Two roles (CONTRACT.md, "Roles"):

- **operator** — a uid in ``daemon.operator_uids`` (default: the daemon's own uid): every op, every voice,
  every event (drafts' keyed hashes included).
- **submitter** — any other uid in ``daemon.allowed_uids``: ``submit`` and ``ping``; ``watch``, ``jobs``,
  ``job`` and ``voices`` answer only about the voices that uid has submitted to; every other op is
  ``forbidden`` with a message naming the role. ``daemon.voice_owners = {voice = uid}`` binds a voice to
  one submitter: only that uid (and operators) may submit to it or read it.

The server asks ``Policy`` before running an op and filters what read ops answer with it; it keeps the
record of which uid submitted to which voice (``Policy.record``), seeded from the event log's
idempotency table at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from beagled.errors import Forbidden

SUBMITTER_OPS = frozenset({"ping", "submit", "watch", "jobs", "job", "voices"})


@dataclass
class Policy:
    operators: frozenset[int]
    owners: Mapping[str, int] = field(default_factory=dict)  # voice -> the one uid that may submit/read it
    submitted: dict[int, set[str]] = field(default_factory=dict)  # uid -> voices it has submitted to

    def is_operator(self, uid: int) -> bool:
        return uid in self.operators

    def role(self, uid: int) -> str:
        return "operator" if self.is_operator(uid) else "submitter"

    def check_op(self, uid: int, op: str) -> None:
        """Raise ``Forbidden`` when ``uid``'s role may not run ``op`` at all."""
        if self.is_operator(uid) or op in SUBMITTER_OPS:
            return
        raise Forbidden(
            f"{op} is for operators (daemon.operator_uids); uid {uid} has the submitter role, "
            f"which may only {', '.join(sorted(SUBMITTER_OPS))}"
        )

    def check_submit(self, uid: int, voice: str) -> None:
        owner = self.owners.get(voice)
        if owner is not None and owner != uid and not self.is_operator(uid):
            raise Forbidden(f"voice {voice!r} belongs to another submitter (daemon.voice_owners)")

    def may_read(self, uid: int, voice: str | None) -> bool:
        """May ``uid`` see this voice (its jobs, its events)? ``None``: not about any voice."""
        if self.is_operator(uid):
            return True
        if voice is None:
            return False
        owner = self.owners.get(voice)
        if owner is not None:
            return owner == uid
        return voice in self.submitted.get(uid, ())

    def check_read(self, uid: int, voice: str) -> None:
        if not self.may_read(uid, voice):
            raise Forbidden(f"uid {uid} (submitter role) may read only the voices it submitted to")

    def record(self, uid: int, voice: str) -> None:
        self.submitted.setdefault(uid, set()).add(voice)

    def seed(self, pairs: Iterable[tuple[int, str]]) -> None:
        for uid, voice in pairs:
            self.record(uid, voice)

    # -- filters of read answers ---------------------------------------------------------------------
    def filter_jobs(self, uid: int, result: dict[str, Any]) -> dict[str, Any]:
        if self.is_operator(uid):
            return result
        return {
            **result,
            "jobs": [j for j in result["jobs"] if self.may_read(uid, j["voice"])],
            "archived": 0,
        }

    def filter_voices(self, uid: int, result: dict[str, Any]) -> dict[str, Any]:
        if self.is_operator(uid):
            return result
        return {**result, "voices": [v for v in result["voices"] if self.may_read(uid, v["voice"])]}

    def public_event(self, uid: int, event: dict[str, Any], voice: str | None) -> dict[str, Any] | None:
        """The event as ``uid`` may see it in a ``watch``, or None to skip it. ``voice`` is the voice the
        event is about (None: the daemon's own stream). Submitters never see idempotency keys."""
        if self.is_operator(uid):
            return event
        if voice is None:
            return event if event["type"] in ("Paused", "Resumed") else None
        if not self.may_read(uid, voice):
            return None
        data = event.get("data")
        if isinstance(data, dict) and "key" in data:
            event = {**event, "data": {k: v for k, v in data.items() if k != "key"}}
        return event
