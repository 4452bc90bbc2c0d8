"""One vLLM server's HTTP API, as the reloader uses it: the model list, the runtime LoRA load and
unload routes, and the sleep endpoints.

``VllmApi`` sends the requests and turns every answer into a value or a ``ReloadError`` whose message
says what the operator can do (what an answer means is ``vllm_answers``'s, measured against the real
server); it keeps no policy: which names to load, keep or unload is ``vllm.VllmReloader``'s.
``GET /v1/models`` lists the base model (``parent`` null) and each adapter with ``id`` = name,
``root`` = the ``lora_path`` as sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from beagled.errors import ReloadError
from beagled.reload.base_check import BaseModel
from beagled.reload.vllm_answers import RUNTIME_HINT, classify_load, classify_unload


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    root: str
    parent: str | None


def error_message(response: httpx.Response) -> str:
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


class VllmApi:
    """The HTTP client of one server at ``url`` (``api_key``: its ``--api-key``, sent as a bearer token)."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        *,
        api_key: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(timeout_s), headers=headers, transport=transport
        )

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

    def _refused(self, what: str, response: httpx.Response, hint: str = "") -> ReloadError:
        """A non-200 answer to ``what`` (``"POST /sleep"``): retried when the server failed (5xx)."""
        return ReloadError(
            f"vLLM at {self.url} {what} answered {response.status_code}: {error_message(response)}{hint}",
            retryable=response.status_code >= 500,
        )

    # --- the model list ---------------------------------------------------------------------------

    async def _model_list(self) -> list[dict[str, Any]]:
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise self._refused("GET /v1/models", response)
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

    # --- runtime LoRA -----------------------------------------------------------------------------

    async def load(self, name: str, path: str, *, inplace: bool = False) -> str:
        """Load ``name`` from ``path``; returns the verdict's kind (``ok`` or ``already_loaded``)."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        response = await self._request("POST", "/v1/load_lora_adapter", body)
        message = error_message(response) if response.status_code != 200 else ""
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

    async def unload(self, name: str) -> bool:
        """Unload ``name``; ``False`` if the server did not know it."""
        response = await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        message = error_message(response) if response.status_code != 200 else ""
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

    # --- sleep mode (VLLM_SERVER_DEV_MODE=1 on CPU; --enable-sleep-mode on GPUs) -----------------

    async def sleep(self, level: int) -> None:
        response = await self._request("POST", "/sleep", params={"level": level})
        if response.status_code != 200:
            raise self._refused(
                f"POST /sleep?level={level}",
                response,
                " (sleep needs --enable-sleep-mode, or VLLM_SERVER_DEV_MODE=1)",
            )

    async def wake_up(self) -> None:
        response = await self._request("POST", "/wake_up")
        if response.status_code != 200:
            raise self._refused("POST /wake_up", response)

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
