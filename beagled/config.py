"""Settings: frozen dataclasses, loaded from TOML and validated once, with errors that name the key.

Lookup (``beagled.paths``): ``--config PATH``, else ``$BEAGLED_CONFIG``, else ``./config.toml``, else
``$XDG_CONFIG_HOME/beagled/config.toml``, else ``/etc/beagled/config.toml``, else the built-in defaults.
Every default works on one machine with no GPU: an empty ``training.base_model`` means the tiny model
that beagled builds itself under ``<state_dir>/models``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from beagled import hfcache, paths, secrets
from beagled.bounds import check_not_writable_by_others
from beagled.errors import ConfigError
from beagled.training_spec import HYPER_KEYS, Hyper

BUILTIN_BACKENDS = ("mlx", "unsloth", "peft")
VOICE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _default_state_dir() -> str:
    return str(paths.default_state_dir())


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: str = field(default_factory=_default_state_dir)
    socket: str = ""  # "" → <state_dir>/beagled.sock
    max_message_bytes: int = 1_048_576
    max_draft_bytes: int = 262_144
    max_connections: int = 256
    allowed_uids: list[int] = field(default_factory=list)  # empty → the daemon's own uid only
    operator_uids: list[int] = field(default_factory=list)  # every op; empty → the daemon's own uid only
    voice_owners: dict[str, int] = field(default_factory=dict)  # {voice = uid}: its one submitter
    max_voices: int = 1000  # a submit that would create one more voice is refused
    max_pending_per_uid: int = 10_000  # pending pairs in a submitter's voices (operators: no quota)
    max_connections_per_uid: int = 64
    max_watches: int = 32  # concurrent watch streams, all uids together (one per connection)
    max_watches_per_uid: int = 4
    idle_timeout_s: float = 300.0  # a connection that sends nothing this long is closed
    write_timeout_s: float = 10.0  # a client that does not read its responses this long is dropped
    max_inflight_per_connection: int = 64
    log_format: str = "auto"  # auto | json | text
    log_level: str = "info"
    snapshot_every: int = (
        10_000  # events between snapshots of the projected state (recovery replays the tail)
    )
    database_url: str = ""  # "" → SQLite in state_dir; "postgresql+psycopg://user@host:port/db" (shared)
    database_password_file: str = ""  # first line: the database password (never printed)
    node_name: str = ""  # "" → host name + pid
    leader_timeout_s: float = 10.0  # a leader that cannot renew its lease this long is replaced
    adapters_dir: str = ""  # "" → <state_dir>/voices; shared storage when daemons share a log


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # "" disables
    max_connections: int = 16  # concurrent scrapes; more are closed at once
    timeout_s: float = 2.0  # a scrape must send its request and read the answer within this


@dataclass(frozen=True)
class SchedulerConfig:
    min_pairs: int = 4
    max_wait_s: float = 300.0
    max_attempts: int = 3
    retry_backoff_s: float = 5.0
    retry_backoff_max_s: float = 300.0
    max_pairs_per_job: int = 1000  # the rest stay pending for the next job


@dataclass(frozen=True)
class RayConfig:
    """``[training.ray]``: where and how jobs run when ``training.executor = "ray"``."""

    address: str = ""  # "auto", "host:port" (a head's GCS) or "ray://host:10001" (Ray Client); "" → auto
    num_gpus: float = 0.0  # per training actor
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources an actor needs
    runtime_env: dict[str, Any] = field(default_factory=dict)  # passed to ray.init as the job's runtime_env
    namespace: str = "beagled"
    base_model: str = ""  # the base model's path on the workers; "" → the same path as on the daemon's host
    fallback_local: bool = False  # Ray unreachable: train locally instead of waiting
    backoff_s: float = 1.0  # Ray unreachable: first wait before connecting again (doubles)
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 300.0  # a new actor (worker start, imports, base model load) is up within


@dataclass(frozen=True)
class TrainingConfig:
    backends: list[str] = field(default_factory=lambda: list(BUILTIN_BACKENDS))
    base_model: str = ""  # "" → the tiny model built under <state_dir>/models
    objective: str = "sft"  # sft | dpo | sft+dpo
    dpo_weight: float = 1.0  # sft+dpo: loss = sft + dpo_weight * dpo
    eval_tolerance: float = 0.0
    gate: str = "both"  # loss | preference | both
    preference_tolerance: float = 0.0
    init: str = "current"  # current | base
    heldout_share: float = 0.2
    heldout_max: int = 64
    replay_pairs: int = 16
    prompt_template: str = "Rewrite this draft in my voice:\n\n{bad}"
    timeout_s: float = 900.0
    probe_timeout_s: float = 120.0
    python: str = ""  # interpreter for built-in backends; "" → the daemon's own
    memory_limit_mb: int = 0  # RLIMIT_AS of a training subprocess; 0 → no limit
    warm: bool = True  # keep a worker per backend with the base model loaded between jobs
    warm_max_jobs: int = 20  # a warm worker is replaced after this many jobs (memory hygiene)
    custom_backends: dict[str, list[str]] = field(default_factory=dict)
    hyper: Hyper = field(default_factory=Hyper)  # [training.hyper]: the training spec's own type and ranges
    executor: str = "local"  # local (a subprocess on this host) | ray (an actor on a Ray cluster)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass(frozen=True)
class VoicesConfig:
    keep_versions: int = 5


@dataclass(frozen=True)
class VllmConfig:
    url: str = "http://127.0.0.1:8000"
    naming: str = "versioned"  # versioned | fixed
    prefix: str = ""
    keep: int = 2
    path_map: list[list[str]] = field(default_factory=list)  # [[daemon_prefix, server_prefix], …]
    max_lora_rank: int = 16
    timeout_s: float = 30.0
    api_key: str = ""  # sent as a bearer token when the server was started with --api-key
    urls: list[str] = field(default_factory=list)  # several replicas; empty: just ``url``
    served_base: str = ""  # the base model as the server lists it; "" = whatever it lists
    sleep_during_training: bool = False  # POST /sleep before each training, /wake_up after
    sleep_level: int = 1
    api_key_file: str = ""  # the key in a file (bare name: $CREDENTIALS_DIRECTORY, LoadCredential=)


@dataclass(frozen=True)
class SshConfig:
    host: str = ""
    port: int = 22
    user: str = ""
    identity_file: str = ""
    known_hosts: str = ""  # required: host keys are always verified
    remote_dir: str = ""
    command: list[str] = field(default_factory=lambda: ["docker", "compose", "restart", "vllm"])
    workdir: str = ""
    health_url: str = ""
    health_timeout_s: float = 120.0
    timeout_s: float = 120.0


@dataclass(frozen=True)
class CommandConfig:
    argv: list[str] = field(default_factory=list)
    timeout_s: float = 120.0
    verify_argv: list[str] = field(default_factory=list)  # exit 0 = the adapter is served (reconcile)


@dataclass(frozen=True)
class ReloadConfig:
    method: str = "none"  # none | vllm | ssh | command
    reconcile_interval_s: float = 30.0
    retry_backoff_s: float = 2.0
    retry_backoff_max_s: float = 300.0
    vllm: VllmConfig = field(default_factory=VllmConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    command: CommandConfig = field(default_factory=CommandConfig)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    voices: VoicesConfig = field(default_factory=VoicesConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    source: str = ""  # the file it came from, "" for the defaults

    # -- derived paths ---------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir).expanduser()

    @property
    def socket_path(self) -> Path:
        return paths.socket_path(self.daemon.socket, self.daemon.state_dir)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "events.sqlite3"

    @property
    def voices_dir(self) -> Path:
        if self.daemon.adapters_dir:
            return Path(self.daemon.adapters_dir).expanduser()
        return self.state_dir / "voices"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


# --- loading ------------------------------------------------------------------------------------


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if hint is Any:  # a table handed on as it is (training.ray.runtime_env)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        kt, vt = get_args(hint)
        return {_check_type(key, k, kt): _check_type(f"{key}.{k}", v, vt) for k, v in value.items()}
    if hint is Hyper:
        return _hyper(key, value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return _build(hint, value, key)
    raise ConfigError(key, f"unsupported setting type {hint!r}")  # pragma: no cover


def _hyper(key: str, table: Any) -> Hyper:
    """``[training.hyper]``, read as every backend reads a spec's (``Hyper.from_json``), no unknown key."""
    if not isinstance(table, dict):
        raise ConfigError(key, f"expected a table, got {table!r}")
    for name in table:
        if name not in HYPER_KEYS:
            raise ConfigError(f"{key}.{name}", f"unknown key (known here: {', '.join(sorted(HYPER_KEYS))})")
    try:
        return Hyper.from_json(table)
    except ConfigError as e:
        raise ConfigError(
            f"{key}.{e.key.removeprefix('hyper.')}", str(e).removeprefix(f"{e.key}: ")
        ) from None


