"""Structured logging: one event per line — JSON when stderr is not a terminal, readable text on one.

Context travels as ``extra=`` fields (``job_id``, ``voice``, ``backend`` …) and lands on the same line,
so every line about a job names it. Secrets never reach a log record: reloaders log hosts, not keys,
and a key the daemon loaded (``add_secret``) is replaced by ``********`` in every formatted line.
With ``$JOURNAL_STREAM`` set (stderr is journald's), each line starts with its syslog priority
(``<3>`` error … ``<7>`` debug) so ``journalctl -p warning`` selects by level.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRETS: set[str] = set()
MASK = "********"
# syslog priorities (sd-daemon(3) prefixes) by logging level
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def add_secret(value: str) -> str:
    """Mask ``value`` in every log line from now on; returns it (for use inline)."""
    if len(value) >= 4:  # shorter would mask ordinary words
        _SECRETS.add(value)
    return value


def _scrub(line: str) -> str:
    for s in _SECRETS:
        line = line.replace(s, MASK)
    return line


def priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalPrefix(logging.Formatter):
    """Wraps a formatter: ``<N>`` before each line, N the record's syslog priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        p = f"<{priority(record.levelno)}>"
        return "\n".join(p + ln for ln in self.inner.format(record).split("\n"))


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _extras(record).items():
            out[k] = v if isinstance(v, str | int | float | bool | type(None) | list | dict) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _scrub(json.dumps(out, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        ctx = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}" + (f"  [{ctx}]" if ctx else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return _scrub(line)


def _journal_stderr() -> bool:
    """stderr is connected to journald (``$JOURNAL_STREAM`` = its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(fmt: str = "auto", level: str = "info") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if use_json else TextFormatter()
    handler.setFormatter(JournalPrefix(formatter) if _journal_stderr() else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
