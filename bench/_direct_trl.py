"""A direct TRL LoRA SFT run, as a user would write it: the baseline of ``torch_jobs.py warm-cold``.

    python bench/_direct_trl.py DATA.json [--unsloth]   (DATA: {"base", "out", "train": [pairs], "hyper"})

Same model, pairs (chat-rendered prompt/completion, loss on the completion only), LoRA and
hyper-parameters as the peft backend; no held-out evaluation, no manifest. ``--unsloth`` imports
Unsloth first, as an Unsloth user's script does (in ``.venv-unsloth`` plain TRL fails on a CPU: its
fused LM-head loss calls a triton kernel, triton being there for Unsloth, with no driver to run it).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(path: str, with_unsloth: bool = False) -> None:
    if with_unsloth:
        import unsloth  # noqa: F401  (before trl, peft and transformers: it patches them)
    import datasets
    import torch
    import transformers
    import trl
    from peft import LoraConfig

    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    h = d["hyper"]
    tok = transformers.AutoTokenizer.from_pretrained(d["base"])
    model = transformers.AutoModelForCausalLM.from_pretrained(d["base"], dtype=torch.float32)
    transformers.set_seed(h["seed"])
    rows = [
        {"prompt": [{"role": "user", "content": p["prompt"]}],
         "completion": [{"role": "assistant", "content": p["chosen"]}]}
        for p in d["train"]
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.SFTConfig(
            output_dir=tmp, max_steps=h["steps"], per_device_train_batch_size=h["batch_size"],
            learning_rate=h["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_length=h["max_seq_len"], seed=h["seed"], save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            logging_steps=1000,
        )  # fmt: skip
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
            peft_config=LoraConfig(r=h["rank"], lora_alpha=h["alpha"], lora_dropout=h["dropout"],
                                   target_modules=h["target_modules"], task_type="CAUSAL_LM"),
        )  # fmt: skip
        trainer.train()
        trainer.model.save_pretrained(d["out"])


if __name__ == "__main__":
    main(sys.argv[1], "--unsloth" in sys.argv[2:])
