"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's notification socket."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from beagled.notify import Notifier
from tests.daemon_proc import notify_socket


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket (what systemd listens on) and its path."""
    with notify_socket(2) as pair:
        yield pair


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_ready_status_stopping_watchdog(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    with Notifier.from_env({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert recv(sock) == "READY=1"
        assert notifier.ready("serving 3 voices")
        assert recv(sock) == "READY=1\nSTATUS=serving 3 voices"
        assert notifier.status("training default\nv0004")
        assert recv(sock) == "STATUS=training default v0004"  # a newline would start a new field
        assert notifier.watchdog()
        assert recv(sock) == "WATCHDOG=1"
        assert notifier.extend_timeout(1.5)
        assert recv(sock) == "EXTEND_TIMEOUT_USEC=1500000"
        assert notifier.reloading()
        assert recv(sock) == "RELOADING=1"
        assert notifier.stopping("shutting down")
        assert recv(sock) == "STOPPING=1\nSTATUS=shutting down"


def test_long_status_is_cut() -> None:
    with tempfile.TemporaryDirectory(prefix="bn-", dir="/tmp") as directory:
        path = str(Path(directory) / "n")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            with Notifier(path) as notifier:
                notifier.status("x" * 5000)
            assert len(sock.recv(8192)) == len("STATUS=") + 1024


def test_abstract_socket() -> None:
    name = f"beagled-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert recv(sock) == "READY=1"
        notifier.close()


def test_unset_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None  # no socket: nobody to ping


def test_dead_socket_never_raises_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/beagled/notify"})
    with caplog.at_level(logging.DEBUG, logger="beagled.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.status("x") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "READY" in warnings[0].getMessage()
    notifier.close()


def test_unsupported_address_disables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="beagled.notify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "vsock" in caplog.text


def test_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    """A receiver that never reads: sends fail fast with EAGAIN instead of blocking the event loop."""
    sock, path = receiver
    notifier = Notifier(path)
    start = time.monotonic()
    results = [notifier.watchdog() for _ in range(5000)]
    assert time.monotonic() - start < 5
    assert results[0] is True
    assert False in results, "the receiver's queue never filled up"
    drain(sock)
    assert notifier.watchdog() is True  # recovers once systemd reads again
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notifier.watchdog_interval() == expected


def test_unset_environment(monkeypatch: pytest.MonkeyPatch, receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env(unset_environment=True)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ  # training subprocesses must not talk to systemd
    assert notifier.watchdog_interval() == 1.0
    assert notifier.ready()
    assert recv(sock) == "READY=1"
    notifier.close()


async def test_run_watchdog_pings_until_cancelled(
    receiver: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = receiver
    notifier = Notifier(path, watchdog_usec=20_000)  # ping every 10 ms (of the mock clock: no load skews it)
    async with trio.open_nursery() as nursery:
        await nursery.start(notifier.run_watchdog)
        await trio.sleep(0.105)
        nursery.cancel_scope.cancel()
    pings = drain(sock)
    assert len(pings) == 11  # at 0, 10, ..., 100 ms
    assert set(pings) == {"WATCHDOG=1"}
    notifier.close()


async def test_run_watchdog_without_watchdog_returns() -> None:
    notifier = Notifier("/nonexistent/notify")
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run_watchdog)
