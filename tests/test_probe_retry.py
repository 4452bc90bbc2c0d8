"""A backend probe that times out (a loaded machine, a slow import) is asked again, longer each time.

The probes are real subprocesses: ``training.python`` points at a small wrapper that makes the first
probe hang (as an import can under load) and runs the real worker after that.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing

from beagled.training import runner
from beagled.training.runner import SubprocessTrainer
from tests.daemon_proc import poll


def hang_first(tmp_path: Path, *, always: bool = False) -> Path:
    """An interpreter wrapper: a ``probe`` hangs the first time (every time with ``always``)."""
    mark = tmp_path / "probed-once"
    test = "true" if always else f"mkdir {mark} 2>/dev/null"
    exe = tmp_path / "python-slow-first"
    exe.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path / "calls"}\n'
        f'if [ "$3" = probe ] && {test}; then exec sleep 3600; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_a_probe_that_timed_out_is_asked_again_and_the_backend_becomes_available(
    make_daemon: Any, tmp_path: Path
) -> None:
    exe = hang_first(tmp_path)
    d = make_daemon(
        {
            "training": {"backends": ["mlx"], "python": str(exe), "probe_timeout_s": 10.0, "warm": False},
        }
    )
    pid = d.proc.pid

    def mlx() -> dict[str, Any]:
        with d.client() as c:
            (b,) = c.status()["backends"]
        return dict(b)

    def when(ok: Any) -> Any:
        return lambda: b if ok(b := mlx()) else None

    first = poll(when(lambda b: "timed out" in b["reason"]), 120, what="the first timeout")
    assert not first["available"]
    assert "timed out after 10s" in first["reason"] and "with a 20s timeout" in first["reason"]
    # no restart, no `train`: the daemon asks again by itself and the real probe answers
    final = poll(when(lambda b: b["available"]), 300, what="mlx to become available")
    assert final["reason"].startswith("mlx-lm ")
    assert d.proc.poll() is None and d.proc.pid == pid  # the same daemon process all along
    probes = [ln for ln in (tmp_path / "calls").read_text().splitlines() if " probe " in f" {ln} "]
    assert 2 <= len(probes) <= 1 + runner.PROBE_RETRIES
    logged = [json.loads(ln) for ln in d.log_text().splitlines() if '"backend probed"' in ln]
    assert [r["available"] for r in logged][-1] is True
    assert len(logged) == len(probes)  # one log line per probe: bounded


def test_retries_are_bounded_and_each_timeout_doubles_up_to_8x(tmp_path: Path) -> None:
    exe = hang_first(tmp_path, always=True)
    spec_dir = tmp_path / "state" / "specs"
    spec_dir.mkdir(parents=True)
    reasons: list[str] = []
    times: list[float] = []

    async def main() -> None:
        t = SubprocessTrainer(["mlx"], python=str(exe), probe_timeout_s=10.0, spec_dir=spec_dir)
        start = trio.current_time()
        await t.probe_all()
        reasons.append(t.statuses()[0].reason)
        times.append(trio.current_time() - start)
        while t.reprobe_at() < float("inf"):
            await trio.sleep_until(t.reprobe_at())
            start = trio.current_time()
            await t.reprobe_due()
            reasons.append(t.statuses()[0].reason)
            times.append(trio.current_time() - start)
        assert t.available() == []

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    # virtual time: each try ran exactly to its limit (10, 20, 40, 80 s), then no more tries of its own
    assert [round(x) for x in times] == [10, 20, 40, 80]
    assert reasons[0] == "probe timed out after 10s; asked again in 5s with a 20s timeout"
    assert reasons[1] == "probe timed out after 20s; asked again in 10s with a 40s timeout"
    assert reasons[2] == "probe timed out after 40s; asked again in 20s with a 80s timeout"
    assert reasons[3] == "probe timed out after 80s (4 tries)"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 + runner.PROBE_RETRIES
    assert all(c.endswith("probe mlx") for c in calls)
