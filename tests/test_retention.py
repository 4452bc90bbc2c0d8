"""Retention and voice removal delete an adapter directory only after no server lists it (against the
stand-in, which answers as the real server; the real-server run is in ``test_vllm_serving.py``)."""

from __future__ import annotations

from pathlib import Path

from beagled import retention
from beagled.adapter_dirs import AdapterDirs
from beagled.reload.replicas import VllmReplicas
from beagled.reload.vllm import VllmReloader
from tests.vllm_standin import VllmStandin, make_peft_adapter


def store_with(tmp_path: Path, jobs: list[str]) -> AdapterDirs:
    store = AdapterDirs(tmp_path / "voices")
    for j in jobs:
        make_peft_adapter(store.adapter_dir("bea", j), job_id=j, voice="bea")
    store.promote("bea", jobs[-1])
    return store


async def test_prune_unloads_what_a_server_lists_then_deletes(tmp_path: Path) -> None:
    store = store_with(tmp_path, ["j1", "j2", "j3"])
    with VllmStandin() as server:
        server.preload("bea-v0001", str(store.adapter_dir("bea", "j1")))
        reloader = VllmReplicas([VllmReloader(server.url)])
        try:
            removed = await retention.prune(store, reloader, "bea", ["j3", "j2"])
        finally:
            await reloader.aclose()
        assert removed == ["j1"]
        assert server.adapters == {}
        assert not store.adapter_dir("bea", "j1").exists()


async def test_a_server_that_cannot_be_asked_keeps_every_directory(tmp_path: Path) -> None:
    store = store_with(tmp_path, ["j1", "j2"])
    reloader = VllmReplicas([VllmReloader("http://127.0.0.1:9", timeout_s=2)])
    try:
        assert await retention.prune(store, reloader, "bea", ["j2"]) == []
    finally:
        await reloader.aclose()
    assert store.adapter_dir("bea", "j1").is_dir()


async def test_an_unload_that_does_not_take_keeps_the_directory(tmp_path: Path) -> None:
    store = store_with(tmp_path, ["j1", "j2"])
    with VllmStandin() as server:
        server.preload("bea-v0001", str(store.adapter_dir("bea", "j1")))
        server.fail_next(503)  # the server cannot say what it lists: nothing is deleted
        reloader = VllmReplicas([VllmReloader(server.url)])
        try:
            first = await retention.prune(store, reloader, "bea", ["j2"])
            assert store.adapter_dir("bea", "j1").is_dir() and first == []
            # what a crash between an unload and its delete leaves is finished by the next pass
            assert await retention.prune(store, reloader, "bea", ["j2"]) == ["j1"]
        finally:
            await reloader.aclose()


async def test_removing_a_voice_waits_for_every_replica(tmp_path: Path) -> None:
    store = store_with(tmp_path, ["j1", "j2"])
    with VllmStandin() as up:
        up.preload("bea-v0002", str(store.adapter_dir("bea", "j2")))
        down = VllmReplicas([VllmReloader(up.url), VllmReloader("http://127.0.0.1:9", timeout_s=2)])
        try:
            assert not await retention.remove_voice(store, down, "bea", lambda v: False)
        finally:
            await down.aclose()
        assert store.adapter_dir("bea", "j2").is_dir() and store.pending_removals() == {"bea": ["j1", "j2"]}
        reloader = VllmReplicas([VllmReloader(up.url)])
        try:  # the sweep (start-up, each reconcile pass) finishes it once the servers can be asked
            await retention.sweep(store, reloader, lambda v: False)
        finally:
            await reloader.aclose()
        assert up.adapters == {}
        assert not store.voice_dir("bea").exists()
