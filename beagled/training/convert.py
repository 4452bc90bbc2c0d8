"""LoRA weights between mlx-lm's layout and PEFT's (what vLLM loads), numpy and safetensors only.

mlx-lm: ``model.layers.N.<module>.lora_a`` of shape (in, r), ``lora_b`` (r, out), and
``y = W x + scale · (x A) B``. PEFT: ``base_model.model.model.layers.N.<module>.lora_A.weight`` (r, in),
``lora_B.weight`` (out, r), ``y = W x + (lora_alpha / r) · B A x``. So ``A_peft = a.T``,
``B_peft = b.T`` and ``lora_alpha = scale * r``; the conversion is exact (transposes only).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from beagled.errors import AdapterError

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MLX_KEY = re.compile(r"^(?P<path>.*\.layers\.(?P<layer>\d+)\.(?P<module>.+))\.lora_(?P<which>[ab])$")
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.*\.layers\.(?P<layer>\d+)\.(?P<module>.+))"
    r"\.lora_(?P<which>[AB])(?:\.default)?\.weight$"
)


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter read back into mlx-lm's layout."""

    weights: dict[str, np.ndarray]  # mlx keys: model.layers.N.<module>.lora_a (in, r) / lora_b (r, out)
    rank: int
    scale: float
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # short names (q_proj, …), sorted
    layer_indices: tuple[int, ...]  # sorted
    modules: tuple[str, ...]  # module paths inside a block (self_attn.q_proj, …), sorted
    base_model: str | None


def _number(x: float) -> int | float:
    return int(x) if x.is_integer() else x


def mlx_to_peft(
    mlx_weights: dict[str, np.ndarray],
    *,
    rank: int,
    scale: float,
    target_modules: list[str] | tuple[str, ...] | None = None,
    layer_indices: list[int] | tuple[int, ...] | None = None,
    base_model_path: Path | str,
    out_dir: Path,
    dropout: float = 0.0,
    num_hidden_layers: int | None = None,
) -> Path:
    """Write ``mlx_weights`` as a PEFT adapter (config + safetensors) into ``out_dir`` and return it.

    ``target_modules`` and ``layer_indices`` default to what the keys hold; ``num_hidden_layers``
    (default: read from the base model's config.json) decides whether ``layers_to_transform`` is needed.
    """
    tensors: dict[str, np.ndarray] = {}
    seen_modules: set[str] = set()
    seen_layers: set[int] = set()
    for key, value in sorted(mlx_weights.items()):
        m = _MLX_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{key!r} is not an mlx-lm LoRA weight (model.layers.N.<module>.lora_a|lora_b)"
            )
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim != 2:
            raise AdapterError(f"{key}: expected a matrix, got shape {arr.shape}")
        if (m["which"] == "a" and arr.shape[1] != rank) or (m["which"] == "b" and arr.shape[0] != rank):
            raise AdapterError(f"{key}: shape {arr.shape} does not hold rank {rank}")
        peft_key = f"{PEFT_PREFIX}{m['path']}.lora_{m['which'].upper()}.weight"
        tensors[peft_key] = np.ascontiguousarray(arr.T)
        seen_modules.add(m["module"].rsplit(".", 1)[-1])
        seen_layers.add(int(m["layer"]))
    if not tensors:
        raise AdapterError("no LoRA weights to write")
    for key in tensors:
        twin = (
            key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        )
        if twin not in tensors:
            raise AdapterError(f"{key} has no matching {twin}")

    targets = sorted(set(target_modules) if target_modules is not None else seen_modules)
    if not seen_modules <= set(targets):
        raise AdapterError(
            f"weights hold modules {sorted(seen_modules - set(targets))} not in target_modules"
        )
    layers = sorted(set(layer_indices) if layer_indices is not None else seen_layers)
    if num_hidden_layers is None:
        cfg_path = Path(base_model_path) / "config.json"
        if cfg_path.is_file():
            num_hidden_layers = int(json.loads(cfg_path.read_text(encoding="utf-8"))["num_hidden_layers"])
    all_layers = num_hidden_layers is not None and layers == list(range(num_hidden_layers))

    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": int(rank),
        "lora_alpha": _number(float(scale) * int(rank)),
        "lora_dropout": float(dropout),
        "target_modules": targets,
        "layers_to_transform": None if all_layers else layers,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def peft_to_mlx(peft_dir: Path) -> PeftAdapter:
    """Read a PEFT LoRA adapter into mlx-lm's layout; raise ``AdapterError`` for what mlx cannot hold."""
    peft_dir = Path(peft_dir)
    try:
        config = json.loads((peft_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        raw = load_file(str(peft_dir / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{peft_dir} is not a readable PEFT adapter: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{peft_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise AdapterError(f"{peft_dir}: {key}={bad} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{peft_dir}: bias={config['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{peft_dir}: per-module {key} is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{peft_dir}: modules_to_save is not supported")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    weights: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    layers: set[int] = set()
    for key, value in raw.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{peft_dir}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)"
            )
        arr = np.asarray(value, dtype=np.float32)
        weights[f"{m['path']}.lora_{m['which'].lower()}"] = np.ascontiguousarray(arr.T)
        modules.add(m["module"])
        layers.add(int(m["layer"]))
    if not weights:
        raise AdapterError(f"{peft_dir}: adapter holds no LoRA weights")
    short = sorted({mod.rsplit(".", 1)[-1] for mod in modules})
    return PeftAdapter(
        weights=weights,
        rank=rank,
        scale=scale,
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        target_modules=tuple(short),
        layer_indices=tuple(sorted(layers)),
        modules=tuple(sorted(modules)),
        base_model=config.get("base_model_name_or_path"),
    )
