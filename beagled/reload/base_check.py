"""Is the server's base model the one an adapter was trained on? Pure checks over config files.

vLLM accepts an adapter trained on another base (one layer fewer, seen here) and answers 200, then
serves garbage. The daemon checks before every load instead: the server's base (its ``/v1/models``
entry with ``parent`` null) must be ``reload.vllm.served_base`` when that is set, and when the daemon
can read both model directories, the shapes in their ``config.json`` must agree with the base the
adapter records (``base_model_name_or_path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# what must agree for a LoRA trained on one base to mean the same on another
SHAPE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


@dataclass(frozen=True)
class BaseModel:
    id: str
    root: str


def model_shape(directory: str | Path) -> dict[str, Any] | None:
    """The shape keys of a local model directory's ``config.json``; None if it cannot be read."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return {k: config.get(k) for k in SHAPE_KEYS if k in config}


def check_base(base: BaseModel, served_base: str, training_base: str | None, local_root: str) -> str:
    """A message saying what is wrong, or "" when the adapter may be loaded over ``base``.

    ``local_root`` is the server's base directory as the daemon sees it (mapped back by path_map)."""
    if served_base and base.id != served_base:
        return (
            f"the server's base model is {base.id!r}, but reload.vllm.served_base is {served_base!r}: "
            "point reload.vllm.url at the server of that model, or correct served_base"
        )
    if not training_base or training_base in (base.id, base.root):
        return ""
    trained = model_shape(training_base)
    served = model_shape(local_root) if local_root else None
    if trained is None or served is None:
        return ""  # cannot be told from here (another host): the name check above is all there is
    diff = {k: (trained.get(k), served.get(k)) for k in SHAPE_KEYS if trained.get(k) != served.get(k)}
    if not diff:
        return ""
    shown = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
    return (
        f"the adapter was trained on {training_base!r}, which differs from the server's base model "
        f"{base.id!r} ({shown}): set training.base_model to the served model, or serve the training base"
    )
