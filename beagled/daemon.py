"""The composition root: builds the concrete adapters from config, recovers, serves, shuts down.

Order of start-up: open the log and replay it, repair ``current`` links, bind the socket, start the
metrics endpoint and the engine's loops, then tell systemd READY=1. SIGTERM/SIGINT: stop accepting,
let the commit in flight finish and its submitters get their acks, cancel the rest (the training
subprocess group is killed by the runner), exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio

from beagled import jobs, logs, secrets
from beagled.adapter_dirs import AdapterDirs
from beagled.bounds import check_not_writable_by_others, raise_nofile_limit
from beagled.config import Config
from beagled.engine import Engine
from beagled.errors import ConfigError, TrainingError
from beagled.metrics import Metrics, serve_metrics
from beagled.notify import Notifier
from beagled.ports import SystemClock
from beagled.reload import NoneReloader, Reloader
from beagled.reload.sleep import guard_for
from beagled.server import Server
from beagled.store import SqliteStore, SqlStore
from beagled.training.executor_ray import RayTrainer, build_ray_trainer
from beagled.training.runner import SubprocessTrainer, reap_orphans

log = logging.getLogger("beagled.daemon")


def build_reloader(cfg: Config) -> Reloader:
    r = cfg.reload
    if r.method == "none":
        return NoneReloader()
    if r.method == "command":
        from beagled.reload.command import CommandReloader

        return CommandReloader(
            list(r.command.argv), timeout_s=r.command.timeout_s, verify_argv=list(r.command.verify_argv)
        )
    if r.method == "vllm":
        from beagled.reload.replicas import VllmReplicas
        from beagled.reload.vllm import VllmReloader

        api_key = logs.add_secret(secrets.vllm_api_key(r.vllm.api_key, r.vllm.api_key_file))
        return VllmReplicas(
            [
                VllmReloader(
                    url,
                    naming=r.vllm.naming,
                    prefix=r.vllm.prefix,
                    keep=r.vllm.keep,
                    path_map=[(a, b) for a, b in r.vllm.path_map],
                    timeout_s=r.vllm.timeout_s,
                    max_lora_rank=r.vllm.max_lora_rank,
                    served_base=r.vllm.served_base,
                    api_key=api_key,
                )
                for url in (r.vllm.urls or [r.vllm.url])
            ]
        )
    if r.method == "ssh":
        from beagled.reload.ssh import SshReloader

        s = r.ssh
        return SshReloader(
            s.host,
            s.port,
            s.user,
            s.identity_file,
            s.known_hosts,
            remote_dir=s.remote_dir,
            command=list(s.command),
            workdir=s.workdir,
            health_url=s.health_url,
            timeout_s=s.timeout_s,
            health_timeout_s=s.health_timeout_s,
        )
    raise ConfigError("reload.method", f"unknown method {r.method!r}")


def tiny_model_builder(cfg: Config) -> Path:
    """Build (once) the tiny local model in a subprocess: the daemon itself never imports mlx."""
    target = cfg.models_dir / "tiny"
    if (target / "config.json").is_file():
        return target
    python = cfg.training.python or sys.executable
    code = (
        "import sys; from pathlib import Path; from beagled.training.tinymodel import ensure_tiny_model; "
        "print(ensure_tiny_model(Path(sys.argv[1])))"
    )
    done = subprocess.run(
        [python, "-c", code, str(cfg.models_dir)], capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        raise TrainingError(f"cannot build the tiny model: {done.stderr.strip()[-500:]}")
    return Path(done.stdout.strip().splitlines()[-1])


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.notifier = Notifier.from_env(unset_environment=True)
        # every file the daemon creates (the event log holds every draft; specs, adapters) is private to
        # its user, even when the state dir is made traversable for a shared socket (allowed_uids)
        os.umask(0o077)
        raise_nofile_limit()  # systemd's soft default (1024) is a few hundred clients; LimitNOFILE= too
        check_not_writable_by_others(cfg.state_dir, "daemon.state_dir", "the state directory")
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in cfg.state_dir.glob("events.sqlite3*"):  # logs created before the umask was set
            if p.is_file() and p.stat().st_mode & 0o077:
                p.chmod(0o600)
        d = cfg.daemon
        self.node = d.node_name or f"{socket.gethostname()}-{os.getpid()}"
        self.leadership = self.listener = None
        if d.database_url:  # several daemons may share this log: one leads (beagled.leader)
            from beagled.dialects import PostgresDialect
            from beagled.leader import Leadership, Lease, Listener

            dialect = PostgresDialect(d.database_url, d.database_password_file)
            self.store: SqlStore = SqlStore(dialect)
            self.leadership = Leadership(Lease(dialect, self.node, d.leader_timeout_s))
            self.listener = Listener(dialect)
        else:
            self.store = SqliteStore(cfg.db_path)
        t = cfg.training
        self.trainer: SubprocessTrainer | RayTrainer = SubprocessTrainer(
            list(t.backends),
            custom=dict(t.custom_backends),
            python=t.python,
            timeout_s=t.timeout_s,
            probe_timeout_s=t.probe_timeout_s,
            spec_dir=cfg.state_dir / "specs",
            memory_limit_mb=t.memory_limit_mb,
            warm=t.warm,
            warm_max_jobs=t.warm_max_jobs,
        )
        if t.executor == "ray":
            self.trainer = build_ray_trainer(cfg, self.trainer, self._executor_fault)
        # the composition root: the concrete adapters meet here, the engine knows only their ports
        reloader = build_reloader(cfg)
        state = jobs.State(heldout_max=cfg.training.heldout_max)  # the engine writes it, metrics read it
        self.metrics = Metrics(lambda: state)
        if cfg.reload.method == "vllm":
            from beagled.reload.replicas import VllmReplicas

            if isinstance(reloader, VllmReplicas):  # per-replica series (beagled_vllm_replica_*)
                self.metrics.registry.register(reloader)
        self.engine = Engine(
            cfg,
            self.store,
            AdapterDirs(cfg.voices_dir, keep_versions=cfg.voices.keep_versions),
            self.trainer,
            reloader,
            state=state,
            metrics=self.metrics,
            # reload.vllm.sleep_during_training; wakes what the log holds asleep (State.sleeping) either way
            sleep_guard=lambda record, sleeping: guard_for(cfg, reloader, record, sleeping),
            base_model=lambda: (
                Path(t.ray.base_model)
                if t.executor == "ray" and t.ray.base_model
                else tiny_model_builder(cfg)
            ),
            leadership=self.leadership,
            listener=self.listener,
            node=self.node,
            clock=SystemClock(),  # the real clock; fast tests drive the engine with trio's MockClock
        )
        self.metrics.prime(list(t.backends), cfg.reload.method, t.executor)
        self.server = Server(self.engine)
        self.metrics_address: tuple[str, int] | None = None

    async def run(self) -> None:
        started = time.monotonic()
        self.notifier.status("recovering")
        reaped = await trio.to_thread.run_sync(reap_orphans, self.cfg.state_dir / "specs")
        if reaped:
            log.warning("killed training processes left by a previous run", extra={"groups": reaped})
        n = await trio.to_thread.run_sync(self.engine.recover)
        if self.leadership is None:  # a shared log's leader repairs them once elected
            await self.engine.repair_links()
        snap = (self.engine.recovery or {}).get("snapshot_seq")
        log.info(
            "recovered",
            extra={
                "events": n,
                "replayed": n,
                "snapshot_seq": snap,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._signals, nursery.cancel_scope)
                await nursery.start(self.server.serve)
                if self.cfg.metrics.listen:
                    host, _, port = self.cfg.metrics.listen.rpartition(":")
                    self.metrics_address = await nursery.start(
                        partial(
                            serve_metrics,
                            max_connections=self.cfg.metrics.max_connections,
                            timeout_s=self.cfg.metrics.timeout_s,
                        ),
                        self.metrics,
                        host.strip("[]"),
                        int(port),
                    )
                    bound_host, bound_port = self.metrics_address[:2]
                    self.engine.metrics_listen = (
                        f"{host}:{bound_port}" if host else f"{bound_host}:{bound_port}"
                    )
                await nursery.start(self.engine.run)
                await nursery.start(self.notifier.run_watchdog)
                nursery.start_soon(self._status_line)
                ready = time.monotonic() - started
                log.info(
                    "ready",
                    extra={
                        "socket": str(self.cfg.socket_path),
                        "startup_s": round(ready, 3),
                        "metrics": self.engine.metrics_listen,
                        "pid": os.getpid(),
                    },
                )
                self.notifier.ready(self._summary())
        finally:
            with trio.CancelScope(shield=True):
                await self.trainer.aclose()  # the warm workers' process groups
            if self.listener is not None:
                self.listener.close()
            await trio.to_thread.run_sync(self.store.close)
            await self.engine.reloader.aclose()
            log.info("stopped")

    def _executor_fault(self, kind: str) -> None:
        self.metrics.executor_faults.labels(self.cfg.training.executor, kind).inc()

    def _summary(self) -> str:
        c = self.engine.state.counts()
        busy = ", ".join(f"{k} {v}" for k, v in c.items() if v and k not in {t.value for t in jobs.TERMINAL})
        pending = sum(len(v.pending) for v in self.engine.state.voices.values())
        return f"{len(self.engine.state.voices)} voices, {pending} pending pairs" + (
            f", jobs: {busy}" if busy else ""
        )

    async def _status_line(self) -> None:
        last = ""
        while True:
            s = self._summary()
            if s != last:
                self.notifier.status(s)
                last = s
            await trio.sleep(5)

    async def _signals(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for sig in signals:
                log.info("shutting down", extra={"signal": signal.Signals(sig).name})
                self.notifier.stopping("shutting down")
                self.engine.stop_accepting()
                await self.server.stop_accepting()
                with trio.move_on_after(3):
                    await self.engine.drain_submits()
                scope.cancel()
                return


def serve(cfg: Config) -> int:
    trio.run(Daemon(cfg).run)
    return 0
