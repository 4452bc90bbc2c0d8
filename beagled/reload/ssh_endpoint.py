"""Where ``method = "ssh"`` logs in, and how: the host, the key, ``known_hosts``, and the errors.

``SshEndpoint`` checks the settings (a host, a ``known_hosts`` file, a TCP port), checks before each
use that the key is private and that ``known_hosts`` is not writable by others, opens an asyncssh
connection that always verifies the host key, and turns asyncssh's and the OS's errors into
``ReloadError`` messages that name paths, hosts and fingerprints, never key material.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import asyncssh

from beagled.bounds import check_private_file
from beagled.errors import ConfigError, ReloadError
from beagled.reload import ReloadConfigError


class SshEndpoint:
    """One SSH login: ``user@host:port`` with a key (or the ssh-agent) and a ``known_hosts`` file."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        identity_file: str | Path,
        known_hosts: str | Path,
        *,
        connect_timeout_s: float,
    ) -> None:
        if not host:
            raise ReloadConfigError(
                "reload.ssh.host", "is empty: name the host that runs the inference server"
            )
        if not str(known_hosts):
            raise ReloadConfigError(
                "reload.ssh.known_hosts",
                "is empty: host keys are always verified; give a known_hosts file that lists the host's key "
                f"(e.g. from `ssh-keyscan -p {port} {host}`, checked against its fingerprint)",
            )
        if not 0 < port < 65536:
            raise ReloadConfigError("reload.ssh.port", f"{port} is not a TCP port")
        self.host = host
        self.port = port
        self.user = user
        # "" → the user's ssh-agent ($SSH_AUTH_SOCK) and default keys, as `ssh` would
        self.identity_file = Path(identity_file).expanduser() if str(identity_file) else None
        self.known_hosts = Path(known_hosts).expanduser()
        self.connect_timeout_s = connect_timeout_s

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def check_files(self) -> None:
        if not self.known_hosts.is_file():
            raise ReloadConfigError(
                "reload.ssh.known_hosts", f"{self.known_hosts} does not exist: host keys are always verified"
            )
        if self.identity_file is not None and not self.identity_file.is_file():
            raise ReloadConfigError("reload.ssh.identity_file", f"{self.identity_file} does not exist")
        try:  # a key others can read is not a secret; a known_hosts others can write verifies nothing
            if self.identity_file is not None:  # optional: the agent may hold the key
                check_private_file(self.identity_file, "reload.ssh.identity_file", "the SSH key")
            check_private_file(
                self.known_hosts, "reload.ssh.known_hosts", "the known_hosts file", others_may_read=True
            )
        except ConfigError as e:
            raise ReloadConfigError(e.key, str(e).removeprefix(f"{e.key}: ")) from None

    def connect(self) -> AbstractAsyncContextManager[asyncssh.SSHClientConnection]:
        """An asyncssh connection (asyncio side); the host key is checked against ``known_hosts``."""
        return asyncssh.connect(
            self.host,  # may be a Host alias of ~/.ssh/config (HostName, Port, ProxyJump …)
            self.port if self.port != 22 else (),  # () → the config's Port, else 22
            username=self.user or (),
            client_keys=[str(self.identity_file)] if self.identity_file is not None else (),
            known_hosts=str(self.known_hosts),  # always verified, whatever the config says
            agent_path=(),  # $SSH_AUTH_SOCK when set
            config=(),  # ~/.ssh/config (and /etc/ssh/ssh_config) when present
            preferred_auth="publickey",
            connect_timeout=self.connect_timeout_s,
            login_timeout=self.connect_timeout_s,
        )

    def translate(self, e: BaseException) -> ReloadError:
        """The ``ReloadError`` for a failure of SSH, SFTP or the network on this endpoint."""
        if isinstance(e, asyncssh.HostKeyNotVerifiable):
            return ReloadError(
                f"the host key of {self.host}:{self.port} is not trusted by {self.known_hosts} (unknown or "
                f"changed): check its fingerprint and add it (e.g. `ssh-keyscan -p {self.port} {self.host}`)",
                retryable=False,
            )
        if isinstance(e, asyncssh.PermissionDenied):
            return ReloadError(
                f"{self.where} refused the key in {self.identity_file or 'the ssh-agent or default keys'} "
                "(is its public key in the "
                "remote authorized_keys?)",
                retryable=False,
            )
        if isinstance(e, asyncssh.KeyImportError | asyncssh.KeyEncryptionError):
            return ReloadError(
                f"cannot use the private key {self.identity_file} ({type(e).__name__}); it must be "
                "unencrypted and in OpenSSH or PEM format",
                retryable=False,
            )
        if isinstance(e, asyncssh.SFTPError):
            return ReloadError(f"SFTP on {self.where} failed: {e.reason}")
        if isinstance(e, asyncssh.Error):
            return ReloadError(f"SSH to {self.where} failed: {e.reason}")
        if isinstance(e, TimeoutError):
            return ReloadError(f"SSH to {self.where} timed out connecting")
        if isinstance(e, OSError):
            return ReloadError(f"cannot reach {self.host}:{self.port}: {e.strerror or e}")
        return ReloadError(f"SSH to {self.where} failed: {type(e).__name__}")
