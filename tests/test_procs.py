"""The worker-line reader and the process-group helper of ``beagled.training.procs``, without a worker."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import deque
from typing import Any

import trio

from beagled.training.procs import (
    JobLines,
    LineBuffer,
    how_it_ended,
    job_lines,
    kill_group,
    parse_line,
    signal_group,
)


def test_parse_line_takes_json_objects_only() -> None:
    line = parse_line(b'  {"type": "progress", "step": 3}\r\n')
    assert line is not None
    assert line.type == "progress" and line.body == {"type": "progress", "step": 3}
    untyped = parse_line(b'{"step": 3}')
    assert untyped is not None and untyped.type == ""
    for raw in (b"", b"loading weights...", b"[1, 2]", b"{not json", b'"text"'):
        assert parse_line(raw) is None, raw


def test_line_buffer_splits_chunks_and_drops_an_over_long_line() -> None:
    plain = LineBuffer()
    assert plain.feed(b"a\nb") == [b"a"]
    assert plain.feed(bytearray(b"c\n\nd")) == [b"bc", b""]

    notes: list[str] = []
    capped = LineBuffer(8, on_dropped=notes.append)
    assert capped.feed(b"ok\n" + b"x" * 20) == [b"ok"]
    assert notes == ["(stdout line over 8 bytes dropped) " + "x" * 20]
    assert capped.feed(b"yyy") == []  # still inside the dropped line
    assert capped.feed(b"yy\nnext\n") == [b"next"]
    assert len(notes) == 1


def test_job_lines_follow_one_job() -> None:
    progress: list[dict[str, Any]] = []
    stray: deque[str] = deque(maxlen=3)
    job = JobLines("peft", progress.append, stray)
    assert not job.take(b'{"type": "progress", "step": 1}')
    assert not job.take(b'{"type": "log", "message": "hello"}')
    assert not job.take(b"a banner " + b"=" * 600)
    assert progress == [{"type": "progress", "step": 1}]
    assert list(stray) == [("a banner " + "=" * 600)[:500]]
    assert job.take(b'{"type": "error", "message": "' + b"e" * 3000 + b'"}')
    assert job.error == "e" * 2000 and job.result is None
    assert job.take(b'{"type": "result", "steps": 4}')
    assert job.result == {"type": "result", "steps": 4}

    unnamed = JobLines("peft", progress.append, [])
    assert unnamed.take(b'{"type": "error"}') and unnamed.error == "error"


def test_job_lines_skip_blank_stdin_lines() -> None:
    assert list(job_lines([b"{}\n", b"  \n", b"\n", b'{"a": 1}\n'])) == [b"{}\n", b'{"a": 1}\n']


def test_how_it_ended() -> None:
    assert how_it_ended(-9) == "killed by signal 9"
    assert how_it_ended(3) == "exited with status 3"
    assert how_it_ended(0) == "exited with status 0"
    assert how_it_ended(None) == "failed"


def test_signal_group_of_a_gone_group_is_no_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    assert signal_group(proc.pid, signal.SIGTERM) is False


def test_kill_group_ends_a_group_that_ignores_sigterm_and_its_children() -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])  # shares our stdout\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def main() -> int | None:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True
        )
        assert proc.stdout is not None
        buf = LineBuffer()
        while not buf.feed(await proc.stdout.receive_some(100)):
            pass
        await kill_group(proc, grace_s=0.2)
        with trio.fail_after(10):  # end of file: no process of the group holds the pipe any more
            while await proc.stdout.receive_some(100):
                pass
        await proc.stdout.aclose()
        return proc.returncode

    assert trio.run(main) == -signal.SIGKILL
