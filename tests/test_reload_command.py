"""The command reloader with real subprocesses: recorded argv/env, failure, timeout of a process group."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from beagled.errors import ConfigError, ReloadError
from beagled.reload import NoneReloader, Reloader, ServeTarget
from beagled.reload.command import CommandReloader
from tests.sshd import process_alive, wait_until

RECORDER = textwrap.dedent(
    """
    import json, os, sys
    env = {k: v for k, v in os.environ.items() if k.startswith("BEAGLED_")}
    with open(sys.argv[1], "a", encoding="utf-8") as f:
        record = {"argv": sys.argv[2:], "env": env, "sid": os.getsid(0), "pid": os.getpid()}
        f.write(json.dumps(record) + "\\n")
    """
)


def calls(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def t1(tmp_path: Path) -> ServeTarget:
    adapter = tmp_path / "voices" / "my voice" / "adapters" / "j-1"
    adapter.mkdir(parents=True)
    return ServeTarget(voice="default", version=7, job_id="j-1", adapter_dir=adapter)


async def test_runs_with_placeholders_env_and_own_session(tmp_path: Path, t1: ServeTarget) -> None:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER, encoding="utf-8")
    log = tmp_path / "calls.jsonl"
    argv = [
        sys.executable,
        str(script),
        str(log),
        "--adapter={adapter_dir}",
        "{voice}",
        "v{version}",
        "{job_id}",
        "two words",
        'it\'s "quoted"',
        "$HOME; rm -rf /",
        "{not_a_placeholder} {}",
    ]
    reloader: Reloader = CommandReloader(argv, timeout_s=30)
    name = await reloader.reload(t1)
    assert name == "default-v0007"
    [call] = calls(log)
    assert call["argv"] == [
        f"--adapter={t1.adapter_dir}",
        "default",
        "v7",
        "j-1",
        "two words",
        'it\'s "quoted"',
        "$HOME; rm -rf /",
        "{not_a_placeholder} {}",
    ]
    inherited = {k: v for k, v in os.environ.items() if k.startswith("BEAGLED_")}  # the test run's own
    assert call["env"] == {
        **inherited,
        "BEAGLED_ADAPTER_DIR": str(t1.adapter_dir),
        "BEAGLED_VOICE": "default",
        "BEAGLED_VERSION": "7",
        "BEAGLED_JOB_ID": "j-1",
    }
    assert call["sid"] == call["pid"]  # its own session
    assert await reloader.verify(t1)
    await reloader.aclose()


async def test_template_names_the_served_model(tmp_path: Path, t1: ServeTarget) -> None:
    reloader = CommandReloader(["true"], served_name_template="lora-{voice}-{job_id}-{version:03d}")
    assert await reloader.reload(t1) == "lora-default-j-1-007"
    with pytest.raises(ConfigError, match="served_name_template"):
        CommandReloader(["true"], served_name_template="{nope}")
    with pytest.raises(ConfigError, match="argv"):
        CommandReloader([])


async def test_failure_reports_exit_status_and_stderr_tail(t1: ServeTarget) -> None:
    code = (
        "import sys; print('noise ' * 1000, file=sys.stderr); "
        "print('container vllm not found', file=sys.stderr); sys.exit(3)"
    )
    reloader = CommandReloader([sys.executable, "-c", code], timeout_s=30)
    with pytest.raises(ReloadError) as info:
        await reloader.reload(t1)
    message = str(info.value)
    assert "exit status 3" in message
    assert message.endswith("container vllm not found")
    assert len(message) < 2200
    assert info.value.retryable


async def test_missing_program_is_not_retryable(t1: ServeTarget) -> None:
    reloader = CommandReloader(["/nonexistent/restart-vllm", "{voice}"])
    with pytest.raises(ReloadError, match="cannot run") as info:
        await reloader.reload(t1)
    assert not info.value.retryable


async def test_hang_is_cut_by_timeout_and_the_group_killed(tmp_path: Path, t1: ServeTarget) -> None:
    pidfile = tmp_path / "child.pid"
    # the command forks a grandchild that would outlive a plain kill of the parent
    code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        time.sleep(600)
        """
    )
    reloader = CommandReloader([sys.executable, "-c", code], timeout_s=2.0)
    start = trio.current_time()
    with pytest.raises(ReloadError, match="did not finish within the 2 s timeout") as info:
        await reloader.reload(t1)
    assert trio.current_time() - start < 10
    assert info.value.retryable
    grandchild = int(pidfile.read_text())
    # the grandchild was killed with the group: poll until it is gone (it may be a zombie of init briefly)
    await wait_until(lambda: not process_alive(grandchild))


async def test_cancel_kills_the_group(tmp_path: Path, t1: ServeTarget) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    reloader = CommandReloader([sys.executable, "-c", code], timeout_s=600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloader.reload, t1)
        await wait_until(lambda: pidfile.exists() and bool(pidfile.read_text()))
        nursery.cancel_scope.cancel()
    pid = int(pidfile.read_text())
    assert not process_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_verify_argv(tmp_path: Path, t1: ServeTarget) -> None:
    marker = tmp_path / "served"
    check = [
        sys.executable,
        "-c",
        "import sys, os; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)",
        str(marker),
    ]
    reloader = CommandReloader(["touch", str(marker)], verify_argv=check)
    assert not await reloader.verify(t1)
    await reloader.reload(t1)
    assert await reloader.verify(t1)


async def test_none_reloader(t1: ServeTarget) -> None:
    reloader: Reloader = NoneReloader()
    assert reloader.method == "none"
    assert await reloader.reload(t1) == "default-v0007"
    assert await reloader.verify(t1)
    await reloader.aclose()
