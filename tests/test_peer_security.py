"""Who may talk to the daemon, shown with a second, real user (``beagletest``, created if missing).

(a) default config: the socket is 0600 in a 0700 directory, so another user cannot even connect (EACCES);
(b) a peer whose uid is not in ``allowed_uids`` but can reach the socket is answered ``forbidden``, both
    when the test opens the socket up by hand and when the daemon widens it itself (``allowed_uids``
    names another uid: socket 0666, directory 0711);
(c) a uid in ``allowed_uids`` is served.
The client runs as that user in a subprocess (``/usr/bin/python3``, standard library only).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProc
from tests.shared_users import PYTHON, ensure_user, run_code_as

USER = "beagletest"
CLIENT = r"""
import json, socket, sys
path, payload = sys.argv[1], sys.argv[2].encode() + b"\n"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(path)
except OSError as e:
    print(json.dumps({"connect": e.__class__.__name__, "errno": e.errno}))
    sys.exit(0)
s.sendall(payload)
buf = b""
while b"\n" not in buf:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(json.dumps({"connect": "ok", "response": json.loads(buf) if buf.strip() else None}))
"""
READER = r"""
import json, sys
try:
    open(sys.argv[1], "rb").read(16)
    print(json.dumps({"read": "ok"}))
except OSError as e:
    print(json.dumps({"read": e.__class__.__name__}))
"""


@pytest.fixture(scope="session")
def other_uid() -> int:
    if os.geteuid() != 0:
        pytest.skip("needs root to create and become a second user")
    if not Path(PYTHON).is_file():
        pytest.skip(f"{PYTHON} is needed to run a client as another user")
    try:
        return ensure_user(USER)[0]
    except RuntimeError as e:
        pytest.skip(str(e))


def run_as(uid: int, code: str, *args: str) -> dict[str, Any]:
    return run_code_as(uid, code, *args, timeout=30)  # type: ignore[no-any-return]


def ping_as(uid: int, sock: Path) -> dict[str, Any]:
    return run_as(uid, CLIENT, str(sock), json.dumps({"v": 1, "id": 1, "op": "ping"}))


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_default_config_another_user_cannot_connect(make_daemon: Any, other_uid: int) -> None:
    d = make_daemon()
    assert mode(d.socket) == 0o600 and mode(d.socket.parent) == 0o700
    out = ping_as(other_uid, d.socket)
    assert out == {"connect": "PermissionError", "errno": 13}
    with d.client() as c:  # the owner is served
        assert c.ping()


def test_a_peer_not_in_allowed_uids_is_forbidden(make_daemon: Any, other_uid: int) -> None:
    d = make_daemon({"daemon": {"allowed_uids": [os.getuid()]}})
    assert mode(d.socket) == 0o600  # only its own uid allowed: nothing is widened
    os.chmod(d.socket.parent, 0o711)  # the test opens the way by hand: the uid check must still hold
    os.chmod(d.socket, 0o666)
    out = ping_as(other_uid, d.socket)
    assert out["connect"] == "ok"
    assert out["response"]["ok"] is False and out["response"]["error"]["code"] == "forbidden", out
    assert "refused a peer" in d.log_text()


def test_widened_socket_still_forbids_uids_not_listed(make_daemon: Any, other_uid: int) -> None:
    d = make_daemon({"daemon": {"allowed_uids": [os.getuid(), other_uid + 1]}})
    assert mode(d.socket) == 0o666 and mode(d.socket.parent) == 0o711
    out = ping_as(other_uid, d.socket)
    assert out["connect"] == "ok" and out["response"]["error"]["code"] == "forbidden", out


def test_an_allowed_uid_is_served(make_daemon: Any, other_uid: int) -> None:
    d = make_daemon({"daemon": {"allowed_uids": [os.getuid(), other_uid]}})
    out = ping_as(other_uid, d.socket)
    assert out["connect"] == "ok" and out["response"]["ok"] is True, out
    sub = run_as(
        other_uid,
        CLIENT,
        str(d.socket),
        json.dumps({"v": 1, "id": 2, "op": "submit", "bad": "b", "good": "g", "key": "other-user"}),
    )
    assert sub["response"]["ok"] is True and sub["response"]["result"]["duplicate"] is False, sub
    # and narrowing the config again closes the door at the next start
    d.stop()
    d.tables["daemon"]["allowed_uids"] = []
    from tests.daemon_proc import to_toml

    d.config.write_text(to_toml(d.tables))
    d.start()
    assert mode(d.socket) == 0o600 and mode(d.socket.parent) == 0o700
    assert ping_as(other_uid, d.socket)["connect"] == "PermissionError"


@pytest.fixture
def open_state_dir() -> Iterator[Path]:
    """A state dir that other users could reach (its parent is 0711), socket at its default place."""
    top = Path(tempfile.mkdtemp(prefix="bgp", dir="/tmp"))
    top.chmod(0o711)
    yield top / "st"
    shutil.rmtree(top, ignore_errors=True)


def test_widening_the_state_dir_exposes_no_state_files(
    make_daemon: Any, other_uid: int, open_state_dir: Path, tmp_path: Path
) -> None:
    """With the socket at its default place (``<state_dir>/beagled.sock``) widening makes the state
    dir traversable (0711): every file in it must then be private, or the event log (every draft) is
    readable by anyone who knows its name."""
    (tmp_path / "base").mkdir()
    d = DaemonProc(
        tmp_path,
        {
            "daemon": {"state_dir": str(open_state_dir), "socket": "", "allowed_uids": [0, other_uid]},
            "training": {"backends": ["fake"], "base_model": str(tmp_path / "base")},
            "training.custom_backends": {"fake": ["/bin/false"]},
        },
    )
    d.socket = open_state_dir / "beagled.sock"
    try:
        d.start()
        with d.client() as c:
            c.submit(bad="a private draft", good="another private draft")
        assert ping_as(other_uid, d.socket)["response"]["ok"] is True
        leaks = {}
        for p in sorted(open_state_dir.rglob("*")):
            if p.is_file() and not p.is_symlink():
                got = run_as(other_uid, READER, str(p))["read"]
                if got == "ok":
                    leaks[p.name] = oct(mode(p))
        assert not leaks, f"readable by uid {other_uid} once the state dir is widened: {leaks}"
    finally:
        d.close()
