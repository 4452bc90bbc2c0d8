"""mlx-lm LoRA <-> PEFT conversion: exact round trip, and the same logits in transformers+PEFT as in MLX."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm import load
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from beagled.errors import AdapterError
from beagled.training.backend_mlx import apply_lora, module_paths
from beagled.training.convert import mlx_to_peft, peft_to_mlx
from beagled.training.corpus import voice_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _random_mlx_weights(
    rng: np.random.Generator, layers: list[int], shapes: dict[str, tuple[int, int]], rank: int
) -> dict[str, np.ndarray]:
    out = {}
    for layer in layers:
        for module, (n_in, n_out) in shapes.items():
            out[f"model.layers.{layer}.{module}.lora_a"] = rng.standard_normal((n_in, rank)).astype(
                np.float32
            )
            out[f"model.layers.{layer}.{module}.lora_b"] = rng.standard_normal((rank, n_out)).astype(
                np.float32
            )
    return out


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32), "mlp.down_proj": (192, 64)}
    weights = _random_mlx_weights(rng, [1, 3], shapes, rank=4)
    out = mlx_to_peft(weights, rank=4, scale=2.5, target_modules=["q_proj", "v_proj", "down_proj"],
                      layer_indices=[1, 3], base_model_path="/models/x", out_dir=tmp_path / "a",
                      dropout=0.05, num_hidden_layers=4)  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4
    assert config["lora_alpha"] == 10
    assert config["lora_dropout"] == 0.05
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["layers_to_transform"] == [1, 3]
    assert config["bias"] == "none"
    assert config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "/models/x"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].shape == (32, 4)

    back = peft_to_mlx(out)
    assert back.rank == 4
    assert back.scale == 2.5
    assert back.dropout == 0.05
    assert back.layer_indices == (1, 3)
    assert back.target_modules == ("down_proj", "q_proj", "v_proj")
    assert back.modules == tuple(sorted(shapes))
    assert back.base_model == "/models/x"
    assert back.weights.keys() == weights.keys()
    for key, value in weights.items():
        assert np.array_equal(back.weights[key], value), key

    all_layers = mlx_to_peft(weights, rank=4, scale=2.5, layer_indices=[0, 1, 2, 3], base_model_path="/m",
                             out_dir=tmp_path / "b", num_hidden_layers=4)  # fmt: skip
    assert json.loads((all_layers / "adapter_config.json").read_text())["layers_to_transform"] is None


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    good = {"model.layers.0.self_attn.q_proj.lora_a": np.zeros((8, 2), np.float32),
            "model.layers.0.self_attn.q_proj.lora_b": np.zeros((2, 8), np.float32)}  # fmt: skip
    with pytest.raises(AdapterError, match="rank 3"):
        mlx_to_peft(good, rank=3, scale=1.0, base_model_path="/m", out_dir=tmp_path / "x")
    with pytest.raises(AdapterError, match="no matching"):
        mlx_to_peft({k: v for k, v in good.items() if k.endswith("lora_a")}, rank=2, scale=1.0,
                    base_model_path="/m", out_dir=tmp_path / "x")  # fmt: skip
    with pytest.raises(AdapterError, match="not an mlx-lm LoRA weight"):
        mlx_to_peft(
            {"lm_head.weight": np.zeros((2, 2))},
            rank=2,
            scale=1.0,
            base_model_path="/m",
            out_dir=tmp_path / "x",
        )
    out = mlx_to_peft(good, rank=2, scale=1.0, base_model_path="/m", out_dir=tmp_path / "ok")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        peft_to_mlx(out)
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True, "lora_alpha": 4}))
    assert peft_to_mlx(out).scale == pytest.approx(4 / np.sqrt(2))
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {"base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)},
        str(out / "adapter_model.safetensors"),
    )
    with pytest.raises(AdapterError, match="unexpected tensor"):
        peft_to_mlx(out)
    with pytest.raises(AdapterError, match="not a readable PEFT adapter"):
        peft_to_mlx(tmp_path / "missing")


def _mlx_logits_with_lora(
    base: Path, targets: list[str], layers: list[int], rank: int, scale: float, inputs: list[list[int]]
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    model, _ = load(str(base))
    model.freeze()
    mx.random.seed(7)
    apply_lora(model, module_paths(model, targets), layers, rank=rank, scale=scale, dropout=0.0)
    rng = np.random.default_rng(11)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        # a trained-looking adapter: both factors non-zero, big enough to move the logits visibly
        weights[name] = (rng.standard_normal(value.shape) * 0.3).astype(np.float32)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=False)
    model.eval()
    return weights, [np.array(model(mx.array([ids]))[0]) for ids in inputs]


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)  # peft 0.21 + transformers 5
@pytest.mark.parametrize(
    ("targets", "layers", "rank", "alpha"),
    [
        (["q_proj", "v_proj"], [0, 1], 8, 16.0),
        (["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], [1], 4, 6.0),
    ],
)
def test_peft_logits_equal_mlx_logits(
    tiny_model: Path, tmp_path: Path, targets: list[str], layers: list[int], rank: int, alpha: float
) -> None:
    tokenizer: Any = AutoTokenizer.from_pretrained(str(tiny_model))
    chats = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": g}]
        for p, _, g in voice_pairs(3, seed=5)
    ]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    texts.append("a")
    inputs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    scale = alpha / rank
    weights, mlx_logits = _mlx_logits_with_lora(tiny_model, targets, layers, rank, scale, inputs)
    adapter = mlx_to_peft(weights, rank=rank, scale=scale, target_modules=targets, layer_indices=layers,
                          base_model_path=tiny_model, out_dir=tmp_path / "adapter")  # fmt: skip

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        base_logits = [base(torch.tensor([ids])).logits[0].numpy() for ids in inputs]
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    with torch.no_grad():
        peft_logits = [model(torch.tensor([ids])).logits[0].numpy() for ids in inputs]

    moved = max(float(np.abs(b - m).max()) for b, m in zip(base_logits, mlx_logits, strict=True))
    assert moved > 0.05, "the adapter should change the logits, or the comparison proves nothing"
    diff = max(float(np.abs(p - m).max()) for p, m in zip(peft_logits, mlx_logits, strict=True))
    assert diff <= 1e-4, f"max |logit diff| {diff}"
