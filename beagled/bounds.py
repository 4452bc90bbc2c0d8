"""Resource bounds and trust checks of a daemon on a shared host (issue 18).

Owns: raising the soft ``RLIMIT_NOFILE`` at start-up; refusing config files and state directories
that another user could write (or that another user owns); checking the modes of SSH key files; the
``Throttle`` that rate-limits a log line an attacker could otherwise make the daemon write in a
loop; and ``worker_env``/``worker_cwd``, the one place that decides what a training subprocess
inherits (working directory in the state dir, an environment reduced to what it needs).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from beagled.errors import ConfigError

NOFILE_WANT = 65_536


def raise_nofile_limit(want: int = NOFILE_WANT) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` towards the hard limit (systemd's default soft limit is 1024,
    which a few hundred clients exhaust). Returns ``(soft, hard)`` after the change."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def _trusted_owner(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def check_not_writable_by_others(path: Path, key: str, what: str) -> None:
    """Refuse ``path`` when a user other than the daemon's (or root) owns it, or its group or others
    may write it: whoever can write a config file or a state dir can make the daemon run their code."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if not _trusted_owner(st.st_uid):
        raise ConfigError(
            key, f"{what} {path} is owned by uid {st.st_uid}, not by uid {os.getuid()} (or root); refusing it"
        )
    if mode & 0o022:
        raise ConfigError(
            key,
            f"{what} {path} is writable by its group or others (mode {mode:o}); "
            f"refusing it (chmod go-w {path})",
        )


def check_private_file(path: Path, key: str, what: str, *, others_may_read: bool = False) -> None:
    """An SSH key must not be readable by group or others (``known_hosts``: not writable by them)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return  # the adapter that uses it reports a missing file with its own message
    mode = stat.S_IMODE(st.st_mode)
    bad = 0o022 if others_may_read else 0o077
    if mode & bad:
        raise ConfigError(
            key,
            f"{what} {path} has mode {mode:o}; it must not be "
            f"{'writable' if others_may_read else 'readable or writable'} by group or others "
            f"(chmod {'go-w' if others_may_read else '600'} {path})",
        )
    if not _trusted_owner(st.st_uid):
        raise ConfigError(key, f"{what} {path} is owned by uid {st.st_uid}; refusing it")


class Throttle:
    """At most ``burst`` events per ``per_s`` seconds pass; the rest are counted. ``allow`` answers
    whether to log now and how many were suppressed since the last line that was logged."""

    def __init__(self, burst: int = 5, per_s: float = 10.0, clock: object = time.monotonic) -> None:
        self.burst = burst
        self.per_s = per_s
        self._clock = clock
        self._window_start = -float("inf")
        self._count = 0
        self.suppressed = 0

    def allow(self) -> tuple[bool, int]:
        now = self._clock()  # type: ignore[operator]
        if now - self._window_start >= self.per_s:
            self._window_start = now
            self._count = 0
        if self._count < self.burst:
            self._count += 1
            n, self.suppressed = self.suppressed, 0
            return True, n
        self.suppressed += 1
        return False, 0


# What a training worker keeps of the daemon's environment: enough to find its interpreter,
# libraries and accelerators, nothing else (the daemon's own secrets, sockets, notify variables stay).
WORKER_ENV_KEEP = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
)
WORKER_ENV_PREFIXES = (
    "CUDA_",
    "NVIDIA_",
    "HIP_",
    "ROCM_",
    "MLX_",
    "OMP_",
    "MKL_",
    "HF_",
    "TRANSFORMERS_",
    "BEAGLED_",
    "UNSLOTH_",
    "PYTORCH_",
    "RAY_",  # the cluster's own settings (RAY_ADDRESS, RAY_TMPDIR, loopback-only clusters …) for its driver
    "TORCH_",
    "TOKENIZERS_",
)


def worker_cwd(state_dir: Path) -> Path:
    """The working directory of training workers: inside the state dir (Unsloth writes and imports
    ``./unsloth_compiled_cache``: never the daemon's cwd, which another user might control)."""
    d = state_dir / "work"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def worker_env(state_dir: Path | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a training worker: the kept variables of ``base`` (default ``os.environ``),
    and Unsloth's compile cache under the state dir (when there is one)."""
    src = os.environ if base is None else base
    env = {k: v for k, v in src.items() if k in WORKER_ENV_KEEP or k.startswith(WORKER_ENV_PREFIXES)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if state_dir is not None:
        env["UNSLOTH_COMPILE_LOCATION"] = str(state_dir / "work" / "unsloth_compiled_cache")
    return env
