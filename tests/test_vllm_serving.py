"""A real ``beagled serve`` with ``reload.method = "vllm"`` against real vLLM CPU servers: retention
never takes the server down, two replicas, a real restart, sleep during training (with ``kill -9``).

Training here is the fake subprocess trainer writing a real LoRA for the tiny model (``--tiny``): the
point is serving; what real backends train is checked against vLLM's logprobs in
``test_vllm_logprobs.py``. Figures are printed (``-s``) for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from beagled import manifest
from tests.daemon_proc import DaemonProc, fake_backend, poll
from tests.vllm_real import RealVllm, http

pytestmark = pytest.mark.slow

SERVER_EVENTS = ("SleepStarted", "Slept", "WakeStarted", "Woken", "WakeFailed")


def vllm_daemon(
    make_daemon: Callable[..., DaemonProc],
    tiny_model: Path,
    urls: list[str],
    *,
    trainer: tuple[str, ...] = (),
    vllm: dict[str, Any] | None = None,
    voices: dict[str, Any] | None = None,
    reconcile_s: float = 0.5,
) -> DaemonProc:
    return make_daemon(
        {
            "training": {"base_model": str(tiny_model), "heldout_share": 0.0},
            "reload": {"method": "vllm", "reconcile_interval_s": reconcile_s, "retry_backoff_s": 0.2},
            "reload.vllm": {"urls": urls, **(vllm or {})},
            "voices": voices or {},
        },
        backend=fake_backend("ok", "--tiny", *trainer),
    )


def promote(d: DaemonProc, n: int, voice: str = "default", timeout: float = 120.0) -> dict[str, Any]:
    """Submit 4 pairs (a job) and wait until it is reloaded; returns the job."""
    with d.client() as c:
        before = {j["job_id"] for j in c.jobs(limit=1000)["jobs"]}
        for i in range(4):
            c.submit(
                bad=f"draft {n}.{i} plain", good=f"draft {n}.{i} voiced", voice=voice, key=f"{voice}-{n}-{i}"
            )
    js = d.wait_jobs(lambda js: any(j["job_id"] not in before for j in js), timeout)
    (jid,) = [j["job_id"] for j in js if j["job_id"] not in before]
    return d.wait_job(jid, ("reloaded",), timeout)


def voice(d: DaemonProc, name: str = "default") -> dict[str, Any]:
    with d.client() as c:
        (v,) = [v for v in c.voices()["voices"] if v["voice"] == name]
    return v  # type: ignore[no-any-return]


def listed_dirs_exist(server: RealVllm) -> None:
    for name, root in server.adapters().items():
        assert Path(root).is_dir(), f"{server.url} lists {name!r} from a deleted directory {root}"


def test_ten_promotions_with_keep_two_never_kill_the_server(
    make_daemon: Callable[..., DaemonProc], tiny_model: Path, vllm: RealVllm
) -> None:
    d = vllm_daemon(make_daemon, tiny_model, [vllm.url], voices={"keep_versions": 2})
    published: list[str] = []
    sent = 0
    for n in range(10):
        promote(d, n)
        published.append(voice(d)["served_name"])
        listed_dirs_exist(vllm)
        for name in published:  # every name ever published: served or 404, never a dead server
            status, body = vllm.complete(name, "Hello", max_tokens=1)
            sent += 1
            assert status in (200, 404), (name, status, body)
            assert vllm.alive(), vllm.log_tail()
    answers = {name: vllm.complete(name, "Hello", max_tokens=1)[0] for name in published}
    sent += len(answers)
    assert answers[published[-1]] == 200
    assert [answers[n] for n in published[:-2]] == [404] * 8
    kept = sorted(
        p.name for p in (d.state_dir / "voices" / "default" / "adapters").iterdir() if p.name[0] != "."
    )
    assert len(kept) == 2, kept
    print(f"\nFIGURE pruning: promotions=10 completions={sent} server_deaths=0 kept_dirs={len(kept)}")


def test_two_replicas_a_real_restart_and_one_down(
    make_daemon: Callable[..., DaemonProc], tiny_model: Path, vllm: RealVllm, vllm_replica: RealVllm
) -> None:
    vllm_replica.unload_all()
    a, b = vllm, vllm_replica
    d = vllm_daemon(make_daemon, tiny_model, [a.url, b.url])
    started = time.monotonic()
    job = promote(d, 0)
    both_s = time.monotonic() - started
    name = voice(d)["served_name"]
    assert name in a.adapters() and name in b.adapters()
    reloaded = [e for e in d.events() if e["type"] == "Reloaded" and e["data"]["job_id"] == job["job_id"]]
    reload_s = reloaded[-1]["data"]["duration_s"]
    replicas = {r["url"]: r for r in voice(d)["replicas"]}
    assert all(r["served_name"] == name and r["verified_at"] for r in replicas.values()), replicas

    # B down: a promotion is served by A alone and B is shown behind; B's real restart (it forgot
    # every adapter) is caught up by reconcile with the current adapter, without touching A
    b.stop()
    promote(d, 1)
    name2 = voice(d)["served_name"]
    assert name2 != name and name2 in a.adapters()
    behind = {r["url"]: r for r in voice(d)["replicas"]}[b.url]
    assert behind["behind"] is True
    a_before = a.adapters()
    t0 = time.monotonic()
    b.start()
    restart_s = time.monotonic() - t0
    t0 = time.monotonic()
    poll(lambda: name2 in b.adapters(), timeout=60, what="B serves the voice again")
    reserve_s = time.monotonic() - t0
    assert a.adapters() == a_before
    poll(lambda: not {r["url"]: r for r in voice(d)["replicas"]}[b.url]["behind"], timeout=30)
    print(
        f"\nFIGURE replicas: submit->both_serve={both_s:.2f}s reload={reload_s:.3f}s "
        f"replica_start={restart_s:.1f}s reserve_after_restart={reserve_s:.2f}s"
    )


def test_sleep_train_wake_load_and_kill_9_while_asleep(
    make_daemon: Callable[..., DaemonProc], tiny_model: Path, vllm: RealVllm, tmp_path: Path
) -> None:
    gate = tmp_path / "train-may-finish"
    d = vllm_daemon(
        make_daemon, tiny_model, [vllm.url], trainer=("--wait-file", str(gate)),
        vllm={"sleep_during_training": True, "sleep_level": 1},
    )  # fmt: skip

    def sleeping() -> bool:
        status, body = http("GET", vllm.url + "/is_sleeping")
        assert status == 200, body
        return bool(body["is_sleeping"])

    assert not sleeping()
    t0 = time.monotonic()
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"s{i} plain", good=f"s{i} voiced", key=f"s-{i}")
    poll(sleeping, timeout=60, what="the server asleep while the job trains")
    asleep_s = time.monotonic() - t0
    # the log holds it asleep (intent, outcome) and status shows it
    poll(lambda: "Slept" in [e["type"] for e in d.events()], timeout=30, what="Slept recorded")
    with d.client() as c:
        (shown,) = c.status()["sleeping"]
    assert shown["url"] == vllm.url and shown["phase"] == "asleep" and shown["level"] == 1, shown

    # a completion sent while the server sleeps waits until it wakes
    answer: list[Any] = []
    waiter = threading.Thread(target=lambda: answer.append(vllm.complete(vllm.base_id, "Hi", max_tokens=1)))
    waiter.start()
    waiter.join(timeout=1.0)
    assert answer == [], "a completion was answered by a sleeping server"

    t1 = time.monotonic()
    gate.touch()
    d.wait_jobs(lambda js: bool(js) and js[0]["state"] == "reloaded", timeout=120)
    cycle_s = time.monotonic() - t1
    assert not sleeping()
    kinds = (*SERVER_EVENTS, "TrainingSucceeded", "Reloaded")
    served = [e["type"] for e in d.events() if e["type"] in kinds]
    assert served == ["SleepStarted", "Slept", "WakeStarted", "Woken", "TrainingSucceeded", "Reloaded"]
    with d.client() as c:
        assert c.status()["sleeping"] == []
    waiter.join(timeout=60)
    assert answer and answer[0][0] == 200
    assert voice(d)["served_name"] in vllm.adapters()

    # kill -9 while the server sleeps: the next start wakes it before anything else
    gate.unlink()
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"k{i} plain", good=f"k{i} voiced", key=f"k-{i}")
    poll(sleeping, timeout=60, what="asleep again")
    d.kill()
    assert sleeping()
    gate.touch()
    t2 = time.monotonic()
    d.start()
    poll(lambda: not sleeping(), timeout=60, what="woken after the crash")
    woken_s = time.monotonic() - t2
    # the interrupted job trains again (asleep, then awake) and is served; the server ends awake
    d.wait_jobs(lambda js: len(js) == 2 and all(j["state"] == "reloaded" for j in js), timeout=120)
    assert not sleeping()
    evs = d.events()
    rec = next(  # the first start-up wake
        i for i, e in enumerate(evs) if e["type"] == "WakeStarted" and e["data"]["reason"] == "recovery"
    )
    before = [e["type"] for e in evs[:rec] if e["type"] in SERVER_EVENTS]
    assert before[-2:] == ["SleepStarted", "Slept"] or before[-1] == "SleepStarted", before  # killed asleep
    after = [e for e in evs[rec:] if e["type"] in (*SERVER_EVENTS, "TrainingStarted", "ReloadStarted")]
    assert [e["type"] for e in after[:3]] == ["WakeStarted", "Woken", "TrainingStarted"], after
    assert after[0]["data"] == {"urls": [vllm.url], "reason": "recovery"}
    seen = len(evs)
    d.stop()

    # an older build's marker file (no events): read once at start-up, its server woken, then removed
    assert http("POST", vllm.url + "/sleep?level=1")[0] == 200 and sleeping()
    marker = d.state_dir / "sleeping.json"
    marker.write_text(json.dumps({"job_id": "old-job", "urls": [vllm.url], "at": time.time()}))
    d.start()
    poll(lambda: not sleeping(), timeout=60, what="woken from the old marker")
    assert not marker.exists()

    def adopted_events() -> list[dict[str, Any]]:
        return [e for e in d.events()[seen:] if e["type"] in SERVER_EVENTS]

    # the server answers awake a moment before the daemon records it
    adopted = poll(lambda: (a := adopted_events()) and a[-1]["type"] != "WakeStarted" and a, timeout=30)
    assert [e["type"] for e in adopted] == ["SleepStarted", "WakeStarted", "Woken"], adopted
    assert adopted[0]["data"]["job_id"] == "old-job" and adopted[0]["data"]["urls"] == [vllm.url]
    d.stop()
    print(
        f"\nFIGURE sleep: submit->asleep={asleep_s:.2f}s wake+load after training={cycle_s:.2f}s "
        f"restart_after_kill9->awake={woken_s:.2f}s"
    )


def test_routes_absent_is_one_operator_error_naming_the_env_var(
    make_daemon: Callable[..., DaemonProc], tiny_model: Path, vllm_no_runtime: RealVllm, tmp_path: Path
) -> None:
    """A real server started without VLLM_ALLOW_RUNTIME_LORA_UPDATING: its LoRA routes answer 404;
    a load is one ReloadFailed (retryable false, naming the variable), never a retry storm.

    The daemon trains over the same model under another path (a link): the adapters it writes name
    the base as the server serves it (its base entry's id), as vLLM's filesystem resolver demands."""
    server = vllm_no_runtime
    status, body = http("POST", server.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"})
    assert (status, body) == (404, {"detail": "Not Found"})  # the real answer the daemon classifies
    linked = tmp_path / "same-model"
    linked.symlink_to(tiny_model, target_is_directory=True)
    d = vllm_daemon(make_daemon, linked, [server.url])

    def failures(job_id: str) -> list[dict[str, Any]]:
        return [e for e in d.events() if e["type"] == "ReloadFailed" and e["data"]["job_id"] == job_id]

    jobs_seen = []
    for n in range(2):  # the second job's whole life is the time in which a storm would show
        with d.client() as c:
            for i in range(4):
                c.submit(bad=f"r{n}.{i} plain", good=f"r{n}.{i} voiced", key=f"r-{n}-{i}")
        js = d.wait_jobs(lambda js, n=n: len(js) == n + 1 and all(j["state"] == "promoted" for j in js), 120)
        (new,) = [j["job_id"] for j in js if j["job_id"] not in jobs_seen]
        jobs_seen.append(new)
        poll(lambda new=new: failures(new), timeout=60, what="the load refused")
    for job_id in jobs_seen:
        (fail,) = failures(job_id)
        assert fail["data"]["retryable"] is False, fail
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in fail["data"]["error"], fail
    with d.client() as c:
        (job, *_) = c.jobs()["jobs"]
        assert job["state"] == "promoted" and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in job["error"]
    assert server.alive() and server.adapters() == {}
    for job_id in jobs_seen:  # the served base, written before the manifest hashed the files
        adapter = d.state_dir / "voices" / "default" / "adapters" / job_id
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == server.base_id != str(linked)
        info = manifest.verify(adapter)
        assert info["served_base"] == server.base_id and info["base_model"] == str(linked)
    d.stop()
    print(f"\nFIGURE routes absent: server_start={server.start_seconds[0]:.1f}s (the CI time it adds)")
