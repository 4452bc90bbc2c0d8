"""The SFTP side of ``method = "ssh"``: stage an adapter directory on the remote host, then switch.

``upload`` (asyncio side, on an open connection) is idempotent: leftovers of a crashed attempt are
removed, a ``<voice_dir>/<job_id>`` that already matches the manifest is kept, else the files go to
``<voice_dir>/.<job>.tmp-*``, are checked by sha256 (``sha256sum`` on the remote; read back over SFTP
where there is none) and renamed into place; ``current`` is swapped atomically (a relative symlink made
under a temp name, then ``posix-rename``). ``read_link`` answers where ``current`` points.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import secrets
import shlex
from collections.abc import Mapping

import asyncssh

from beagled.errors import ReloadError
from beagled.reload import ServeTarget
from beagled.reload.ssh_exec import tail

log = logging.getLogger("beagled.reload.ssh")


async def upload(
    conn: asyncssh.SSHClientConnection,
    where: str,
    paths: tuple[str, str, str],
    target: ServeTarget,
    expected: Mapping[str, str],
) -> None:
    """Make ``paths`` = ``(voice_dir, final, current)`` hold ``target.adapter_dir`` (its files by
    sha256 in ``expected``) at ``final``, with ``current`` pointing at it."""
    voice_dir, final, current = paths
    job_id = target.job_id
    async with conn.start_sftp_client() as sftp:
        await sftp.makedirs(voice_dir, exist_ok=True)
        for name in await sftp.listdir(voice_dir):
            if name.startswith((f".{job_id}.tmp-", f".{job_id}.stale-", ".current.tmp-")):
                await _remove(sftp, posixpath.join(voice_dir, name))  # leftovers of a crashed attempt
        if await sftp.isdir(final) and await _matches(conn, sftp, where, final, expected):
            log.info("%s already holds %s: not uploading again", where, final)
        else:
            if await sftp.lexists(final):
                stale = posixpath.join(voice_dir, f".{job_id}.stale-{secrets.token_hex(4)}")
                await sftp.posix_rename(final, stale)
                await _remove(sftp, stale)
            tmp = posixpath.join(voice_dir, f".{job_id}.tmp-{secrets.token_hex(4)}")
            await sftp.mkdir(tmp)
            for rel in sorted(expected):
                remote = posixpath.join(tmp, rel)
                if "/" in rel:
                    await sftp.makedirs(posixpath.dirname(remote), exist_ok=True)
                await sftp.put(str(target.adapter_dir / rel), remote)
            if not await _matches(conn, sftp, where, tmp, expected):
                await _remove(sftp, tmp)
                raise ReloadError(f"the upload to {where}:{tmp} does not match the manifest (sha256)")
            await sftp.posix_rename(tmp, final)
        link_tmp = posixpath.join(voice_dir, f".current.tmp-{secrets.token_hex(4)}")
        await sftp.symlink(job_id, link_tmp)  # relative: survives moving remote_dir
        await sftp.posix_rename(link_tmp, current)


async def read_link(conn: asyncssh.SSHClientConnection, path: str) -> str:
    """Where the symlink ``path`` points; ``""`` when there is none."""
    async with conn.start_sftp_client() as sftp:
        try:
            return str(await sftp.readlink(path))
        except asyncssh.SFTPNoSuchFile:
            return ""


async def _matches(
    conn: asyncssh.SSHClientConnection,
    sftp: asyncssh.SFTPClient,
    where: str,
    directory: str,
    expected: Mapping[str, str],
) -> bool:
    names = sorted(expected)
    for name in names:
        if not await sftp.isfile(posixpath.join(directory, name)):
            return False
    result = await conn.run(f"cd {shlex.quote(directory)} && sha256sum -- {shlex.join(names)}", check=False)
    if result.exit_status == 0 and isinstance(result.stdout, str):
        lines = result.stdout.splitlines()
        got = [line.lstrip("\\")[:64] for line in lines]
        return len(got) == len(names) and all(got[i] == expected[n] for i, n in enumerate(names))
    log.info("sha256sum failed on %s (%s): reading the files back", where, tail(result.stderr))
    for name in names:
        digest = hashlib.sha256()
        async with sftp.open(posixpath.join(directory, name), "rb") as f:
            while block := await f.read(1 << 20):
                digest.update(block if isinstance(block, bytes) else block.encode())
        if digest.hexdigest() != expected[name]:
            return False
    return True


async def _remove(sftp: asyncssh.SFTPClient, path: str) -> None:
    if await sftp.isdir(path) and not await sftp.islink(path):
        await sftp.rmtree(path)
    else:
        await sftp.remove(path)
