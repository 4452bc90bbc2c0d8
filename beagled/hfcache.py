"""``training.base_model`` as a directory or a Hugging Face repo id found in the local HF cache.

No download ever happens at run time: a repo id resolves to the snapshot that the cache's
``refs/main`` (or a ``@revision``) names, under ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub`` (the layout ``huggingface_hub`` writes). A repo id that is not there is a
clear error naming the command that fetches it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from beagled.errors import ConfigError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


def hub_cache(env: Mapping[str, str] | None = None) -> Path:
    e = os.environ if env is None else env
    if e.get("HF_HUB_CACHE"):
        return Path(e["HF_HUB_CACHE"]).expanduser()
    if e.get("HF_HOME"):
        return Path(e["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve(base_model: str, env: Mapping[str, str] | None = None) -> Path:
    """The model directory for ``base_model``; raises ``ConfigError`` (key ``training.base_model``)."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path
    if not REPO_ID_RE.match(base_model) or base_model.startswith((".", "/", "~")):
        raise ConfigError("training.base_model", f"{base_model} is not a directory")
    repo, _, revision = base_model.partition("@")
    cache = hub_cache(env)
    root = cache / ("models--" + repo.replace("/", "--"))
    fetch = (
        f"{base_model} is not in the local Hugging Face cache ({cache}); beagled never downloads at run "
        f"time: fetch it once with `hf download {repo}"
        + (f" --revision {revision}" if revision else "")
        + "` (pip install huggingface_hub), or set base_model to a model directory"
    )
    ref = root / "refs" / (revision or "main")
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    if commit:
        snap = root / "snapshots" / commit
        if (snap / "config.json").is_file():
            return snap
    raise ConfigError("training.base_model", fetch)
