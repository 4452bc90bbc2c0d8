"""A Ray driver process: runs the backend worker code on a Ray cluster, speaking the worker protocol.

``python -m beagled.training.ray_driver probe BACKEND… | train SPEC.json | serve BACKEND [TOKEN]``, with
the cluster settings (``address``, ``namespace``, ``num_cpus``, ``num_gpus``, ``resources``,
``runtime_env``) as JSON in ``$BEAGLED_RAY``. It is a subprocess of the daemon, like a local worker, so
the daemon never imports Ray (nor torch or MLX): its stdout carries the same JSON lines as
``beagled.training.worker`` (``ready``, ``progress``, ``log``, then ``result`` or ``error``), and the
daemon runs it, times it out and kills its process group exactly as it does a local worker.

On the cluster, one ``BeagledTrainActor`` per driver (with the requested resources) imports the backend
(``new_session()`` where the backend has a warm mode, so the base model stays loaded between jobs) and
runs ``backend.train(spec, emit)`` in a thread; its ``train`` is a streaming generator whose items are
the worker's lines, the last one the result with the adapter's files (the object store carries them
back). The adapter the served voice has (``init_adapter``/``served_adapter``) travels the other way in
the spec. The driver writes the returned files into the spec's ``out_dir`` on the daemon's host, where
the daemon verifies them against their manifest before promotion, like a local adapter.

``serve`` keeps the driver and its actor between jobs (the warm worker of the Ray executor); like the
local ``worker serve`` it exits 1 right after a failed job, and the daemon starts a fresh one. The actor
is not detached: it dies with this driver (Ray fate-shares an actor with its owner). On SIGTERM (the
daemon's timeout, cancellation, shutdown) the driver also kills the actor explicitly before it exits,
which matters for Ray Client (``ray://``) connections, whose server would otherwise keep the actor for
a grace period. A cluster that cannot be reached gives one ``error`` line with ``"unreachable": true``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from beagled.training.procs import job_lines
from beagled.training.worker import BACKENDS, emit, watch_parent

CONNECT_TIMEOUT_S = 5.0  # a TCP check of the address before ray.init, which would retry for a long time
ADAPTER_KEYS = ("init_adapter", "served_adapter")


class Unreachable(Exception):
    """The Ray cluster cannot be reached (nothing ran)."""


def _settings() -> dict[str, Any]:
    raw = os.environ.get("BEAGLED_RAY", "{}")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("BEAGLED_RAY must be a JSON object")
    return data


def _host_port(address: str) -> tuple[str, int] | None:
    """The TCP endpoint an address names (None for ``auto``/empty: Ray finds it itself)."""
    rest = address.removeprefix("ray://")
    if not rest or rest == "auto" or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    endpoint = _host_port(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout_s):
            pass
    except OSError as e:
        raise Unreachable(f"ray at {address} is unreachable: {e}") from e


def connect(settings: dict[str, Any]) -> Any:
    address = str(settings.get("address") or "auto")
    check_reachable(address)  # before the (slow) import of ray

    import ray

    try:
        ray.init(
            address=address,
            namespace=str(settings.get("namespace") or "beagled"),
            runtime_env=settings.get("runtime_env") or None,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, TimeoutError) as e:
        raise Unreachable(f"ray at {address} is unreachable: {e}") from e
    return ray


def _read_tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _write_tree(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = (directory / name).resolve()
        if directory.resolve() not in target.parents:
            raise ValueError(f"refusing to write {name!r} outside {directory}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def pack_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as it travels: the adapters it names (on the daemon's host) go along as bytes."""
    out = dict(spec)
    files: dict[str, dict[str, bytes]] = {}
    for key in ADAPTER_KEYS:
        path = spec.get(key)
        if path and str(path) not in files and Path(path).is_dir():
            files[str(path)] = _read_tree(Path(path))
    out["_adapter_files"] = files
    out["executor"] = "ray"
    return out


