"""Every reloader end to end through a real ``beagled serve`` process: submitted pairs → a job trained
by the fake subprocess trainer → promoted → ``reloaded`` on a vLLM stand-in, a real sshd, or a local
command; plus what happens when the server is down, restarts, or the daemon dies mid-reload."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from beagled import manifest
from tests.daemon_proc import DaemonProc, free_port, poll, to_toml
from tests.sshd import Sshd, available, running_sshd
from tests.vllm_standin import VllmStandin

# --- helpers ---------------------------------------------------------------------------------------


def submit_n(d: DaemonProc, n: int, voice: str = "default", start: int = 0) -> list[dict[str, Any]]:
    with d.client() as c:
        return [
            c.submit(bad=f"draft {i} plain", good=f"draft {i} in voice", voice=voice, key=f"{voice}-{i}")
            for i in range(start, start + n)
        ]


def job_events(d: DaemonProc, job_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e["type"] == kind and e["data"].get("job_id") == job_id]


def new_job(d: DaemonProc, n: int, state: str = "reloaded", timeout: float = 30.0) -> dict[str, Any]:
    """Submit 4 pairs (min_pairs) and wait until the job they make is in ``state``; returns it."""
    with d.client() as c:
        before = {j["job_id"] for j in c.jobs(limit=1000)["jobs"]}
    submit_n(d, 4, start=4 * n)
    js = d.wait_jobs(lambda js: any(j["job_id"] not in before for j in js), timeout)
    (jid,) = [j["job_id"] for j in js if j["job_id"] not in before]
    return d.wait_job(jid, (state,), timeout)


def adapter_dir(d: DaemonProc, job_id: str, voice: str = "default") -> Path:
    return d.state_dir / "voices" / voice / "adapters" / job_id


def voice_info(d: DaemonProc, voice: str = "default") -> dict[str, Any]:
    with d.client() as c:
        (v,) = [v for v in c.voices()["voices"] if v["voice"] == voice]
    return v  # type: ignore[no-any-return]


def status(d: DaemonProc) -> dict[str, Any]:
    with d.client() as c:
        return c.status()


def load_successes(standin: VllmStandin, name: str) -> int:
    return sum(
        1
        for r in standin.requests
        if r.path == "/v1/load_lora_adapter" and r.status == 200 and r.body.get("lora_name") == name
    )


def standin_on_port(port: int, **kw: Any) -> VllmStandin:
    """A stand-in bound to a given port (the "server comes back" case): rebind its HTTP server."""
    s = VllmStandin(**kw)
    s._server.server_close()
    s._server = ThreadingHTTPServer(("127.0.0.1", port), s._handler_class())
    s._server.daemon_threads = True
    s._thread = threading.Thread(target=s._server.serve_forever, args=(0.05,), daemon=True)
    return s.start()


@pytest.fixture
def standin() -> Iterator[VllmStandin]:
    with VllmStandin() as s:
        yield s


def vllm_tables(url: str, **vllm: Any) -> dict[str, dict[str, Any]]:
    return {
        "training": {"heldout_share": 0.0},
        "reload": {
            "method": "vllm",
            "reconcile_interval_s": 3600.0,
            "retry_backoff_s": 0.1,
            "retry_backoff_max_s": 0.4,
        },
        "reload.vllm": {"url": url, "timeout_s": 2.0, **vllm},
    }


# --- vLLM ------------------------------------------------------------------------------------------


def test_vllm_versioned_names_served_json_and_keep(make_daemon: Any, standin: VllmStandin) -> None:
    d = make_daemon(vllm_tables(standin.url, keep=2))
    j1 = new_job(d, 0)
    assert j1["served_name"] == "default-v0001"
    v = voice_info(d)
    assert v["served_name"] == "default-v0001" and v["current_job"] == j1["job_id"]
    # the fake trainer's PEFT-shaped adapter passed the stand-in's PEFT checks, from the job's own dir
    assert standin.adapters == {"default-v0001": str(adapter_dir(d, j1["job_id"]))}
    served = json.loads((d.state_dir / "voices" / "default" / "served.json").read_text())
    assert served["served_name"] == "default-v0001" and served["job_id"] == j1["job_id"]
    assert served["version"] == 1 and served["method"] == "vllm"
    assert served["adapter_path"] == str(adapter_dir(d, j1["job_id"]))
    models = json.loads(_get(standin.url + "/v1/models"))["data"]
    listed = {m["id"]: m for m in models}
    assert listed["default-v0001"]["root"] == str(adapter_dir(d, j1["job_id"]))
    assert listed["default-v0001"]["parent"] == standin.base_model

    j2 = new_job(d, 1)
    assert j2["served_name"] == "default-v0002" and voice_info(d)["served_name"] == "default-v0002"
    # keep = 2: the previous version stays loaded until the next one
    assert set(standin.adapters) == {"default-v0001", "default-v0002"}
    j3 = new_job(d, 2)
    assert standin.adapters == {
        "default-v0002": str(adapter_dir(d, j2["job_id"])),
        "default-v0003": str(adapter_dir(d, j3["job_id"])),
    }
    durations = [e["data"]["duration_s"] for e in d.events() if e["type"] == "Reloaded"]
    print(f"\nvllm reload durations (s): {[round(x, 4) for x in durations]}")
    assert len(durations) == 3


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def test_vllm_fixed_naming_swaps_one_name(make_daemon: Any, standin: VllmStandin) -> None:
    d = make_daemon(vllm_tables(standin.url, naming="fixed"))
    j1 = new_job(d, 0)
    assert j1["served_name"] == "default" and voice_info(d)["served_name"] == "default"
    assert standin.adapters == {"default": str(adapter_dir(d, j1["job_id"]))}
    j2 = new_job(d, 1)
    assert voice_info(d)["served_name"] == "default"
    assert standin.adapters == {"default": str(adapter_dir(d, j2["job_id"]))}


def test_vllm_path_map_gives_the_server_its_own_view(
    make_daemon: Any, standin: VllmStandin, tmp_path: Path
) -> None:
    d = make_daemon(vllm_tables(standin.url), start=False)
    mount = tmp_path / "mnt-adapters"  # what a container would see: the voices dir mounted elsewhere
    (d.state_dir / "voices").mkdir(parents=True)
    mount.symlink_to(d.state_dir / "voices")
    d.tables["reload.vllm"]["path_map"] = [[str(d.state_dir / "voices"), str(mount)]]
    d.config.write_text(to_toml(d.tables))
    d.start()
    j1 = new_job(d, 0)
    assert standin.adapters == {"default-v0001": f"{mount}/default/adapters/{j1['job_id']}"}


def test_vllm_restart_is_reconciled(make_daemon: Any, standin: VllmStandin) -> None:
    tables = vllm_tables(standin.url)
    tables["reload"]["reconcile_interval_s"] = 0.5
    d = make_daemon(tables)
    j1 = new_job(d, 0)
    want = {"default-v0001": str(adapter_dir(d, j1["job_id"]))}
    assert standin.adapters == want
    seq = d.events()[-1]["seq"]
    t0 = time.monotonic()
    standin.restart()  # vLLM restarted: runtime adapters are gone
    poll(lambda: standin.adapters == want, 10, 0.01, "adapter loaded again after the restart")
    reserve_s = time.monotonic() - t0
    print(f"\ntime to re-serve after a vLLM restart: {reserve_s:.3f} s (reconcile_interval_s = 0.5)")
    assert reserve_s < 5
    later = poll(
        lambda: [e for e in d.events(seq) if e["type"] == "Reloaded"], 10, what="reconcile Reloaded event"
    )
    assert later[0]["data"]["reason"] == "reconcile" and later[0]["data"]["job_id"] == j1["job_id"]
    assert d.wait_job(j1["job_id"], ("reloaded",))["served_name"] == "default-v0001"


def test_vllm_outage_after_serving_backs_off(make_daemon: Any, standin: VllmStandin) -> None:
    tables = vllm_tables(standin.url)
    tables["reload"].update(reconcile_interval_s=0.1, retry_backoff_s=1.0, retry_backoff_max_s=30.0)
    d = make_daemon(tables)
    j1 = new_job(d, 0)
    seq = d.events()[-1]["seq"]
    standin.fail_next(503, 1_000_000)  # the server is up but failing from now on

    def failures() -> list[dict[str, Any]]:
        return [e for e in d.events(seq) if e["type"] == "ReloadFailed"]

    fails = poll(lambda: f if len(f := failures()) >= 3 else None, 30, what="three failures")
    assert all(e["data"]["job_id"] == j1["job_id"] for e in fails)
    # backoff 1 s, 2 s, ...: the retries are spaced by the backoff, not one per 0.1 s reconcile interval.
    # The gaps are read from the recorded times, so a loaded machine can only make them longer.
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(fails)]
    assert gaps[0] >= 1.0 - 0.05 and gaps[1] >= 2.0 - 0.05, gaps


def test_vllm_down_during_promotion_retries_then_serves(make_daemon: Any) -> None:
    port = free_port()  # nothing listens there yet: the server is down
    d = make_daemon(vllm_tables(f"http://127.0.0.1:{port}"))
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted")
    jid = job["job_id"]
    fails = poll(lambda: (f := job_events(d, jid, "ReloadFailed")) and len(f) >= 3 and f, 20)
    assert all("unreachable" in f["data"]["error"] for f in fails), fails
    waits = [f["data"]["retry_at"] - f["at"] for f in fails[:3]]
    assert waits[0] < waits[1] < waits[2] or waits[2] == pytest.approx(0.4), waits  # backoff, capped
    with d.client() as c:
        assert c.job(jid)["job"]["state"] == "promoted"
        c.pause()  # the pairs below must not make jobs of their own
        lat = []
        for i in range(30):
            t = time.perf_counter()
            c.submit(bad=f"x{i}", good=f"y{i}", voice="busy")
            lat.append(time.perf_counter() - t)
    assert max(lat) < 0.5, lat
    s = standin_on_port(port)  # the server comes back
    try:
        done = d.wait_job(jid, ("reloaded",), 15)
        assert done["served_name"] == "default-v0001"
        assert s.adapters == {"default-v0001": str(adapter_dir(d, jid))}
    finally:
        s.close()


def test_vllm_without_runtime_updating_names_the_env_var(make_daemon: Any) -> None:
    with VllmStandin(runtime_updating=False) as s:
        d = make_daemon(vllm_tables(s.url))
        submit_n(d, 4)
        (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted")
        (fail, *_) = poll(lambda: job_events(d, job["job_id"], "ReloadFailed"), 15)
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in fail["data"]["error"]
        with d.client() as c:
            j = c.job(job["job_id"])["job"]
            assert j["state"] == "promoted" and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in j["error"]
        assert s.adapters == {}


def test_vllm_rollback_serves_the_earlier_version(make_daemon: Any, standin: VllmStandin) -> None:
    d = make_daemon(vllm_tables(standin.url))
    j1 = new_job(d, 0)
    new_job(d, 1)
    assert voice_info(d)["served_name"] == "default-v0002"
    with d.client() as c:
        assert c.rollback("default")["job_id"] == j1["job_id"]
    poll(lambda: voice_info(d)["served_name"] == "default-v0001", 15, what="rollback served")
    assert standin.adapters == {"default-v0001": str(adapter_dir(d, j1["job_id"]))}
    served = json.loads((d.state_dir / "voices" / "default" / "served.json").read_text())
    assert served["served_name"] == "default-v0001" and served["job_id"] == j1["job_id"]
    rb = [e for e in job_events(d, j1["job_id"], "Reloaded") if e["data"]["reason"] == "rollback"]
    assert len(rb) == 1


def test_killed_after_reload_before_its_event_serves_exactly_once(
    make_daemon: Any, standin: VllmStandin
) -> None:
    d = make_daemon(vllm_tables(standin.url), start=False)
    d.start(env={"BEAGLED_FAULTS": "after_reload_before_event:kill"})  # this start only
    submit_n(d, 4)
    assert d.wait_exit(30) == -signal.SIGKILL
    assert list(standin.adapters) == ["default-v0001"]  # the reload happened, its outcome was not logged
    d.start()
    assert "BEAGLED_FAULTS" not in d.env
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "reloaded")
    assert standin.adapters == {"default-v0001": str(adapter_dir(d, job["job_id"]))}
    assert load_successes(standin, "default-v0001") == 1
    with d.client() as c:
        hist = [h["event"] for h in c.job(job["job_id"])["job"]["history"]]
    assert hist[-3:] == ["ReloadStarted", "ReloadStarted", "Reloaded"]


# --- command ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "timeout_s", "expect"),
    [
        (["sh", "-c", "echo nope >&2; exit 1"], 10.0, "exit status 1"),
        (["sleep", "30"], 0.5, "did not finish within the 0.5 s timeout"),
    ],
    ids=["exit1", "hang"],
)
def test_command_failure_leaves_the_job_promoted(
    make_daemon: Any, argv: list[str], timeout_s: float, expect: str
) -> None:
    d = make_daemon(
        {
            "training": {"heldout_share": 0.0},
            "reload": {"method": "command", "reconcile_interval_s": 3600.0, "retry_backoff_s": 0.2},
            "reload.command": {"argv": argv, "timeout_s": timeout_s},
        }
    )
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted")
    (fail, *_) = poll(lambda: job_events(d, job["job_id"], "ReloadFailed"), 15)
    assert expect in fail["data"]["error"], fail
    with d.client() as c:
        assert c.ping()["version"]
        assert c.job(job["job_id"])["job"]["state"] == "promoted"
        assert c.submit(bad="still", good="answering")["duplicate"] is False


# --- ssh -------------------------------------------------------------------------------------------

RESTART = textwrap.dedent(
    """
    import json, os, sys
    with open(sys.argv[1], "a", encoding="utf-8") as f:
        f.write(json.dumps({"argv": sys.argv[2:], "cwd": os.getcwd()}) + "\\n")
    """
)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    why = available()
    if why is not None:
        pytest.skip(why)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def ssh_tables(sshd: Sshd, tmp: Path, known_hosts: Path) -> tuple[dict[str, Any], Path, Path]:
    script = tmp / "restart.py"
    script.write_text(RESTART)
    calls = tmp / "restarts.log"
    remote = tmp / "remote"
    tables = {
        "training": {"heldout_share": 0.0},
        "reload": {
            "method": "ssh",
            "reconcile_interval_s": 0.5,
            "retry_backoff_s": 0.2,
            "retry_backoff_max_s": 1.0,
        },
        "reload.ssh": {
            "host": sshd.host,
            "port": sshd.port,
            "user": sshd.user,
            "identity_file": str(sshd.identity_file),
            "known_hosts": str(known_hosts),
            "remote_dir": str(remote),
            "command": [sys.executable, str(script), str(calls), "{adapter_dir}", "{voice}"],
            "timeout_s": 20.0,
        },
    }
    return tables, calls, remote


def test_ssh_uploads_switches_current_and_restarts_once(make_daemon: Any, sshd: Sshd, tmp_path: Path) -> None:
    tables, calls, remote = ssh_tables(sshd, tmp_path, sshd.known_hosts)
    d = make_daemon(tables)
    job = new_job(d, 0)
    jid = job["job_id"]
    assert job["served_name"] == "default"
    current = remote / "default" / "current"
    assert current.is_symlink() and os.readlink(current) == jid
    uploaded = manifest.verify(current.resolve())  # every file's sha256 matches the manifest
    local = manifest.verify(adapter_dir(d, jid))
    assert uploaded["files"] == local["files"] and uploaded["job_id"] == jid
    runs = [json.loads(x) for x in calls.read_text().splitlines()]
    assert runs == [{"argv": [str(remote / "default" / jid), "default"], "cwd": runs[0]["cwd"]}]
    (reloaded,) = job_events(d, jid, "Reloaded")
    print(f"\nssh reload duration: {reloaded['data']['duration_s']:.3f} s")

    assert d.stop() == 0
    d.start()
    # wait for the restarted daemon's reconcile pass to verify the voice; it must not restart again
    poll(lambda: status(d)["voices"]["default"]["last_verified_at"] is not None, 15, what="verified")
    assert len(calls.read_text().splitlines()) == 1
    assert d.wait_job(jid, ("reloaded",))["served_name"] == "default"


def test_ssh_wrong_host_key_is_refused_without_leaking_the_key(
    make_daemon: Any, sshd: Sshd, tmp_path: Path
) -> None:
    tables, calls, remote = ssh_tables(sshd, tmp_path, sshd.wrong_known_hosts)
    d = make_daemon(tables)
    submit_n(d, 4)
    (job,) = d.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] == "promoted")
    fails = poll(lambda: (f := job_events(d, job["job_id"], "ReloadFailed")) and len(f) >= 2 and f, 15)
    assert "host key" in fails[0]["data"]["error"], fails[0]
    assert not calls.exists() and not (remote / "default").exists()
    with d.client() as c:
        status = json.dumps(c.status())
        jobtext = json.dumps(c.job(job["job_id"]))
    key_text = sshd.identity_file.read_text()
    secret_lines = [ln for ln in key_text.splitlines() if ln and not ln.startswith("-----")]
    assert secret_lines
    everything = "\n".join([d.log_text(), json.dumps(d.events()), status, jobtext])
    for line in secret_lines:
        assert line not in everything
    assert "PRIVATE KEY" not in everything
