"""Jobs end to end in a real daemon with the fake subprocess trainer: scheduling, fallback, timeouts,
retries, crash-resume, promotion, rollback, retention, and the loop never blocked."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from beagled import manifest
from beagled.errors import Conflict
from tests.daemon_proc import DaemonProc, fake_backend, poll


def submit_n(d: DaemonProc, n: int, voice: str = "default", start: int = 0) -> list[dict[str, Any]]:
    with d.client() as c:
        return [
            c.submit(bad=f"draft {i} plain", good=f"draft {i} in voice", voice=voice, key=f"{voice}-{i}")
            for i in range(start, start + n)
        ]


def history(d: DaemonProc, job_id: str) -> list[str]:
    with d.client() as c:
        return [h["event"] for h in c.job(job_id)["job"]["history"]]


def test_min_pairs_cuts_a_job_that_is_promoted(make_daemon: Any) -> None:
    d = make_daemon({"training": {"heldout_share": 0.0}})
    submit_n(d, 3)
    with d.client() as c:
        assert c.jobs()["jobs"] == []  # 3 < min_pairs
    submit_n(d, 1, start=3)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted")
    # nothing was held out, so the voice's first job holds back its newest pair to be judged on
    assert job["pairs"] == 3 and job["eval_pairs"] == 1 and job["sibling_pairs"] == 1
    assert job["backend"] == "fake" and job["version"] == 1 and job["eval_loss"] is not None
    assert history(d, job["job_id"]) == [
        "JobCreated",
        "TrainingStarted",
        "TrainingSucceeded",
        "PromotionStarted",
        "Promoted",
    ]
    cur = d.state_dir / "voices" / "default" / "current"
    assert cur.is_symlink() and cur.resolve().name == job["job_id"]
    manifest.verify(cur.resolve())
    with d.client() as c:
        (v,) = c.voices()["voices"]
    assert v["current_job"] == job["job_id"] and v["version"] == 1 and v["pending_pairs"] == 0


def test_max_wait_and_train_and_pause(make_daemon: Any) -> None:
    d = make_daemon({"scheduler": {"max_wait_s": 0.5}, "training": {"heldout_share": 0.0}})
    with d.client() as c:
        c.pause()
        c.submit(bad="a", good="b", voice="slow")
        time.sleep(
            1.0
        )  # longer than max_wait: paused, so nothing may be cut (an absence can only be waited out)
        assert c.jobs()["jobs"] == []
        c.resume()
    (job,) = d.wait_jobs(lambda js: len(js) == 1)
    with d.client() as c:
        assert c.job(job["job_id"])["job"]["history"][0]["event"] == "JobCreated"
        (created,) = [e for e in d.events() if e["type"] == "JobCreated"]
        assert created["data"]["reason"] == "max_wait"
        c.submit(bad="c", good="d", voice="manual")
        lone = c.train("manual")["job_id"]
    # one pair and no held-out one: nothing to judge the job on, so it is never promoted
    assert "no held-out evaluation" in d.wait_job(lone, ("rejected",))["error"]
    with d.client() as c:
        c.submit(bad="e", good="f", voice="manual")
        c.submit(bad="g", good="h", voice="manual")
        jid = c.train("manual")["job_id"]
    job = d.wait_job(jid, ("promoted",))  # still no held-out pair: this one holds one back
    assert job["pairs"] == 1 and job["eval_pairs"] == 1


def test_fallback_to_the_next_backend_records_each_failure(make_daemon: Any) -> None:
    d = make_daemon(
        {
            "training": {"backends": ["broken", "stuck", "fake"], "timeout_s": 1.0, "heldout_share": 0.0},
            "training.custom_backends": {"broken": fake_backend("crash"), "stuck": fake_backend("hang")},
        }
    )
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted", timeout=60)
    evs = [e for e in d.events() if e["type"] == "TrainingFailed"]
    assert [(e["data"]["backend"], e["data"]["timeout"]) for e in evs] == [("broken", False), ("stuck", True)]
    assert "status 3" in evs[0]["data"]["error"] and "crashing as told" in evs[0]["data"]["error"]
    assert job["backend"] == "fake"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics").read().decode()
    assert 'beagled_backend_fallbacks_total{from_backend="broken",to_backend="stuck"} 1.0' in metrics
    count = "beagled_training_duration_seconds_count"
    assert f'{count}{{backend="stuck",executor="local",outcome="timeout"}} 1.0' in metrics
    assert f'{count}{{backend="fake",executor="local",outcome="success"}} 1.0' in metrics
    # the hung trainer's whole process group is gone
    assert not any("--mode hang" in _cmdline(p) for p in os.listdir("/proc") if p.isdigit())


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_attempts_retry_with_backoff_then_fail(make_daemon: Any) -> None:
    d = make_daemon(
        {"scheduler": {"max_attempts": 2, "retry_backoff_s": 0.2}, "training": {"heldout_share": 0.0}},
        backend=fake_backend("crash"),
    )
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "failed", timeout=60)
    assert job["attempt"] == 2 and "attempt 2/2" in job["error"]
    assert history(d, job["job_id"]) == [
        "JobCreated",
        "TrainingStarted",
        "TrainingFailed",
        "AttemptFailed",
        "TrainingStarted",
        "TrainingFailed",
        "JobFailed",
    ]
    with d.client() as c:
        assert c.ping()  # a failed job never takes the daemon down


def test_an_adapter_that_does_not_match_its_manifest_is_never_promoted(make_daemon: Any) -> None:
    d = make_daemon(
        {"scheduler": {"max_attempts": 1}, "training": {"heldout_share": 0.0}},
        backend=fake_backend("garbage"),
    )
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "failed")
    assert "invalid adapter" in job["error"] and "does not match its manifest" in job["error"]
    assert not (d.state_dir / "voices" / "default" / "current").exists()


def test_killed_mid_training_resumes_as_a_new_attempt(make_daemon: Any, tmp_path: Path) -> None:
    mode = tmp_path / "mode"
    mode.write_text("slow:30")
    runs = tmp_path / "runs.log"
    d = make_daemon(
        {"training": {"heldout_share": 0.0}},
        backend=fake_backend("ok", "--mode-file", str(mode), "--log", str(runs)),
    )
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "training")
    poll(lambda: runs.exists() and runs.read_text(), 10, what="trainer started")
    d.kill()
    mode.write_text("ok")
    d.start()
    done = d.wait_job(job["job_id"], ("promoted",))
    assert done["attempt"] == 2
    lines = runs.read_text().splitlines()
    assert [ln.split()[1] for ln in lines] == ["1", "2"]
    assert lines[0].split()[2] == lines[1].split()[2]  # the same pairs, once per attempt
    assert len(lines[1].split()[2].split(",")) == 3  # the newest of 4 is held back to judge it
    assert history(d, job["job_id"])[:3] == ["JobCreated", "TrainingStarted", "TrainingStarted"]


def test_submit_is_fast_while_training_runs(make_daemon: Any) -> None:
    d = make_daemon({"training": {"heldout_share": 0.0}}, backend=fake_backend("slow:5"))
    submit_n(d, 4)
    d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "training")
    lat = []
    with d.client() as c:
        for i in range(50):
            t0 = time.perf_counter()
            c.submit(bad=f"x{i}", good=f"y{i}", voice="busy")
            lat.append(time.perf_counter() - t0)
    assert max(lat) < 0.5, lat


def test_command_reloader_rollback_and_retention(make_daemon: Any, tmp_path: Path) -> None:
    calls = tmp_path / "reloads.log"
    script = tmp_path / "reload.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $2" >> {calls}\n')
    script.chmod(0o755)
    d = make_daemon(
        {
            "training": {"heldout_share": 0.0},
            "voices": {"keep_versions": 2},
            "reload": {"method": "command", "reconcile_interval_s": 3600.0},
            "reload.command": {"argv": [str(script), "{voice}", "{adapter_dir}"]},
        }
    )
    ids = []
    for n in range(3):
        submit_n(d, 4, start=4 * n)
        js = d.wait_jobs(lambda js, n=n: len(js) == n + 1 and js[0]["state"] == "reloaded")
        ids.append(js[0]["job_id"])
    served = json.loads((d.state_dir / "voices" / "default" / "served.json").read_text())
    assert served["served_name"] == "default-v0003" and served["job_id"] == ids[2]
    adapters = sorted(
        p.name
        for p in (d.state_dir / "voices" / "default" / "adapters").iterdir()
        if not p.name.startswith(".")
    )
    assert adapters == sorted(ids[1:])  # keep_versions = 2
    with d.client() as c:
        rb = c.rollback("default")
        assert rb["job_id"] == ids[1]
        (v,) = c.voices()["voices"]
        assert v["current_job"] == ids[1] and v["version"] == 2
    poll(lambda: len(calls.read_text().splitlines()) == 4, 20, what="rollback reload")
    assert calls.read_text().splitlines()[-1].endswith(ids[1])
    assert (d.state_dir / "voices" / "default" / "current").resolve().name == ids[1]

    def rollback_served() -> bool:  # the command ran; its outcome (Reloaded) is recorded just after
        with d.client() as c:
            return bool(c.voices()["voices"][0]["served_name"] == "default-v0002")

    poll(rollback_served, 20, what="rollback reload recorded")
    d.kill()
    d.start()
    with d.client() as c:
        (v,) = c.voices()["voices"]
        assert v["current_job"] == ids[1] and v["served_name"] == "default-v0002"


def test_sigterm_during_training_kills_the_trainer_and_exits_zero(make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon({"training": {"heldout_share": 0.0}}, backend=fake_backend("hang"))
    submit_n(d, 4)
    d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "training")
    poll(lambda: any("--mode hang" in _cmdline(p) for p in os.listdir("/proc") if p.isdigit()), 10)
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    poll(
        lambda: not any("--mode hang" in _cmdline(p) for p in os.listdir("/proc") if p.isdigit()),
        10,
        what="trainer group killed",
    )


def test_voices_pause_and_delete(make_daemon: Any) -> None:
    d = make_daemon({"training": {"heldout_share": 0.0}})
    with d.client() as c:
        c.submit(bad="q", good="r", voice="held")
        assert c.pause("held") == {"paused": True, "voice": "held"}
        assert c.status()["paused"] is False  # only that voice
    submit_n(d, 4, voice="held", start=1)
    submit_n(d, 4, voice="other")
    d.wait_jobs(lambda js: [j["voice"] for j in js if j["state"] == "promoted"] == ["other"])
    with d.client() as c:
        assert c.voices()["voices"][0]["pending_pairs"] == 5  # "held" keeps its pairs, uncut
        c.resume("held")
    d.wait_jobs(lambda js: sorted(j["voice"] for j in js if j["state"] == "promoted") == ["held", "other"])
    adapters = d.state_dir / "voices" / "other"
    assert adapters.is_dir()
    with d.client() as c:
        assert c.delete_voice("held") == {"voice": "held", "deleted": True, "adapters_removed": False}
        assert (d.state_dir / "voices" / "held").is_dir()  # adapters stay unless asked
        assert c.delete_voice("other", remove_adapters=True)["adapters_removed"] is True
        assert c.voices()["voices"] == []
        assert len(c.jobs()["jobs"]) == 2  # the events, and so the jobs' history, stay
    assert not adapters.exists()
    d.kill()
    d.start()
    with d.client() as c:
        assert c.voices()["voices"] == []
        c.submit(bad="new", good="life", voice="other")  # a voice comes back with its first pair
        assert [v["voice"] for v in c.voices()["voices"]] == ["other"]


def test_fair_between_voices_and_no_voice_sees_another_s_pairs(make_daemon: Any, tmp_path: Path) -> None:
    """A voice that floods never starves another; each job trains only on its own voice's pairs."""
    runs = tmp_path / "runs.log"
    d = make_daemon(
        {"training": {"heldout_share": 0.0, "replay_pairs": 4}},
        backend=fake_backend("slow:0.3", "--log", str(runs)),
    )
    mine: dict[str, set[str]] = {"flood": set(), "quiet": set()}
    mine["flood"] |= {r["pair_id"] for r in submit_n(d, 4, voice="flood")}
    d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "training")
    mine["flood"] |= {r["pair_id"] for r in submit_n(d, 40, voice="flood", start=4)}
    mine["quiet"] |= {r["pair_id"] for r in submit_n(d, 4, voice="quiet")}
    js = d.wait_jobs(lambda js: sum(j["state"] == "promoted" for j in js) >= 3, timeout=60)
    order = [j["voice"] for j in sorted(js, key=lambda j: j["updated_at"]) if j["state"] == "promoted"]
    assert order.index("quiet") <= 2, order  # right after the flood's first or second job, not last
    with d.client() as c:
        for j in c.jobs(limit=100)["jobs"]:
            detail = c.job(j["job_id"])["job"]
            assert set(detail["pair_ids"]) | set(detail["replay_ids"]) <= mine[j["voice"]]
    voice_of = {pid: v for v, ids in mine.items() for pid in ids}
    for line in runs.read_text().splitlines():
        trained = line.split()[2].split(",")
        assert len({voice_of[p] for p in trained}) == 1, line  # what the trainer saw: one voice only


