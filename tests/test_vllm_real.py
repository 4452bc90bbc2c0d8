"""The real vLLM CPU server as the reference: the stand-in answers as it does (one table of requests
sent to both), and the reloader classifies every real answer (rank over the limit, bad adapters,
wrong base model, restarts) and never deletes what a server still lists."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from beagled.errors import ReloadError
from beagled.reload import ServeTarget
from beagled.reload.replicas import VllmReplicas
from beagled.reload.vllm import VllmReloader
from beagled.reload.vllm_answers import classify_load, classify_unload
from tests.vllm_real import RealVllm, http, tiny_adapter
from tests.vllm_standin import VllmStandin

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """Adapter directories for the table: good ones, a rank-32 one, broken ones."""
    root = tmp_path_factory.mktemp("adapters")
    base = str(tiny_model)
    out = {
        "good": tiny_adapter(root / "good", base=base, seed=1),
        "good2": tiny_adapter(root / "good2", base=base, seed=2),
        "rank32": tiny_adapter(root / "rank32", base=base, rank=32, seed=3),
        "noweights": tiny_adapter(root / "noweights", base=base, weights=False),
        # mlx-lm's tensor names, not PEFT's
        "badnames": tiny_adapter(root / "badnames", base=base, suffixes=("lora_a", "lora_b")),
        "noconfig": root / "noconfig",
        "missing": root / "does-not-exist",
    }
    (root / "noconfig").mkdir()
    (root / "noconfig" / "adapter_model.safetensors").write_bytes(
        (root / "good" / "adapter_model.safetensors").read_bytes()
    )
    return out


def _message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message"))
        return str(body.get("detail") or body.get("message") or body)
    return str(body)


# (case, method, route, body builder) — run in order on a server with no adapters
TABLE: list[tuple[str, str, Callable[[dict[str, Path]], dict[str, Any]]]] = [
    ("load", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-a", "lora_path": str(a["good"])}),
    ("load same name", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-a", "lora_path": str(a["good"])}),
    (
        "load_inplace",
        "/v1/load_lora_adapter",
        lambda a: {"lora_name": "t-a", "lora_path": str(a["good2"]), "load_inplace": True},
    ),
    ("missing dir", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-b", "lora_path": str(a["missing"])}),
    ("no config", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-c", "lora_path": str(a["noconfig"])}),
    ("rank 32", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-d", "lora_path": str(a["rank32"])}),
    ("no weights", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-e", "lora_path": str(a["noweights"])}),
    ("bad names", "/v1/load_lora_adapter", lambda a: {"lora_name": "t-f", "lora_path": str(a["badnames"])}),
    ("unload known", "/v1/unload_lora_adapter", lambda a: {"lora_name": "t-a"}),
    ("unload unknown", "/v1/unload_lora_adapter", lambda a: {"lora_name": "t-a"}),
]


def run_table(url: str, adapters: dict[str, Path]) -> list[tuple[str, int, str, str]]:
    out = []
    for case, route, body in TABLE:
        status, answer = http("POST", url + route, body(adapters))
        message = _message(answer) if status != 200 else ""
        classify = classify_unload if "unload" in route else classify_load
        out.append((case, status, classify(status, message).kind, message))
    return out


def test_standin_answers_as_the_real_server(vllm: RealVllm, adapters: dict[str, Path]) -> None:
    real = run_table(vllm.url, adapters)
    assert vllm.alive()
    with VllmStandin(base_model=vllm.base_id, base_root=vllm.base_id) as standin:
        fake = run_table(standin.url, adapters)
    assert [r[:3] for r in fake] == [r[:3] for r in real], json.dumps(real, indent=1)
    for (case, status, _, message), (_, _, _, fake_message) in zip(real, fake, strict=True):
        if (status == 404 and "path" in case) or case == "missing dir":
            assert "<path>" in message and "<path>" in fake_message, (case, message, fake_message)
    kinds = {case: kind for case, _, kind, _ in real}
    assert kinds["rank 32"] == "rank" and kinds["no weights"] == kinds["bad names"] == "bad_adapter"
    assert kinds["load_inplace"] == "ok"


def target(adapter: Path, version: int, voice: str = "default") -> ServeTarget:
    return ServeTarget(voice=voice, version=version, job_id=adapter.name, adapter_dir=adapter)


async def test_rank_over_the_limit_is_one_operator_error(vllm: RealVllm, adapters: dict[str, Path]) -> None:
    # the server's own answer (500), then the daemon's check before the call
    for limit in (None, 16):
        reloader = VllmReloader(vllm.url, max_lora_rank=limit)
        try:
            with pytest.raises(ReloadError, match="--max-lora-rank") as info:
                await reloader.reload(target(adapters["rank32"], 1))
            assert not info.value.retryable
        finally:
            await reloader.aclose()
    assert vllm.adapters() == {}


@pytest.mark.parametrize("which", ["noweights", "badnames", "missing"])
async def test_broken_adapters_are_not_retried(vllm: RealVllm, adapters: dict[str, Path], which: str) -> None:
    reloader = VllmReloader(vllm.url)
    try:
        with pytest.raises(ReloadError) as info:
            await reloader.reload(target(adapters[which], 1))
        assert not info.value.retryable, str(info.value)
    finally:
        await reloader.aclose()


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with one layer fewer: vLLM itself accepts its adapters over the 2-layer base."""
    from beagled.training.tinymodel import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("other-base"), num_layers=1)


