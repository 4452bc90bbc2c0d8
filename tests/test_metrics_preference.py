"""``beagled_eval_preference_accuracy{voice}``: the current voice's held-out preference accuracy."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest

from beagled.jobs import State, Voice
from beagled.metrics import Metrics


def test_the_gauge_shows_the_current_voice_s_preference_accuracy_and_skips_unmeasured_ones() -> None:
    state = State()
    state.voices["bea"] = Voice(name="bea", eval_loss=2.5, preference_accuracy=0.75)
    state.voices["new"] = Voice(name="new")  # nothing promoted yet: no sample rather than a made-up 0
    text = generate_latest(Metrics(lambda: state).registry).decode()
    assert 'beagled_eval_preference_accuracy{voice="bea"} 0.75' in text
    assert 'beagled_eval_preference_accuracy{voice="new"}' not in text
    assert "# TYPE beagled_eval_preference_accuracy gauge" in text
