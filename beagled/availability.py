"""Training-backend availability: install hints, the re-probe backoff, and why a voice waits.

Pure (no I/O): the engine's trainer loop asks ``ProbeSchedule`` when to probe the backends again while a
job is blocked, and ``install_hint`` what to tell a user whose backend is missing. A job that finds no
backend records one ``TrainingBlocked`` event and waits; a probe that finds one records one
``TrainingUnblocked`` (see ``jobs``): the log does not grow while nothing can train.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from beagled.jobs import JobState, State

EXTRAS = {"mlx": "mlx", "peft": "peft", "unsloth": "unsloth"}
PROBE_BACKOFF_MIN_S = 5.0
PROBE_BACKOFF_MAX_S = 300.0


def install_hint(backend: str) -> str:
    """What to install for a built-in backend ("" for a custom one)."""
    extra = EXTRAS.get(backend)
    return f"pip install 'beagled[{extra}]'" if extra else ""


def unavailable_message(statuses: Iterable[tuple[str, bool, str]]) -> str:
    """One line naming each unavailable backend, its reason and what to install."""
    parts = []
    for name, available, reason in statuses:
        if available:
            continue
        hint = install_hint(name)
        parts.append(f"{name}: {reason}" + (f" (install: {hint})" if hint else ""))
    return "; ".join(parts)


@dataclass
class ProbeSchedule:
    """Exponential backoff of re-probes while a job is blocked; reset when a backend appears."""

    base_s: float = PROBE_BACKOFF_MIN_S
    cap_s: float = PROBE_BACKOFF_MAX_S
    delay_s: float = PROBE_BACKOFF_MIN_S
    next_at: float = 0.0  # trio clock
    asked: bool = False  # a ``train`` request: probe at once

    def due(self, now: float) -> bool:
        return self.asked or now >= self.next_at

    def failed(self, now: float) -> None:
        self.asked = False
        self.next_at = now + self.delay_s
        self.delay_s = min(self.delay_s * 2, self.cap_s)

    def succeeded(self) -> None:
        self.asked = False
        self.delay_s = self.base_s


def waiting_reason(state: State, voice: str, min_pairs: int) -> str | None:
    """Why a voice's pairs are not training now, or None."""
    v = state.voices.get(voice)
    for j in state.jobs.values():
        if j.voice == voice and j.blocked:
            return f"job {j.job_id} waits for a training backend: {j.blocked}"
        if j.voice == voice and j.executor_outage and j.state == JobState.TRAINING:
            return f"job {j.job_id} waits for the {j.outage_executor} executor: {j.executor_outage}"
    if v is None:
        return None
    if v.paused or state.paused:
        return "paused"
    if any(j.voice == voice and j.state == JobState.QUEUED for j in state.jobs.values()):
        return "a job is queued behind another training"
    submitted = len(v.pending) + len(v.heldout_window)
    if v.pending and submitted < min_pairs:
        return f"{submitted} of min_pairs = {min_pairs} pairs submitted (or max_wait_s after the oldest)"
    return None
