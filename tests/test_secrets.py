"""No SSH key material leaks: with the ssh reloader pointed at a host that refuses (a closed port), or
given a corrupt key, neither the private key text nor any run of its base64 body (nor the public key's
blob) appears in the daemon's logs, its events (``watch`` from 0), ``status`` or ``/metrics``."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import free_port, poll

WINDOW = 16  # any run of this many base64 characters of the key counts as a leak


def keygen(tmp: Path) -> tuple[Path, str, str]:
    key = tmp / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "beagle-secret-test", "-f", str(key)],
        check=True,
    )
    text = key.read_text()
    body = "".join(ln for ln in text.splitlines() if ln and not ln.startswith("-----"))
    blob = key.with_suffix(".pub").read_text().split()[1]
    return key, body, blob


def windows(s: str) -> set[str]:
    return {s[i : i + WINDOW] for i in range(len(s) - WINDOW + 1)}


@pytest.mark.parametrize("key_state", ["valid", "corrupt"])
def test_no_key_material_in_logs_events_status_or_metrics(
    make_daemon: Any, tmp_path: Path, key_state: str
) -> None:
    if subprocess.run(["which", "ssh-keygen"], capture_output=True, check=False).returncode:
        pytest.skip("ssh-keygen is not installed")
    key, body, blob = keygen(tmp_path)
    if key_state == "corrupt":  # a key the SSH library cannot parse: its error must not quote it
        lines = key.read_text().splitlines()
        lines[2] = lines[2][::-1]
        key.write_text("\n".join(lines) + "\n")
        body = "".join(ln for ln in lines if ln and not ln.startswith("-----"))
    known = tmp_path / "known_hosts"
    known.write_text("")
    d = make_daemon(
        {
            "daemon": {"log_level": "debug"},
            "training": {"heldout_share": 0.0},
            "reload": {"method": "ssh", "retry_backoff_s": 0.1, "retry_backoff_max_s": 0.2},
            "reload.ssh": {
                "host": "127.0.0.1",
                "port": free_port(),  # nothing listens: refused
                "user": "beagle",
                "identity_file": str(key),
                "known_hosts": str(known),
                "timeout_s": 5.0,
            },
        }
    )
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"bad {i}", good=f"good {i}")
    poll(
        lambda: sum(e["type"] == "ReloadFailed" for e in d.events()) >= 2,
        60,
        0.2,
        "two failed reloads",
    )
    evs = d.events()
    errors = [e["data"].get("error", "") for e in evs if e["type"] == "ReloadFailed"]
    assert all(errors), evs
    with d.client() as c:
        status = json.dumps(c.status())
        voices = json.dumps(c.voices())
        jobs = json.dumps([c.job(j["job_id"]) for j in c.jobs()["jobs"]])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).read().decode()
    d.stop()
    places = {
        "logs": d.log_text(),
        "events": json.dumps(evs),
        "status": status,
        "voices": voices,
        "jobs": jobs,
        "metrics": metrics,
    }
    secret = windows(body) | windows(blob)
    for where, text in places.items():
        assert "PRIVATE KEY" not in text, f"private key text in {where}"
        hits = [w for w in secret if w in text]
        assert not hits, f"key material in {where}: {hits[:3]}"
    print(f"\n{key_state} key: reload errors look like: {errors[0][:200]!r}")
