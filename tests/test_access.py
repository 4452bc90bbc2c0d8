"""The pure parts of issue 18: the roles policy, fair job order, the refusal-log throttle, trust checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from beagled import bounds, jobs
from beagled.access import Policy
from beagled.errors import ConfigError, Forbidden

OP, SUB, OTHER = 0, 1001, 1002


def policy() -> Policy:
    p = Policy(operators=frozenset({OP}), owners={"bound": OTHER})
    p.record(SUB, "mine")
    return p


def test_operators_may_do_everything_submitters_only_their_ops() -> None:
    p = policy()
    for op in ("pause", "resume", "train", "rollback", "delete_voice", "status"):
        p.check_op(OP, op)
        with pytest.raises(Forbidden, match="operator"):
            p.check_op(SUB, op)
    for op in ("ping", "submit", "watch", "jobs", "job", "voices"):
        p.check_op(SUB, op)


def test_reads_are_limited_to_the_voices_a_submitter_used_and_owners_bind() -> None:
    p = policy()
    assert p.may_read(SUB, "mine") and not p.may_read(SUB, "theirs") and not p.may_read(SUB, None)
    assert p.may_read(OP, "theirs")
    with pytest.raises(Forbidden, match="voice_owners"):
        p.check_submit(SUB, "bound")
    p.check_submit(OTHER, "bound")
    p.check_submit(OP, "bound")
    p.record(
        SUB, "bound"
    )  # even after submitting (as an operator allowed it), an owned voice stays the owner's
    assert not p.may_read(SUB, "bound")
    jobs_ = {"jobs": [{"voice": "mine"}, {"voice": "theirs"}], "archived": 3}
    assert p.filter_jobs(SUB, jobs_) == {"jobs": [{"voice": "mine"}], "archived": 0}
    event = {"seq": 1, "type": "PairSubmitted", "at": 0.0, "data": {"voice": "mine", "key": "k:x"}}
    assert p.public_event(SUB, event, "mine") == {**event, "data": {"voice": "mine"}}
    assert p.public_event(SUB, event, "theirs") is None
    assert p.public_event(OP, event, "theirs") == event


def _job(job_id: str, voice: str, n: int, at: float) -> jobs.Job:
    return jobs.Job(
        job_id=job_id,
        voice=voice,
        state=jobs.JobState.QUEUED,
        pair_ids=tuple(f"{job_id}-{i}" for i in range(n)),
        replay_ids=(),
        created_at=at,
        updated_at=at,
    )


def test_a_flood_of_one_pair_voices_does_not_starve_a_full_job() -> None:
    state = jobs.State()
    state.voices["real"] = jobs.Voice(name="real", last_trained_at=50.0)  # trained before: sorts later
    for i in range(200):
        state.voices[f"f{i}"] = jobs.Voice(name=f"f{i}")
        state.jobs[f"f{i}"] = _job(f"f{i}", f"f{i}", 1, float(i))
    state.jobs["real"] = _job("real", "real", 4, 300.0)
    assert jobs.next_training(state, 400.0, min_pairs=4).job_id == "real"  # type: ignore[union-attr]
    assert jobs.next_training(state, 400.0).job_id == "f0"  # type: ignore[union-attr]  # (the old order)


def test_throttle_lets_a_burst_pass_then_counts() -> None:
    now = [0.0]
    t = bounds.Throttle(burst=2, per_s=10.0, clock=lambda: now[0])
    assert [t.allow()[0] for _ in range(5)] == [True, True, False, False, False]
    now[0] = 10.0
    assert t.allow() == (True, 3)


def _refused_then_passed(path: Path, check: Callable[[Path], None], bad: int, good: int, match: str) -> None:
    """``check`` refuses ``path`` with mode ``bad`` (a ``ConfigError`` matching ``match``) and passes it
    with mode ``good``."""
    path.write_text("")
    path.chmod(bad)
    with pytest.raises(ConfigError, match=match):
        check(path)
    path.chmod(good)
    check(path)


def test_files_others_can_write_or_read_are_refused(tmp_path: Path) -> None:
    cfg, key = tmp_path / "config.toml", tmp_path / "id"
    _refused_then_passed(
        cfg,
        lambda p: bounds.check_not_writable_by_others(p, "", "the config file"),
        0o664,
        0o644,
        "writable by its group or others",
    )
    _refused_then_passed(
        key,
        lambda p: bounds.check_private_file(p, "reload.ssh.identity_file", "the SSH key"),
        0o644,
        0o600,
        "readable or writable",
    )
    bounds.check_private_file(cfg, "reload.ssh.known_hosts", "known_hosts", others_may_read=True)


def test_worker_env_keeps_only_what_a_worker_needs(tmp_path: Path) -> None:
    env = bounds.worker_env(
        tmp_path, {"PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "s", "CUDA_VISIBLE_DEVICES": "0"}
    )
    assert env["PATH"] == "/bin" and env["CUDA_VISIBLE_DEVICES"] == "0" and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["UNSLOTH_COMPILE_LOCATION"].startswith(str(tmp_path))


def test_nofile_soft_limit_is_raised() -> None:
    soft, hard = bounds.raise_nofile_limit()
    assert soft >= min(hard, 1024) or soft == -1


def test_removing_a_voice_never_follows_a_planted_link(tmp_path: Path) -> None:
    from beagled.adapter_dirs import AdapterDirs
    from beagled.errors import AdapterError

    victim = tmp_path / "victim" / "v"
    victim.mkdir(parents=True)
    (victim / "precious").write_text("x")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "voices").symlink_to(tmp_path / "victim")
    store = AdapterDirs(tmp_path / "state" / "voices", keep_versions=2)
    with pytest.raises(AdapterError, match="symbolic link"):
        store.remove("v")
    assert (victim / "precious").exists()
