"""``beaglectl``: the command-line client of beagled.

``beaglectl [--socket PATH] [--config PATH] [--json] COMMAND``. Human-readable output by default,
``--json`` prints the raw result for scripts (JSON lines for ``watch``). Exit status: 0 success,
1 the daemon refused or failed the request, 2 usage error (bad arguments, bad input, bad config),
3 the daemon is not running.

The formatting functions (``format_*``, ``render_progress``) are pure: data in, text out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, TextIO

from beagled import __version__, errors
from beagled.client import Client, DaemonNotRunning, default_socket_path
from beagled.protocol import SETTLED_STATES

__all__ = [
    "EXIT_DAEMON_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_RUNNING",
    "EXIT_OK",
    "EXIT_USAGE",
    "ProgressBoard",
    "ProgressTracker",
    "UsageError",
    "format_event",
    "format_job",
    "format_jobs",
    "format_status",
    "format_voices",
    "main",
    "parse_submission",
    "render_progress",
]

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130

PROG = "beaglectl"
SUBMIT_KEYS = frozenset({"bad", "good", "voice", "prompt", "key", "quality", "system", "messages"})
#: A job that reaches one of these states has no more progress to show.
_DONE_STATES = SETTLED_STATES


class UsageError(Exception):
    """Bad arguments or bad input from the user (exit 2)."""


# --- small pure helpers -------------------------------------------------------------------------


def _clean(value: object) -> str:
    """A value as one line of text, with control characters escaped (daemon text reaches a terminal)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _shorten(text: str, limit: int) -> str:
    if limit <= 0:
        return ""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], indent: str = "") -> str:
    cells = [[_clean(h) for h in headers]] + [[_clean(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _format_time(value: object, tz: tzinfo | None = None) -> str:
    """An event/job time (epoch seconds or ISO 8601) as ``YYYY-MM-DD HH:MM:SS`` in ``tz`` (local)."""
    if value is None or value == "":
        return "-"
    moment: datetime | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        moment = datetime.fromtimestamp(value, tz=UTC)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return _clean(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    if moment is None:
        return _clean(value)
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _pairs(value: object) -> object:
    """A job's ``pairs``: a count, or a list of pair ids shown by its length."""
    if isinstance(value, list | tuple):
        return len(value)
    return value


# --- formatting: results ------------------------------------------------------------------------


def format_jobs(jobs: Sequence[Mapping[str, Any]], *, tz: tzinfo | None = None) -> str:
    """An aligned table of jobs (newest first, as the daemon sends them)."""
    if not jobs:
        return "no jobs"
    rows = [
        (
            job.get("job_id"),
            job.get("voice"),
            job.get("state"),
            job.get("attempt"),
            job.get("backend"),
            _pairs(job.get("pairs")),
            _format_time(job.get("updated_at"), tz),
            _shorten(_clean(job.get("error") or ""), 60),
        )
        for job in jobs
    ]
    return _table(("JOB", "VOICE", "STATE", "ATTEMPT", "BACKEND", "PAIRS", "UPDATED", "ERROR"), rows)


def format_job(job: Mapping[str, Any], *, tz: tzinfo | None = None) -> str:
    """One job: its fields, then its state history when the daemon sends one."""
    lines: list[str] = []
    known = ("job_id", "voice", "state", "attempt", "backend", "pairs", "created_at", "updated_at", "error")
    fields: list[tuple[str, object]] = []
    for name in known:
        value = job.get(name)
        if name in ("created_at", "updated_at"):
            value = _format_time(value, tz)
        elif name == "pairs":
            value = _pairs(value)
        fields.append((name, value))
    for name, value in job.items():
        if name not in known and name != "history" and not isinstance(value, list | dict):
            fields.append((name, value))
        elif name == "waiting_for_executor" and isinstance(value, Mapping):  # a Ray cluster is down
            since = _format_time(value.get("since"), tz)
            fields.append((name, f"{value.get('executor')} since {since}: {value.get('error')}"))
    width = max(len(name) for name, _ in fields)
    lines.extend(f"{name.ljust(width)}  {_clean(value)}" for name, value in fields)
    history = job.get("history")
    if isinstance(history, list) and history:
        lines.append("")
        lines.append("history")
        rows: list[tuple[object, ...]] = []
        for entry in history:
            if not isinstance(entry, Mapping):
                rows.append(("-", "-", _clean(entry)))
                continue
            rest = {k: v for k, v in entry.items() if k not in ("at", "state", "type")}
            detail = " ".join(f"{k}={_shorten(_clean(v), 60)}" for k, v in rest.items())
            rows.append((_format_time(entry.get("at"), tz), entry.get("state") or entry.get("type"), detail))
        lines.append(_table(("AT", "STATE", "DETAIL"), rows, indent="  "))
    return "\n".join(lines)


#: A voice's columns, in the order of ``format_voices`` (``format_status`` shows the first five).
_VOICE_KEYS = ("voice", "version", "served_name", "pending_pairs", "current_job", "adapter_path")


def format_voices(voices: Sequence[Mapping[str, Any]]) -> str:
    if not voices:
        return "no voices"
    rows = [[v.get(key) for key in _VOICE_KEYS] for v in voices]
    return _table(("VOICE", "VERSION", "SERVED NAME", "PENDING", "CURRENT JOB", "ADAPTER"), rows)


def format_status(status: Mapping[str, Any]) -> str:
    """The daemon's status: event seq, paused, jobs by state, voices, backends."""
    lines = [
        f"event seq  {_clean(status.get('event_seq'))}",
        f"paused     {_clean(bool(status.get('paused')))}",
    ]
    if status.get("node") is not None:  # who leads the log this daemon writes to
        role = "leader" if status.get("leader") else "follower"
        lead = status.get("leader_node") or "none"
        lines.append(
            f"node       {_clean(status.get('node'))} ({role}; leader {_clean(lead)}, "
            f"term {_clean(status.get('term'))}, lag {_clean(status.get('lag_s'))} s)"
        )
        nodes = status.get("nodes")
        if isinstance(nodes, list) and nodes:
            lines.append("nodes      " + ", ".join(_clean(n) + (" *" if n == lead else "") for n in nodes))
    jobs = status.get("jobs") or {}
    if isinstance(jobs, Mapping) and any(jobs.values()):
        counts = ", ".join(f"{_clean(state)} {_clean(n)}" for state, n in jobs.items() if n)
        lines.append(f"jobs       {counts}")
    else:
        lines.append("jobs       none")
    voices = status.get("voices") or {}
    lines.append("")
    if isinstance(voices, Mapping) and voices:
        rows: list[tuple[object, ...]] = []
        for name, raw in voices.items():
            info: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            rows.append((name, *(info.get(key) for key in _VOICE_KEYS[1:5])))
        lines.append("voices")
        lines.append(_table(("VOICE", "VERSION", "SERVED NAME", "PENDING", "CURRENT JOB"), rows, indent="  "))
    else:
        lines.append("voices     none")
    backends = status.get("backends") or []
    lines.append("")
    if isinstance(backends, list) and backends:
        backend_rows = [
            (b.get("name"), b.get("available"), b.get("reason") or "")
            for b in backends
            if isinstance(b, Mapping)
        ]
        lines.append("backends")
        lines.append(_table(("NAME", "AVAILABLE", "REASON"), backend_rows, indent="  "))
    else:
        lines.append("backends   none")
    return "\n".join(lines)


def format_ping(result: Mapping[str, Any]) -> str:
    uptime = _number(result.get("uptime_s"))
    up = _format_duration(uptime) if uptime is not None else "?"
    return f"beagled {_clean(result.get('version'))} is up ({up})"


# --- formatting: the watch stream ---------------------------------------------------------------

_EVENT_SKIP = frozenset({"job_id", "voice", "bad", "good", "prompt"})


def format_event(event: Mapping[str, Any], *, tz: tzinfo | None = None) -> str:
    """One line per event: time, seq, type, job id, voice, then the other data fields (shortened)."""
    at = _format_time(event.get("at"), tz)
    clock = at[11:] if len(at) == 19 else at
    data = event.get("data")
    data = data if isinstance(data, Mapping) else {}
    parts = [clock, f"#{_clean(event.get('seq'))}", _clean(event.get("type")).ljust(16)]
    if data.get("job_id") is not None:
        parts.append(f"job={_clean(data['job_id'])}")
    if data.get("voice") is not None:
        parts.append(f"voice={_clean(data['voice'])}")
    parts.extend(
        f"{_clean(k)}={_shorten(_field(str(k), v, tz), 40)}" for k, v in data.items() if k not in _EVENT_SKIP
    )
    return " ".join(parts).rstrip()


def _field(key: str, value: object, tz: tzinfo | None) -> str:
    """A data field: ``*_at`` epoch times as local times (``retry_at=12:04:31``, not ``1.796e+09``)."""
    if key.endswith("_at") and _number(value) is not None:
        at = _format_time(value, tz)
        return at[11:] if len(at) == 19 else at
    return _clean(value)


def render_progress(progress: Mapping[str, Any], width: int) -> str:
    """One progress line, at most ``width`` characters: ``JOB [####....] 12/100 loss 1.23 tok/s ETA``.

    Known keys: ``job_id``, ``voice``, ``step``, ``total``, ``loss``, ``tokens_per_s``, ``eta_s``
    (else ETA from ``elapsed_s``); any may be missing.
    """
    label = _shorten(_clean(progress.get("job_id") or "?"), 24)
    if progress.get("voice") is not None:
        label = f"{label} ({_shorten(_clean(progress['voice']), 16)})"
    step = _number(progress.get("step"))
    total = _number(progress.get("total"))
    info: list[str] = []
    if step is not None and total is not None and total > 0:
        info.append(f"{int(step)}/{int(total)}")
    elif step is not None:
        info.append(f"step {int(step)}")
    loss = _number(progress.get("loss"))
    if loss is not None:
        info.append(f"loss {loss:.4f}")
    tps = _number(progress.get("tokens_per_s"))
    if tps is not None:
        info.append(f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    eta = _number(progress.get("eta_s"))
    if eta is None:
        elapsed = _number(progress.get("elapsed_s"))
        if elapsed is not None and step and total is not None and step > 0:
            eta = elapsed / step * max(total - step, 0)
    if eta is not None:
        info.append(f"ETA {_format_duration(eta)}")
    right = " ".join(info)
    bar = ""
    if step is not None and total is not None and total > 0:
        room = width - len(label) - len(right) - 4  # spaces and brackets
        if room >= 10:
            bar_width = min(room, 40)
            filled = int(bar_width * min(max(step / total, 0.0), 1.0))
            bar = "[" + "#" * filled + "." * (bar_width - filled) + "]"
    line = " ".join(part for part in (label, bar, right) if part)
    return _shorten(line, width)


class ProgressTracker:
    """Adds an ``eta_s`` estimate to progress messages that lack one, from the step rate seen so far."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[float, float]] = {}

    def update(self, progress: Mapping[str, Any], now: float) -> dict[str, Any]:
        out = dict(progress)
        job = str(progress.get("job_id"))
        step = _number(progress.get("step"))
        total = _number(progress.get("total"))
        if step is None:
            return out
        first = self._first.setdefault(job, (now, step))
        if step < first[1]:  # a new attempt restarted the count
            first = self._first[job] = (now, step)
        if "eta_s" in out or "elapsed_s" in out or total is None:
            return out
        done = step - first[1]
        if done > 0 and now > first[0]:
            out["eta_s"] = (now - first[0]) / done * max(total - step, 0)
        return out

    def forget(self, job_id: str) -> None:
        self._first.pop(job_id, None)


class ProgressBoard:
    """Writes watch output: event lines, and one progress bar per running job.

    On a TTY the bars sit below the event lines and are redrawn in place (carriage return, cursor up,
    erase line); otherwise each progress message is one plain line.
    """

    def __init__(self, out: TextIO, *, tty: bool, width: int = 80, tz: tzinfo | None = None) -> None:
        self.out = out
        self.tty = tty
        self.width = width
        self.tz = tz
        self.tracker = ProgressTracker()
        self.bars: dict[str, str] = {}
        self._drawn = 0

    def _erase(self) -> None:
        if self.tty and self._drawn:
            # to the first bar's line, then erase from there to the end of the screen
            up = f"\x1b[{self._drawn - 1}A" if self._drawn > 1 else ""
            self.out.write(f"\r{up}\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if self.tty and self.bars:
            self.out.write("\n".join(self.bars.values()))
            self._drawn = len(self.bars)
        self.out.flush()

    def event(self, event: Mapping[str, Any]) -> None:
        self._erase()
        line = format_event(event, tz=self.tz)
        self.out.write((_shorten(line, self.width) if self.tty else line) + "\n")
        data = event.get("data")
        if isinstance(data, Mapping) and data.get("job_id") is not None:
            job = str(data["job_id"])
            state = str(data.get("state") or "")
            kind = str(event.get("type") or "")
            if state in _DONE_STATES or any(s in kind for s in _DONE_STATES):
                self.bars.pop(job, None)
                self.tracker.forget(job)
        self._draw()

    def progress(self, progress: Mapping[str, Any], now: float) -> None:
        line = render_progress(self.tracker.update(progress, now), self.width)
        if not self.tty:
            self.out.write(line + "\n")
            self.out.flush()
            return
        self._erase()
        self.bars[str(progress.get("job_id"))] = line
        self._draw()

    def close(self) -> None:
        """Leave the cursor on a fresh line below the bars."""
        if self.tty and self._drawn:
            self.out.write("\n")
            self._drawn = 0
        self.out.flush()


# --- submit input -------------------------------------------------------------------------------


def parse_submission(text: str) -> dict[str, Any]:
    """The pair from ``submit``'s stdin: a JSON object with string ``bad`` and ``good`` (and optionally
    ``voice``, ``prompt``, ``key``, ``quality``). Raises UsageError with a message a user can act on."""
    if not text.strip():
        raise UsageError('no input: pipe a JSON object {"bad": ..., "good": ...} on stdin')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"stdin is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, dict):
        raise UsageError('stdin must hold a JSON object {"bad": ..., "good": ...}')
    unknown = sorted(set(data) - SUBMIT_KEYS)
    if unknown:
        raise UsageError(
            f"unknown field(s) in stdin JSON: {', '.join(unknown)} (known: {', '.join(sorted(SUBMIT_KEYS))})"
        )
    for name in ("bad", "good"):
        if not isinstance(data.get(name), str):
            raise UsageError(f'stdin JSON needs "{name}" as a string')
    for name in ("voice", "prompt", "key", "system"):
        if name in data and data[name] is not None and not isinstance(data[name], str):
            raise UsageError(f'"{name}" must be a string')
    if data.get("messages") is not None and not isinstance(data["messages"], list):
        raise UsageError('"messages" must be a list of {"role": ..., "content": ...}')
    quality = data.get("quality")
    if quality is not None and not isinstance(quality, dict):
        raise UsageError('"quality" must be an object {"before": number, "after": number}')
    return data


def _read_file(path: str, what: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UsageError(f"{what}: no such file: {path}") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: {path} is not UTF-8 text") from e
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path}: {e.strerror or e}") from e


def _submission(args: argparse.Namespace) -> dict[str, Any]:
    if (args.bad_file is None) != (args.good_file is None):
        raise UsageError("--bad-file and --good-file go together")
    if args.bad_file is not None:
        if args.bad_file == "-" and args.good_file == "-":
            raise UsageError("only one of --bad-file/--good-file can be stdin (-)")
        data: dict[str, Any] = {
            "bad": _read_file(args.bad_file, "--bad-file"),
            "good": _read_file(args.good_file, "--good-file"),
        }
    else:
        if sys.stdin.isatty():
            raise UsageError(
                'submit needs a pair: pipe {"bad": ..., "good": ...} JSON on stdin, '
                "or give --bad-file and --good-file"
            )
        data = parse_submission(sys.stdin.read())
    for name in ("voice", "prompt", "key", "system"):
        value = getattr(args, name)
        if value is not None:
            data[name] = value
    if args.messages_file is not None:
        data["messages"] = _messages_file(
            args.messages_file, stdin_taken=args.bad_file is None or "-" in (args.bad_file, args.good_file)
        )
    return data


def _messages_file(path: str, *, stdin_taken: bool) -> list[Any]:
    """``--messages-file``: a JSON list of ``{"role", "content"}`` (the daemon checks each message)."""
    if path == "-" and stdin_taken:
        raise UsageError("--messages-file - needs --bad-file and --good-file from files (stdin is taken)")
    text = _read_file(path, "--messages-file")
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--messages-file: {path} is not valid JSON: {e.msg} (line {e.lineno})") from e
    if not isinstance(messages, list):
        raise UsageError(f'--messages-file: {path} must hold a JSON list of {{"role": ..., "content": ...}}')
    return messages


# --- command line -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's NoReturn, without the sys.exit
        raise UsageError(f"{message}\n{self.format_usage().rstrip()}")


def _build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # Also accepted after the command (``beaglectl status --json``); SUPPRESS keeps the global value.
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help="the daemon's socket")
    common.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help="config to find the socket in"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON")
    common.add_argument(
        "--timeout", type=float, metavar="S", default=argparse.SUPPRESS, help="request timeout"
    )

    parser = _Parser(
        prog=PROG,
        description="Control beagled over its Unix socket.",
        epilog="exit status: 0 ok, 1 daemon error, 2 usage error, 3 daemon not running",
    )
    parser.add_argument("--socket", metavar="PATH", help="the daemon's socket (default: from the config)")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file to read the socket from ($BEAGLED_CONFIG, ./config.toml)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the raw result JSON (JSON lines for watch)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="request timeout (default 30)"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, parents=[common], description=help_text
        )
        return p

    add("ping", "check that the daemon answers")
    add("status", "event seq, paused, jobs by state, voices, backends")
    p = add("submit", 'submit a pair: {"bad": ..., "good": ...} JSON on stdin, or --bad-file/--good-file')
    p.add_argument("--bad-file", metavar="PATH", help="the worse draft (- for stdin)")
    p.add_argument("--good-file", metavar="PATH", help="the better draft (- for stdin)")
    p.add_argument("--voice", help='voice (default "default", or the JSON\'s)')
    p.add_argument("--prompt", help="the prompt both drafts answer")
    p.add_argument("--key", help="idempotency key")
    p.add_argument("--system", help="the system prompt of the conversation the drafts answer")
    p.add_argument(
        "--messages-file",
        metavar="PATH",
        help='the conversation before the drafts: a JSON list of {"role": ..., "content": ...} (- for stdin)',
    )
    p = add("jobs", "list jobs, newest first")
    p.add_argument("--voice")
    p.add_argument("--state")
    p.add_argument("--limit", type=int)
    p = add("job", "one job with its state history")
    p.add_argument("job_id", metavar="ID")
    add("voices", "voices with version, served name, pending pairs")
    p = add("train", "cut a job from a voice's pending pairs now")
    p.add_argument("voice", metavar="VOICE")
    p = add("rollback", "serve a voice's previous (or a given) adapter")
    p.add_argument("voice", metavar="VOICE")
    p.add_argument("--to", metavar="JOB", help="the job whose adapter to serve")
    p = add("pause", "stop cutting new jobs (running work finishes), for all voices or one")
    p.add_argument("voice", metavar="VOICE", nargs="?")
    p.add_argument(
        "--cancel-running",
        action="store_true",
        help="also cancel jobs not yet trained (stops the running training; their pairs wait again)",
    )
    p = add("resume", "start cutting new jobs again, for all voices or one")
    p.add_argument("voice", metavar="VOICE", nargs="?")
    p = add("delete", "delete a voice from the listing (its events stay in the log)")
    p.add_argument("voice", metavar="VOICE")
    p.add_argument("--remove-adapters", action="store_true", help="also delete its adapter files")
    p.add_argument("--erase-drafts", action="store_true", help="also overwrite its drafts in the event log")
    p.add_argument(
        "--force", action="store_true", help="cancel its unfinished jobs (and a running training) first"
    )
    p = add("watch", "follow events and live training progress (Ctrl-C to stop)")
    p.add_argument("--from-seq", type=int, metavar="SEQ", help="replay events from this seq")
    p = add("completion", "print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=["bash", "zsh"])
    return parser


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _paused_text(result: Mapping[str, Any], args: argparse.Namespace) -> str:
    who = f"voice {_clean(args.voice)}" if args.voice else "all voices"
    return (
        f"{who} paused: no new jobs are cut" if result.get("paused") else f"{who} running: new jobs are cut"
    )


@dataclass(frozen=True)
class _Command:
    """A ``beaglectl`` command: the op it sends (``protocol.OPS``), its fields from the arguments
    (None: left out), and the text shown for its result (``--json`` prints the result itself)."""

    op: str
    fields: Callable[[argparse.Namespace], dict[str, Any]]
    text: Callable[[Mapping[str, Any], argparse.Namespace], str]


def _none(_args: argparse.Namespace) -> dict[str, Any]:
    return {}


COMMANDS: dict[str, _Command] = {
    "ping": _Command("ping", _none, lambda r, a: format_ping(r)),
    "status": _Command("status", _none, lambda r, a: format_status(r)),
    "submit": _Command(
        "submit",
        lambda a: dict(a.submission),
        lambda r, a: (
            f"{'duplicate of pair' if r.get('duplicate') else 'accepted pair'} {_clean(r.get('pair_id'))} "
            f"(seq {_clean(r.get('seq'))})"
        ),
    ),
    "jobs": _Command(
        "jobs",
        lambda a: {"voice": a.voice, "state": a.state, "limit": a.limit},
        lambda r, a: format_jobs(r.get("jobs") or []),
    ),
    "job": _Command(
        "job",
        lambda a: {"job_id": a.job_id},
        lambda r, a: format_job(r["job"] if isinstance(r.get("job"), Mapping) else {}),
    ),
    "voices": _Command("voices", _none, lambda r, a: format_voices(r.get("voices") or [])),
    "train": _Command(
        "train",
        lambda a: {"voice": a.voice},
        lambda r, a: f"job {_clean(r.get('job_id'))} queued for voice {_clean(a.voice)}",
    ),
    "rollback": _Command(
        "rollback",
        lambda a: {"voice": a.voice, "to": a.to},
        lambda r, a: f"voice {_clean(a.voice)} now serves job {_clean(r.get('job_id'))}",
    ),
    "pause": _Command(
        "pause",
        lambda a: {"voice": a.voice, "cancel_running": True if a.cancel_running else None},
        _paused_text,
    ),
    "resume": _Command("resume", lambda a: {"voice": a.voice}, _paused_text),
    "delete": _Command(
        "delete_voice",
        lambda a: {
            "voice": a.voice,
            "remove_adapters": a.remove_adapters,
            "erase_drafts": a.erase_drafts,
            "force": True if a.force else None,
        },
        lambda r, a: (
            f"voice {_clean(a.voice)}{' and its adapters' if r.get('adapters_removed') else ''} deleted "
            "(its events stay in the log)"
        ),
    ),
}


def _run(client: Client, args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "watch":
        return _watch(client, args, sys.stdout, tty=fancy_terminal(sys.stdout))
    spec = COMMANDS[command]  # argparse only lets known commands through
    result = client.request(spec.op, **spec.fields(args))
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(spec.text(result, args) + "\n")
    return EXIT_OK


def _watch(client: Client, args: argparse.Namespace, out: TextIO, *, tty: bool) -> int:
    width = max(shutil.get_terminal_size((80, 24)).columns - 1, 20)
    board = ProgressBoard(out, tty=tty, width=width)
    stream = client.watch(from_seq=args.from_seq)
    try:
        for message in stream:
            if args.json:
                out.write(json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n")
                out.flush()
            elif isinstance(message.get("event"), Mapping):
                board.event(message["event"])
            elif isinstance(message.get("progress"), Mapping):
                board.progress(message["progress"], time.monotonic())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED  # the shell convention for Ctrl-C (128 + SIGINT)
    finally:
        stream.close()
        board.close()
    return EXIT_OK


def fancy_terminal(out: TextIO) -> bool:
    """Redraw progress in place and cut lines to the width only on a real, capable terminal."""
    return out.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


def _failure(e: Exception) -> tuple[str, int]:
    """What ``beaglectl`` says on stderr for a failure, and its exit status."""
    if isinstance(e, UsageError):
        return str(e), EXIT_USAGE
    if isinstance(e, errors.ConfigError):
        return f"config: {e}", EXIT_USAGE
    if isinstance(e, DaemonNotRunning):
        return str(e), EXIT_NOT_RUNNING
    return f"{e} ({getattr(e, 'code', 'internal')})", EXIT_DAEMON_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``beaglectl``; returns the exit status."""
    try:
        args = _build_parser().parse_args(argv)
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    try:
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        if args.command == "completion":  # needs no daemon
            from beagled import completion

            gen = completion.bash if args.shell == "bash" else completion.zsh
            sys.stdout.write(gen(_build_parser(), PROG))
            return EXIT_OK
        if args.command == "submit":  # bad input is a usage error even with no daemon running
            args.submission = _submission(args)
        socket_path = Path(args.socket) if args.socket else default_socket_path(args.config)
        with Client(socket_path, timeout=args.timeout) as client:
            return _run(client, args)
    except (UsageError, errors.ConfigError, errors.BeagledError) as e:
        text, status = _failure(e)
        sys.stderr.write(f"{PROG}: {text}\n")
        return status
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (``beaglectl jobs | head``): not an error; silence the flush at exit
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
