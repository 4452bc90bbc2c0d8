"""The adapter store: manifests verified before promotion, atomic `current` swap, retention, removal."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from beagled import manifest
from beagled.adapter_dirs import AdapterDirs
from beagled.errors import AdapterError


def adapter(d: Path, payload: bytes = b"weights") -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    manifest.write_manifest(d, {"job_id": d.name})
    return d


def finished(store: AdapterDirs, voice: str, job: str) -> Path:
    staging = store.staging_dir(voice, job, 1, "mlx")
    return store.finalize(voice, job, adapter(staging / "adapter", job.encode()))


def test_promote_swaps_current_and_refuses_a_tampered_adapter(tmp_path: Path) -> None:
    store = AdapterDirs(tmp_path / "voices")
    finished(store, "v", "j1")
    finished(store, "v", "j2")
    store.promote("v", "j1")
    assert store.current_job("v") == "j1"
    (store.adapter_dir("v", "j2") / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterError, match="does not match its manifest"):
        store.promote("v", "j2")
    assert store.current_job("v") == "j1"  # unchanged
    (store.adapter_dir("v", "j2") / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterError):
        store.verify("v", "j2")


def test_a_half_written_adapter_is_never_finalized_or_promoted(tmp_path: Path) -> None:
    store = AdapterDirs(tmp_path / "voices")
    staging = store.staging_dir("v", "j1", 1, "mlx")
    half = staging / "adapter"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")  # the worker died before the weights and manifest
    with pytest.raises(AdapterError, match=r"no manifest\.json"):
        store.finalize("v", "j1", half)
    assert not store.adapter_dir("v", "j1").exists()
    with pytest.raises(AdapterError):
        store.promote("v", "j1")
    store.clean_staging()
    assert not staging.exists()


def test_manifest_requires_the_peft_files(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors"):
        manifest.write_manifest(d, {})


def test_current_is_a_relative_symlink_swapped_by_rename(tmp_path: Path) -> None:
    store = AdapterDirs(tmp_path / "voices")
    finished(store, "v", "j1")
    finished(store, "v", "j2")
    store.promote("v", "j1")
    link = tmp_path / "voices" / "v" / "current"
    inode_before = link.lstat().st_ino
    store.promote("v", "j2")
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert link.lstat().st_ino != inode_before  # a new link renamed over the old, not rewritten in place
    assert store.current_job("v") == "j2"
    assert not list((tmp_path / "voices" / "v").glob(".current.*"))
    store.promote("v", "j2")  # idempotent
    assert store.current_job("v") == "j2"


def test_two_swaps_at_once_never_collide(tmp_path: Path) -> None:
    """A rollback's request and the serve loop may swap ``current`` at the same moment (seen on a loaded
    CI machine: one failed with EEXIST on the other's temporary link)."""
    store = AdapterDirs(tmp_path / "voices")
    finished(store, "v", "j1")
    finished(store, "v", "j2")
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def swap(job: str) -> None:
        start.wait()
        try:
            for _ in range(300):
                store.promote("v", job)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=swap, args=(j,)) for j in ("j1", "j2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.current_job("v") in ("j1", "j2")
    assert not [p.name for p in store.voice_dir("v").iterdir() if p.name.endswith(".tmp")]


def test_prune_keeps_the_current_and_the_kept(tmp_path: Path) -> None:
    store = AdapterDirs(tmp_path / "voices")
    for j in ("j1", "j2", "j3", "j4"):
        finished(store, "v", j)
    store.promote("v", "j1")
    assert sorted(store.prune("v", keep=["j4"])) == ["j2", "j3"]
    assert sorted(p.name for p in store.adapters_dir("v").iterdir() if not p.name.startswith(".")) == [
        "j1",
        "j4",
    ]
    assert store.remove("v") is True
    assert store.current("v") is None and store.remove("v") is False


def test_the_served_base_is_written_into_adapter_config_before_the_manifest_hashes_it(tmp_path: Path) -> None:
    d = tmp_path / "a"
    d.mkdir()
    config = {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "/models/tiny"}
    (d / "adapter_config.json").write_text(json.dumps(config))
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    info = manifest.write_manifest(d, {"base_model": "/models/tiny", "served_base": "tiny-served"})
    written = json.loads((d / "adapter_config.json").read_text())
    assert written == {**config, "base_model_name_or_path": "tiny-served"}
    assert not list(d.glob("*.tmp"))
    verified = manifest.verify(d)  # the hash covers the rewritten config
    assert verified == info and verified["served_base"] == "tiny-served"
    assert verified["base_model"] == "/models/tiny"  # what it was trained over stays recorded
    store = AdapterDirs(tmp_path / "voices")
    staging = store.staging_dir("v", "j1", 1, "mlx") / "adapter"
    d.rename(staging)
    store.finalize("v", "j1", staging)
    store.promote("v", "j1")
    # no served base known: the adapter_config is left as the backend wrote it
    e = tmp_path / "b"
    e.mkdir()
    (e / "adapter_config.json").write_text(json.dumps(config))
    (e / "adapter_model.safetensors").write_bytes(b"weights")
    manifest.write_manifest(e, {"served_base": None})
    assert json.loads((e / "adapter_config.json").read_text()) == config
