"""A tiny Llama-shaped model built locally, for the demo and the tests: no download, no torch.

``build_tiny_model`` creates the architecture with ``mlx_lm.models.llama``, fills it with seeded random
weights (numpy's PCG64, so a seed gives the same bytes on every machine and MLX version), trains a
byte-level BPE tokenizer on ``corpus.general_corpus`` and writes a Hugging Face layout directory that
transformers, mlx-lm and vLLM all load as ``LlamaForCausalLM``. ``ensure_tiny_model`` builds it once
into a cache directory (atomically: a temp directory renamed into place) and reuses it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from beagled.training.corpus import general_corpus

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
BUILD_VERSION = 2  # bump when the bytes a seed produces change


def _config(
    *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
    intermediate_size: int, max_position_embeddings: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "beagled_tiny_model": BUILD_VERSION,
    }


def _train_tokenizer(vocab_size: int, seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(general_corpus(seed=seed), trainer=trainer)
    return tok


def _weights(model: Any, seed: int, std: float, head_std: float) -> dict[str, Any]:
    import numpy as np
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    params: Any = tree_flatten(model.parameters())
    for name, param in sorted(params, key=lambda kv: str(kv[0])):
        shape = tuple(param.shape)
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype=np.float32)
        elif name == "lm_head.weight":
            out[name] = (rng.standard_normal(shape) * head_std).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 192,
    vocab_size: int = 1024,
    max_position_embeddings: int = 512,
    init_std: float = 0.02,
    head_std: float | None = None,
) -> Path:
    """Write a tiny seeded Llama model with its tokenizer to ``out_dir`` (created) and return it."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from safetensors.numpy import save_file

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size, seed)
    actual_vocab = tokenizer.get_vocab_size()
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, token
    config = _config(
        vocab_size=actual_vocab, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )  # fmt: skip

    mx.random.seed(seed)
    args = ModelArgs.from_dict(config)  # type: ignore[no-untyped-call]
    weights = _weights(Model(args), seed, init_std, head_std if head_std is not None else hidden_size**-0.5)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,
        "max_new_tokens": 64,
    }
    for name, obj in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_map),
        ("generation_config.json", generation_config),
    ):
        (out_dir / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for path in out_dir.iterdir():
        path.chmod(0o644)  # readable by an inference server running as another user
    return out_dir


def tree_sha256(directory: Path) -> str:
    """One sha256 over every file's name and bytes in ``directory`` (sorted): the model's identity."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def ensure_tiny_model(cache_dir: Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """Return ``cache_dir/tiny-llama-…``, building it first if absent. Safe against concurrent builders."""
    cache_dir = Path(cache_dir)
    key = json.dumps({"seed": seed, "v": BUILD_VERSION, **kwargs}, sort_keys=True)
    name = f"tiny-llama-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    target = cache_dir / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        build_tiny_model(tmp, seed=seed, **kwargs)
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to a builder that finished: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
