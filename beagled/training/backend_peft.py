"""The ``peft`` backend: transformers + PEFT + TRL, on CUDA when there is one, else on the CPU.

The base model loads in float32 on the CPU (bfloat16 on a CUDA device that supports it). A fresh LoRA
goes to TRL as a ``LoraConfig`` (``peft_config=``); continuing from ``init_adapter`` loads it with
``PeftModel.from_pretrained(..., is_trainable=True)`` and trains that adapter further (its rank and
target modules are the adapter's own). Everything else (data, TRL trainers, eval, output) is in
``torch_common``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from beagled.training.torch_common import (
    Emit,
    Session,
    Spec,
    TorchLoader,
    lib,
    quiet_environment,
    run_training,
)

NAME = "peft"
VERSIONS = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


def probe() -> tuple[bool, str]:
    quiet_environment()
    import peft
    import torch
    import transformers
    import trl

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    return True, (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"trl {trl.__version__}; {device}"
    )


class PeftLoader:
    name: str = NAME
    versions: tuple[str, ...] = VERSIONS

    def prepare(self) -> None:
        pass

    def device(self) -> tuple[bool, bool]:
        import torch

        use_cuda = torch.cuda.is_available()
        return use_cuda, bool(use_cuda and torch.cuda.is_bf16_supported())

    def load(self, spec: Spec, use_cuda: bool, bf16: bool) -> tuple[Any, Any]:
        import torch

        transformers = lib("transformers")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(spec.base_model), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(spec.base_model),
            dtype=torch.bfloat16 if bf16 else torch.float32,
            local_files_only=True,
        )
        if use_cuda:
            model = model.to("cuda")
        model.config.use_cache = False
        return model, tokenizer

    def lora(self, model: Any, spec: Spec, lora_kwargs: dict[str, Any]) -> tuple[Any, Any]:
        from peft import LoraConfig, PeftModel

        if spec.init_adapter is not None:
            peft_model = PeftModel.from_pretrained(
                model, str(spec.init_adapter), adapter_name="default", is_trainable=True
            )
            return peft_model, None
        return model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)

    def load_served(self, model: Any, adapter: Path) -> None:
        model.load_adapter(str(adapter), adapter_name="served", is_trainable=False)
        model.set_adapter("served")

    def before_eval(self, model: Any) -> None:
        pass

    def load_key(self, spec: Spec) -> tuple[Any, ...]:
        return ()  # ``load`` reads nothing from the spec but the base model


def new_session() -> Session:
    """A warm worker's session (``worker serve peft``): the base model stays loaded between jobs."""
    quiet_environment()
    return Session()


def train(spec: dict[str, Any], emit: Emit, session: Session | None = None) -> dict[str, Any]:
    quiet_environment()
    loader: TorchLoader = PeftLoader()
    return run_training(spec, emit, loader, session)
