"""The tiny local model and the synthetic corpus: loadable by mlx-lm and transformers, deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm import load
from transformers import AutoModelForCausalLM, AutoTokenizer

from beagled.training import corpus
from beagled.training.tinymodel import build_tiny_model, ensure_tiny_model, tree_sha256

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

MESSAGES = [
    {"role": "user", "content": "Write a short note to Ana about the build."},
    {"role": "assistant", "content": "Hey Ana — quick one on the build. Cheers, Bea"},
]


# --- corpus ------------------------------------------------------------------------------------------


def test_voice_pairs_are_deterministic_and_styled() -> None:
    a = corpus.voice_pairs(20, seed=3)
    assert a == corpus.voice_pairs(20, seed=3)
    assert a != corpus.voice_pairs(20, seed=4)
    for prompt, bad, good in a:
        assert prompt
        assert bad
        assert good
        assert bad != good
        assert good.startswith("Hey ")
        assert good.endswith("Cheers, Bea")
        assert "Cheers" not in bad
    for _, _, good in corpus.voice_pairs(10, seed=3, style="shifted"):
        assert good.startswith("Dear ")
        assert good.endswith("Kind regards, Dr. Holt")
    noise = [g for _, _, g in corpus.voice_pairs(10, seed=3, style="noise")]
    assert len(set(noise)) == 10
    assert not any("Cheers" in g for g in noise)
    with pytest.raises(ValueError, match="unknown style"):
        corpus.voice_pairs(1, style="loud")


def test_general_corpus_is_deterministic() -> None:
    lines = corpus.general_corpus(200, seed=1)
    assert lines == corpus.general_corpus(200, seed=1)
    assert len(lines) > 200
    assert all(isinstance(line, str) and line for line in lines)


# --- the model -------------------------------------------------------------------------------------


def test_layout_and_config(tiny_model: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names  # fmt: skip
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert config["hidden_size"] // config["num_attention_heads"] >= 16
    assert 500 <= config["vocab_size"] <= 2048
    tok_config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config


def test_loads_in_mlx_lm(tiny_model: Path) -> None:
    model, tokenizer = load(str(tiny_model))
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    logits = model(mx.array([ids]))
    config = json.loads((tiny_model / "config.json").read_text())
    assert tuple(logits.shape) == (1, len(ids), config["vocab_size"])


def test_loads_in_transformers_and_matches_mlx(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text.startswith("<|bos|><|user|>\n")
    assert "<|assistant|>\nHey Ana" in text
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)
    assert prompt.endswith("<|assistant|>\n")
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token == "<|pad|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mlx_model, mlx_tok = load(str(tiny_model))
    assert ids == mlx_tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    ours = np.array(mlx_model(mx.array([ids])))
    assert np.abs(theirs - ours).max() <= 1e-4


def test_build_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    a = build_tiny_model(tmp_path / "a", seed=0)
    assert tree_sha256(a) == tree_sha256(tiny_model)
    b = build_tiny_model(tmp_path / "b", seed=1)
    assert tree_sha256(b) != tree_sha256(a)


def test_ensure_builds_once(tmp_path: Path) -> None:
    first = ensure_tiny_model(tmp_path, hidden_size=32, num_heads=1, num_layers=1, vocab_size=600)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_model(tmp_path, hidden_size=32, num_heads=1, num_layers=1, vocab_size=600)
    assert again == first
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp directory left behind
