"""What the vLLM reloader reads from an adapter directory before it is loaded: its LoRA rank (checked
against ``reload.vllm.max_lora_rank``) and the base it was trained over (checked by ``base_check``).

Unreadable or odd files answer ``None`` (nothing known): the server's own answer then decides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from beagled.errors import ReloadError


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def trained_on(adapter_dir: Path) -> str | None:
    """The base the adapter was trained over: the manifest's ``base_model`` (its adapter_config names
    the served base when the daemon knew it), else the adapter_config's ``base_model_name_or_path``."""
    try:
        manifest = json.loads((adapter_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("base_model"), str):
        return str(manifest["base_model"])
    base = _adapter_config(adapter_dir).get("base_model_name_or_path")
    return base if isinstance(base, str) else None


def adapter_rank(adapter_dir: Path) -> int | None:
    rank = _adapter_config(adapter_dir).get("r")
    return rank if isinstance(rank, int) else None


def check_rank(adapter_dir: Path, max_lora_rank: int | None) -> None:
    """Raise (not retryable) when the adapter's rank is above ``max_lora_rank`` (vLLM's limit)."""
    if max_lora_rank is None:
        return
    rank = adapter_rank(adapter_dir)
    if rank is not None and rank > max_lora_rank:
        raise ReloadError(
            f"adapter {adapter_dir} has rank {rank}, above reload.vllm.max_lora_rank "
            f"{max_lora_rank} (vLLM's --max-lora-rank): train with a smaller training.hyper.rank "
            "or start vLLM with a larger --max-lora-rank and raise reload.vllm.max_lora_rank",
            retryable=False,
        )