def _trainers_of(d: DaemonProc) -> list[int]:
    """Fake trainer processes of this daemon (their spec files lie in its state dir)."""
    mark = str(d.state_dir)
    return [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and "fake_trainer.py" in _cmdline(p) and mark in _cmdline(p)
    ]


def test_pause_cancel_running_and_forced_delete_stop_the_training(make_daemon: Any, tmp_path: Path) -> None:
    """By default pause lets the running training finish and delete_voice refuses; ``cancel_running`` /
    ``force`` stop it (its process group is gone when the answer comes) and record ``JobCancelled``."""
    mode = tmp_path / "mode"
    mode.write_text("hang")
    d = make_daemon(
        {"training": {"heldout_share": 0.0, "timeout_s": 600.0}},
        backend=fake_backend("ok", "--mode-file", str(mode)),
    )
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "training")
    poll(lambda: _trainers_of(d), 30, what="the trainer to run")
    with d.client() as c:
        assert c.pause("default") == {"paused": True, "voice": "default"}
        assert _trainers_of(d), "a plain pause lets the running training go on"
        with pytest.raises(Conflict, match="work in progress"):
            c.delete_voice("default")
        assert c.pause("default", cancel_running=True)["paused"] is True
        assert not _trainers_of(d), "the trainer's process group is gone when pause answers"
        cancelled = c.job(job["job_id"])["job"]
        (voice,) = c.voices()["voices"]
    assert cancelled["state"] == "cancelled" and "pause" in cancelled["error"]
    assert [h["event"] for h in cancelled["history"]][-1] == "JobCancelled"
    assert voice["pending_pairs"] == job["pairs"], "its pairs are pending again"
    mode.write_text("ok")
    with d.client() as c:
        c.resume("default")
        c.train("default")  # 3 pending pairs < min_pairs (the held-back one judges): cut them now
    (again,) = [
        j
        for j in d.wait_jobs(lambda js: any(j["state"] == "promoted" for j in js))
        if j["state"] == "promoted"
    ]
    assert again["pairs"] == job["pairs"] and again["job_id"] != job["job_id"]

    mode.write_text("hang")
    submit_n(d, 4, voice="gone")
    training = lambda j: j["voice"] == "gone" and j["state"] == "training"  # noqa: E731
    (gone,) = [j for j in d.wait_jobs(lambda js: any(map(training, js))) if training(j)]
    poll(lambda: _trainers_of(d), 30, what="its trainer to run")
    with d.client() as c:
        assert c.delete_voice("gone", force=True)["deleted"] is True
        assert not _trainers_of(d), "the trainer's process group is gone when delete answers"
        assert c.job(gone["job_id"])["job"]["state"] == "cancelled"
        assert "gone" not in [v["voice"] for v in c.voices()["voices"]]
        assert c.ping()
