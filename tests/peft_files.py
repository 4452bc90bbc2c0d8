"""The files of a PEFT LoRA adapter directory, written for tests: the weights (``adapter_model
.safetensors``), ``adapter_config.json`` and the daemon's manifest. Which tensors go in is the caller's
(random ones over the tiny model in ``vllm_real``, small ones for the stand-in in ``vllm_standin``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from beagled.manifest import write_manifest


def write_peft_adapter(
    directory: Path,
    tensors: Mapping[str, np.ndarray[Any, Any]] | None,
    *,
    base: str,
    rank: int,
    lora_alpha: float,
    modules: tuple[str, ...],
    manifest: Mapping[str, Any] | None,
) -> Path:
    """Write ``tensors`` (none: no weights file), the config of a rank-``rank`` LoRA over ``base`` on
    ``modules``, then the manifest with ``manifest``'s fields (none: no manifest)."""
    if tensors is not None:
        save_file(dict(tensors), str(directory / "adapter_model.safetensors"))
    config = {
        "base_model_name_or_path": base,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if manifest is not None:
        write_manifest(directory, dict(manifest))
    return directory
