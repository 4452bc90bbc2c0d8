"""The reloader port: how the engine makes an inference server serve a promoted adapter.

The engine knows only :class:`Reloader` (a ``typing.Protocol``) and :class:`ServeTarget`, both
declared in ``beagled.ports`` and re-exported here; the daemon
wires one concrete adapter from ``[reload]``: :class:`NoneReloader` here, ``vllm.VllmReloader``
(runtime LoRA over HTTP), ``ssh.SshReloader`` (upload over SFTP + restart command on another host)
or ``command.CommandReloader`` (a local command). Each ``reload`` is idempotent: the engine calls it
again after a crash at any point, and repeating it leaves the adapter served exactly once under its
name. Failures raise ``beagled.errors.ReloadError`` with ``retryable`` saying whether trying again
later can help.
"""

from __future__ import annotations

from beagled.errors import ConfigError, ReloadError
from beagled.ports import Reloader, ServeTarget
from beagled.reload.naming import versioned_name

__all__ = ["NoneReloader", "ReloadConfigError", "Reloader", "ServeTarget"]


class ReloadConfigError(ReloadError, ConfigError):
    """A reload setting that cannot work: both a ``ConfigError`` (the operator's fault, names the key)
    and a non-retryable ``ReloadError`` (so the engine records it and does not retry)."""

    def __init__(self, key: str, message: str) -> None:
        Exception.__init__(self, f"{key}: {message}" if key else message)
        self.key = key
        self.retryable = False


class NoneReloader(Reloader):
    """``method = "none"``: nothing to reload; the served name is ``<voice>-v<NNNN>``."""

    method = "none"
    reload_timeout_s = 150.0  # nothing to wait for; the budget the vLLM defaults give

    async def reload(self, target: ServeTarget) -> str:
        return versioned_name("", target.voice, target.version)

    async def verify(self, target: ServeTarget) -> bool:
        return True

    async def aclose(self) -> None:
        return None
