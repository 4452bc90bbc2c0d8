"""The restart command of ``method = "ssh"``: how it is wrapped, sent and judged on the remote host.

``command_line`` quotes the workdir and every argument as its own word (``shlex.join``) under a small
``sh -c`` wrapper (``REMOTE_WRAPPER``), so the remote login shell re-parses nothing; ``run`` sends it
over an open connection and raises ``ReloadError`` with the tail of its stderr on a non-zero exit.
Closing the channel (beagled cancelled or timed out) makes the wrapper kill the command's process group.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

import asyncssh

from beagled.errors import ReloadError

log = logging.getLogger("beagled.reload.ssh")

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


def tail(text: str | bytes | None) -> str:
    """The last ``TAIL_CHARS`` of a remote output, stripped (``…`` in front when cut)."""
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    return ("…" + text[-TAIL_CHARS:]) if len(text) > TAIL_CHARS else text


def command_line(workdir: str, argv: Sequence[str]) -> str:
    """The command line sent over SSH: ``sh -c WRAPPER beagled-reload <workdir> <argv...>``, each word
    quoted, so the remote login shell passes every argument through intact."""
    return shlex.join(["sh", "-c", REMOTE_WRAPPER, "beagled-reload", workdir, *argv])


async def run(conn: asyncssh.SSHClientConnection, where: str, workdir: str, argv: Sequence[str]) -> None:
    """Run ``argv`` in ``workdir`` on the host of ``conn`` (asyncio side); a failure is a ``ReloadError``."""
    log.info("running on %s%s: %s", where, f" in {workdir}" if workdir else "", shlex.join(argv))
    # stdin stays open (and empty): closing the channel is what tells the wrapper to kill the command
    process = await conn.create_process(command_line(workdir, argv))
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
        err = tail(result.stderr) or tail(result.stdout)
        raise ReloadError(f"the restart command on {where} failed ({status})" + (f": {err}" if err else ""))
