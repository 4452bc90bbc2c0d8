"""sd_notify for systemd's ``Type=notify``: READY, STATUS, STOPPING, WATCHDOG, without dependencies.

This module owns the notification socket and nothing else. ``Notifier.from_env()`` reads
``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket) and ``WATCHDOG_USEC`` /
``WATCHDOG_PID``; with no ``NOTIFY_SOCKET`` (launchd, a terminal, a test) every call is a no-op.

Why a plain blocking-API ``socket`` call is fine inside trio: the notification socket is an
``AF_UNIX`` datagram socket and ours is put in non-blocking mode. A datagram send either copies the
message into the receiver's queue at once or fails at once (``EAGAIN`` when systemd's queue is full,
``ECONNREFUSED``/``ENOENT`` when nobody listens); it never waits on the network or on a peer. So a
call costs one syscall of a few microseconds, which is less than any trio checkpoint, and needs no
thread. ``run_watchdog`` is the one async part: a trio task that pings at ``watchdog_interval()``.

Nothing here raises into the caller: a failed send is logged (a warning the first time, then at debug
level so a dead socket does not flood the journal) and the daemon carries on. sd_notify is advisory;
losing a READY=1 makes systemd time the start out, which is the right outcome for a daemon that cannot
talk to its manager.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

#: A sd_notify datagram is a few ``KEY=value`` lines; systemd accepts far more, but STATUS= text from
#: the daemon should stay short. Longer status texts are cut to this many characters.
MAX_STATUS_CHARS = 1024


def _parse_address(raw: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` as an ``AF_UNIX`` address: ``@name`` is abstract (a leading NUL byte)."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd >= 253 also hands out "vsock:CID:PORT" (for VMs); we do not speak it.
    log.warning("NOTIFY_SOCKET=%r is not a path or an abstract name; sd_notify disabled", raw)
    return None


def _parse_watchdog(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC in microseconds if it applies to this process, else None."""
    raw_usec = environ.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not an integer", raw_pid)
            return None
        if pid != os.getpid():
            # The watchdog is meant for another process (e.g. we were started by a wrapper).
            return None
    return usec


class Notifier:
    """Sends sd_notify datagrams to the service manager; every method is a no-op when disabled."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (``os.environ`` by default).

        With ``unset_environment`` the three variables are removed from ``os.environ`` afterwards, so
        that child processes (training subprocesses) do not talk to systemd in our name.
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _parse_address(raw) if raw else None
        watchdog_usec = _parse_watchdog(env) if address is not None else None
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled advises)."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # --- the messages ------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is done (after recovery and binding the socket)."""
        return self.send("READY=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """STATUS=...: one line shown by ``systemctl status``."""
        return self.send(*self._status_field(text))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send("STOPPING=1", *self._status_field(status))

    def reloading(self) -> bool:
        """RELOADING=1: a configuration reload has begun (send ready() when it is done)."""
        return self.send("RELOADING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1: we are alive; must come more often than WATCHDOG_USEC."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=...: ask for more time to start or stop (e.g. during a long recovery)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it was sent, False if disabled or failed."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as e:
            self._report(fields, e)
            return False
        return True

    def close(self) -> None:
        """Close the socket; later sends open a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the watchdog task -------------------------------------------------------------------

    async def run_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping WATCHDOG=1 every ``watchdog_interval()`` until cancelled; returns at once without one.

        Start it in the daemon's nursery (``await nursery.start(notifier.run_watchdog)``): as long as
        the trio event loop runs, systemd sees pings; a wedged loop stops them and systemd restarts us.
        """
        interval = self.watchdog_interval()
        task_status.started()
        if interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _status_field(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        # sd_notify fields are newline separated: a newline in the text would start a new field.
        line = " ".join(text.split("\n")).replace("\r", " ")[:MAX_STATUS_CHARS]
        return (f"STATUS={line}",)

    def _report(self, fields: tuple[str, ...], error: OSError) -> None:
        what = fields[0].split("=", 1)[0]
        if not self._warned:
            self._warned = True
            log.warning(
                "sd_notify %s to %r failed: %s (further failures are logged at debug level)",
                what,
                self._address,
                error,
            )
        else:
            log.debug("sd_notify %s to %r failed: %s", what, self._address, error)
