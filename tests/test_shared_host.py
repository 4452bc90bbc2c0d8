"""Issue 18, each finding replayed by real local users against a real daemon, and now refused or bounded.

Users (created for the session with ``useradd``, removed after): ``SUB`` is in ``allowed_uids`` (the
submitter role), ``OUT`` is not. The owner (this test process) is the operator.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.attacks import (
    FD_FLOOD,
    P99_BOUND_S,
    WATCH_ATTACK,
    Attack,
    ping_p99,
    rss_kb,
    seed_large_drafts,
    timed_submits,
)
from tests.daemon_proc import poll
from tests.shared_users import PYTHON, ensure_user, remove_user, requests_as, run_code_as

SUB, OUT = "bgd18sub", "bgd18out"


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[int, int]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create and become other users")
    if not Path(PYTHON).is_file():
        pytest.skip(f"{PYTHON} is needed to run a client as another user")
    made = []
    try:
        uids = []
        for name in (SUB, OUT):
            uid, created = ensure_user(name)
            uids.append(uid)
            if created:
                made.append(name)
        yield uids[0], uids[1]
    finally:
        for name in made:
            remove_user(name)


def shared(sub: int, **daemon: Any) -> dict[str, dict[str, Any]]:
    return {"daemon": {"allowed_uids": [sub], **daemon}}


def err(r: dict[str, Any]) -> str:
    assert r.get("ok") is False, r
    return str(r["error"]["code"])


def test_finding1_a_submitter_is_not_an_operator(make_daemon: Any, users: tuple[int, int]) -> None:
    sub, _ = users
    d = make_daemon({**shared(sub, voice_owners={"alice": os.getuid()}), "scheduler": {"min_pairs": 100}})
    with d.client() as c:
        for i in range(4):
            c.submit(bad=f"alice draft {i}", good=f"alice better {i}", voice="alice")
        job = d.wait_job(c.train("alice")["job_id"], ("promoted", "reloaded"))
    got = requests_as(
        sub,
        d.socket,
        [
            {"op": "ping"},
            {"op": "submit", "voice": "mallory", "bad": "m bad", "good": "m good"},
            {"op": "pause"},
            {"op": "pause", "voice": "alice"},
            {"op": "submit", "voice": "alice", "bad": "poison", "good": "poisoned"},
            {"op": "delete_voice", "voice": "alice", "remove_adapters": True},
            {"op": "rollback", "voice": "alice"},
            {"op": "train", "voice": "alice"},
            {"op": "status"},
            {"op": "job", "job_id": job["job_id"]},
            {"op": "jobs"},
            {"op": "voices"},
        ],
    )
    assert got[0]["ok"] and got[1]["ok"], got[:2]
    for r in got[2:10]:
        assert err(r) == "forbidden", r
    assert "operator" in got[2]["error"]["message"] and "submitter" in got[2]["error"]["message"]
    assert got[10]["result"]["jobs"] == []  # alice's jobs are not hers to read
    assert [v["voice"] for v in got[11]["result"]["voices"]] == ["mallory"]
    # her watch shows her own voice only, without idempotency keys
    events = requests_as(sub, d.socket, [{"op": "watch", "from_seq": 0}], watch_lines=1)
    ev = [m["event"] for m in events if "event" in m]
    assert ev and all(e["data"].get("voice") == "mallory" for e in ev), ev
    assert all("key" not in e["data"] for e in ev)
    with d.client() as c:  # nothing of alice's changed; the operator still may do everything
        st = c.status()
        assert st["paused"] is False and st["voices"]["alice"]["paused"] is False
        assert st["voices"]["alice"]["pending_pairs"] == 0
        assert (d.state_dir / "voices" / "alice").is_dir()
        assert c.pause()["paused"] is True


def test_finding3_keys_are_scoped_and_never_a_false_duplicate(
    make_daemon: Any, users: tuple[int, int]
) -> None:
    sub, _ = users
    # the pair must stay pending to be counted there: none is held out (a held-out pair is not pending)
    d = make_daemon({**shared(sub), "training": {"heldout_share": 0.0}})
    key = "acme-merger-memo-rev4"
    theirs = requests_as(
        sub, d.socket, [{"op": "submit", "voice": "mallory", "bad": "x", "good": "y", "key": key}]
    )
    assert theirs[0]["ok"] and theirs[0]["result"]["duplicate"] is False
    with d.client() as c:
        mine = c.submit(bad="ok", good="Sounds good!", voice="alice", key=key)
        assert mine["duplicate"] is False and mine["pair_id"] != theirs[0]["result"]["pair_id"]
        again = c.submit(bad="ok", good="Sounds good!", voice="alice", key=key)
        assert again["duplicate"] is True and again["pair_id"] == mine["pair_id"]
        other = c.pipeline([("submit", {"voice": "alice", "bad": "ok", "good": "Other text", "key": key})])[0]
        assert err(other) == "conflict" and mine["pair_id"] in other["error"]["message"]
        assert c.status()["voices"]["alice"]["pending_pairs"] == 1
    events = d.events()
    pairs = [e for e in events if e["type"] == "PairSubmitted"]
    raw_hash = hashlib.sha256("\x00".join(("alice", "ok", "Sounds good!")).encode()).hexdigest()
    for e in pairs:  # the operator sees keyed hashes only: no raw key, no offline-guessable draft hash
        k = e["data"]["key"]
        assert key not in k and raw_hash not in k and len(k) == 2 + 64, k


def test_finding2_the_watch_attack_is_bounded(make_daemon: Any, users: tuple[int, int]) -> None:
    sub, _ = users
    d = make_daemon(shared(sub, write_timeout_s=30.0), start=False)
    seed_large_drafts(d.state_dir)  # ~30 MB of drafts in the log, before start
    d.start()
    requests_as(
        sub,
        d.socket,
        [{"op": "submit", "voice": "mallory", "bad": f"b{i}", "good": f"g{i}"} for i in range(200)],
    )
    assert d.proc is not None
    pid = d.proc.pid
    base = rss_kb(pid, "VmRSS")
    quiet = ping_p99(d)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from now on: the attack's peak, not the set-up's
    attack = Attack(WATCH_ATTACK, str(d.socket), "8", "32", uid=sub)
    try:
        assert attack.ready["held"] == 8
        p99 = ping_p99(d)
        peak = rss_kb(pid)
    finally:
        attack.stop()
    print(
        f"watch attack: rss base {base / 1024:.0f} MB, peak {peak / 1024:.0f} MB, "
        f"owner ping p99 {p99 * 1000:.1f} ms (quiet {quiet * 1000:.1f} ms)"
    )
    assert peak < 150 * 1024, f"peak RSS {peak / 1024:.0f} MB"
    # every owner ping was answered while the attack held its watches (ping_p99 sends 200); the 50 ms
    # target is a speed target, checked on a quiet machine with BEAGLED_P99_BOUND_MS=50
    if P99_BOUND_S is not None:
        bound = max(P99_BOUND_S, 2 * quiet)
        assert p99 < bound, f"owner ping p99 {p99 * 1000:.1f} ms (quiet {quiet * 1000:.1f} ms)"
    assert "watch" not in d.log_text() or "Traceback" not in d.log_text()


def test_finding4_metrics_flood_cannot_starve_the_daemon(
    make_daemon: Any, users: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = users
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # as under systemd: the daemon inherits 1024
    try:
        d = make_daemon()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert d.proc is not None
    limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
    nofile = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()
    assert int(nofile[3]) > 1024, nofile  # the daemon raised its soft limit
    flood = Attack(FD_FLOOD, str(d.metrics_port), "1100", uid=out)
    try:
        fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        times = timed_submits(d, 5)
        # a scrape still answers, at most a cap's worth of the flood was ever held
        poll(lambda: b"beagled_build_info" in _scrape(d.metrics_port), 10, what="a scrape")
    finally:
        flood.stop()
    print(
        f"fd flood: 1100 connects by another user; daemon fds {fds}; "
        f"owner submits max {max(times) * 1000:.0f} ms"
    )
    assert fds < 200, fds
    assert len(times) == 5  # every owner submit answered (client timeout 5 s) while the flood held on


def _scrape(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


REFUSED_FLOOD = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        pass
    s.close()
print(json.dumps({"done": n}))
"""


