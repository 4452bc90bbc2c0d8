"""The ssh reloader against a real private sshd on 127.0.0.1 (tests/sshd.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from beagled.errors import ConfigError, ReloadError
from beagled.manifest import file_hashes
from beagled.reload import ReloadConfigError, ServeTarget
from beagled.reload.ssh import SshReloader
from tests.sshd import Sshd, available, process_alive, running_sshd, wait_until
from tests.vllm_standin import make_peft_adapter

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

RESTART = textwrap.dedent(
    """
    import json, os, sys, time
    log = sys.argv[1]
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"argv": sys.argv[2:], "cwd": os.getcwd(), "pid": os.getpid()}) + "\\n")
    mode = open(log + ".mode").read().strip() if os.path.exists(log + ".mode") else ""
    if mode == "fail":
        print("Error response from daemon: no such service: vllm", file=sys.stderr)
        sys.exit(4)
    if mode == "hang":
        time.sleep(600)
    """
)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


class Health:
    """A tiny HTTP server: answers 503 to the first ``fail_first`` GETs, then 200."""

    def __init__(self, fail_first: int = 2) -> None:
        self.fail_first = fail_first
        self.hits = 0
        health = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                health.hits += 1
                self.send_response(200 if health.hits > health.fail_first else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def health() -> Iterator[Health]:
    server = Health()
    yield server
    server.close()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    script = tmp_path / "restart.py"
    script.write_text(RESTART, encoding="utf-8")
    workdir = tmp_path / "compose dir 'x'"
    workdir.mkdir()
    return {
        "script": script,
        "log": tmp_path / "restarts.jsonl",
        "remote": tmp_path / "remote",
        "workdir": workdir,
    }


def target(tmp_path: Path, version: int, voice: str = "default") -> ServeTarget:
    job_id = f"j-{version:03d}"
    adapter = tmp_path / "local" / voice / "adapters" / job_id
    if not adapter.exists():
        make_peft_adapter(adapter, job_id=job_id, voice=voice, seed=version)
    return ServeTarget(voice=voice, version=version, job_id=job_id, adapter_dir=adapter)


def reloader(sshd: Sshd, setup: dict[str, Path], **kw: Any) -> SshReloader:
    args: dict[str, Any] = {
        "remote_dir": str(setup["remote"]),
        "command": [
            sys.executable,
            str(setup["script"]),
            str(setup["log"]),
            "two words",
            'it\'s "quoted"',
            "$HOME; touch /tmp/pwned",
            "{voice}",
            "{adapter_dir}",
        ],
        "workdir": str(setup["workdir"]),
        "timeout_s": 30.0,
        "health_timeout_s": 10.0,
    }
    args.update(kw)
    return SshReloader(sshd.host, sshd.port, sshd.user, sshd.identity_file, sshd.known_hosts, **args)


def set_mode(setup: dict[str, Path], mode: str) -> None:
    Path(str(setup["log"]) + ".mode").write_text(mode)


def restarts(setup: dict[str, Path]) -> list[dict[str, Any]]:
    log = setup["log"]
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


async def test_upload_swap_restart_health(
    sshd: Sshd, setup: dict[str, Path], health: Health, tmp_path: Path
) -> None:
    r = reloader(sshd, setup, health_url=health.url)
    try:
        t1, t2 = target(tmp_path, 1), target(tmp_path, 2)
        assert not await r.verify(t1)
        start = trio.current_time()
        assert await r.reload(t1) == "default"
        print(f"ssh reload (upload+swap+command+health) took {trio.current_time() - start:.3f} s")
        voice_dir = setup["remote"] / "default"
        assert file_hashes(voice_dir / "j-001") == file_hashes(t1.adapter_dir)
        assert (voice_dir / "j-001" / "manifest.json").read_bytes() == (
            t1.adapter_dir / "manifest.json"
        ).read_bytes()
        assert os.readlink(voice_dir / "current") == "j-001"
        assert health.hits == 3  # polled through two 503s
        [call] = restarts(setup)
        assert call["argv"] == [
            "two words",
            'it\'s "quoted"',
            "$HOME; touch /tmp/pwned",
            "default",
            str(voice_dir / "j-001"),
        ]
        assert call["cwd"] == str(setup["workdir"])
        assert not await trio.Path("/tmp/pwned").exists()
        assert await r.verify(t1)

        await r.reload(t2)
        assert os.readlink(voice_dir / "current") == "j-002"
        assert len(restarts(setup)) == 2
        assert await r.verify(t2)
        assert not await r.verify(t1)
        assert sorted(p.name for p in voice_dir.iterdir()) == ["current", "j-001", "j-002"]
    finally:
        await r.aclose()


async def test_rerun_after_crash_ends_in_the_same_state(
    sshd: Sshd, setup: dict[str, Path], tmp_path: Path
) -> None:
    r = reloader(sshd, setup)
    try:
        t1 = target(tmp_path, 1)
        voice_dir = setup["remote"] / "default"
        voice_dir.mkdir(parents=True)
        # a crash mid-upload left a temp dir and a temp link behind; a crash after the rename left a
        # corrupted final dir (say, a disk error)
        (voice_dir / ".j-001.tmp-dead").mkdir()
        (voice_dir / ".j-001.tmp-dead" / "adapter_config.json").write_text("{}")
        (voice_dir / ".current.tmp-dead").symlink_to("nowhere")
        await r.reload(t1)
        (voice_dir / "j-001" / "adapter_model.safetensors").write_bytes(b"corrupt")
        await r.reload(t1)
        await r.reload(t1)
        assert sorted(p.name for p in voice_dir.iterdir()) == ["current", "j-001"]
        assert file_hashes(voice_dir / "j-001") == file_hashes(t1.adapter_dir)
        assert os.readlink(voice_dir / "current") == "j-001"
        assert len(restarts(setup)) == 3  # once per reload call
    finally:
        await r.aclose()


async def test_unknown_host_key_is_refused(sshd: Sshd, setup: dict[str, Path], tmp_path: Path) -> None:
    for known_hosts in (sshd.wrong_known_hosts, tmp_path / "empty_known_hosts"):
        known_hosts.touch()
        r = SshReloader(
            sshd.host,
            sshd.port,
            sshd.user,
            sshd.identity_file,
            known_hosts,
            remote_dir=str(setup["remote"]),
            command=["true"],
            timeout_s=30,
        )
        try:
            with pytest.raises(ReloadError, match=r"host key of 127\.0\.0\.1") as info:
                await r.reload(target(tmp_path, 1))
            assert not info.value.retryable
            assert not await r.verify(target(tmp_path, 1))
        finally:
            await r.aclose()
    assert not setup["remote"].exists()
    assert restarts(setup) == []


def test_known_hosts_is_required(sshd: Sshd) -> None:
    with pytest.raises(ConfigError, match="known_hosts") as info:
        SshReloader(sshd.host, sshd.port, sshd.user, sshd.identity_file, "")
    assert isinstance(info.value, ReloadError)
    assert isinstance(info.value, ReloadConfigError)
    assert not info.value.retryable


async def test_missing_known_hosts_file(sshd: Sshd, tmp_path: Path) -> None:
    r = SshReloader(sshd.host, sshd.port, sshd.user, sshd.identity_file, tmp_path / "nope", command=["true"])
    with pytest.raises(ReloadError, match="does not exist") as info:
        await r.reload(target(tmp_path, 1))
    assert not info.value.retryable
    await r.aclose()


async def test_wrong_client_key(sshd: Sshd, setup: dict[str, Path], tmp_path: Path) -> None:
    r = SshReloader(
        sshd.host,
        sshd.port,
        sshd.user,
        sshd.known_hosts.parent / "other_host_ed25519",
        sshd.known_hosts,
        command=["true"],
    )
    try:
        with pytest.raises(ReloadError, match="refused the key") as info:
            await r.reload(target(tmp_path, 1))
        assert not info.value.retryable
        assert "PRIVATE KEY" not in str(info.value)
    finally:
        await r.aclose()


async def test_failing_command_reports_stderr(sshd: Sshd, setup: dict[str, Path], tmp_path: Path) -> None:
    set_mode(setup, "fail")
    r = reloader(sshd, setup)
    try:
        with pytest.raises(ReloadError, match="exit status 4") as info:
            await r.reload(target(tmp_path, 1))
        assert info.value.retryable
        assert "no such service: vllm" in str(info.value)
        # the adapter is in place even though the restart failed: a retry only reruns the command
        assert os.readlink(setup["remote"] / "default" / "current") == "j-001"
    finally:
        await r.aclose()


async def test_hanging_command_is_cut_by_timeout(sshd: Sshd, setup: dict[str, Path], tmp_path: Path) -> None:
    set_mode(setup, "hang")
    r = reloader(sshd, setup, timeout_s=3.0)
    try:
        start = trio.current_time()
        with pytest.raises(ReloadError, match="did not finish within the 3 s timeout") as info:
            await r.reload(target(tmp_path, 1))
        assert trio.current_time() - start < 3.0 + 6.0
        assert info.value.retryable
        # the remote command was signalled: poll until it is gone
        [call] = restarts(setup)
        await wait_until(lambda: not process_alive(call["pid"]))
    finally:
        await r.aclose()


async def test_health_never_ok(sshd: Sshd, setup: dict[str, Path], tmp_path: Path) -> None:
    h = Health(fail_first=10**9)
    r = reloader(sshd, setup, remote_dir="", health_url=h.url, health_timeout_s=1.0)
    try:
        with pytest.raises(ReloadError, match="did not answer 200 within 1 s") as info:
            await r.reload(target(tmp_path, 1))
        assert info.value.retryable
        assert h.hits >= 2
        assert len(restarts(setup)) == 1
    finally:
        await r.aclose()
        h.close()


async def test_tampered_local_adapter_is_not_uploaded(
    sshd: Sshd, setup: dict[str, Path], tmp_path: Path
) -> None:
    t1 = target(tmp_path, 1)
    (t1.adapter_dir / "adapter_config.json").write_text("{}")
    r = reloader(sshd, setup)
    try:
        with pytest.raises(ReloadError, match="will not upload") as info:
            await r.reload(t1)
        assert not info.value.retryable
        assert not setup["remote"].exists()
    finally:
        await r.aclose()


async def test_connection_refused_is_retryable(sshd: Sshd, setup: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = SshReloader(sshd.host, port, sshd.user, sshd.identity_file, sshd.known_hosts, command=["true"])
    try:
        with pytest.raises(ReloadError, match="cannot reach") as info:
            await r.reload(target(tmp_path, 1))
        assert info.value.retryable
    finally:
        await r.aclose()


async def test_trio_cancellation_reaches_the_ssh_call(
    sshd: Sshd, setup: dict[str, Path], tmp_path: Path
) -> None:
    set_mode(setup, "hang")
    r = reloader(sshd, setup, timeout_s=600.0)
    try:
        with trio.move_on_after(2.0) as scope:
            await r.reload(target(tmp_path, 1))
        assert scope.cancelled_caught
        [call] = restarts(setup)
        await wait_until(lambda: not process_alive(call["pid"]))
    finally:
        await r.aclose()


async def test_agent_and_ssh_config_alias_without_identity_file(
    sshd: Sshd, setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 14: the key only in the user's ssh-agent, the host only as an ~/.ssh/config alias
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host gpu-box\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
    )
    sock = tmp_path / "agent.sock"
    agent = await trio.lowlevel.open_process(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        await wait_until(sock.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        await trio.run_process(["ssh-add", str(sshd.identity_file)], env=env, capture_stderr=True)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        r = SshReloader("gpu-box", 22, "", "", sshd.known_hosts, command=["true"], timeout_s=30.0)
        try:
            await r.reload(target(tmp_path, 1))  # logs in with the agent's key; host key still verified
        finally:
            await r.aclose()
        bad = SshReloader("gpu-box", 22, "", "", sshd.wrong_known_hosts, command=["true"], timeout_s=30.0)
        try:
            with pytest.raises(ReloadError, match="not trusted"):
                await bad.reload(target(tmp_path, 2))
        finally:
            await bad.aclose()
    finally:
        agent.terminate()
        with trio.fail_after(10):
            await agent.wait()
