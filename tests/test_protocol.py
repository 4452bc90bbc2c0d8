"""The sans-IO protocol layer: framing, validation, encoding — including property tests."""

from __future__ import annotations

import json
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from beagled import protocol
from beagled.errors import ERROR_CODES, TooLarge

LIM = protocol.Limits(max_draft_bytes=1024)


def test_line_buffer_splits_partial_and_many_lines() -> None:
    b = protocol.LineBuffer(100)
    assert b.feed(b'{"a"') == []
    assert b.feed(b':1}\n{"b":2}\r\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert b.pending == 4
    assert b.feed(b"}\n") == [b'{"c"}']


def test_line_buffer_overflow_keeps_earlier_lines() -> None:
    b = protocol.LineBuffer(10)
    assert b.feed(b"short\n" + b"x" * 11 + b"\nafter\n") == [b"short"]
    assert isinstance(b.overflow, TooLarge)
    assert b.feed(b"more\n") == []
    b2 = protocol.LineBuffer(10)
    assert b2.feed(b"y" * 11) == [] and b2.overflow is not None


def test_valid_submit_is_normalised() -> None:
    r = protocol.parse_request(
        b'{"v":1,"id":"a","op":"submit","bad":"x","good":"y","quality":{"before":1,"after":2.5},"key":"k"}',
        LIM,
    )
    assert r.id == "a" and r.op == "submit"
    assert r.fields == {
        "voice": "default",
        "bad": "x",
        "good": "y",
        "quality": {"before": 1.0, "after": 2.5},
        "key": "k",
    }


def test_error_keeps_the_request_id_when_readable() -> None:
    with pytest.raises(protocol.RequestError) as e:
        protocol.parse_request(b'{"v":1,"id":7,"op":"nope"}', LIM)
    assert e.value.request_id == 7 and e.value.code == "unknown_op"
    out = json.loads(protocol.encode_error(e.value.request_id, e.value))
    assert out == {"v": 1, "id": 7, "ok": False, "error": {"code": "unknown_op", "message": str(e.value)}}


def test_draft_size_is_measured_in_utf8_bytes() -> None:
    body = json.dumps({"v": 1, "id": 1, "op": "submit", "bad": "é" * 513, "good": "y"}).encode()
    with pytest.raises(protocol.RequestError) as e:
        protocol.parse_request(body, LIM)
    assert e.value.code == "too_large"


def test_nan_and_deep_nesting_are_invalid_json() -> None:
    for line in (b'{"v":1,"id":1,"op":"ping","x":NaN}', b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(protocol.RequestError) as e:
            protocol.parse_request(line, LIM)
        assert e.value.code in ("invalid_json", "bad_request")


def test_internal_errors_do_not_leak_details() -> None:
    out = json.loads(protocol.encode_error(1, RuntimeError("secret path /root/.ssh/id_ed25519")))
    assert out["error"] == {"code": "internal", "message": "internal error (see the daemon's log)"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        protocol.parse_request(data, LIM)
    except protocol.RequestError as e:
        assert e.code in ERROR_CODES


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "id",
                "op",
                "bad",
                "good",
                "voice",
                "key",
                "job_id",
                "limit",
                "state",
                "to",
                "from_seq",
                "prompt",
                "quality",
            ]
        )
        | st.text(max_size=5),
        json_values,
        max_size=8,
    )
)
def test_random_objects_are_accepted_or_refused_with_a_contract_code(obj: dict[str, object]) -> None:
    line = json.dumps(obj).encode()
    try:
        r = protocol.parse_request(line, LIM)
    except protocol.RequestError as e:
        assert e.code in ERROR_CODES and str(e)
        return
    assert r.op in protocol.OPS
    json.loads(protocol.encode_ok(r.id, {"echo": r.fields}))  # whatever passed validation encodes


def test_pause_cancel_running_and_delete_force_are_booleans_defaulting_to_false() -> None:
    def parse(obj: dict[str, object]) -> dict[str, object]:
        return protocol.parse_request(json.dumps({"v": 1, "id": 1, **obj}).encode(), LIM).fields

    assert parse({"op": "pause"}) == {"cancel_running": False}
    assert parse({"op": "pause", "voice": "a", "cancel_running": True}) == {
        "voice": "a",
        "cancel_running": True,
    }
    assert parse({"op": "delete_voice", "voice": "a"})["force"] is False
    assert parse({"op": "delete_voice", "voice": "a", "force": True})["force"] is True
    for bad in ({"op": "pause", "cancel_running": "yes"}, {"op": "delete_voice", "voice": "a", "force": 1},
                {"op": "resume", "cancel_running": True}):  # fmt: skip
        with pytest.raises(protocol.RequestError) as e:
            parse(bad)
        assert e.value.code == "bad_request", bad


# --- chat-shaped pairs: system and messages ---------------------------------------------------------


def _submit(**fields: object) -> protocol.Request:
    line = json.dumps({"v": 1, "id": 7, "op": "submit", "bad": "x", "good": "y", **fields})
    return protocol.parse_request(line.encode(), LIM)


