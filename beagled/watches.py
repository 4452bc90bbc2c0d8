"""The ``watch`` streams: how many are open (overall and per uid, capped), what each uid may see of
the engine's publish stream (``beagled.access``), and the streaming of one watch into its
connection's answers, bounded (it waits for the client to read its queued lines)."""

from __future__ import annotations

from typing import Any

from beagled import protocol
from beagled.access import Policy
from beagled.answers import Entry, Output
from beagled.config import DaemonConfig
from beagled.engine import Engine
from beagled.errors import Conflict, Unavailable

WATCH_LINES_MAX = 256  # lines a watch may have queued for its client before it waits for it to read


class Watches:
    """The live watch streams, counted per uid, and the streaming of each."""

    def __init__(self, engine: Engine, policy: Policy, cfg: DaemonConfig) -> None:
        self.engine = engine
        self.policy = policy
        self.cfg = cfg
        self.per_uid: dict[int, int] = {}  # live watch streams per uid

    def open(self, uid: int, already: bool) -> None:
        """Count a new watch of ``uid`` (``already``: its connection streams one), or refuse it."""
        if already:
            raise Conflict("this connection already streams a watch (one per connection)")
        total = sum(self.per_uid.values())
        if total >= self.cfg.max_watches:
            raise Unavailable(f"too many watch streams (daemon.max_watches = {self.cfg.max_watches})")
        if self.per_uid.get(uid, 0) >= self.cfg.max_watches_per_uid and not self.policy.is_operator(uid):
            raise Unavailable(
                f"uid {uid} has {self.per_uid[uid]} watch streams "
                f"(daemon.max_watches_per_uid = {self.cfg.max_watches_per_uid})"
            )
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1

    def close(self, uid: int) -> None:
        self.per_uid[uid] -= 1
        if not self.per_uid[uid]:
            del self.per_uid[uid]

    def visible(self, uid: int, kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """A watch message as ``uid`` may see it, or None."""
        policy = self.policy
        if policy.is_operator(uid):
            return body
        if kind == "progress":
            return body if policy.may_read(uid, body.get("voice")) else None
        data = body.get("data") or {}
        voice = data.get("voice")
        if voice is None and "job_id" in data:
            job = self.engine.state.jobs.get(data["job_id"])
            if job is None:
                return None  # a job no longer in memory: its voice is unknown here, so not shown
            voice = job.voice
        return policy.public_event(uid, body, voice)

    async def stream(self, req: protocol.Request, entry: Entry, out: Output, uid: int) -> None:
        """Stream the engine's messages ``uid`` may see into ``entry`` until the stream ends."""
        gen = protocol.OPS[req.op].call(self.engine, req.fields)
        try:
            async for msg in gen:
                key = "event" if "event" in msg else "progress"
                body = self.visible(uid, key, msg[key])
                if body is None:
                    continue
                entry.lines.append(protocol.encode_stream(req.id, key, body))
                out.wake()
                while len(entry.lines) >= WATCH_LINES_MAX:  # bounded: wait for the client to read
                    await out.wait_flushed()
        finally:
            await gen.aclose()
        entry.lines.append(
            protocol.encode_error(req.id, Unavailable("watch stream ended: the client fell behind"))
        )
        entry.done = True
        out.wake()
