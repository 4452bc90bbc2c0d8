"""Entry point of a training subprocess: ``python -m beagled.training.worker probe|train|serve ...``.

Speaks the worker protocol of docs/internals.md: JSON lines on stdout, a final ``result`` or ``error``
line, exit status 0 on success. Each backend lives in ``backend_<name>.py`` and exposes
``probe() -> tuple[bool, str]`` and ``train(spec, emit) -> dict``; it is imported only here, inside the
subprocess, so the daemon never loads an ML library.

``serve BACKEND [TOKEN]`` is the warm worker: for a backend that also exposes ``new_session()`` (and
``train(spec, emit, session)``), it imports the backend once, says ``{"type": "ready"}``, then reads one
JSON spec per line on stdin and answers each with the same lines as ``train`` (ending with its
``result`` or ``error`` line), keeping the session (the loaded base model) between jobs. It exits 0 at
the end of stdin, and 1 right after a failed job (the daemon starts a fresh worker: a failed job may
leave the session in any state). ``TOKEN`` only marks the command line, for orphan reaping.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from beagled.training.procs import job_lines, signal_group

BACKENDS = ("mlx", "unsloth", "peft")


def watch_parent() -> None:
    """Exit (with the whole process group) when the daemon that started us is gone."""
    parent = int(os.environ.get("BEAGLED_PARENT_PID", "0") or 0)
    if parent <= 0:
        return

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                try:
                    signal_group(os.getpgid(0), signal.SIGKILL)
                finally:
                    os._exit(137)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _backend(name: str) -> Any:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return importlib.import_module(f"beagled.training.backend_{name}")


def probe(name: str) -> dict[str, Any]:
    try:
        available, reason = _backend(name).probe()
    except Exception as e:  # a probe that raises means "not available", with the reason
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    return {"available": bool(available), "reason": str(reason)}


def train(spec_path: Path) -> int:
    started = time.monotonic()
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        module = _backend(spec["backend"])
        result = dict(module.train(spec, emit))
    except Exception as e:
        emit({"type": "log", "message": traceback.format_exc(limit=8)})
        emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    result.setdefault("duration_s", time.monotonic() - started)
    result.setdefault("backend", spec["backend"])
    emit({"type": "result", **result})
    return 0


def serve(name: str) -> int:
    try:
        module = _backend(name)
        if not hasattr(module, "new_session"):
            raise ValueError(f"backend {name!r} has no warm mode")
        available, reason = module.probe()
        if not available:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
        session = module.new_session()
    except Exception as e:
        emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    emit({"type": "ready", "backend": name, "pid": os.getpid()})
    for raw in job_lines(sys.stdin.buffer):
        started = time.monotonic()
        try:
            spec = json.loads(raw)
            if not isinstance(spec, dict) or spec.get("backend") != name:
                raise ValueError(f"this worker serves backend {name!r} only")
            result = dict(module.train(spec, emit, session))
        except Exception as e:
            emit({"type": "log", "message": traceback.format_exc(limit=8)})
            emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
            return 1
        result.setdefault("duration_s", time.monotonic() - started)
        result.setdefault("backend", name)
        emit({"type": "result", **result, "worker_pid": os.getpid()})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "probe":
        emit(probe(args[1]))
        return 0
    if len(args) == 2 and args[0] == "train":
        watch_parent()
        return train(Path(args[1]))
    if len(args) in (2, 3) and args[0] == "serve":
        watch_parent()
        return serve(args[1])
    sys.stderr.write(
        "usage: python -m beagled.training.worker probe BACKEND | train SPEC.json | serve BACKEND [TOKEN]\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
