"""The vLLM reloader against a real HTTP stand-in that follows vLLM's runtime LoRA behaviour."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from beagled.errors import ConfigError, ReloadError
from beagled.reload import ServeTarget
from beagled.reload.vllm import RUNTIME_HINT, VllmReloader, map_path
from tests.vllm_standin import VllmStandin, make_peft_adapter


@pytest.fixture
def standin() -> Iterator[VllmStandin]:
    with VllmStandin() as server:
        yield server


def target(tmp_path: Path, version: int, voice: str = "default", rank: int = 8) -> ServeTarget:
    job_id = f"j-{voice}-{version}"
    adapter = tmp_path / "voices" / voice / "adapters" / job_id
    if not adapter.exists():
        make_peft_adapter(adapter, rank=rank, job_id=job_id, voice=voice, seed=version)
    return ServeTarget(voice=voice, version=version, job_id=job_id, adapter_dir=adapter)


async def test_versioned_load_lists_and_verifies(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url)
    try:
        t1 = target(tmp_path, 1)
        assert not await reloader.verify(t1)
        name = await reloader.reload(t1)
        assert name == "default-v0001"
        assert standin.adapters == {"default-v0001": str(t1.adapter_dir)}
        assert await reloader.verify(t1)
        assert await reloader.served("default") == ["default-v0001"]
    finally:
        await reloader.aclose()


async def test_double_reload_is_idempotent(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url)
    try:
        t1 = target(tmp_path, 1)
        assert await reloader.reload(t1) == await reloader.reload(t1) == "default-v0001"
        assert standin.adapters == {"default-v0001": str(t1.adapter_dir)}
        loads = [r for r in standin.requests if r.path == "/v1/load_lora_adapter"]
        assert len(loads) == 1  # the second reload saw it listed and loaded nothing
    finally:
        await reloader.aclose()


async def test_already_loaded_answer_is_success_only_for_the_same_path(
    standin: VllmStandin, tmp_path: Path
) -> None:
    # A crash between load and the outcome event: vLLM answers 400 "already been loaded" to the retry.
    reloader = VllmReloader(standin.url)
    try:
        t1 = target(tmp_path, 1)
        await reloader._load_fresh("default-v0001", str(t1.adapter_dir))
        await reloader._load_fresh("default-v0001", str(t1.adapter_dir))  # 400 already loaded, same root: ok
        with pytest.raises(ReloadError, match="already has an adapter named 'default-v0001'"):
            await reloader._load_fresh("default-v0001", "/elsewhere")
        assert standin.adapters == {"default-v0001": str(t1.adapter_dir)}
        # reload() itself replaces a same-named adapter that points elsewhere
        standin.restart()
        standin.preload("default-v0001", "/stale/path")
        assert await reloader.reload(t1) == "default-v0001"
        assert standin.adapters == {"default-v0001": str(t1.adapter_dir)}
    finally:
        await reloader.aclose()


async def test_keep_unloads_older_versions_of_the_voice_only(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url, keep=2)
    try:
        other = target(tmp_path, 1, voice="other")
        await reloader.reload(other)
        for version in (1, 2, 3, 4):
            await reloader.reload(target(tmp_path, version))
        assert set(standin.adapters) == {"default-v0003", "default-v0004", "other-v0001"}
        # rollback to v3: v4 (rolled back from) goes, v3 stays, and the keep-1 below it stay
        await reloader.reload(target(tmp_path, 2))
        assert set(standin.adapters) == {"default-v0002", "other-v0001"}
    finally:
        await reloader.aclose()


async def test_keep_one(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url, keep=1, prefix="beagle-")
    try:
        await reloader.reload(target(tmp_path, 1))
        name = await reloader.reload(target(tmp_path, 2))
        assert name == "beagle-default-v0002"
        assert set(standin.adapters) == {"beagle-default-v0002"}
    finally:
        await reloader.aclose()


async def test_fixed_naming_unloads_then_loads(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url, naming="fixed", prefix="p-")
    try:
        t1, t2 = target(tmp_path, 1), target(tmp_path, 2)
        assert await reloader.reload(t1) == "p-default"
        assert await reloader.reload(t1) == "p-default"
        assert standin.adapters == {"p-default": str(t1.adapter_dir)}
        assert await reloader.reload(t2) == "p-default"
        assert standin.adapters == {"p-default": str(t2.adapter_dir)}
        assert await reloader.verify(t2)
        assert not await reloader.verify(t1)
    finally:
        await reloader.aclose()


async def test_path_map_gives_the_server_its_own_path(standin: VllmStandin, tmp_path: Path) -> None:
    # The "server" sees the state dir under /mnt/state: map it, and make that path real for the stand-in.
    t1 = target(tmp_path, 1)
    server_root = tmp_path / "server-view"
    server_root.symlink_to(tmp_path / "voices")
    reloader = VllmReloader(
        standin.url, path_map=[("/nowhere", "/x"), (str(tmp_path / "voices"), str(server_root))]
    )
    try:
        await reloader.reload(t1)
        expected = str(server_root / "default" / "adapters" / t1.job_id)
        assert standin.adapters == {"default-v0001": expected}
        assert await reloader.verify(t1)
    finally:
        await reloader.aclose()


def test_map_path() -> None:
    pairs = [("/state/", "/srv/state"), ("/", "/root-of-all")]
    assert map_path("/state/voices/a", pairs) == "/srv/state/voices/a"
    assert map_path("/state", pairs) == "/srv/state"
    assert map_path("/statex/a", pairs) == "/root-of-all/statex/a"
    assert map_path("/a/b", []) == "/a/b"


async def test_reserve_after_server_restart(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url)
    try:
        t1 = target(tmp_path, 1)
        await reloader.reload(t1)
        standin.restart()
        assert not await reloader.verify(t1)
        start = trio.current_time()
        await reloader.reload(t1)
        print(f"re-serve after restart took {trio.current_time() - start:.4f} s")
        assert await reloader.verify(t1)
        assert standin.adapters == {"default-v0001": str(t1.adapter_dir)}
    finally:
        await reloader.aclose()


async def test_routes_missing_names_the_env_var(tmp_path: Path) -> None:
    with VllmStandin(runtime_updating=False) as server:
        reloader = VllmReloader(server.url)
        try:
            with pytest.raises(ReloadError) as info:
                await reloader.reload(target(tmp_path, 1))
        finally:
            await reloader.aclose()
    assert not info.value.retryable
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in str(info.value)
    assert "--enable-lora" in str(info.value)
    assert RUNTIME_HINT in str(info.value)


async def test_bad_path_is_not_retryable(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url, path_map=[(str(tmp_path), "/not/on/the/server")])
    try:
        with pytest.raises(ReloadError, match="cannot find the adapter") as info:
            await reloader.reload(target(tmp_path, 1))
    finally:
        await reloader.aclose()
    assert not info.value.retryable
    assert "path_map" in str(info.value)
    assert standin.adapters == {}


async def test_rank_too_high_is_not_retryable(tmp_path: Path) -> None:
    with VllmStandin(max_lora_rank=16) as server:
        reloader = VllmReloader(server.url)
        try:
            with pytest.raises(ReloadError, match="greater than max_lora_rank 16") as info:
                await reloader.reload(target(tmp_path, 1, rank=32))
        finally:
            await reloader.aclose()
        assert not info.value.retryable
        assert server.adapters == {}
        # with max_lora_rank configured, the daemon refuses before asking the server
        reloader = VllmReloader(server.url, max_lora_rank=16)
        try:
            with pytest.raises(ReloadError, match=r"above reload\.vllm\.max_lora_rank") as info:
                await reloader.reload(target(tmp_path, 1, rank=32))
        finally:
            await reloader.aclose()
        assert not info.value.retryable


async def test_not_an_adapter_is_not_retryable(standin: VllmStandin, tmp_path: Path) -> None:
    t1 = target(tmp_path, 1)
    (t1.adapter_dir / "adapter_model.safetensors").write_bytes(b"garbage!")
    reloader = VllmReloader(standin.url)
    try:
        with pytest.raises(ReloadError, match="cannot load") as info:
            await reloader.reload(t1)
    finally:
        await reloader.aclose()
    assert not info.value.retryable


async def test_5xx_is_retryable_then_succeeds(standin: VllmStandin, tmp_path: Path) -> None:
    reloader = VllmReloader(standin.url)
    t1 = target(tmp_path, 1)
    try:
        standin.fail_next(503)
        with pytest.raises(ReloadError, match="503") as info:
            await reloader.reload(t1)
        assert info.value.retryable
        assert not await reloader.verify(t1)
        standin.fail_next(500, count=1)
        assert not await reloader.verify(t1)
        assert await reloader.reload(t1) == "default-v0001"
    finally:
        await reloader.aclose()


async def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reloader = VllmReloader(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ReloadError, match="unreachable") as info:
            await reloader.reload(target(tmp_path, 1))
        assert info.value.retryable
        assert not await reloader.verify(target(tmp_path, 1))
    finally:
        await reloader.aclose()


async def test_timeout_is_retryable(standin: VllmStandin, tmp_path: Path) -> None:
    standin.hang_s = 30.0
    reloader = VllmReloader(standin.url, timeout_s=0.3)
    try:
        with trio.fail_after(10):
            with pytest.raises(ReloadError, match="did not answer") as info:
                await reloader.reload(target(tmp_path, 1))
        assert info.value.retryable
    finally:
        await reloader.aclose()


def test_bad_config() -> None:
    with pytest.raises(ConfigError, match="naming"):
        VllmReloader("http://127.0.0.1:1", naming="sometimes")
    with pytest.raises(ConfigError, match="keep"):
        VllmReloader("http://127.0.0.1:1", keep=0)
    with pytest.raises(ConfigError, match="url"):
        VllmReloader("127.0.0.1:8000")