def test_chat_shaped_submit_is_normalised() -> None:
    msgs = [
        {"role": "user", "content": "Write to Ana."},
        {"role": "assistant", "content": "About what?"},
        {"role": "user", "content": "The report."},
    ]
    r = _submit(system="You are Bea.", messages=msgs)
    assert r.fields["system"] == "You are Bea." and r.fields["messages"] == msgs
    assert "prompt" not in r.fields
    # prompt after messages: the last user turn (messages then end with an assistant turn)
    r = _submit(messages=msgs[:2], prompt="The report.")
    assert r.fields["messages"] == msgs[:2] and r.fields["prompt"] == "The report."
    # a system message first is fine; an empty list is as if none were given
    assert _submit(messages=[{"role": "system", "content": "s"}, msgs[0]]).fields["messages"][0] == {
        "role": "system",
        "content": "s",
    }
    assert "messages" not in _submit(messages=[]).fields
    assert _submit(system="only a system prompt").fields == {
        "voice": "default", "bad": "x", "good": "y", "system": "only a system prompt"
    }  # fmt: skip


def _m(role: object, content: object = "x", **extra: object) -> dict[str, object]:
    return {"role": role, "content": content, **extra}


U, A, S = _m("user"), _m("assistant", "a"), _m("system", "s")


@pytest.mark.parametrize(
    ("fields", "code", "names"),
    [
        ({"messages": "hello"}, "bad_request", "messages must be a list"),
        ({"messages": U}, "bad_request", "messages must be a list"),
        ({"messages": ["hello"]}, "bad_request", "messages[0] must be an object"),
        ({"messages": [_m("tool")]}, "bad_request", "messages[0].role must be one of"),
        ({"messages": [_m(1)]}, "bad_request", "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "bad_request", "messages[0] needs role and content"),
        ({"messages": [_m("user", 5)]}, "bad_request", "messages[0].content must be a string"),
        ({"messages": [_m("user", None)]}, "bad_request", "messages[0].content must be a string"),
        ({"messages": [_m("user", "")]}, "bad_request", "messages[0].content must not be empty"),
        ({"messages": [_m("user", " \n")]}, "bad_request", "messages[0].content must not be blank"),
        ({"messages": [_m("user", name="a")]}, "bad_request", "messages[0] takes only"),
        ({"messages": [_m("user", "é" * 600)]}, "too_large", "messages[0].content is 1200 bytes"),
        ({"messages": [U] * 65}, "bad_request", "messages holds 65 messages"),
        ({"messages": [U, S, U]}, "bad_request", "messages[1]: a system message may only come first"),
        ({"messages": [U, A]}, "bad_request", "must end with a user turn"),
        ({"messages": [U], "prompt": "p"}, "bad_request", "already ends with a user turn"),
        ({"system": "s", "messages": [S, U]}, "bad_request", "give the system prompt once"),
        ({"system": 3}, "bad_request", "system must be a string"),
        ({"system": ""}, "bad_request", "system must not be empty"),
        ({"system": "s" * 1025}, "too_large", "system is 1025 bytes"),
    ],
)
def test_bad_conversation_shapes_are_refused_naming_the_field(
    fields: dict[str, object], code: str, names: str
) -> None:
    with pytest.raises(protocol.RequestError) as e:
        _submit(**fields)
    assert e.value.code == code and e.value.request_id == 7
    assert names in str(e.value), str(e.value)


def test_every_job_state_can_be_asked_for() -> None:
    # the protocol's list of states is the pure core's (a new state once made `jobs --state` refuse it)
    from beagled.jobs import JobState

    assert set(protocol.JOB_STATES) == {s.value for s in JobState}
    for state in protocol.JOB_STATES:
        line = json.dumps({"v": 1, "id": 1, "op": "jobs", "state": state}).encode()
        assert protocol.parse_request(line, LIM).fields["state"] == state


class _EngineCalls:
    """A fake engine: records which method an op's ``call`` reaches, with what arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: self.calls.append((name, args, kw))


def test_the_table_of_operations_says_how_each_op_runs_and_what_it_calls() -> None:
    kinds = {name: op.kind for name, op in protocol.OPS.items()}
    assert {n for n, k in kinds.items() if k.writes} == {
        "submit",
        "train",
        "rollback",
        "pause",
        "resume",
        "delete_voice",
    }
    assert {n for n, k in kinds.items() if k is protocol.Kind.QUICK} == {"ping", "status", "jobs", "voices"}
    assert kinds["watch"] is protocol.Kind.STREAM and kinds["submit"] is protocol.Kind.COMMIT
    limits = protocol.Limits()
    engine = _EngineCalls()
    req = protocol.parse_request(b'{"v":1,"id":1,"op":"jobs","state":"cancelled"}', limits)
    protocol.OPS[req.op].call(engine, req.fields)
    req = protocol.parse_request(b'{"v":1,"id":2,"op":"pause","voice":"a","cancel_running":true}', limits)
    protocol.OPS[req.op].call(engine, req.fields)
    req = protocol.parse_request(b'{"v":1,"id":3,"op":"submit","bad":"x","good":"y"}', limits)
    done = object()
    protocol.OPS[req.op].call(engine, req.fields, done, 1000)
    assert engine.calls == [
        ("list_jobs", (None, "cancelled", 100), {}),
        ("set_paused", (True, "a", True), {}),
        ("submit_nowait", ({"voice": "default", "bad": "x", "good": "y"}, done), {"uid": 1000}),
    ]
    assert {"trained", "promoted", "reloaded", "failed", "rejected", "cancelled"} == protocol.SETTLED_STATES
