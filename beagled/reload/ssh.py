"""``method = "ssh"``: ship an adapter to another host and restart its inference server there.

Steps, each idempotent so that a rerun after a crash at any point ends in the same state:

1. the local adapter is checked against its manifest (sha256 of every file);
2. if ``remote_dir`` is set, the directory is uploaded by SFTP into ``<remote_dir>/<voice>/.<job>.tmp-*``,
   checked by sha256 on the remote (``sha256sum``; read back over SFTP where there is none), renamed to
   ``<remote_dir>/<voice>/<job_id>`` (skipped when that already matches), and
   ``<remote_dir>/<voice>/current`` is swapped atomically: a relative symlink made under a temp name,
   then renamed over ``current`` (SFTP ``posix-rename``, i.e. rename(2));
3. ``command`` runs in ``workdir`` under a small ``sh -c`` wrapper (``REMOTE_WRAPPER``) that gets the
   workdir and every argument as its own quoted word (``shlex.join``), so nothing is re-parsed by a
   shell; a non-zero exit is a ``ReloadError`` with the tail of its stderr;
4. ``health_url`` is polled until it answers 200.

Host keys are always verified against ``known_hosts``; no option turns that off. asyncssh is
asyncio-only: it runs in an asyncio loop on a dedicated thread, and a trio cancellation or timeout
cancels the asyncio task, which closes the connection; the remote wrapper then kills the command's
process group.
No message or log line carries key material: only paths, host names and fingerprints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import posixpath
import secrets
import shlex
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import httpx
import trio

from beagled import manifest as manifest_mod
from beagled.bounds import check_private_file
from beagled.errors import AdapterError, ConfigError, ReloadError
from beagled.reload import ReloadConfigError, Reloader, ServeTarget
from beagled.reload.command import substitute
from beagled.reload.naming import check_template, render_template

log = logging.getLogger(__name__)

T = TypeVar("T")
CANCEL_GRACE_S = 5.0
HEALTH_POLL_S = 0.25
TAIL_CHARS = 2000


# Runs on the remote host under ``sh -c``: $1 is the workdir ("" for none), the rest is the argv. sshd
# makes the session a process group of its own; the watcher waits for EOF on stdin, which comes when
# the SSH channel closes (beagled cancelled or timed out, or the connection died), and then kills the
# whole group (TERM, KILL 2 s later). ``kill`` signals over SSH are no substitute: sshd refuses them
# for root sessions ("session signalling requires privilege separation").
REMOTE_WRAPPER = """\
if [ -n "$1" ]; then cd -- "$1" || exit 125; fi
shift
exec 3<&0
"$@" </dev/null 3<&- &
child=$!
( trap '' TERM; cat <&3 >/dev/null; kill -TERM 0; sleep 2; kill -KILL 0 ) </dev/null >/dev/null 2>&1 &
watcher=$!
exec 3<&-
wait "$child"
status=$?
kill -KILL "$watcher" 2>/dev/null
exit "$status"
"""


class AsyncioThread:
    """One asyncio event loop on a dedicated daemon thread, driven from trio.

    ``await call(factory)`` runs ``factory()`` as a task on that loop and wakes trio from the task's
    done callback, so no worker thread is parked. If the trio side is cancelled (or times out), the
    asyncio task is cancelled too and ``call`` waits (shielded, at most ``CANCEL_GRACE_S``) for it to
    unwind, so connections are closed before the cancellation propagates.
    """

    def __init__(self, name: str = "beagled-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, started), name=self._name, daemon=True
                )
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        loop = self._ensure()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        tasks: list[asyncio.Task[T]] = []

        def wake(_: object) -> None:  # asyncio thread: the task has fully unwound (connections closed)
            with contextlib.suppress(trio.RunFinishedError):  # trio already gone
                token.run_sync_soon(done.set)

        def start() -> None:  # asyncio thread
            task = loop.create_task(factory())
            task.add_done_callback(wake)
            tasks.append(task)

        def cancel() -> None:  # asyncio thread; always runs after start() (FIFO)
            for task in tasks:
                task.cancel()

        loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except trio.Cancelled:
            loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
                await done.wait()
            raise
        task = tasks[0]
        if task.cancelled():
            raise ReloadError("the SSH operation was cancelled on the asyncio side")
        return task.result()

    async def aclose(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            await trio.to_thread.run_sync(thread.join)


def _tail(text: str | bytes | None) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return ("…" + text[-TAIL_CHARS:]) if len(text) > TAIL_CHARS else text


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
        if timeout_s <= 0 or health_timeout_s <= 0:
            raise ReloadConfigError("reload.ssh.timeout_s", "timeouts must be > 0")
        if health_url and not health_url.startswith(("http://", "https://")):
            raise ReloadConfigError("reload.ssh.health_url", f"{health_url!r} is not an http(s) URL")
        self.host = host
        self.port = port
        self.user = user
        # "" → the user's ssh-agent ($SSH_AUTH_SOCK) and default keys, as `ssh` would
        self.identity_file = Path(identity_file).expanduser() if str(identity_file) else None
        self.known_hosts = Path(known_hosts).expanduser()
        self.remote_dir = remote_dir.rstrip("/") if remote_dir not in ("", "/") else remote_dir
        self.command = list(command)
        self.workdir = workdir
        self.health_url = health_url
        self.timeout_s = timeout_s
        self.health_timeout_s = health_timeout_s
        self.reload_timeout_s = timeout_s + health_timeout_s + 30  # upload + restart, then health
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.served_name_template = check_template("reload.ssh.served_name_template", served_name_template)
        self._bridge = AsyncioThread(f"beagled-ssh-{host}")

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

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
        """The command line sent over SSH: ``sh -c WRAPPER beagled-reload <workdir> <argv...>``, each word
        quoted, so the remote login shell passes every argument through intact."""
        return shlex.join(
            ["sh", "-c", REMOTE_WRAPPER, "beagled-reload", self.workdir, *self.remote_argv(target)]
        )

    # --- the port ---------------------------------------------------------------------------------

    async def reload(self, target: ServeTarget) -> str:
        self._check_files()
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
            await self._wait_healthy()
        return self.served_name(target)

    async def verify(self, target: ServeTarget) -> bool:
        try:
            self._check_files()
            if self.remote_dir:
                with trio.fail_after(self.timeout_s):
                    link = await self._bridge.call(lambda: self._read_current(target))
                if link != target.job_id:
                    return False
            if self.health_url:
                return await self._healthy_once()
        except (ReloadError, trio.TooSlowError) as e:
            log.info("cannot verify %s v%d on %s: %s", target.voice, target.version, self.where, e)
            return False
        return True

    async def aclose(self) -> None:
        await self._bridge.aclose()

    # --- local checks -----------------------------------------------------------------------------

    def _check_files(self) -> None:
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

    def _connect(self) -> AbstractAsyncContextManager[asyncssh.SSHClientConnection]:
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

    def _translate(self, e: BaseException) -> ReloadError:
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

    async def _remote_reload(self, target: ServeTarget, expected: Mapping[str, str]) -> None:
        try:
            async with self._connect() as conn:
                if self.remote_dir:
                    await self._upload(conn, target, expected)
                if self.command:
                    await self._run_command(conn, target)
        except ReloadError:
            raise
        except (asyncssh.Error, OSError, ValueError) as e:
            raise self._translate(e) from None

    async def _read_current(self, target: ServeTarget) -> str:
        try:
            async with self._connect() as conn, conn.start_sftp_client() as sftp:
                try:
                    return str(await sftp.readlink(self.remote_paths(target)[2]))
                except asyncssh.SFTPNoSuchFile:
                    return ""
        except (asyncssh.Error, OSError, ValueError) as e:
            raise self._translate(e) from None

    async def _upload(
        self, conn: asyncssh.SSHClientConnection, target: ServeTarget, expected: Mapping[str, str]
    ) -> None:
        voice_dir, final, current = self.remote_paths(target)
        async with conn.start_sftp_client() as sftp:
            await sftp.makedirs(voice_dir, exist_ok=True)
            for name in await sftp.listdir(voice_dir):
                if name.startswith((f".{target.job_id}.tmp-", f".{target.job_id}.stale-", ".current.tmp-")):
                    await _remove(sftp, posixpath.join(voice_dir, name))  # leftovers of a crashed attempt
            if await sftp.isdir(final) and await self._matches(conn, sftp, final, expected):
                log.info("%s already holds %s: not uploading again", self.where, final)
            else:
                if await sftp.lexists(final):
                    stale = posixpath.join(voice_dir, f".{target.job_id}.stale-{secrets.token_hex(4)}")
                    await sftp.posix_rename(final, stale)
                    await _remove(sftp, stale)
                tmp = posixpath.join(voice_dir, f".{target.job_id}.tmp-{secrets.token_hex(4)}")
                await sftp.mkdir(tmp)
                for rel in sorted(expected):
                    remote = posixpath.join(tmp, rel)
                    if "/" in rel:
                        await sftp.makedirs(posixpath.dirname(remote), exist_ok=True)
                    await sftp.put(str(target.adapter_dir / rel), remote)
                if not await self._matches(conn, sftp, tmp, expected):
                    await _remove(sftp, tmp)
                    raise ReloadError(
                        f"the upload to {self.where}:{tmp} does not match the manifest (sha256)"
                    )
                await sftp.posix_rename(tmp, final)
            link_tmp = posixpath.join(voice_dir, f".current.tmp-{secrets.token_hex(4)}")
            await sftp.symlink(target.job_id, link_tmp)  # relative: survives moving remote_dir
            await sftp.posix_rename(link_tmp, current)

    async def _matches(
        self,
        conn: asyncssh.SSHClientConnection,
        sftp: asyncssh.SFTPClient,
        directory: str,
        expected: Mapping[str, str],
    ) -> bool:
        names = sorted(expected)
        for name in names:
            if not await sftp.isfile(posixpath.join(directory, name)):
                return False
        result = await conn.run(
            f"cd {shlex.quote(directory)} && sha256sum -- {shlex.join(names)}", check=False
        )
        if result.exit_status == 0 and isinstance(result.stdout, str):
            lines = result.stdout.splitlines()
            got = [line.lstrip("\\")[:64] for line in lines]
            return len(got) == len(names) and all(got[i] == expected[n] for i, n in enumerate(names))
        log.info("sha256sum failed on %s (%s): reading the files back", self.where, _tail(result.stderr))
        for name in names:
            digest = hashlib.sha256()
            async with sftp.open(posixpath.join(directory, name), "rb") as f:
                while block := await f.read(1 << 20):
                    digest.update(block if isinstance(block, bytes) else block.encode())
            if digest.hexdigest() != expected[name]:
                return False
        return True

    async def _run_command(self, conn: asyncssh.SSHClientConnection, target: ServeTarget) -> None:
        log.info(
            "running on %s%s: %s",
            self.where,
            f" in {self.workdir}" if self.workdir else "",
            shlex.join(self.remote_argv(target)),
        )
        # stdin stays open (and empty): closing the channel is what tells the wrapper to kill the command
        process = await conn.create_process(self.remote_command(target))
        try:
            result = await process.wait(check=False)
        finally:
            process.close()
        if result.exit_status != 0:
            status = (
                f"killed by signal {result.exit_signal[0]}"
                if result.exit_signal
                else f"exit status {result.exit_status}"
            )
            err = _tail(result.stderr) or _tail(result.stdout)
            raise ReloadError(
                f"the restart command on {self.where} failed ({status})" + (f": {err}" if err else "")
            )

    # --- health -----------------------------------------------------------------------------------

    async def _healthy_once(self, client: httpx.AsyncClient | None = None) -> bool:
        try:
            if client is None:
                async with httpx.AsyncClient(timeout=10.0) as own:
                    response = await own.get(self.health_url)
            else:
                response = await client.get(self.health_url)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _wait_healthy(self) -> None:
        start = trio.current_time()
        attempts = 0
        async with httpx.AsyncClient(timeout=min(10.0, self.health_timeout_s)) as client:
            with trio.move_on_after(self.health_timeout_s):
                while True:
                    attempts += 1
                    if await self._healthy_once(client):
                        log.info("%s answered 200 after %.2f s", self.health_url, trio.current_time() - start)
                        return
                    await trio.sleep(HEALTH_POLL_S)
        raise ReloadError(
            f"{self.health_url} did not answer 200 within {self.health_timeout_s:g} s after the restart "
            f"({attempts} tries)"
        )


async def _remove(sftp: asyncssh.SFTPClient, path: str) -> None:
    if await sftp.isdir(path) and not await sftp.islink(path):
        await sftp.rmtree(path)
    else:
        await sftp.remove(path)