async def test_adapter_of_another_base_is_refused_before_the_load(
    vllm: RealVllm, other_base: Path, tmp_path: Path
) -> None:
    wrong = tiny_adapter(tmp_path / "wrong", base=str(other_base), layers=(0,))
    reloader = VllmReloader(vllm.url)
    try:
        with pytest.raises(ReloadError, match="num_hidden_layers 1 vs 2") as info:
            await reloader.reload(target(wrong, 1))
        assert not info.value.retryable
        assert vllm.adapters() == {}  # never sent
        # the server's answer to the same load, for the record: it takes it
        status, _ = http(
            "POST", vllm.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(wrong)}
        )
        assert status == 200
    finally:
        await reloader.aclose()
    named = VllmReloader(vllm.url, served_base="some-other-model")
    try:
        with pytest.raises(ReloadError, match="served_base") as info:
            await named.check_base(None)
        assert not info.value.retryable
    finally:
        await named.aclose()


async def test_fixed_naming_replaces_in_place(vllm: RealVllm, adapters: dict[str, Path]) -> None:
    """Also the reload duration per naming mode (a new version over a served one), for the record."""
    timings: dict[str, float] = {}
    reloader = VllmReloader(vllm.url, naming="fixed")
    try:
        assert await reloader.reload(target(adapters["good"], 1)) == "default"
        t0 = time.monotonic()
        assert await reloader.reload(target(adapters["good2"], 2)) == "default"
        timings["fixed"] = time.monotonic() - t0
        assert reloader.inplace is True
        assert vllm.adapters() == {"default": str(adapters["good2"])}
        status, _ = vllm.complete("default", "Hello", max_tokens=1)
        assert status == 200
    finally:
        await reloader.aclose()
    vllm.unload_all()
    versioned = VllmReloader(vllm.url)
    try:
        await versioned.reload(target(adapters["good"], 1))
        t0 = time.monotonic()
        assert await versioned.reload(target(adapters["good2"], 2)) == "default-v0002"
        timings["versioned"] = time.monotonic() - t0
    finally:
        await versioned.aclose()
    print(
        f"\nFIGURE reload duration: versioned={timings['versioned']:.3f}s "
        f"fixed(load_inplace)={timings['fixed']:.3f}s"
    )


async def test_release_unloads_and_verifies_before_delete(vllm: RealVllm, tmp_path: Path) -> None:
    base = str(vllm.model)
    dirs = [tiny_adapter(tmp_path / f"j{i}", base=base, seed=i) for i in range(3)]
    reloader = VllmReplicas([VllmReloader(vllm.url, keep=3)])
    try:
        for i, d in enumerate(dirs):
            await reloader.reload(target(d, i + 1))
        assert len(vllm.adapters()) == 3
        assert await reloader.release(dirs[:2]) == set(dirs[:2])
        assert set(vllm.adapters()) == {"default-v0003"}
    finally:
        await reloader.aclose()
    down = VllmReplicas([VllmReloader(vllm.url), VllmReloader("http://127.0.0.1:9")])
    try:  # a replica that cannot be asked keeps every directory
        assert await down.release(dirs[2:]) == set()
    finally:
        await down.aclose()
