"""Real local users for the shared-host tests (issue 18), created for the session and removed after,
and a standard-library client that runs as one of them (``/usr/bin/python3``, no beagled import)."""

from __future__ import annotations

import json
import pwd
import subprocess
from pathlib import Path
from typing import Any

PYTHON = "/usr/bin/python3"

# argv: socket, JSON list of requests, JSON options. Sends every request on one connection (pipelined),
# then reads responses: ``{"responses": [...]}`` (one per request; a watch request contributes its stream
# lines until ``watch_lines`` of them, or until ``watch_until_seq`` is reached).
CLIENT = r"""
import json, socket, sys, time
path, reqs, opts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(opts.get("timeout", 20))
try:
    s.connect(path)
except OSError as e:
    print(json.dumps({"connect": e.__class__.__name__, "errno": e.errno})); sys.exit(0)
s.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in reqs))
want = opts.get("watch_lines")
until = opts.get("watch_until_seq")
out, buf, answers = [], b"", 0
try:
    while True:
        nl = buf.find(b"\n")
        if nl < 0:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            continue
        line, buf = buf[:nl], buf[nl + 1:]
        msg = json.loads(line)
        out.append(msg)
        if "event" in msg or "progress" in msg:
            if want is not None and sum(1 for m in out if "event" in m or "progress" in m) >= want:
                break
            if until is not None and "event" in msg and msg["event"]["seq"] >= until:
                break
            continue
        answers += 1
        if answers >= len(reqs):
            break
except socket.timeout:
    out.append({"timeout": True})
print(json.dumps({"connect": "ok", "responses": out}))
"""


def ensure_user(name: str) -> tuple[int, bool]:
    """``(uid, created)``: the user, created (no home, no shell) when missing."""
    try:
        return pwd.getpwnam(name).pw_uid, False
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot create user {name}: {done.stderr.strip()}")
    return pwd.getpwnam(name).pw_uid, True


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, check=False)


def run_code_as(uid: int, code: str, *args: str, timeout: float = 60.0) -> Any:
    gid = pwd.getpwuid(uid).pw_gid
    done = subprocess.run(
        [PYTHON, "-c", code, *args],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def requests_as(uid: int, sock: Path, reqs: list[dict[str, Any]], **opts: Any) -> list[dict[str, Any]]:
    """Send ``reqs`` (``{"op": ..., fields}``; ``v`` and ``id`` added) as ``uid``; the responses."""
    full = [{"v": 1, "id": i + 1, **r} for i, r in enumerate(reqs)]
    out = run_code_as(uid, CLIENT, str(sock), json.dumps(full), json.dumps(opts))
    assert out["connect"] == "ok", out
    return out["responses"]  # type: ignore[no-any-return]
