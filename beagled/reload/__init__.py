"""The reloader port: how the engine makes an inference server serve a promoted adapter.

The engine knows only :class:`Reloader` (a ``typing.Protocol``) and :class:`ServeTarget`; the daemon
wires one concrete adapter from ``[reload]``: :class:`NoneReloader` here, ``vllm.VllmReloader``
(runtime LoRA over HTTP), ``ssh.SshReloader`` (upload over SFTP + restart command on another host)
or ``command.CommandReloader`` (a local command). Each ``reload`` is idempotent: the engine calls it
again after a crash at any point, and repeating it leaves the adapter served exactly once under its
name. Failures raise ``beagled.errors.ReloadError`` with ``retryable`` saying whether trying again
later can help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from beagled.errors import ConfigError, ReloadError
from beagled.reload.naming import versioned_name

__all__ = ["NoneReloader", "ReloadConfigError", "Reloader", "ServeTarget"]


@dataclass(frozen=True)
class ServeTarget:
    """One adapter to serve: ``adapter_dir`` is the job's own directory (not the ``current`` link)."""

    voice: str
    version: int
    job_id: str
    adapter_dir: Path


@runtime_checkable
class Reloader(Protocol):
    method: str

    async def reload(self, target: ServeTarget) -> str:
        """Make the server serve ``target``; return the model name clients must ask for."""
        ...

    async def verify(self, target: ServeTarget) -> bool:
        """Is ``target`` served now? ``False`` when it cannot be told (server unreachable)."""
        ...

    async def aclose(self) -> None: ...


class ReloadConfigError(ReloadError, ConfigError):
    """A reload setting that cannot work: both a ``ConfigError`` (the operator's fault, names the key)
    and a non-retryable ``ReloadError`` (so the engine records it and does not retry)."""

    def __init__(self, key: str, message: str) -> None:
        Exception.__init__(self, f"{key}: {message}" if key else message)
        self.key = key
        self.retryable = False


class NoneReloader:
    """``method = "none"``: nothing to reload; the served name is ``<voice>-v<NNNN>``."""

    method = "none"

    async def reload(self, target: ServeTarget) -> str:
        return versioned_name("", target.voice, target.version)

    async def verify(self, target: ServeTarget) -> bool:
        return True

    async def aclose(self) -> None:
        return None
