"""``method = "vllm"``: make a running vLLM server serve an adapter through its runtime LoRA API.

vLLM needs ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (without the env var the
routes answer 404 "Not Found"). ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` loads one;
the same name again answers 400 "... has already been loaded"; a bad path 404; ``POST
/v1/unload_lora_adapter {"lora_name"}`` unloads (404 for an unknown name); ``GET /v1/models`` lists each
adapter with ``id`` = name, ``root`` = path. Runtime adapters vanish when vLLM restarts: ``verify`` tells
the engine, which reloads.

Naming:
- ``versioned`` (default): ``<prefix><voice>-v<NNNN>``. A new name per version, so no stale prefix-cache
  blocks; after the new one is verified, versions of the voice beyond the newest ``keep`` (the target
  and the ``keep - 1`` highest versions below it; versions above it were rolled back from) are unloaded.
- ``fixed``: ``<prefix><voice>``; unload (404 is fine) then load.

``lora_path`` is the path as the server sees it: the daemon's path mapped by the first ``path_map``
pair whose first element is a path prefix of it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from beagled.errors import ConfigError, ReloadError
from beagled.reload import ServeTarget
from beagled.reload.naming import fixed_name, parse_version, versioned_name

log = logging.getLogger(__name__)

RUNTIME_HINT = (
    "vLLM's runtime LoRA routes are missing: start vLLM with --enable-lora and the environment variable "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
)
_RANK_RE = re.compile(r"rank \d+ is greater than max_lora_rank", re.IGNORECASE)


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


def _adapter_rank(adapter_dir: Path) -> int | None:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
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

    # --- HTTP -------------------------------------------------------------------------------------

    async def _request(self, method: str, route: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            response = await self._client.request(method, route, json=body)
        except httpx.TimeoutException as e:
            raise ReloadError(
                f"vLLM at {self.url} did not answer {method} {route} within {self.timeout_s:g} s"
            ) from e
        except httpx.TransportError as e:
            raise ReloadError(f"vLLM at {self.url} is unreachable ({type(e).__name__}: {e})") from e
        if response.status_code >= 500:
            raise ReloadError(f"vLLM {method} {route} answered {response.status_code}: {_message(response)}")
        if response.status_code == 404 and _message(response) == "Not Found":
            raise ReloadError(f"{RUNTIME_HINT} ({method} {self.url}{route} answered 404)", retryable=False)
        return response

    async def models(self) -> dict[str, ServedAdapter]:
        """Every adapter the server lists (entries with a parent), by name."""
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise ReloadError(f"vLLM GET /v1/models answered {response.status_code}: {_message(response)}")
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise ReloadError(f"vLLM GET /v1/models answered something that is not a model list: {e}") from e
        out: dict[str, ServedAdapter] = {}
        for entry in data if isinstance(data, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
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

    async def _load(self, name: str, path: str) -> None:
        response = await self._request(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}
        )
        if response.status_code == 200:
            return
        message = _message(response)
        if response.status_code == 400 and "already been loaded" in message:
            served = (await self.models()).get(name)
            if served is not None and served.root == path:
                return  # a previous attempt loaded it: idempotent success
            raise ReloadError(
                f"vLLM already has an adapter named {name!r} "
                + (f"from {served.root!r}" if served else "(not listed by /v1/models)")
                + f", not {path!r}"
            )
        if response.status_code == 404:
            raise ReloadError(
                f"vLLM cannot find the adapter {name!r} at {path!r} (as the server sees it; check "
                f"reload.vllm.path_map): {message}",
                retryable=False,
            )
        if response.status_code == 400 and _RANK_RE.search(message):
            raise ReloadError(
                f"vLLM refused {name!r}: {message}; "
                "train with a smaller rank or raise vLLM's --max-lora-rank",
                retryable=False,
            )
        if 400 <= response.status_code < 500:
            raise ReloadError(
                f"vLLM refused to load {name!r} from {path!r} ({response.status_code}): {message}",
                retryable=False,
            )
        raise ReloadError(f"vLLM load of {name!r} answered {response.status_code}: {message}")

    async def _unload(self, name: str) -> bool:
        """Unload ``name``; ``False`` if the server did not know it."""
        response = await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise ReloadError(f"vLLM unload of {name!r} answered {response.status_code}: {_message(response)}")

    # --- the port ---------------------------------------------------------------------------------

    async def reload(self, target: ServeTarget) -> str:
        name = self.served_name(target)
        path = self.server_path(target)
        if self.max_lora_rank is not None:
            rank = _adapter_rank(target.adapter_dir)
            if rank is not None and rank > self.max_lora_rank:
                raise ReloadError(
                    f"adapter {target.adapter_dir} has rank {rank}, above reload.vllm.max_lora_rank "
                    f"{self.max_lora_rank} (vLLM's --max-lora-rank)",
                    retryable=False,
                )
        current = (await self.models()).get(name)
        if current is not None and current.root != path:
            log.warning("vLLM serves %r from %r, not %r: reloading it", name, current.root, path)
            await self._unload(name)
            current = None
        if current is None:
            if self.naming == "fixed":
                await self._unload(name)  # an unlisted leftover; 404 is fine
            await self._load(name, path)
        served = (await self.models()).get(name)
        if served is None or served.root != path:
            raise ReloadError(
                f"vLLM accepted {name!r} but /v1/models "
                + (f"lists it from {served.root!r}" if served else "does not list it")
                + f" (expected {path!r})"
            )
        if self.naming == "versioned":
            await self._retire(target)
        return name

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
                    log.info("unloaded %r from vLLM (keep=%d)", name, self.keep)

    async def verify(self, target: ServeTarget) -> bool:
        try:
            served = (await self.models()).get(self.served_name(target))
        except ReloadError as e:
            log.info("cannot verify %s v%d on vLLM: %s", target.voice, target.version, e)
            return False
        return served is not None and served.root == self.server_path(target)

    async def aclose(self) -> None:
        await self._client.aclose()
