"""``method = "command"``: run a local command after each promotion.

The argv runs without a shell, in its own process session; on timeout or cancellation the whole process
group gets SIGTERM, then SIGKILL after a short grace. ``{adapter_dir}``, ``{voice}``, ``{version}`` and
``{job_id}`` are replaced inside every argv item (nothing else in braces is touched), and the same
values are in the environment as ``BEAGLED_ADAPTER_DIR``, ``BEAGLED_VOICE``, ``BEAGLED_VERSION`` and
``BEAGLED_JOB_ID``. The command must be idempotent: it runs again if the daemon crashed mid-reload.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence

import trio

from beagled.errors import ConfigError, ReloadError
from beagled.reload import Reloader, ServeTarget
from beagled.reload.naming import check_template, render_template
from beagled.training.procs import kill_group

log = logging.getLogger(__name__)

PLACEHOLDERS = ("adapter_dir", "voice", "version", "job_id")
TAIL_BYTES = 2000


def _values(target: ServeTarget) -> dict[str, str]:
    return {
        "adapter_dir": str(target.adapter_dir),
        "voice": target.voice,
        "version": str(target.version),
        "job_id": target.job_id,
    }


def substitute(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    out = []
    for item in argv:
        text = item
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        out.append(text)
    return out


def tail(data: bytes | None, limit: int = TAIL_BYTES) -> str:
    if not data:
        return ""
    text = data[-limit:].decode("utf-8", "replace").strip()
    return ("…" + text) if len(data) > limit else text


async def run_in_group(
    argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str], what: str
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` in its own session; ``ReloadError`` on timeout, missing program or non-zero exit."""
    with trio.move_on_after(timeout_s) as scope:
        try:
            result: subprocess.CompletedProcess[bytes] = await trio.run_process(
                list(argv),
                check=False,
                capture_stdout=True,
                capture_stderr=True,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                start_new_session=True,
                deliver_cancel=kill_group,
            )
        except OSError as e:  # the program does not exist or cannot be executed
            raise ReloadError(f"{what}: cannot run {argv[0]!r}: {e.strerror or e}", retryable=False) from e
    if scope.cancelled_caught:
        raise ReloadError(f"{what}: {argv[0]!r} did not finish within the {timeout_s:g} s timeout; killed")
    if result.returncode != 0:
        status = (
            f"killed by signal {-result.returncode}"
            if result.returncode < 0
            else f"exit status {result.returncode}"
        )
        err = tail(result.stderr) or tail(result.stdout)
        raise ReloadError(f"{what}: {argv[0]!r} failed ({status})" + (f": {err}" if err else ""))
    return result


class CommandReloader(Reloader):
    """Run ``argv`` (and optionally ``verify_argv``) locally; the served name comes from a template."""

    method = "command"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = 300.0,
        served_name_template: str = "{voice}-v{version:04d}",
        verify_argv: Sequence[str] = (),
        verify_timeout_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not argv or not argv[0]:
            raise ConfigError("reload.command.argv", "is empty: give the command to run after a promotion")
        if timeout_s <= 0:
            raise ConfigError("reload.command.timeout_s", "must be > 0")
        self.argv = list(argv)
        self.verify_argv = list(verify_argv)
        self.timeout_s = timeout_s
        self.reload_timeout_s = timeout_s + 30  # the engine's budget: the command, then some
        self.verify_timeout_s = verify_timeout_s
        self.served_name_template = check_template(
            "reload.command.served_name_template", served_name_template
        )
        self._env = dict(os.environ if env is None else env)

    def _prepare(self, argv: Sequence[str], target: ServeTarget) -> tuple[list[str], dict[str, str]]:
        values = _values(target)
        env = {**self._env, **{f"BEAGLED_{k.upper()}": v for k, v in values.items()}}
        return substitute(argv, values), env

    def served_name(self, target: ServeTarget) -> str:
        return render_template(
            self.served_name_template, voice=target.voice, version=target.version, job_id=target.job_id
        )

    async def reload(self, target: ServeTarget) -> str:
        argv, env = self._prepare(self.argv, target)
        start = trio.current_time()
        result = await run_in_group(argv, timeout_s=self.timeout_s, env=env, what="reload command")
        log.info(
            "reload command for %s v%d done in %.2f s%s",
            target.voice,
            target.version,
            trio.current_time() - start,
            f": {tail(result.stdout, 300)}" if result.stdout else "",
        )
        return self.served_name(target)

    async def verify(self, target: ServeTarget) -> bool:
        if not self.verify_argv:
            return True  # a plain command cannot be asked what it serves
        argv, env = self._prepare(self.verify_argv, target)
        try:
            await run_in_group(argv, timeout_s=self.verify_timeout_s, env=env, what="verify command")
        except ReloadError as e:
            log.info("verify command says %s v%d is not served: %s", target.voice, target.version, e)
            return False
        return True

    async def aclose(self) -> None:
        return None
