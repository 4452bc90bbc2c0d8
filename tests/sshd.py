"""A real, private OpenSSH server for tests: ``/usr/sbin/sshd -D -e -f <tmp config>`` on a free
127.0.0.1 port, with a temporary host key, client key, ``authorized_keys`` and ``known_hosts``, running
as the current user (root: ``PermitRootLogin prohibit-password``). Nothing outside the temp dir is
touched except ``/run/sshd`` (sshd's privilege-separation dir, created when running as root)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Sshd:
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    wrong_known_hosts: Path  # the same host with a different key: must be refused
    log: Path


def available() -> str | None:
    """``None`` when a private sshd can run here, else why not."""
    if not Path(SSHD).exists():
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed"
    return None


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_suffix(".pub").read_text(encoding="utf-8").strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.02)  # polling a port that is not open yet: nothing to wait on but time
    raise RuntimeError(f"sshd did not answer on 127.0.0.1:{port}: {log.read_text(errors='replace')}")


@contextmanager
def running_sshd(tmp: Path) -> Iterator[Sshd]:
    tmp.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key = tmp / "host_ed25519"
    host_pub = _keygen(host_key, "beagled-test-host")
    other_pub = _keygen(tmp / "other_host_ed25519", "beagled-test-other-host")
    client_key = tmp / "client_ed25519"
    client_pub = _keygen(client_key, "beagled-test-client")
    authorized = tmp / "authorized_keys"
    authorized.write_text(client_pub + "\n", encoding="utf-8")
    authorized.chmod(0o600)
    known_hosts = tmp / "known_hosts"
    wrong = tmp / "wrong_known_hosts"
    config = tmp / "sshd_config"
    log = tmp / "sshd.log"
    for attempt in range(3):  # a free port can be taken between probing and binding: pick another
        port = _free_port()
        known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n", encoding="utf-8")
        wrong.write_text(f"[127.0.0.1]:{port} {' '.join(other_pub.split()[:2])}\n", encoding="utf-8")
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {port}",
                    f"HostKey {host_key}",
                    f"PidFile {tmp / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "Subsystem sftp internal-sftp",
                    "LogLevel ERROR",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for_banner(port, proc, log)
            break
        except RuntimeError:
            proc.kill()
            proc.wait()
            if attempt == 2 or "Address already in use" not in log.read_text(errors="replace"):
                raise
    try:
        yield Sshd(
            host="127.0.0.1",
            port=port,
            user=getpass.getuser(),
            identity_file=client_key,
            known_hosts=known_hosts,
            wrong_known_hosts=wrong,
            log=log,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    """Poll ``predicate`` (external state with nothing to wait on: a process, a file) until it holds."""
    with trio.fail_after(timeout_s):
        while True:
            if predicate():
                return
            await trio.sleep(interval_s)


def process_alive(pid: int) -> bool:
    """Is ``pid`` running? A zombie (exited, not yet reaped by its new parent) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
