"""No space left on the device: the state dir lives on a small tmpfs that the test fills up.

While the disk is full the daemon keeps answering ``ping``, a submit gets a clear ``unavailable`` (not a
hang, not a crash), and a job whose adapter cannot be written fails its try cleanly or waits. Once space
returns, work resumes; after a SIGKILL and a restart every acknowledged pair is still in the log.
Needs root and a kernel that lets it mount tmpfs (skipped otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beagled import errors
from tests.daemon_proc import DaemonProc, fake_backend, poll
from tests.invariants import (
    FINAL_WITHOUT_RELOADER,
    Ack,
    all_jobs,
    check_acked,
    check_current_links,
    check_integrity,
    check_pairs_trained_once,
    wait_final,
)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="bgdisk", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def fill(mnt: Path) -> Path:
    filler = mnt / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def submit(d: DaemonProc, tag: str, n: int, acked: list[Ack]) -> list[str]:
    """Submit ``n`` keyed pairs; returns the error codes met (acks are recorded)."""
    codes = []
    with d.client(timeout=10) as c:
        for i in range(n):
            key = f"{tag}-{i}"
            t0 = time.monotonic()
            try:
                r = c.submit(bad=f"{key} bad", good=f"{key} good", key=key)
                acked.append(Ack(key, r["pair_id"], "default"))
            except errors.BeagledError as e:
                codes.append(e.code)
            assert time.monotonic() - t0 < 10, "a submit hung"
    return codes


def test_disk_full_is_survived_and_loses_no_acknowledged_pair(
    small_disk: Path, tmp_path: Path, make_daemon: Any
) -> None:
    state = small_disk / "state"
    mode = tmp_path / "mode"
    mode.write_text("ok")
    d = make_daemon(
        {
            "daemon": {"state_dir": str(state)},
            "training": {"heldout_share": 0.0},
            "scheduler": {"retry_backoff_s": 0.2, "max_attempts": 100},
        },
        start=False,
        backend=fake_backend("ok", "--mode-file", str(mode)),
    )
    d.state_dir = state
    d.start()
    acked: list[Ack] = []
    assert submit(d, "before", 8, acked) == []
    d.wait_jobs(lambda js: len(js) == 2 and all(j["state"] == "promoted" for j in js))

    mode.write_text("slow:1.5")  # a job is training when the disk fills: its adapter cannot be written
    assert submit(d, "training", 4, acked) == []
    d.wait_jobs(lambda js: len(js) == 3 and js[0]["state"] == "training")
    filler = fill(small_disk)
    codes = submit(d, "full", 300, acked)
    with d.client(timeout=5) as c:
        assert c.ping()
    assert codes and set(codes) == {"unavailable"}, codes
    assert d.proc is not None and d.proc.poll() is None, "the daemon died on a full disk"
    assert "database or disk is full" in d.log_text()
    # the training try that was running cannot write its adapter: it fails (and is retried), cleanly
    poll(lambda: "No space left on device" in d.log_text(), 30, 0.1, "the trainer to hit the full disk")
    with d.client(timeout=5) as c:
        assert c.ping()

    mode.write_text("ok")
    filler.unlink()  # space is back
    assert submit(d, "after", 8, acked) == []
    wait_final(d, FINAL_WITHOUT_RELOADER, 120)
    d.kill()
    d.start()
    with d.client(timeout=60) as c:
        assert check_acked(c, acked) == len(acked)
        check_pairs_trained_once(all_jobs(c))
        voices = c.voices()["voices"]
    check_current_links(d, voices)
    check_integrity(state / "events.sqlite3")
    print(f"\ndisk full: {len(acked)} acked pairs kept, {len(codes)} submits refused as unavailable")
