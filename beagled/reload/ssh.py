"""``method = "ssh"``: ship an adapter to another host and restart its inference server there.

Steps, each idempotent so that a rerun after a crash at any point ends in the same state:

1. the local adapter is checked against its manifest (sha256 of every file);
2. if ``remote_dir`` is set, the directory is uploaded by SFTP into ``<remote_dir>/<voice>/.<job>.tmp-*``,
   checked by sha256 on the remote (``sha256sum``; read back over SFTP where there is none), renamed to
   ``<remote_dir>/<voice>/<job_id>`` (skipped when that already matches), and
   ``<remote_dir>/<voice>/current`` is swapped atomically: a relative symlink made under a temp name,
   then renamed over ``current`` (SFTP ``posix-rename``, i.e. rename(2)) — ``ssh_upload``;
3. ``command`` runs in ``workdir`` under a small ``sh -c`` wrapper (``ssh_exec.REMOTE_WRAPPER``) that
   gets the workdir and every argument as its own quoted word (``shlex.join``), so nothing is re-parsed
   by a shell; a non-zero exit is a ``ReloadError`` with the tail of its stderr;
4. ``health_url`` is polled until it answers 200 (``health``).

Host keys are always verified against ``known_hosts``; no option turns that off (``ssh_endpoint``).
asyncssh is asyncio-only: it runs in an asyncio loop on a dedicated thread (``asyncio_bridge``), and a
trio cancellation or timeout cancels the asyncio task, which closes the connection; the remote wrapper
then kills the command's process group.
No message or log line carries key material: only paths, host names and fingerprints.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path

import asyncssh
import trio

from beagled import manifest as manifest_mod
from beagled.errors import AdapterError, ReloadError
from beagled.reload import ReloadConfigError, Reloader, ServeTarget, ssh_exec, ssh_upload
from beagled.reload.asyncio_bridge import AsyncioThread
from beagled.reload.command import substitute
from beagled.reload.health import HealthCheck
from beagled.reload.naming import check_template, render_template
from beagled.reload.ssh_endpoint import SshEndpoint

log = logging.getLogger(__name__)


class SshReloader(Reloader):
    method = "ssh"

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str = "",
        identity_file: str | Path = "",
        known_hosts: str | Path = "",
        *,
        remote_dir: str = "",
        command: Sequence[str] = ("docker", "compose", "restart", "vllm"),
        workdir: str = "",
        health_url: str = "",
        timeout_s: float = 300.0,
        health_timeout_s: float = 300.0,
        connect_timeout_s: float = 30.0,
        served_name_template: str = "{voice}",
    ) -> None:
        self.endpoint = SshEndpoint(
            host, port, user, identity_file, known_hosts, connect_timeout_s=min(connect_timeout_s, timeout_s)
        )
        if timeout_s <= 0 or health_timeout_s <= 0:
            raise ReloadConfigError("reload.ssh.timeout_s", "timeouts must be > 0")
        if health_url and not health_url.startswith(("http://", "https://")):
            raise ReloadConfigError("reload.ssh.health_url", f"{health_url!r} is not an http(s) URL")
        self.host = host
        self.port = port
        self.user = user
        self.identity_file = self.endpoint.identity_file
        self.known_hosts = self.endpoint.known_hosts
        self.remote_dir = remote_dir.rstrip("/") if remote_dir not in ("", "/") else remote_dir
        self.command = list(command)
        self.workdir = workdir
        self.health_url = health_url
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.reload_timeout_s = timeout_s + health_timeout_s + 30  # upload + restart, then health
        self.connect_timeout_s = self.endpoint.connect_timeout_s
        self.served_name_template = check_template("reload.ssh.served_name_template", served_name_template)
        self.health = HealthCheck(health_url, health_timeout_s)
        self._bridge = AsyncioThread(f"beagled-ssh-{host}")

    @property
    def where(self) -> str:
        return self.endpoint.where

    def served_name(self, target: ServeTarget) -> str:
        return render_template(
            self.served_name_template, voice=target.voice, version=target.version, job_id=target.job_id
        )

    def remote_paths(self, target: ServeTarget) -> tuple[str, str, str]:
        """``(<remote_dir>/<voice>, <remote_dir>/<voice>/<job_id>, <remote_dir>/<voice>/current)``."""
        voice_dir = posixpath.join(self.remote_dir, target.voice)
        return voice_dir, posixpath.join(voice_dir, target.job_id), posixpath.join(voice_dir, "current")

    def remote_argv(self, target: ServeTarget) -> list[str]:
        values = {
            "adapter_dir": self.remote_paths(target)[1] if self.remote_dir else str(target.adapter_dir),
            "voice": target.voice,
            "version": str(target.version),
            "job_id": target.job_id,
        }
        return substitute(self.command, values)

    def remote_command(self, target: ServeTarget) -> str:
        """The command line sent over SSH (``ssh_exec.command_line``)."""
        return ssh_exec.command_line(self.workdir, self.remote_argv(target))

    # --- the port ---------------------------------------------------------------------------------

    async def reload(self, target: ServeTarget) -> str:
        self.endpoint.check_files()
        expected: dict[str, str] = {}
        if self.remote_dir:
            expected = await trio.to_thread.run_sync(self._local_hashes, target.adapter_dir)
        start = trio.current_time()
        with trio.move_on_after(self.timeout_s) as scope:
            await self._bridge.call(lambda: self._remote_reload(target, expected))
        if scope.cancelled_caught:
            raise ReloadError(
                f"ssh reload on {self.where} did not finish within the {self.timeout_s:g} s timeout; "
                "the connection was closed, which stops the remote command"
            )
        log.info(
            "ssh reload of %s v%d on %s took %.2f s",
            target.voice,
            target.version,
            self.where,
            trio.current_time() - start,
        )
        if self.health_url:
            await self.health.wait()
        return self.served_name(target)

    async def verify(self, target: ServeTarget) -> bool:
        try:
            self.endpoint.check_files()
            if self.remote_dir:
                with trio.fail_after(self.timeout_s):
                    link = await self._bridge.call(lambda: self._read_current(target))
                if link != target.job_id:
                    return False
            if self.health_url:
                return await self.health.once()
        except (ReloadError, trio.TooSlowError) as e:
            log.info("cannot verify %s v%d on %s: %s", target.voice, target.version, self.where, e)
            return False
        return True

    async def aclose(self) -> None:
        await self._bridge.aclose()

    @staticmethod
    def _local_hashes(adapter_dir: Path) -> dict[str, str]:
        try:
            manifest = manifest_mod.verify(adapter_dir)
        except AdapterError as e:
            raise ReloadError(f"will not upload {adapter_dir}: {e}", retryable=False) from e
        files = dict(manifest["files"])
        files[manifest_mod.MANIFEST] = manifest_mod.sha256_file(adapter_dir / manifest_mod.MANIFEST)
        return files

    # --- asyncio side -----------------------------------------------------------------------------

    async def _remote_reload(self, target: ServeTarget, expected: Mapping[str, str]) -> None:
        try:
            async with self.endpoint.connect() as conn:
                if self.remote_dir:
                    await ssh_upload.upload(conn, self.where, self.remote_paths(target), target, expected)
                if self.command:
                    await ssh_exec.run(conn, self.where, self.workdir, self.remote_argv(target))
        except ReloadError:
            raise
        except (asyncssh.Error, OSError, ValueError) as e:
            raise self.endpoint.translate(e) from None

    async def _read_current(self, target: ServeTarget) -> str:
        try:
            async with self.endpoint.connect() as conn:
                return await ssh_upload.read_link(conn, self.remote_paths(target)[2])
        except (asyncssh.Error, OSError, ValueError) as e:
            raise self.endpoint.translate(e) from None
