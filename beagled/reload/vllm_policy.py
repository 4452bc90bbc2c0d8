"""The pure decisions of ``method = "vllm"``: paths as the server sees them, and what to unload.

- ``map_path``: a daemon-side path mapped by the first ``path_map`` pair whose first element is a path
  prefix of it (``lora_path`` is the path as the server sees it); the inverse map swaps the pairs.
- ``retired_versions``: under versioned naming, the versions of a voice beyond the newest ``keep``: the
  target and the ``keep - 1`` highest versions below it stay (versions above it were rolled back from).
- ``owner``: which of the directories being released an adapter's ``root`` lies in.

No I/O: ``vllm.VllmReloader`` asks the server and acts on these answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


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


def unmap_path(server_path: str, path_map: Sequence[tuple[str, str]]) -> str:
    """The inverse of ``map_path``: the server's path as the daemon sees it."""
    return map_path(server_path, [(b, a) for a, b in path_map])


def retired_versions(versions: Iterable[int], target: int, keep: int) -> list[int]:
    """The versions to unload, newest first: all but ``target`` and the ``keep - 1`` below it."""
    newest_first = sorted(versions, reverse=True)
    kept = {target, *[v for v in newest_first if v < target][: keep - 1]}
    return [v for v in newest_first if v not in kept]


def owner(root: str, wanted: Mapping[str, Path]) -> Path | None:
    """The directory of ``wanted`` (server path → daemon path) that ``root`` is or lies in."""
    for prefix, d in wanted.items():
        if root == prefix or root.startswith(prefix + "/"):
            return d
    return None