def _build(cls: Any, table: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(full, f"unknown key (known here: {', '.join(sorted(names))})")
        kwargs[key] = _check_type(full, value, hints[key])
    return cls(**kwargs)


# settings that must be > 0 (False) or may also be 0 (True); the hyper-parameters are training_spec's
_POSITIVE: dict[str, bool] = {
    "daemon.max_message_bytes": False,
    "daemon.max_draft_bytes": False,
    "daemon.max_connections": False,
    "daemon.idle_timeout_s": False,
    "daemon.write_timeout_s": False,
    "daemon.max_inflight_per_connection": False,
    "daemon.snapshot_every": False,
    "daemon.leader_timeout_s": False,
    "daemon.max_voices": False,
    "daemon.max_pending_per_uid": False,
    "daemon.max_connections_per_uid": False,
    "daemon.max_watches": False,
    "daemon.max_watches_per_uid": False,
    "metrics.max_connections": False,
    "metrics.timeout_s": False,
    "scheduler.max_pairs_per_job": False,
    "training.warm_max_jobs": False,
    "scheduler.min_pairs": False,
    "scheduler.max_wait_s": False,
    "scheduler.max_attempts": False,
    "training.timeout_s": False,
    "training.probe_timeout_s": False,
    "voices.keep_versions": False,
    "reload.reconcile_interval_s": False,
    "reload.vllm.keep": False,
    "reload.vllm.max_lora_rank": False,
    "reload.vllm.timeout_s": False,
    "reload.ssh.timeout_s": False,
    "reload.command.timeout_s": False,
    "scheduler.retry_backoff_s": True,
    "training.eval_tolerance": True,
    "training.preference_tolerance": True,
    "training.dpo_weight": True,
    "training.replay_pairs": True,
    "training.memory_limit_mb": True,
}


def _setting(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``reload.vllm.keep``)."""
    value: Any = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, f"must be {'≥ 0' if zero_ok else '> 0'}, got {value}")


def validate(cfg: Config) -> Config:
    d, t, r = cfg.daemon, cfg.training, cfg.reload  # [training.hyper] was checked as it was read
    if not d.state_dir:
        raise ConfigError("daemon.state_dir", "must not be empty")
    for key, zero_ok in _POSITIVE.items():
        _positive(key, _setting(cfg, key), zero_ok=zero_ok)
    if d.max_draft_bytes >= d.max_message_bytes:
        raise ConfigError("daemon.max_draft_bytes", "must be smaller than daemon.max_message_bytes")
    if d.log_format not in ("auto", "json", "text"):
        raise ConfigError("daemon.log_format", f"must be auto, json or text, got {d.log_format!r}")
    if d.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("daemon.log_level", f"must be debug, info, warning or error, got {d.log_level!r}")
    if d.database_url and not d.database_url.startswith(("postgresql://", "postgresql+psycopg://")):
        raise ConfigError(
            "daemon.database_url", 'expected "" (SQLite in state_dir) or postgresql+psycopg://user@host/db'
        )
    if any(u < 0 for u in d.allowed_uids):
        raise ConfigError("daemon.allowed_uids", "uids are ≥ 0")
    if any(u < 0 for u in d.operator_uids):
        raise ConfigError("daemon.operator_uids", "uids are ≥ 0")
    for voice, uid in d.voice_owners.items():
        if not VOICE_RE.fullmatch(voice):
            raise ConfigError(f"daemon.voice_owners.{voice}", "not a voice name ([a-z0-9][a-z0-9_-]{0,63})")
        if uid < 0:
            raise ConfigError(f"daemon.voice_owners.{voice}", "uids are ≥ 0")
    if cfg.metrics.listen:
        host, sep, port = cfg.metrics.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError("metrics.listen", f'expected HOST:PORT or "", got {cfg.metrics.listen!r}')
    if not t.backends:
        raise ConfigError("training.backends", "name at least one backend")
    known = set(BUILTIN_BACKENDS) | set(t.custom_backends)
    for name in t.backends:
        if name not in known:
            raise ConfigError(
                "training.backends", f"unknown backend {name!r} (known: {', '.join(sorted(known))})"
            )
    if len(set(t.backends)) != len(t.backends):
        raise ConfigError("training.backends", "a backend is listed twice")
    for name, argv in t.custom_backends.items():
        if name in BUILTIN_BACKENDS:
            raise ConfigError(f"training.custom_backends.{name}", "shadows a built-in backend")
        if not argv:
            raise ConfigError(f"training.custom_backends.{name}", "argv must not be empty")
    if t.executor not in ("local", "ray"):
        raise ConfigError("training.executor", f"must be local or ray, got {t.executor!r}")
    custom_listed = [b for b in t.backends if b in t.custom_backends]
    if t.executor == "ray" and custom_listed:
        raise ConfigError(
            "training.backends", f'custom backends run only with executor = "local": {custom_listed}'
        )
    for key in ("num_gpus", "num_cpus", "backoff_s", "backoff_max_s", "connect_timeout_s"):
        _positive(f"training.ray.{key}", getattr(t.ray, key), zero_ok=key in ("num_gpus", "num_cpus"))
    if t.objective not in ("sft", "dpo", "sft+dpo"):
        raise ConfigError("training.objective", f"must be sft, dpo or sft+dpo, got {t.objective!r}")
    if t.gate not in ("loss", "preference", "both"):
        raise ConfigError("training.gate", f"must be loss, preference or both, got {t.gate!r}")
    if t.init not in ("current", "base"):
        raise ConfigError("training.init", f"must be current or base, got {t.init!r}")
    if not 0 <= t.heldout_share < 1:
        raise ConfigError("training.heldout_share", f"must be in [0, 1), got {t.heldout_share}")
    if "{bad}" not in t.prompt_template:
        raise ConfigError("training.prompt_template", "must contain {bad}")
    try:
        t.prompt_template.format(bad="", good="", voice="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError("training.prompt_template", f"may use only {{bad}} and {{voice}}: {e}") from e
    if cfg.voices.keep_versions > 64:
        raise ConfigError("voices.keep_versions", "at most 64 (finished jobs kept in memory per voice)")
    if t.base_model:
        hfcache.resolve(t.base_model)  # a directory, or a repo id in the local Hugging Face cache
    if r.method not in ("none", "vllm", "ssh", "command"):
        raise ConfigError("reload.method", f"must be none, vllm, ssh or command, got {r.method!r}")
    if r.vllm.naming not in ("versioned", "fixed"):
        raise ConfigError("reload.vllm.naming", f"must be versioned or fixed, got {r.vllm.naming!r}")
    for i, url in enumerate(r.vllm.urls):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"reload.vllm.urls[{i}]", f"{url!r} is not an http(s) URL")
    if len(set(r.vllm.urls)) != len(r.vllm.urls):
        raise ConfigError("reload.vllm.urls", "a server is listed twice")
    if r.vllm.sleep_level not in (1, 2):
        raise ConfigError("reload.vllm.sleep_level", f"must be 1 or 2, got {r.vllm.sleep_level!r}")
    for i, pair in enumerate(r.vllm.path_map):
        if len(pair) != 2:
            raise ConfigError(f"reload.vllm.path_map[{i}]", "expected [daemon_prefix, server_prefix]")
    if r.method == "ssh":
        for key in ("host", "known_hosts"):  # user, identity_file: ~/.ssh/config and the ssh-agent
            if not getattr(r.ssh, key):
                raise ConfigError(f"reload.ssh.{key}", 'required when reload.method = "ssh"')
        if not r.ssh.command:
            raise ConfigError("reload.ssh.command", "must not be empty")
    if r.method == "command" and not r.command.argv:
        raise ConfigError("reload.command.argv", 'required when reload.method = "command"')
    if not 0 < r.ssh.port < 65536:
        raise ConfigError("reload.ssh.port", f"must be a TCP port, got {r.ssh.port}")
    return cfg


def from_mapping(table: Mapping[str, Any], source: str = "") -> Config:
    cfg: Config = _build(Config, table, "")
    return validate(dataclasses.replace(cfg, source=source))


def resolve_path(explicit: str | None) -> Path | None:
    """The config file to read (``beagled.paths.config_path``: ``--config``, ``$BEAGLED_CONFIG``,
    ``./config.toml``, ``$XDG_CONFIG_HOME/beagled/config.toml``, ``/etc/beagled/config.toml``)."""
    return paths.config_path(explicit)[0]


def load(explicit: str | None = None) -> Config:
    path = resolve_path(explicit)
    if path is None:
        return from_mapping({})
    check_not_writable_by_others(path, "", "the config file")  # whoever may write it runs code here
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError("", f"config file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from e
    return from_mapping(table, source=str(path))


def to_toml(cfg: Config) -> str:
    """The effective settings as TOML (what ``beagled check-config`` prints)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    def section(obj: Any, name: str) -> None:
        items = (
            obj.to_json().items()  # its TOML keys (no ``extra``: the config refuses unknown keys)
            if isinstance(obj, Hyper)
            else ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
        )
        scalars = [(k, secrets.mask(k, v)) for k, v in items]
        lines.append(f"[{name}]")
        for k, v in scalars:
            if not dataclasses.is_dataclass(v):
                shown = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", str(v)) if k == "database_url" else v
                lines.append(f"{k} = {value(shown)}")  # a password in the URL is never printed
        lines.append("")
        for k, v in scalars:
            if dataclasses.is_dataclass(v):
                section(v, f"{name}.{k}")

    for f in dataclasses.fields(cfg):
        if f.name != "source":
            section(getattr(cfg, f.name), f.name)
    return "\n".join(lines)
