"""``method = "vllm"``: make one running vLLM server serve an adapter through its runtime LoRA API.

vLLM needs ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. What each answer means is
in ``vllm_answers`` (measured against the real server); ``GET /v1/models`` lists the base model
(``parent`` null) and each adapter with ``id`` = name, ``root`` = the ``lora_path`` as sent. Runtime
adapters vanish when vLLM restarts: ``verify`` tells the engine, which reloads. Several servers are
driven by ``replicas.VllmReplicas``, one ``VllmReloader`` each.

Before each load: the adapter's rank against ``max_lora_rank`` (vLLM's ``--max-lora-rank``) and the
server's base model against ``served_base`` and the adapter's own training base (``base_check``); a
mismatch is the operator's to fix and is never sent to the server.

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
pair whose first element is a path prefix of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from beagled.errors import ConfigError, ReloadError
from beagled.reload import ServeTarget
from beagled.reload.base_check import BaseModel, check_base
from beagled.reload.naming import fixed_name, parse_version, versioned_name
from beagled.reload.vllm_answers import RUNTIME_HINT, classify_load, classify_unload

__all__ = ["RUNTIME_HINT", "ServedAdapter", "VllmReloader", "map_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    root: str
    parent: str | None


def map_path(path: Path | str, path_map: Sequence[tuple[str, str]]) -> str:
    """Map a daemon-side path to the server's view by the first pair whose first element is a prefix."""
    text = str(path)
    for local, remote in path_map:
        base = local.rstrip("/")
        if text in (local, base):
            return remote
        if text.startswith(base + "/"):
            return remote.rstrip("/") + text[len(base) :]
    return text


