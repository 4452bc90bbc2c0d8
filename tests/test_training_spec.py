"""The typed training spec (beagled.training_spec): its wire form, the one set of defaults, bad values."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from beagled import events as ev
from beagled.config import from_mapping
from beagled.engine.spec import training_example
from beagled.errors import ConfigError
from beagled.training_spec import HYPER_KEYS, Example, Hyper, TrainingSpec

WIRE_HYPER = {
    "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "num_layers": -1,
    "learning_rate": 0.002, "steps": 40, "batch_size": 4, "max_seq_len": 256, "seed": 0,
}  # fmt: skip

WIRE: dict[str, Any] = {
    "job_id": "j-1",
    "voice": "default",
    "attempt": 2,
    "base_model": "/models/tiny",
    "served_base": "tiny-served",
    "init_adapter": "/voices/default/j-0",
    "served_adapter": "/voices/default/j-0",
    "objective": "sft+dpo",
    "dpo_weight": 0.5,
    "train": [
        {"pair_id": "p1", "chosen": "good", "rejected": "bad", "prompt": "Rewrite: bad"},
        {
            "pair_id": "p2",
            "chosen": "hi there",
            "rejected": "hello",
            "prompt": "",
            "messages": [{"role": "user", "content": "say hi"}],
            "system": "be brief",
        },
    ],
    "heldout": [{"pair_id": "p3", "chosen": "g", "rejected": "b", "prompt": "x", "system": "s"}],
    "siblings": [],
    "hyper": WIRE_HYPER,
}


def test_wire_form_round_trips_byte_for_byte() -> None:
    spec = TrainingSpec.from_json(WIRE)
    assert json.dumps(spec.to_json()) == json.dumps(WIRE)  # the same keys, in the same order
    assert TrainingSpec.from_json(spec.to_json()) == spec
    assert spec.train[1].messages == ({"role": "user", "content": "say hi"},)


def test_runner_keys_are_not_the_engines() -> None:
    spec = TrainingSpec.from_json({**WIRE, "out_dir": "/tmp/x", "backend": "peft", "executor": "local"})
    assert spec.to_json() == {**WIRE, "out_dir": "/tmp/x"}  # the engine chose out_dir; the rest is not its
    assert dataclasses.replace(spec, out_dir=None).to_json() == WIRE
    assert spec.for_worker("peft") == {**WIRE, "out_dir": "/tmp/x", "backend": "peft"}
    with pytest.raises(ValueError, match="out_dir"):
        TrainingSpec.from_json(WIRE).for_worker("peft")


def test_one_set_of_defaults() -> None:
    config = from_mapping({}).training.hyper  # [training.hyper] as an empty config.toml gives it
    for key in HYPER_KEYS:
        want = getattr(Hyper(), key)
        got = getattr(config, key)
        assert (tuple(got) if key == "target_modules" else got) == want, key
    assert Hyper().learning_rate == 2e-3
    assert Hyper().to_json() == WIRE_HYPER
    assert Hyper.from_json({}) == Hyper()


def test_extra_keys_are_kept_for_a_backend() -> None:
    hyper = Hyper.from_json({**WIRE_HYPER, "beta": 0.2})
    assert hyper.extra == {"beta": 0.2}
    assert hyper.to_json() == {"beta": 0.2, **WIRE_HYPER}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 0}, "hyper.rank: must be an integer >= 1, got 0"),
        ({"steps": 2.5}, "hyper.steps: must be an integer >= 1"),
        ({"seed": True}, "hyper.seed: must be an integer >= 0"),
        ({"max_seq_len": 4}, "hyper.max_seq_len: must be an integer >= 8"),
        ({"dropout": 1.0}, "hyper.dropout: must be a number in [0.0, 1.0), got 1.0"),
        ({"alpha": 0}, "hyper.alpha: must be a number in (0.0, inf), got 0"),
        ({"learning_rate": float("nan")}, "hyper.learning_rate"),
        ({"target_modules": []}, "hyper.target_modules: must be a non-empty list"),
        ({"target_modules": "q_proj"}, "hyper.target_modules: must be a non-empty list"),
        ({"num_layers": 0}, "hyper.num_layers: must be -1 (all) or a positive integer, got 0"),
    ],
)
def test_a_bad_value_is_named_by_its_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Hyper.from_json({**WIRE_HYPER, **change})
    assert message in str(caught.value)


def test_complete_asks_for_every_key() -> None:
    with pytest.raises(ConfigError, match=r"hyper\.seed: is required"):
        Hyper.from_json({k: v for k, v in WIRE_HYPER.items() if k != "seed"}, complete=True)
    with pytest.raises(ConfigError, match="hyper: must be an object"):
        Hyper.from_json([])


def test_constructed_hyper_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"hyper\.batch_size"):
        dataclasses.replace(Hyper(), batch_size=0)


def _pair(**fields: Any) -> ev.PairSubmitted:
    base: dict[str, Any] = {"pair_id": "p1", "voice": "default", "bad": "bad", "good": "good", "key": "k"}
    return ev.PairSubmitted(**{**base, **fields})


def test_training_example_from_a_pair() -> None:
    plain = training_example(_pair(), "Rewrite ({voice}): {bad}")
    assert plain.to_json() == {
        "pair_id": "p1",
        "chosen": "good",
        "rejected": "bad",
        "prompt": "Rewrite (default): bad",
    }
    chat = training_example(_pair(messages=({"role": "user", "content": "hi"},), system="s"), "{bad}")
    assert chat == Example("p1", "good", "bad", "", "s", ({"role": "user", "content": "hi"},))
    assert list(chat.to_json()) == ["pair_id", "chosen", "rejected", "prompt", "messages", "system"]


def test_config_refuses_what_a_backend_would() -> None:
    wanted = r"training\.hyper\.learning_rate: must be a number in \(0\.0, 1\.0\)"
    with pytest.raises(ConfigError, match=wanted):
        from_mapping({"training": {"hyper": {"learning_rate": 1.5}}})
    assert from_mapping({}).training.hyper == Hyper()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("p1", "train: must be a list of pairs"),
        (["p1"], "train[0]: must be an object"),
        (
            [{"pair_id": "p", "chosen": 1, "rejected": "b"}],
            "train[0]: needs string prompt, chosen and rejected",
        ),
        ([{"chosen": "g", "rejected": "b", "system": 3}], "train[0].system: must be a string"),
        ([{"chosen": "g", "rejected": "b", "messages": "hi"}], "train[0].messages: must be a list of turns"),
        (
            [{"chosen": "g", "rejected": "b", "messages": [{"role": "tool", "content": "x"}]}],
            "train[0]: messages[0] must be {'role': system|user|assistant, 'content': str}",
        ),
    ],
)
def test_a_bad_pair_is_named_by_its_place(rows: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainingSpec.from_json({**WIRE, "train": rows})
    assert str(caught.value) == message


def test_a_pair_without_an_id_takes_its_index() -> None:
    spec = TrainingSpec.from_json({**WIRE, "heldout": [{"chosen": "g", "rejected": "b", "prompt": None}]})
    assert spec.heldout == (Example("0", "g", "b", ""),)
    with pytest.raises(ConfigError, match="job_id: is required"):
        TrainingSpec.from_json({k: v for k, v in WIRE.items() if k != "job_id"})
    with pytest.raises(ConfigError, match=r"hyper\.seed: is required"):
        TrainingSpec.from_json(
            {**WIRE, "hyper": {k: v for k, v in WIRE_HYPER.items() if k != "seed"}}, complete=True
        )
