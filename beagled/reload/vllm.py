"""``method = "vllm"``: make one running vLLM server serve an adapter through its runtime LoRA API.

vLLM needs ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. The HTTP calls (model
list, load, unload, sleep) are ``vllm_api.VllmApi``'s; what each answer means is in ``vllm_answers``
(measured against the real server). This module is the policy: which name to load, when to replace,
what to retire (the pure parts in ``vllm_policy``). Runtime adapters vanish when vLLM restarts:
``verify`` tells the engine, which reloads. Several servers are
driven by ``replicas.VllmReplicas``, one ``VllmReloader`` each.

Before each load: the adapter's rank against ``max_lora_rank`` (vLLM's ``--max-lora-rank``) and the
server's base model against ``served_base`` and the adapter's own training base (``base_check``); a
mismatch is the operator's to fix and is never sent to the server (``adapter_facts`` reads the rank and
the training base from the adapter directory).

Naming:
- ``versioned`` (default): ``<prefix><voice>-v<NNNN>``. A new name per version, so no stale prefix-cache
  blocks; after the new one is verified, versions of the voice beyond the newest ``keep`` (the target
  and the ``keep - 1`` highest versions below it; versions above it were rolled back from) are unloaded.
- ``fixed``: ``<prefix><voice>``; replaced in place with ``"load_inplace": true`` where the server
  accepts it (probed once), else unload then load.

Deleting an adapter directory that a server still has registered can kill that server (it re-reads
the directory when the adapter drops out of its CPU cache): ``release`` unloads every adapter served
from given directories and answers which ones no server lists any more; only those may be deleted.

``lora_path`` is the path as the server sees it: the daemon's path mapped by the first ``path_map``
pair whose first element is a path prefix of it (``vllm_policy.map_path``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import httpx

from beagled.errors import ConfigError, ReloadError
from beagled.reload import ServeTarget
from beagled.reload.adapter_facts import check_rank, trained_on
from beagled.reload.base_check import BaseModel, check_base
from beagled.reload.naming import fixed_name, parse_version, versioned_name
from beagled.reload.vllm_answers import RUNTIME_HINT
from beagled.reload.vllm_api import ServedAdapter, VllmApi
from beagled.reload.vllm_policy import map_path, owner, retired_versions, unmap_path

__all__ = ["RUNTIME_HINT", "ServedAdapter", "VllmReloader", "map_path"]

log = logging.getLogger(__name__)


class VllmReloader:
    method = "vllm"

    def __init__(
        self,
        url: str,
        *,
        naming: Literal["versioned", "fixed"] | str = "versioned",
        prefix: str = "",
        keep: int = 2,
        path_map: Sequence[tuple[str, str]] = (),
        timeout_s: float = 30.0,
        max_lora_rank: int | None = None,
        served_base: str = "",
        api_key: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError("reload.vllm.url", f"{url!r} is not an http(s) URL")
        if naming not in ("versioned", "fixed"):
            raise ConfigError("reload.vllm.naming", f"{naming!r}: use 'versioned' or 'fixed'")
        if keep < 1:
            raise ConfigError("reload.vllm.keep", "must be >= 1 (the adapter being served)")
        if timeout_s <= 0:
            raise ConfigError("reload.vllm.timeout_s", "must be > 0")
        self.url = url.rstrip("/")
        self.naming = naming
        self.prefix = prefix
        self.keep = keep
        self.path_map = [(str(a), str(b)) for a, b in path_map]
        self.timeout_s = timeout_s
        self.max_lora_rank = max_lora_rank
        self.served_base = served_base
        self.inplace: bool | None = None  # does the server take "load_inplace"? None: not probed yet
        self.api = VllmApi(self.url, timeout_s, api_key=api_key, transport=transport)

    # --- names and paths --------------------------------------------------------------------------

    def served_name(self, target: ServeTarget) -> str:
        if self.naming == "fixed":
            return fixed_name(self.prefix, target.voice)
        return versioned_name(self.prefix, target.voice, target.version)

    def server_path(self, target: ServeTarget) -> str:
        return map_path(target.adapter_dir, self.path_map)

    def local_path(self, server_path: str) -> str:
        """The inverse of ``map_path``: the server's path as the daemon sees it."""
        return unmap_path(server_path, self.path_map)

    # --- what the server lists --------------------------------------------------------------------

    async def base(self) -> BaseModel:
        """The server's base model: its ``/v1/models`` entry with ``parent`` null."""
        return await self.api.base()

    async def models(self) -> dict[str, ServedAdapter]:
        """Every adapter the server lists (entries with a parent), by name."""
        return await self.api.models()

    async def served(self, voice: str) -> list[str]:
        """Names of ``voice``'s adapters the server lists now (for reconcile), oldest version first."""
        models = await self.models()
        if self.naming == "fixed":
            name = fixed_name(self.prefix, voice)
            return [name] if name in models else []
        found = [(v, n) for n in models if (v := parse_version(self.prefix, voice, n)) is not None]
        return [n for _, n in sorted(found)]

    # --- the port ---------------------------------------------------------------------------------

    def check_rank(self, target: ServeTarget) -> None:
        check_rank(target.adapter_dir, self.max_lora_rank)

    async def check_base(self, training_base: str | None) -> BaseModel:
        """The server's base against ``served_base`` and ``training_base``; raises on a mismatch."""
        base = await self.base()
        problem = check_base(base, self.served_base, training_base, self.local_path(base.root))
        if problem:
            raise ReloadError(f"vLLM at {self.url}: {problem}", retryable=False)
        return base

    async def reload(self, target: ServeTarget) -> str:
        name = await self.load(target)
        if self.naming == "versioned":
            await self._retire(target)
        return name

    async def load(self, target: ServeTarget) -> str:
        """Make the server list ``target`` under its name (nothing retired); returns the name."""
        name = self.served_name(target)
        path = self.server_path(target)
        self.check_rank(target)
        current = (await self.models()).get(name)
        if current is not None and current.root == path:
            return name  # served already (a repeated call after a crash): nothing to do
        await self.check_base(trained_on(target.adapter_dir))
        if current is not None and self.naming == "fixed" and self.inplace is not False:
            kind = await self.api.load(name, path, inplace=True)
            self.inplace = kind == "ok"
            if self.inplace:
                current = None  # replaced in place
                log.info("vLLM at %s replaced %r in place", self.url, name)
        if current is not None:
            log.info("vLLM at %s serves %r from %r, not %r: reloading it", self.url, name, current.root, path)
            await self.api.unload(name)
            await self._load_fresh(name, path)
        elif (await self.models()).get(name) is None:
            if self.naming == "fixed":
                await self.api.unload(name)  # an unlisted leftover; 404 is fine
            await self._load_fresh(name, path)
        served = (await self.models()).get(name)
        if served is None or served.root != path:
            raise ReloadError(
                f"vLLM at {self.url} accepted {name!r} but /v1/models "
                + (f"lists it from {served.root!r}" if served else "does not list it")
                + f" (expected {path!r})"
            )
        return name

    async def _load_fresh(self, name: str, path: str) -> None:
        if await self.api.load(name, path) == "already_loaded":
            served = (await self.models()).get(name)
            if served is not None and served.root == path:
                return  # a previous attempt loaded it: idempotent success
            raise ReloadError(
                f"vLLM at {self.url} already has an adapter named {name!r} "
                + (f"from {served.root!r}" if served else "(not listed by /v1/models)")
                + f", not {path!r}"
            )

    async def retire(self, target: ServeTarget) -> None:
        """Unload the voice's versions beyond the newest ``keep`` (versioned naming only)."""
        if self.naming == "versioned":
            await self._retire(target)

    async def _retire(self, target: ServeTarget) -> None:
        names = await self.served(target.voice)
        versions = [v for n in names if (v := parse_version(self.prefix, target.voice, n)) is not None]
        for version in retired_versions(versions, target.version, self.keep):
            name = versioned_name(self.prefix, target.voice, version)
            if await self.api.unload(name):
                log.info("unloaded %r from vLLM at %s (keep=%d)", name, self.url, self.keep)

    async def verify(self, target: ServeTarget) -> bool:
        try:
            served = (await self.models()).get(self.served_name(target))
        except ReloadError as e:
            log.info("cannot verify %s v%d on vLLM at %s: %s", target.voice, target.version, self.url, e)
            return False
        return served is not None and served.root == self.server_path(target)

    async def release(self, dirs: Sequence[Path]) -> set[Path]:
        """Unload every adapter served from one of ``dirs``; the dirs this server no longer lists.

        Raises ``ReloadError`` when the server cannot be asked: then nothing is known to be safe."""
        wanted = {map_path(d, self.path_map).rstrip("/"): d for d in dirs}
        for adapter in (await self.models()).values():
            if owner(adapter.root, wanted) is not None:
                await self.api.unload(adapter.name)
                log.info("unloaded %r from vLLM at %s before deleting its directory", adapter.name, self.url)
        still = {d for a in (await self.models()).values() if (d := owner(a.root, wanted)) is not None}
        return set(dirs) - still

    # --- sleep mode (the ``sleep.Sleeper`` a ``SleepGuard`` drives) --------------------------------

    async def sleep(self, level: int) -> None:
        await self.api.sleep(level)

    async def wake_up(self) -> None:
        await self.api.wake_up()

    async def is_sleeping(self) -> bool:
        return await self.api.is_sleeping()

    async def aclose(self) -> None:
        await self.api.aclose()