def _message(response: httpx.Response) -> str:
    """The error text of a vLLM answer: ``{"message"}``, ``{"error": {"message"}}`` or ``{"detail"}``."""
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return response.text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in ("message", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return json.dumps(body)[:500]


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _trained_on(adapter_dir: Path) -> str | None:
    """The base the adapter was trained over: the manifest's ``base_model`` (its adapter_config names
    the served base when the daemon knew it), else the adapter_config's ``base_model_name_or_path``."""
    try:
        manifest = json.loads((adapter_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("base_model"), str):
        return str(manifest["base_model"])
    trained_on = _adapter_config(adapter_dir).get("base_model_name_or_path")
    return trained_on if isinstance(trained_on, str) else None


def _adapter_rank(adapter_dir: Path) -> int | None:
    rank = _adapter_config(adapter_dir).get("r")
    return rank if isinstance(rank, int) else None


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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout_s), headers=headers, transport=transport
        )

    # --- names and paths --------------------------------------------------------------------------

    def served_name(self, target: ServeTarget) -> str:
        if self.naming == "fixed":
            return fixed_name(self.prefix, target.voice)
        return versioned_name(self.prefix, target.voice, target.version)

    def server_path(self, target: ServeTarget) -> str:
        return map_path(target.adapter_dir, self.path_map)

    def local_path(self, server_path: str) -> str:
        """The inverse of ``map_path``: the server's path as the daemon sees it."""
        return map_path(server_path, [(b, a) for a, b in self.path_map])

    # --- HTTP -------------------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        route: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        try:
            return await self._client.request(method, route, json=body, params=params)
        except httpx.TimeoutException as e:
            raise ReloadError(
                f"vLLM at {self.url} did not answer {method} {route} within {self.timeout_s:g} s"
            ) from e
        except httpx.TransportError as e:
            raise ReloadError(f"vLLM at {self.url} is unreachable ({type(e).__name__}: {e})") from e

    async def _model_list(self) -> list[dict[str, Any]]:
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise ReloadError(
                f"vLLM at {self.url} GET /v1/models answered {response.status_code}: {_message(response)}",
                retryable=response.status_code >= 500,
            )
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise ReloadError(f"vLLM GET /v1/models answered something that is not a model list: {e}") from e
        return (
            [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            if isinstance(data, list)
            else []
        )

    async def base(self) -> BaseModel:
        """The server's base model: its ``/v1/models`` entry with ``parent`` null."""
        for entry in await self._model_list():
            if entry.get("parent") is None:
                return BaseModel(str(entry["id"]), str(entry.get("root") or ""))
        raise ReloadError(f"vLLM at {self.url} lists no base model in /v1/models")

    async def models(self) -> dict[str, ServedAdapter]:
        """Every adapter the server lists (entries with a parent), by name."""
        out: dict[str, ServedAdapter] = {}
        for entry in await self._model_list():
            parent = entry.get("parent")
            if parent is None:
                continue  # the base model
            out[entry["id"]] = ServedAdapter(entry["id"], str(entry.get("root") or ""), str(parent))
        return out

    async def served(self, voice: str) -> list[str]:
        """Names of ``voice``'s adapters the server lists now (for reconcile), oldest version first."""
        models = await self.models()
        if self.naming == "fixed":
            name = fixed_name(self.prefix, voice)
            return [name] if name in models else []
        found = [(v, n) for n in models if (v := parse_version(self.prefix, voice, n)) is not None]
        return [n for _, n in sorted(found)]

    async def _load(self, name: str, path: str, *, inplace: bool = False) -> str:
        """Load ``name`` from ``path``; returns the verdict's kind (``ok`` or ``already_loaded``)."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        response = await self._request("POST", "/v1/load_lora_adapter", body)
        message = _message(response) if response.status_code != 200 else ""
        verdict = classify_load(response.status_code, message)
        if verdict.ok or verdict.kind == "already_loaded":
            return verdict.kind
        where = f"vLLM at {self.url}"
        if verdict.kind == "routes_missing":
            text = f"{RUNTIME_HINT} (POST {self.url}/v1/load_lora_adapter answered 404)"
        elif verdict.kind == "rank":
            text = f"{where} refused {name!r}: {message}; {verdict.hint}"
        elif verdict.kind == "not_found":
            text = (
                f"{where} cannot find the adapter {name!r} at {path!r} (as the server sees it; check "
                f"reload.vllm.path_map): {message}"
            )
        elif verdict.kind == "bad_adapter":
            text = (
                f"{where} cannot load {name!r} from {path!r} ({response.status_code}): {message}; "
                f"{verdict.hint}"
            )
        elif verdict.kind == "server":
            text = f"{where}: load of {name!r} answered {response.status_code}: {message}"
        else:
            text = f"{where} refused to load {name!r} from {path!r} ({response.status_code}): {message}"
        raise ReloadError(text, retryable=verdict.retryable)

    async def _unload(self, name: str) -> bool:
        """Unload ``name``; ``False`` if the server did not know it."""
        response = await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        message = _message(response) if response.status_code != 200 else ""
        verdict = classify_unload(response.status_code, message)
        if verdict.ok:
            return True
        if verdict.kind == "not_found":
            return False
        if verdict.kind == "routes_missing":
            raise ReloadError(
                f"{RUNTIME_HINT} (POST {self.url}/v1/unload_lora_adapter answered 404)", retryable=False
            )
        raise ReloadError(
            f"vLLM at {self.url}: unload of {name!r} answered {response.status_code}: {message}",
            retryable=verdict.retryable,
        )

    # --- the port ---------------------------------------------------------------------------------

    def check_rank(self, target: ServeTarget) -> None:
        if self.max_lora_rank is None:
            return
        rank = _adapter_rank(target.adapter_dir)
        if rank is not None and rank > self.max_lora_rank:
            raise ReloadError(
                f"adapter {target.adapter_dir} has rank {rank}, above reload.vllm.max_lora_rank "
                f"{self.max_lora_rank} (vLLM's --max-lora-rank): train with a smaller training.hyper.rank "
                "or start vLLM with a larger --max-lora-rank and raise reload.vllm.max_lora_rank",
                retryable=False,
            )

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
        trained_on = _trained_on(target.adapter_dir)
        await self.check_base(trained_on)
        if current is not None and self.naming == "fixed" and self.inplace is not False:
            kind = await self._load(name, path, inplace=True)
            self.inplace = kind == "ok"
            if self.inplace:
                current = None  # replaced in place
                log.info("vLLM at %s replaced %r in place", self.url, name)
        if current is not None:
            log.info("vLLM at %s serves %r from %r, not %r: reloading it", self.url, name, current.root, path)
            await self._unload(name)
            await self._load_fresh(name, path)
        elif (await self.models()).get(name) is None:
            if self.naming == "fixed":
                await self._unload(name)  # an unlisted leftover; 404 is fine
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
        if await self._load(name, path) == "already_loaded":
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
        versions = sorted(
            (v for n in names if (v := parse_version(self.prefix, target.voice, n)) is not None),
            reverse=True,
        )
        keep = {target.version, *[v for v in versions if v < target.version][: self.keep - 1]}
        for version in versions:
            if version not in keep:
                name = versioned_name(self.prefix, target.voice, version)
                if await self._unload(name):
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

        def owner(root: str) -> Path | None:
            for prefix, d in wanted.items():
                if root == prefix or root.startswith(prefix + "/"):
                    return d
            return None

        for adapter in (await self.models()).values():
            if owner(adapter.root) is not None:
                await self._unload(adapter.name)
                log.info("unloaded %r from vLLM at %s before deleting its directory", adapter.name, self.url)
        still = {d for a in (await self.models()).values() if (d := owner(a.root)) is not None}
        return set(dirs) - still

    # --- sleep mode (VLLM_SERVER_DEV_MODE=1 on CPU; --enable-sleep-mode on GPUs) -----------------

    async def sleep(self, level: int) -> None:
        response = await self._request("POST", "/sleep", params={"level": level})
        if response.status_code != 200:
            raise ReloadError(
                f"vLLM at {self.url} POST /sleep?level={level} answered {response.status_code}: "
                f"{_message(response)} (sleep needs --enable-sleep-mode, or VLLM_SERVER_DEV_MODE=1)",
                retryable=response.status_code >= 500,
            )

    async def wake_up(self) -> None:
        response = await self._request("POST", "/wake_up")
        if response.status_code != 200:
            raise ReloadError(
                f"vLLM at {self.url} POST /wake_up answered {response.status_code}: {_message(response)}",
                retryable=response.status_code >= 500,
            )

    async def is_sleeping(self) -> bool:
        response = await self._request("GET", "/is_sleeping")
        if response.status_code != 200:
            raise ReloadError(f"vLLM at {self.url} GET /is_sleeping answered {response.status_code}")
        try:
            return bool(response.json()["is_sleeping"])
        except (ValueError, KeyError, TypeError) as e:
            raise ReloadError(f"vLLM at {self.url} GET /is_sleeping answered {response.text[:200]!r}") from e

    async def aclose(self) -> None:
        await self._client.aclose()
