"""Adapter manifests: what an adapter directory holds and the sha256 of every file in it.

Written by the training worker as the last file of an adapter directory, read by the voices store,
which refuses to promote a directory whose files do not match. Standard library only, so both the
daemon and the training subprocesses import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from beagled.errors import AdapterError

MANIFEST = "manifest.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under ``directory`` except the manifest, by relative path."""
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST:
            out[path.relative_to(directory).as_posix()] = sha256_file(path)
    return out


def hash_cache_path() -> Path:
    """Where weight digests are cached: ``$BEAGLED_HASH_CACHE``, else the user's cache directory."""
    if os.environ.get("BEAGLED_HASH_CACHE"):
        return Path(os.environ["BEAGLED_HASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "beagled" / "sha256-cache.json"


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def sha256_file_cached(path: Path) -> str:
    """``sha256_file``, remembered by (path, size, mtime, inode, ctime): a base model's weights are read
    once, not on every job. Any change of the file (rewrite, touch, replace) makes a new key; a cache
    that cannot be read or written only costs the re-read."""
    cache_file = hash_cache_path()
    key = _cache_key(path)
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, str) and len(hit) == 64:
        return hit
    digest = sha256_file(path)
    resolved = f"{path.resolve()}|"
    cache = {k: v for k, v in cache.items() if not k.startswith(resolved)}  # older versions of this file
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True), encoding="utf-8")
        tmp.replace(cache_file)
    except OSError:
        pass
    return digest


def base_model_sha256(base: Path) -> str | None:
    """sha256 of a model's ``model.safetensors``; for a sharded model, over the sorted shards' digests.
    None when the directory holds no safetensors weights. Digests are cached (``sha256_file_cached``)."""
    single = base / "model.safetensors"
    if single.is_file():
        return sha256_file_cached(single)
    shards = sorted(base.glob("model*.safetensors"))
    if not shards:
        return None
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.name}:{sha256_file_cached(shard)}\n".encode())
    return digest.hexdigest()


def model_files_key(base: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What identifies the base model's bytes cheaply (name, size, mtime and inode of each file): a warm
    worker reloads its copy when this changes."""
    out = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        if path.is_file():
            st = path.stat()
            out.append((path.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_served_base(directory: Path, served_base: str) -> None:
    """Write ``served_base`` as the adapter's ``base_model_name_or_path``: the name the inference server
    serves its base under (vLLM's ``lora_filesystem_resolver`` refuses an adapter whose value differs).
    The file is replaced atomically; call it before the manifest hashes the files."""
    path = directory / PEFT_FILES[0]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is unreadable: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path} is not a JSON object")
    if config.get("base_model_name_or_path") == served_base:
        return
    config["base_model_name_or_path"] = served_base
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def write_manifest(directory: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file, write ``manifest.json`` (fsynced) and return the manifest.

    ``info["served_base"]``, when set, is first written into ``adapter_config.json`` as
    ``base_model_name_or_path`` (``set_served_base``), so the hashes cover it; the manifest records it.
    The training base stays in ``info["base_model"]`` (the path the adapter was trained over)."""
    for name in PEFT_FILES:
        if not (directory / name).is_file():
            raise AdapterError(f"{directory} has no {name}: not a PEFT adapter")
    if info.get("served_base"):
        set_served_base(directory, str(info["served_base"]))
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    manifest = {**info, "files": file_hashes(directory)}
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST)
    fsync_dir(directory)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise AdapterError(f"{directory} has no {MANIFEST}: incomplete adapter") from e
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is unreadable: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise AdapterError(f"{path} has no file list")
    return data


def verify(directory: Path) -> dict[str, Any]:
    """Return the manifest if every file matches it, else raise ``AdapterError`` naming the first mismatch."""
    manifest = read_manifest(directory)
    expected: dict[str, str] = manifest["files"]
    for name in PEFT_FILES:
        if name not in expected:
            raise AdapterError(f"{directory}: manifest lists no {name}")
    actual = file_hashes(directory)
    for name, digest in expected.items():
        if name not in actual:
            raise AdapterError(f"{directory}: {name} is missing")
        if actual[name] != digest:
            raise AdapterError(f"{directory}: {name} does not match its manifest (sha256 differs)")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise AdapterError(f"{directory}: files not in the manifest: {', '.join(extra)}")
    return manifest
