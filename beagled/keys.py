"""Idempotency keys and pair fingerprints: keyed hashes with the log's own secret (stdlib only).

``scoped_key`` is what the store indexes a submit by (and what logs show); ``content_of`` tells a
retried submit from another pair under the same key. Shared by the engine and the stores.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from beagled import events as ev

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # as the store writes JSON


def scoped_key(secret: bytes, *, uid: int | None, voice: str, bad: str, good: str, key: str | None) -> str:
    """The idempotency key as stored and logged: scoped to (uid, voice), a keyed hash (HMAC-SHA256 with
    the log's own secret), so neither a raw key nor an offline-guessable draft hash is ever shown."""
    parts = (str(uid), voice, "k", key) if key is not None else (str(uid), voice, "h", bad, good)
    msg = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return ("k:" if key is not None else "h:") + hmac.new(secret, msg, hashlib.sha256).hexdigest()


def content_of(secret: bytes, p: ev.PairSubmitted) -> str:
    """Keyed fingerprint of a pair's drafts: the same key with another fingerprint is a conflict."""
    parts = [p.voice, p.bad, p.good, p.prompt or ""]
    if p.system is not None or p.messages:  # a prompt-only pair keeps the fingerprint it always had
        parts.append(_encode([p.system, list(p.messages or ())]))
    msg = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hmac.new(secret, b"content\x00" + msg, hashlib.sha256).hexdigest()
