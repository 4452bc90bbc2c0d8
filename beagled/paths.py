"""Where beagled's files are: the one resolver the daemon, ``check-config`` and the client all use.

- State directory (event log, adapters, default socket): ``[daemon] state_dir``, else systemd's
  ``$STATE_DIRECTORY`` (``StateDirectory=``), else ``$XDG_STATE_HOME/beagled``, else
  ``~/.local/state/beagled``.
- Socket: ``[daemon] socket``, else ``<state_dir>/beagled.sock`` (the contract's default). The client
  also looks in the runtime directory — systemd's ``$RUNTIME_DIRECTORY``, else
  ``$XDG_RUNTIME_DIR/beagled`` — for a daemon configured to put its socket there.
- Config file: ``--config``, else ``$BEAGLED_CONFIG``, else ``./config.toml``, else
  ``$XDG_CONFIG_HOME/beagled/config.toml`` (``~/.config`` when unset), else
  ``/etc/beagled/config.toml``; none found: the built-in defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "beagled.sock"
SYSTEM_CONFIG = Path("/etc/beagled/config.toml")


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    e = _env(env)
    if e.get("STATE_DIRECTORY"):  # systemd's StateDirectory= (a colon-separated list: the first)
        return Path(e["STATE_DIRECTORY"].split(":")[0])
    if e.get("XDG_STATE_HOME"):
        return Path(e["XDG_STATE_HOME"]) / "beagled"
    return Path.home() / ".local" / "state" / "beagled"


def state_dir(setting: str = "", env: Mapping[str, str] | None = None) -> Path:
    """``[daemon] state_dir`` if set, else the default above."""
    return Path(setting).expanduser() if setting else default_state_dir(env)


def runtime_dir(env: Mapping[str, str] | None = None) -> Path | None:
    e = _env(env)
    if e.get("RUNTIME_DIRECTORY"):
        return Path(e["RUNTIME_DIRECTORY"].split(":")[0])
    if e.get("XDG_RUNTIME_DIR"):
        return Path(e["XDG_RUNTIME_DIR"]) / "beagled"
    return None


def socket_path(
    socket_setting: str = "", state_setting: str = "", env: Mapping[str, str] | None = None
) -> Path:
    """Where the daemon binds its socket."""
    if socket_setting:
        return Path(socket_setting).expanduser()
    return state_dir(state_setting, env) / SOCKET_NAME


def client_socket_candidates(
    socket_setting: str = "", state_setting: str = "", env: Mapping[str, str] | None = None
) -> list[Path]:
    """Where a client looks for the socket, in order (the first that exists wins)."""
    if socket_setting:
        return [Path(socket_setting).expanduser()]
    out = [socket_path("", state_setting, env)]
    run = runtime_dir(env)
    if run is not None and not state_setting:
        out.append(run / SOCKET_NAME)
    return out


def config_candidates(env: Mapping[str, str] | None = None) -> list[Path]:
    """The implicit config files, in lookup order (after ``--config`` and ``$BEAGLED_CONFIG``)."""
    e = _env(env)
    xdg = Path(e["XDG_CONFIG_HOME"]) if e.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return [Path("config.toml"), xdg / "beagled" / "config.toml", SYSTEM_CONFIG]


def config_path(
    explicit: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[Path | None, bool]:
    """The config file to read and whether it was named explicitly (then it must exist).

    ``(None, False)``: no file anywhere, the built-in defaults apply.
    """
    e = _env(env)
    if explicit:
        return Path(explicit).expanduser(), True
    if e.get("BEAGLED_CONFIG"):
        return Path(e["BEAGLED_CONFIG"]).expanduser(), True
    for p in config_candidates(e):
        if p.is_file():
            return p, False
    return None, False
