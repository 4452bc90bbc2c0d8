"""Named fault points for crash tests: ``fault("name")`` does nothing unless ``BEAGLED_FAULTS`` names it.

``BEAGLED_FAULTS="after_commit_before_ack:kill,mid_promotion:raise"`` makes the daemon SIGKILL itself
(``kill``) or raise ``InjectedFault`` (``raise``) when it reaches that point; ``name:kill:3`` fires on
the third time the point is reached. Production never sets the variable; the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal

from beagled.errors import BeagledError

POINTS = (
    "after_commit_before_ack",
    "after_training_intent",
    "mid_training",
    "after_training_before_outcome",
    "mid_promotion",
    "after_promotion_before_event",
    "mid_reload",
    "after_reload_before_event",
)


class InjectedFault(BeagledError):
    """Raised at a fault point configured with ``raise``."""


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        name, action = parts[0], parts[1] if len(parts) > 1 else "kill"
        nth = int(parts[2]) if len(parts) > 2 else 1
        if name not in POINTS or action not in ("kill", "raise"):
            raise ValueError(
                f"bad BEAGLED_FAULTS entry {item!r} (points: {', '.join(POINTS)}; actions: kill, raise)"
            )
        out[name] = (action, nth)
    return out


_ACTIVE = _parse(os.environ.get("BEAGLED_FAULTS", ""))
_SEEN: dict[str, int] = {}


def fault(name: str) -> None:
    if not _ACTIVE or name not in _ACTIVE:
        return
    action, nth = _ACTIVE[name]
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {name}")