class BeagledTrainActor:
    """Runs on a Ray worker: one backend, imported once, its warm session kept between jobs."""

    def __init__(self, backend: str) -> None:
        from beagled.training import worker

        self.backend = backend
        self.module = worker._backend(backend)
        available, reason = self.module.probe()
        if not available:
            raise RuntimeError(f"backend {backend!r} is not available on this node: {reason}")
        self.session = self.module.new_session() if hasattr(self.module, "new_session") else None

    def info(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def train(self, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        work = Path(tempfile.mkdtemp(prefix="beagled-ray-"))
        try:
            local = {k: v for k, v in spec.items() if k != "_adapter_files"}
            for i, (path, files) in enumerate(dict(spec.get("_adapter_files") or {}).items()):
                target = work / f"in{i}"
                _write_tree(target, files)
                for key in ADAPTER_KEYS:
                    if spec.get(key) == path:
                        local[key] = str(target)
            local["out_dir"] = str(work / "out" / "adapter")
            lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
            outcome: dict[str, Any] = {}

            def run() -> None:
                started = time.monotonic()
                try:
                    if self.session is not None:
                        result = dict(self.module.train(local, lines.put, self.session))
                    else:
                        result = dict(self.module.train(local, lines.put))
                    result.setdefault("duration_s", time.monotonic() - started)
                    result.setdefault("backend", self.backend)
                    outcome["result"] = result
                except Exception as e:
                    outcome["error"] = f"{type(e).__name__}: {e}"
                    outcome["trace"] = traceback.format_exc(limit=8)
                finally:
                    lines.put(None)

            thread = threading.Thread(target=run, name="beagled-train", daemon=True)
            thread.start()
            while (line := lines.get()) is not None:
                yield {**line, "actor_pid": os.getpid()}
            thread.join()
            if "error" in outcome:
                yield {"type": "log", "message": outcome["trace"]}
                yield {"type": "error", "message": outcome["error"]}
                return
            files = _read_tree(Path(local["out_dir"]))
            yield {"type": "result", **outcome["result"], "actor_pid": os.getpid(), "files": files}
        finally:
            shutil.rmtree(work, ignore_errors=True)


class Driver:
    """The driver's side: one actor, jobs run on it, lines printed as they stream back."""

    def __init__(self, settings: dict[str, Any], backend: str) -> None:
        self.ray = connect(settings)
        self.settings = settings
        self.backend = backend
        self._new_actor()

    def _new_actor(self) -> None:
        resources = {str(k): float(v) for k, v in dict(self.settings.get("resources") or {}).items()}
        # by reference (``beagled`` is installed on the workers), not by value from ``__main__``
        actor_cls = importlib.import_module("beagled.training.ray_driver").BeagledTrainActor
        cls = self.ray.remote(actor_cls)
        self.actor = cls.options(
            num_cpus=float(self.settings.get("num_cpus", 1)),
            num_gpus=float(self.settings.get("num_gpus", 0)),
            resources=resources or None,
            max_restarts=0,
            max_task_retries=0,
        ).remote(self.backend)
        self.info: dict[str, Any] = self.ray.get(self.actor.info.remote())

    def run(self, spec: dict[str, Any]) -> bool:
        """One job; prints its lines; True if it ended with a result."""
        out_dir = Path(spec["out_dir"])
        try:  # the warm actor may have gone with its node since the last job: then start another
            self.ray.get(self.actor.info.remote(), timeout=30)
        except self.ray.exceptions.RayError as e:
            emit({"type": "log", "message": f"ray: the warm actor is gone ({type(e).__name__}); a new one"})
            self._new_actor()
        gen = self.actor.train.options(num_returns="streaming").remote(pack_spec(spec))
        try:
            for ref in gen:
                line = self.ray.get(ref)
                if line.get("type") == "result":
                    files = line.pop("files", {})
                    _write_tree(out_dir, files)
                    _stamp_manifest(out_dir, self.info, spec)
                    emit({**line, "executor": "ray", "ray_node_id": self.info.get("node_id")})
                    return True
                emit(line)
                if line.get("type") == "error":
                    return False
        except self.ray.exceptions.RayError as e:
            emit({"type": "error", "message": f"ray: {type(e).__name__}: {str(e)[:1500]}"})
            return False
        emit({"type": "error", "message": "the ray actor ended the job without a result"})
        return False

    def close(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        finally:
            self.ray.shutdown()


def _stamp_manifest(out_dir: Path, info: dict[str, Any], spec: dict[str, Any]) -> None:
    """Record where it ran, and the adapters it started from as the daemon names them, in the manifest
    (the manifest itself is not hashed; its file list is, and stays as the worker wrote it)."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(executor="ray", ray_node_id=info.get("node_id"))
    for key in ADAPTER_KEYS:
        if key in manifest:
            manifest[key] = spec.get(key)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def probe(settings: dict[str, Any], backends: list[str]) -> dict[str, Any]:
    ray = connect(settings)
    try:

        def probe_one(name: str) -> dict[str, Any]:
            from beagled.training import worker

            return {"name": name, **worker.probe(name)}

        task = ray.remote(probe_one).options(num_cpus=0)
        answers = ray.get([task.remote(b) for b in backends])
    finally:
        ray.shutdown()
    return {"type": "probe", "backends": answers}


def _install_sigterm(driver: list[Driver]) -> None:
    def on_term(_sig: int, _frame: Any) -> None:
        try:
            for d in driver:
                d.close()
        finally:
            os._exit(143)

    signal.signal(signal.SIGTERM, on_term)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("probe", "train", "serve"):
        sys.stderr.write(
            "usage: python -m beagled.training.ray_driver"
            " probe BACKEND... | train SPEC.json | serve BACKEND [TOKEN]\n"
        )
        return 2
    holder: list[Driver] = []
    _install_sigterm(holder)
    watch_parent()
    try:
        settings = _settings()
        if args[0] == "probe":
            emit(probe(settings, [b for b in args[1:] if b in BACKENDS]))
            return 0
        if args[0] == "train":
            spec = json.loads(Path(args[1]).read_text(encoding="utf-8"))
            holder.append(Driver(settings, spec["backend"]))
            return 0 if holder[0].run(spec) else 1
        holder.append(Driver(settings, args[1]))
    except Unreachable as e:
        emit({"type": "error", "message": str(e), "unreachable": True})
        return 3
    except Exception as e:
        emit({"type": "log", "message": traceback.format_exc(limit=8)})
        emit({"type": "error", "message": f"ray: {type(e).__name__}: {str(e)[:1500]}"})
        return 1
    finally:
        if args[0] == "train":
            for d in holder:
                d.close()
    d = holder[0]
    emit({"type": "ready", "backend": d.backend, "pid": os.getpid(), "actor_pid": d.info.get("pid")})
    try:
        for raw in job_lines(sys.stdin.buffer):
            spec = json.loads(raw)
            if not d.run(spec):
                return 1
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