def test_finding5_per_client_bounds(make_daemon: Any, users: tuple[int, int]) -> None:
    sub, out = users
    d = make_daemon(
        {
            **shared(sub, max_voices=3, max_connections_per_uid=2, max_pending_per_uid=6),
            "scheduler": {"min_pairs": 100, "max_pairs_per_job": 3},
            "training": {"heldout_share": 0.0},
        }
    )
    got = requests_as(
        sub, d.socket, [{"op": "submit", "voice": f"v{i}", "bad": "b", "good": "g"} for i in range(4)]
    )
    assert [r["ok"] for r in got[:3]] == [True, True, True]
    assert err(got[3]) == "unavailable" and "max_voices" in got[3]["error"]["message"]
    got = requests_as(
        sub, d.socket, [{"op": "submit", "voice": "v0", "bad": f"b{i}", "good": "g"} for i in range(4)]
    )
    assert [r["ok"] for r in got] == [True, True, True, False]  # 6 pending in her voices: the quota
    assert "max_pending_per_uid" in got[3]["error"]["message"]
    # connections per uid: a third concurrent one is refused
    holder = run_code_as(
        sub,
        r"""
import json, socket, sys
path = sys.argv[1]
held = []
for _ in range(2):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path); held.append(s)
    s.sendall(b'{"v":1,"id":1,"op":"ping"}\n'); s.recv(4096)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path)
s.sendall(b'{"v":1,"id":1,"op":"ping"}\n')
print(json.dumps(json.loads(s.recv(4096))))
""",
        str(d.socket),
    )
    assert holder["ok"] is False and "max_connections_per_uid" in holder["error"]["message"], holder
    # a refused peer floods connects: the owner is still served and the log stays short
    run_code_as(out, REFUSED_FLOOD, str(d.socket), "600")
    with d.client(timeout=5) as c:
        assert c.ping()
        # a job takes at most max_pairs_per_job pairs; the rest stay pending
        r = c.train("v0")
        job = c.job(r["job_id"])["job"]
        # (a voice's first job holds one of them back to be judged on: it counts, as for min_pairs)
        assert job["pairs"] + job["sibling_pairs"] == 3 and job["sibling_pairs"] == 1
        assert c.status()["voices"]["v0"]["pending_pairs"] == 1
    refusals = [line for line in d.log_text().splitlines() if "refused" in line]
    assert len(refusals) < 20, len(refusals)


