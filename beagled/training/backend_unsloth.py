"""The ``unsloth`` backend: Unsloth's ``FastLanguageModel`` + TRL, for CUDA machines.

``FastLanguageModel.from_pretrained(base, max_seq_length, dtype=None, load_in_4bit=False)`` loads the
base (16-bit, Unsloth's choice of dtype), ``FastLanguageModel.get_peft_model`` adds the LoRA (Unsloth's
patched layers), and TRL's trainers (patched by Unsloth on import) train it; data, eval and output are
``torch_common``'s, so the adapter directory has the same shape as the ``peft`` backend's.

``unsloth`` must be imported before trl, peft and transformers: ``train`` imports nothing from them
before ``PeftLoader.prepare`` has imported it. Continuing from ``init_adapter`` builds a LoRA with that
adapter's own configuration through ``get_peft_model`` and loads its weights, so Unsloth's patched
layers are kept.

A warm worker (``worker serve unsloth``) passes one ``Session`` to every job, as the peft backend does:
the base stays loaded between jobs (reloaded when ``max_seq_len`` or the checkpointing choice, which
``from_pretrained`` takes, change), the job's LoRA layers are taken out after it, and Unsloth's
logits switch (set for evaluation) is put back before the next job trains, so a warm job trains the
adapter a cold process trains.

Without a CUDA device Unsloth falls back to stock transformers + PEFT + TRL on the CPU, which is what
the ``peft`` backend does already; ``probe`` therefore reports the backend unavailable there unless
``BEAGLED_UNSLOTH_ALLOW_CPU=1`` (the tests use it to run this backend for real on a CPU machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from beagled.training.backend_peft import PeftLoader
from beagled.training.torch_common import (
    Emit,
    Session,
    Spec,
    SpecError,
    TorchLoader,
    quiet_environment,
    run_training,
    stdout_to_stderr,
)

NAME = "unsloth"
VERSIONS: tuple[str, ...] = (
    "unsloth",
    "unsloth_zoo",
    "torch",
    "transformers",
    "peft",
    "trl",
    "xformers",
    "bitsandbytes",
)
ALLOW_CPU_ENV = "BEAGLED_UNSLOTH_ALLOW_CPU"
RETURN_LOGITS_ENV = "UNSLOTH_RETURN_LOGITS"
_RETURN_LOGITS_AT_START = os.environ.get(RETURN_LOGITS_ENV)  # as a cold process starts its job


def _import_unsloth() -> Any:
    quiet_environment()
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no phoning home
    import unsloth

    return unsloth


def probe() -> tuple[bool, str]:
    with stdout_to_stderr():  # Unsloth prints a banner on import
        unsloth = _import_unsloth()
        import torch

        version = getattr(unsloth, "__version__", "?")
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
            return True, f"unsloth {version}, torch {torch.__version__}; cuda ({gpu})"
    cpu = f"unsloth {version}, torch {torch.__version__}; no CUDA device: Unsloth's CPU fallback"
    if os.environ.get(ALLOW_CPU_ENV) == "1":
        return True, f"{cpu} ({ALLOW_CPU_ENV}=1)"
    return False, (
        f"{cpu} is stock transformers + PEFT, what the peft backend runs; "
        f"set {ALLOW_CPU_ENV}=1 to use it anyway"
    )


class UnslothLoader(PeftLoader):
    """The peft backend's loader with Unsloth's model class and LoRA (a served adapter loads the same)."""

    name = NAME
    versions = VERSIONS

    def prepare(self) -> None:
        _import_unsloth()

    def device(self) -> tuple[bool, bool]:
        import torch
        from unsloth import is_bfloat16_supported

        return torch.cuda.is_available(), bool(is_bfloat16_supported())

    def load(self, spec: Spec, use_cuda: bool, bf16: bool) -> tuple[Any, Any]:
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(spec.base_model),
            max_seq_length=spec.hyper.max_seq_len,
            dtype=None,
            load_in_4bit=False,
            use_gradient_checkpointing=self._checkpointing(spec, use_cuda),
        )
        return model, tokenizer

    @staticmethod
    def _checkpointing(spec: Spec, use_cuda: bool) -> Any:
        # Unsloth's offloaded checkpointing pays on a GPU; on the CPU it is plain recomputation.
        return spec.hyper.extra.get("gradient_checkpointing", "unsloth" if use_cuda else False)

    def load_key(self, spec: Spec) -> tuple[Any, ...]:
        return (spec.hyper.max_seq_len, repr(spec.hyper.extra.get("gradient_checkpointing")))

    def lora(self, model: Any, spec: Spec, lora_kwargs: dict[str, Any]) -> tuple[Any, Any]:
        from unsloth import FastLanguageModel

        _restore_return_logits()  # a warm worker's previous job set it for its evaluation
        kwargs = dict(lora_kwargs)
        if spec.init_adapter is not None:
            kwargs.update(_adapter_lora_kwargs(spec.init_adapter))
        use_cuda = next(model.parameters()).is_cuda
        peft_model = FastLanguageModel.get_peft_model(
            model,
            **kwargs,
            use_gradient_checkpointing=self._checkpointing(spec, use_cuda),
            random_state=spec.hyper.seed,
            max_seq_length=spec.hyper.max_seq_len,
        )
        if spec.init_adapter is not None:
            _load_adapter_weights(peft_model, spec.init_adapter)
        return peft_model, None

    def before_eval(self, model: Any) -> None:
        # Unsloth's fused loss leaves logits empty unless asked for them; eval needs them.
        os.environ[RETURN_LOGITS_ENV] = "1"
        model.eval()


def _restore_return_logits() -> None:
    if _RETURN_LOGITS_AT_START is None:
        os.environ.pop(RETURN_LOGITS_ENV, None)
    else:
        os.environ[RETURN_LOGITS_ENV] = _RETURN_LOGITS_AT_START


def _adapter_lora_kwargs(adapter: Path) -> dict[str, Any]:
    """The LoRA shape of a saved PEFT adapter, to rebuild it before loading its weights."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise SpecError(f"init_adapter {adapter} is not a LoRA adapter")
    targets = config.get("target_modules")
    return {
        "r": int(config["r"]),
        "lora_alpha": float(config["lora_alpha"]),
        "target_modules": sorted(targets) if isinstance(targets, list | set) else targets,
        "layers_to_transform": config.get("layers_to_transform"),
    }


def _load_adapter_weights(model: Any, adapter: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and ".default." in k]
    if unexpected or missing:
        raise SpecError(
            f"init_adapter {adapter} does not fit the model: "
            f"{len(unexpected)} unexpected, {len(missing)} missing LoRA weights"
        )


def new_session() -> Session:
    """A warm worker's session (``worker serve unsloth``): the base model stays loaded between jobs."""
    with stdout_to_stderr():  # ``serve`` probed first, so Unsloth is imported; this keeps it so
        _import_unsloth()
    return Session()


def train(spec: dict[str, Any], emit: Emit, session: Session | None = None) -> dict[str, Any]:
    loader: TorchLoader = UnslothLoader()
    return run_training(spec, emit, loader, session)