def test_finding6_delete_voice_can_erase_its_drafts(make_daemon: Any) -> None:
    d = make_daemon()
    with d.client() as c:
        c.submit(bad="confidential merger memo", good="the confidential merger memo, rewritten", voice="gone")
        c.submit(  # a chat-shaped pair: its system prompt and conversation go with the drafts
            bad="short reply",
            good="a better reply",
            voice="gone",
            system="secret system prompt of the acquirer",
            messages=[{"role": "user", "content": "summarise the secret board minutes"}],
        )
        c.submit(bad="keep this draft", good="keep this draft, better", voice="kept")
        r = c.delete_voice("gone", erase_drafts=True)
        assert r["drafts_erased"] == 2
    d.stop()
    raw = b"".join(p.read_bytes() for p in d.state_dir.glob("events.sqlite3*"))
    assert b"confidential merger memo" not in raw and b"keep this draft" in raw
    assert b"secret system prompt" not in raw and b"secret board minutes" not in raw
    d.start()  # the redacted log replays
    events = d.events()
    assert events[-1]["type"] == "DraftsErased" and events[-1]["data"] == {"voice": "gone", "pairs": 2}
    with d.client() as c:
        assert [v["voice"] for v in c.voices()["voices"]] == ["kept"]


def test_finding6_a_pipelined_status_sees_the_submit_before_it(make_daemon: Any) -> None:
    d = make_daemon({"training": {"heldout_share": 0.0}})  # the pair is pending, never held out
    with d.client() as c:
        got = c.pipeline(
            [("submit", {"voice": "pipe", "bad": "b", "good": "g"}), ("status", {}), ("voices", {})]
        )
    assert got[1]["result"]["voices"]["pipe"]["pending_pairs"] == 1
    assert [v["voice"] for v in got[2]["result"]["voices"]] == ["pipe"]


_ = threading  # (kept for helpers that may poll from a thread)
