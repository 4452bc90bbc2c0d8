"""What the torch backends (``peft``, ``unsloth``) share: hyper-parameters, data, TRL training, eval, output.

A backend only says how to load the base model and how to put LoRA on it (``TorchLoader``); a warm
worker passes a ``Session`` that keeps the base model loaded between jobs;
``run_training`` does the rest of the worker protocol (docs/internals.md):

- **spec**: ``Spec.parse`` reads the wire spec through ``beagled.training_spec.TrainingSpec.from_json``
  (the pairs' shapes and the hyper-parameters are checked there, ``ConfigError``) and adds what only a
  torch worker checks (``SpecError``): the paths, the objective, ``num_layers`` against the model.
- **data**: every pair is encoded once by ``encode_example``, which is ``beagled.training.render``
  (shared with the mlx backend): the conversation (system, messages, prompt) and the draft as the
  assistant turn, by the tokenizer's chat template when it has one, else the plain rendering; labels are
  ``-100`` on the conversation; a pair longer than ``max_seq_len`` keeps the prompt's end and the
  completion's start. SFT gets this pre-tokenized dataset (``input_ids`` + ``labels``), so training and
  evaluation see exactly the same tokens whatever trainer patches a backend brings.
- **training**: TRL ``SFTTrainer`` (completion-only loss through the labels) or ``DPOTrainer``
  (chosen = better draft, rejected = worse; ``ref_model=None``, so the reference is the model with its
  adapters disabled, or a frozen copy of ``init_adapter`` when continuing from one; ``beta`` 0.1 unless
  ``hyper.beta``), ``max_steps=steps``, constant learning rate, no hub, no checkpoints, no reports, the
  trainer's output directory a temp dir.
- **eval**: as the mlx backend, every loss is a mean completion-token NLL (the sum of ``-log p`` over
  every completion token, divided by their number): ``train_loss`` over ``train`` after training;
  ``eval_loss``, ``baseline_eval_loss``, ``base_eval_loss`` over ``heldout`` under the new adapter, the
  served adapter (the base when there is none) and the base. DPO adds the mean held-out margin
  ``log p(chosen) - log p(rejected)`` (each summed over its completion) under the same three.
  ``objective_loss`` is the trainer's own mean loss over the run (cross-entropy or DPO loss).
- **output**: the PEFT adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``), then
  ``manifest.json`` by ``beagled.manifest.write_manifest``.

stdout is the protocol channel: while training, file descriptor 1 and ``sys.stdout`` point at stderr,
and only ``emit`` writes JSON lines to the real stdout. torch and friends are imported inside the
functions, so the unsloth backend can import ``unsloth`` before any of them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from beagled.manifest import MANIFEST, PEFT_FILES, base_model_sha256, model_files_key, write_manifest
from beagled.training import render
from beagled.training.preference import preference_accuracy
from beagled.training_spec import Example, Hyper, TrainingSpec

# them, and Unsloth must be imported before any of them)

Emit = Callable[[dict[str, Any]], None]
Encoded = tuple[list[int], list[int]]  # input_ids, labels (-100 where no loss)

IGNORE = -100
OBJECTIVES = ("sft", "dpo", "sft+dpo")
OUT_DIR_LEFTOVERS = (*PEFT_FILES, "README.md", MANIFEST + ".tmp")


class SpecError(ValueError):
    """The spec asks for something this worker cannot do (no model there, an unknown objective, more
    layers than the model has): the job's fault."""


# --------------------------------------------------------------------------------------------------
# The spec (``beagled.training_spec``: one reader, one set of defaults and ranges) and the worker's checks


def lora_kwargs(hyper: Hyper, n_model_layers: int) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig`` (and Unsloth's ``get_peft_model``)."""
    if hyper.num_layers > n_model_layers:
        raise SpecError(
            f"hyper.num_layers is {hyper.num_layers} but the base model has {n_model_layers} layers"
        )
    return {
        "r": hyper.rank,
        "lora_alpha": hyper.alpha,
        "lora_dropout": hyper.dropout,
        "target_modules": list(hyper.target_modules),
        "layers_to_transform": hyper.layers_to_transform(n_model_layers),
        "bias": "none",
    }


def config_layers(base: Path) -> int | None:
    """``num_hidden_layers`` from the model's config.json (its text config for multimodal ones)."""
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        value = section.get("num_hidden_layers")
        if isinstance(value, int):
            return value
    return None


def _path(key: str, value: str | None, *, required: bool) -> Path | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(f"{key} must be a path")
    return Path(value)


@dataclass(frozen=True)
class Spec:
    """A ``TrainingSpec`` as a torch worker runs it: its paths checked (a local model directory, PEFT
    adapters), its objective one this worker trains, ``num_layers`` within the model, a pair to train."""

    job_id: str
    voice: str
    attempt: int
    backend: str
    executor: str  # the worker's own key: Ray's driver writes it, "local" otherwise
    base_model: Path
    served_base: str | None
    out_dir: Path
    init_adapter: Path | None
    served_adapter: Path | None
    objective: str
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    hyper: Hyper
    siblings: tuple[Example, ...] = ()
    dpo_weight: float = 1.0

    @classmethod
    def parse(cls, raw: dict[str, Any], backend: str) -> Spec:
        job = TrainingSpec.from_json(raw)
        base = _path("base_model", job.base_model, required=True)
        out_dir = _path("out_dir", job.out_dir, required=True)
        assert base is not None
        assert out_dir is not None
        if not (base / "config.json").is_file():
            raise SpecError(f"base_model {base} is not a local model directory (no config.json)")
        init = _path("init_adapter", job.init_adapter, required=False)
        served = _path("served_adapter", job.served_adapter, required=False)
        for key, adapter in (("init_adapter", init), ("served_adapter", served)):
            if adapter is not None and not (adapter / "adapter_config.json").is_file():
                raise SpecError(f"{key} {adapter} is not a PEFT adapter (no adapter_config.json)")
        hyper = job.hyper
        layers = config_layers(base)
        if layers is not None and hyper.num_layers > layers:
            raise SpecError(f"hyper.num_layers is {hyper.num_layers} but the base model has {layers} layers")
        if job.objective not in OBJECTIVES:
            raise SpecError(f"objective must be one of {', '.join(OBJECTIVES)}, got {job.objective!r}")
        dpo_weight: Any = job.dpo_weight
        if isinstance(dpo_weight, bool) or not isinstance(dpo_weight, int | float) or dpo_weight < 0:
            raise SpecError(f"dpo_weight must be a number >= 0, got {dpo_weight!r}")
        if not job.train:
            raise SpecError("train has no pairs")
        return cls(
            job_id=str(job.job_id),
            voice=str(job.voice),
            attempt=job.attempt,
            backend=backend,
            executor=raw.get("executor", "local"),
            base_model=base,
            served_base=job.served_base or None,
            out_dir=out_dir,
            init_adapter=init,
            served_adapter=served,
            objective=job.objective,
            train=job.train,
            heldout=job.heldout,
            hyper=hyper,
            siblings=job.siblings,
            dpo_weight=float(dpo_weight),
        )


# --------------------------------------------------------------------------------------------------
# Process hygiene: quiet libraries, stdout kept for the protocol


def quiet_environment() -> None:
    """Set before transformers/datasets are imported: offline, no telemetry, no tokenizer threads."""
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("DISABLE_TQDM", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("WANDB_DISABLED", "true"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ):
        os.environ.setdefault(key, value)


def lib(name: str) -> Any:
    """Import a third-party module as ``Any``: the typed boundary of this package stops here."""
    return importlib.import_module(name)


def quiet_libraries() -> None:
    """Library logging at error level, no progress bars (they would go to stderr anyway)."""
    datasets, transformers = lib("datasets"), lib("transformers")
    # TRL's configs set the field transformers 5 renamed; the warning is theirs, not ours.
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[Any]:
    """Point fd 1 and ``sys.stdout`` at stderr for the duration; yield a stream on the real stdout.

    Libraries print (the Trainer's log dicts, Unsloth's banner, C-level messages); none of it may reach
    the protocol channel.
    """
    sys.stdout.flush()
    saved_fd = os.dup(1)
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    saved_stdout = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield channel
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        channel.close()
        sys.stdout = saved_stdout


@contextlib.contextmanager
def protocol_stdout(emit: Emit) -> Iterator[Emit]:
    """``stdout_to_stderr`` for the duration; the yielded emit writes through ``emit`` to the real stdout."""
    with stdout_to_stderr() as channel:

        def safe_emit(obj: dict[str, Any]) -> None:
            previous = sys.stdout
            sys.stdout = channel
            try:
                emit(obj)
            finally:
                channel.flush()
                sys.stdout = previous

        yield safe_emit


def library_versions(names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# --------------------------------------------------------------------------------------------------
# Data


has_chat_template = render.has_chat_template


def encode_example(
    tokenizer: Any,
    prompt: str,
    completion: str,
    max_len: int,
    *,
    system: str | None = None,
    messages: Sequence[dict[str, str]] = (),
) -> Encoded:
    """``(input_ids, labels)`` with labels ``-100`` on the conversation, at most ``max_len`` tokens, as
    ``beagled.training.render.encode`` renders it (the same tokens as the mlx backend)."""
    return _labelled(
        render.encode(tokenizer, render.conversation(prompt, system, messages), completion, max_len)
    )


def _labelled(encoded: tuple[list[int], int]) -> Encoded:
    ids, n_prompt = encoded
    return ids, [IGNORE] * n_prompt + ids[n_prompt:]


def encode_pair(tokenizer: Any, pair: Example, completion: str, max_len: int) -> Encoded:
    """``encode_example`` of one of ``pair``'s drafts after its conversation."""
    return _labelled(render.encode(tokenizer, render.example_turns(pair), completion, max_len))


def n_loss_tokens(example: Encoded) -> int:
    return sum(1 for t in example[1][1:] if t != IGNORE)  # the first token is never predicted


def conversational(tokenizer: Any, pair: Example) -> dict[str, Any]:
    """A DPO row in TRL's format: conversational with a chat template, else plain strings."""
    turns = render.example_turns(pair)
    if has_chat_template(tokenizer):
        return {
            "prompt": turns,
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}],
        }
    return {"prompt": render.plain_prompt(turns), "chosen": pair.chosen, "rejected": pair.rejected}


# --------------------------------------------------------------------------------------------------
# Evaluation


def completion_logprobs(model: Any, examples: Sequence[Encoded], pad_id: int, batch_size: int) -> list[float]:
    """Sum of ``log p`` over the completion tokens of each example (0.0 for one with none)."""
    import torch
    import torch.nn.functional as F

    device = next(p for p in model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (x, y) in enumerate(chunk):
                    ids[row, : len(x)] = torch.tensor(x)
                    labels[row, : len(y)] = torch.tensor(y)
                    mask[row, : len(x)] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = labels[:, 1:]
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    target.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="none",
                ).view(target.shape)
                out.extend((-nll.sum(dim=1)).tolist())
    finally:
        if was_training:
            model.train()
    return out


def mean_nll(model: Any, examples: Sequence[Encoded], pad_id: int, batch_size: int) -> float | None:
    n = sum(n_loss_tokens(e) for e in examples)
    if n == 0:
        return None
    return -sum(completion_logprobs(model, examples, pad_id, batch_size)) / n


def evaluate(
    model: Any,
    tokenizer: Any,
    spec: Spec,
    pad_id: int,
    load_served: Callable[[Any, Path], None],
) -> dict[str, float | None]:
    """Held-out losses, preference accuracies (and DPO margins) under the new adapter, the served one and
    the base; the job's own held-out siblings measured apart (``sibling_*``, reports only).

    ``model`` is a ``PeftModel`` whose active adapter is ``"default"``. ``load_served`` loads the served
    adapter as ``"served"`` (and leaves it active).
    """
    dpo = spec.objective in ("dpo", "sft+dpo")
    keys = ["eval_loss", "baseline_eval_loss", "base_eval_loss", "preference_accuracy",
            "baseline_preference_accuracy", "sibling_eval_loss", "sibling_preference_accuracy"]  # fmt: skip
    if dpo:
        keys += ["eval_margin", "baseline_eval_margin", "base_eval_margin"]
    out: dict[str, float | None] = dict.fromkeys(keys)
    max_len, bs = spec.hyper.max_seq_len, spec.hyper.batch_size
    encoded = {
        name: (
            [encode_pair(tokenizer, p, p.chosen, max_len) for p in pairs],
            [encode_pair(tokenizer, p, p.rejected, max_len) for p in pairs],
        )
        for name, pairs in (("heldout", spec.heldout), ("siblings", spec.siblings))
        if pairs
    }
    if not encoded:
        return out
    LogPs = dict[str, tuple[list[float], list[float]]]

    def logps() -> LogPs:
        return {
            name: (
                completion_logprobs(model, good, pad_id, bs),
                completion_logprobs(model, bad, pad_id, bs),
            )
            for name, (good, bad) in encoded.items()
        }

    model.set_adapter("default")
    new = logps()
    with model.disable_adapter():
        base = logps()
    if spec.served_adapter is None:
        served = base
    else:
        load_served(model, spec.served_adapter)
        try:
            served = logps()
        finally:
            model.set_adapter("default")
            model.delete_adapter("served")

    for name, (good_examples, _) in encoded.items():
        tokens = sum(n_loss_tokens(e) for e in good_examples)

        def nll(lps: list[float], tokens: int = tokens) -> float | None:
            return -sum(lps) / tokens if tokens else None

        (g, b), (g0, b0), (gs, bs_) = new[name], base[name], served[name]
        if name == "siblings":
            out["sibling_eval_loss"] = nll(g)
            out["sibling_preference_accuracy"] = preference_accuracy(g, b, g0, b0)
            continue
        out["eval_loss"], out["base_eval_loss"], out["baseline_eval_loss"] = nll(g), nll(g0), nll(gs)
        out["preference_accuracy"] = preference_accuracy(g, b, g0, b0)
        out["baseline_preference_accuracy"] = preference_accuracy(gs, bs_, g0, b0)
        if dpo:
            for prefix, (x, y) in (("", (g, b)), ("base_", (g0, b0)), ("baseline_", (gs, bs_))):
                out[f"{prefix}eval_margin"] = sum(u - v for u, v in zip(x, y, strict=True)) / len(x)
    return out


# --------------------------------------------------------------------------------------------------
# Training with TRL


def progress_callback(emit: Emit, total: int) -> Any:
    """A ``TrainerCallback`` that emits one ``progress`` line per logged step (``logging_steps=1``)."""

    class Progress(lib("transformers").TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.last_time = time.monotonic()
            self.last_tokens = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_time = time.monotonic()
            self.last_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            now = time.monotonic()
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            elapsed = max(now - self.last_time, 1e-9)
            rate = (tokens - self.last_tokens) / elapsed
            self.last_time, self.last_tokens = now, tokens
            emit(
                {
                    "type": "progress",
                    "step": int(state.global_step),
                    "total": total,
                    "loss": loss if math.isfinite(loss) else None,  # NaN is not JSON
                    "tokens_per_s": round(rate, 1),
                }
            )

    return Progress()


def trainer_args(config_cls: Any, spec: Spec, output_dir: str, *, use_cuda: bool, bf16: bool) -> Any:
    """TRL config with the daemon's settings: no hub, no checkpoints, no reports, one process."""
    h = spec.hyper
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": h.steps,
        "per_device_train_batch_size": h.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": h.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_length": h.max_seq_len,
        "seed": h.seed,
        "data_seed": h.seed,
        "logging_steps": 1,
        "logging_strategy": "steps",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "push_to_hub": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": use_cuda,
        "use_cpu": not use_cuda,
        "bf16": bf16,
        "fp16": False,
        "gradient_checkpointing": False,
        "include_num_input_tokens_seen": "non_padding",
    }
    if spec.objective in ("dpo", "sft+dpo"):
        kwargs["beta"] = float(h.extra.get("beta", 0.1))
    if spec.objective == "sft+dpo":  # TRL's multi-loss: dpo_weight * DPO (sigmoid) + the chosen drafts' NLL
        kwargs["loss_type"] = ["sigmoid", "sft"]
        kwargs["loss_weights"] = [spec.dpo_weight, 1.0]
    return config_cls(**kwargs)


def _drop_printer(trainer: Any) -> None:
    callbacks = lib("transformers.trainer_callback")
    for cb in (callbacks.PrinterCallback, callbacks.ProgressCallback):
        with contextlib.suppress(Exception):
            trainer.remove_callback(cb)


def sft_row(ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    """One SFT dataset row. ``labels`` carry the loss mask; ``completion_mask`` says the same for TRL
    releases that rebuild labels from ``input_ids`` (they would otherwise train on the prompt)."""
    return {"input_ids": ids, "labels": labels, "completion_mask": [int(y != IGNORE) for y in labels]}


def sft_rows(tokenizer: Any, spec: Spec) -> list[dict[str, Any]]:
    """The pre-tokenized SFT dataset: every train pair that keeps a completion token."""
    rows: list[dict[str, Any]] = []
    for pair in spec.train:
        ids, labels = encode_pair(tokenizer, pair, pair.chosen, spec.hyper.max_seq_len)
        if n_loss_tokens((ids, labels)):
            rows.append(sft_row(ids, labels))
    if not rows:
        raise SpecError(f"no train pair keeps a completion token within max_seq_len={spec.hyper.max_seq_len}")
    return rows


def train_trl(
    model: Any, tokenizer: Any, spec: Spec, emit: Emit, *, peft_config: Any, use_cuda: bool, bf16: bool
) -> tuple[Any, float]:
    """Train with TRL's ``SFTTrainer`` (objective ``sft``) or ``DPOTrainer`` (``ref_model=None``), the
    trainer's output directory a temp dir; the trained model and the trainer's own mean loss."""
    trl = lib("trl")
    if spec.objective == "sft":
        trainer_cls, config_cls, more = trl.SFTTrainer, trl.SFTConfig, {}
        rows = sft_rows(tokenizer, spec)
    else:
        trainer_cls, config_cls, more = trl.DPOTrainer, trl.DPOConfig, {"ref_model": None}
        rows = [conversational(tokenizer, pair) for pair in spec.train]
    with tempfile.TemporaryDirectory(prefix="beagled-trl-") as tmp:
        trainer = trainer_cls(
            model=model,
            **more,
            args=trainer_args(config_cls, spec, tmp, use_cuda=use_cuda, bf16=bf16),
            train_dataset=lib("datasets").Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[progress_callback(emit, spec.hyper.steps)],
        )
        _drop_printer(trainer)
        output = trainer.train()
    return trainer.model, float(output.training_loss)


# --------------------------------------------------------------------------------------------------
# Output


def prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; clear what an earlier interrupted run of ours left; refuse anything else."""
    if (out_dir / MANIFEST).exists():
        raise SpecError(f"out_dir {out_dir} already holds a finished adapter (manifest.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    strangers = sorted(p.name for p in out_dir.iterdir() if p.name not in OUT_DIR_LEFTOVERS)
    if strangers:
        raise SpecError(f"out_dir {out_dir} is not empty: {', '.join(strangers)}")
    for name in OUT_DIR_LEFTOVERS:
        (out_dir / name).unlink(missing_ok=True)


def save_adapter(model: Any, out_dir: Path) -> None:
    """Save only the ``default`` adapter in PEFT format: adapter_config.json + adapter_model.safetensors."""
    for name in list(model.peft_config):
        if name != "default":
            model.delete_adapter(name)  # e.g. DPO's frozen "ref" copy
    model.set_adapter("default")
    model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)
    left = sorted(p.name for p in out_dir.iterdir() if p.name not in PEFT_FILES)
    if left:
        for name in left:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in PEFT_FILES:
        if not (out_dir / name).is_file():
            raise RuntimeError(f"save_pretrained wrote no {name} in {out_dir}")


# --------------------------------------------------------------------------------------------------
# The whole job


class TorchLoader(Protocol):
    """How a backend loads the base model and puts LoRA on it."""

    name: str
    versions: tuple[str, ...]

    def prepare(self) -> None:
        """Called first, with stdout already redirected (Unsloth: import it before trl/peft/transformers)."""
        ...

    def device(self) -> tuple[bool, bool]:
        """(use_cuda, bf16)"""
        ...

    def load(self, spec: Spec, use_cuda: bool, bf16: bool) -> tuple[Any, Any]:
        """The base model (on its device, training dtype) and its tokenizer."""
        ...

    def lora(self, model: Any, spec: Spec, lora_kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``(model, peft_config)``: either a PeftModel and ``None`` or the base and a LoraConfig for TRL."""
        ...

    def load_served(self, model: Any, adapter: Path) -> None:
        """Load ``adapter`` into the PeftModel as ``"served"`` and make it active."""
        ...

    def before_eval(self, model: Any) -> None:
        """Put the trained model in a state whose forward returns logits."""
        ...

    def load_key(self, spec: Spec) -> tuple[Any, ...]:
        """What else of ``spec`` ``load`` depends on: a warm session reloads the base when it changes."""
        ...


class Session:
    """A warm worker's base model and tokenizer, kept (on the device) between jobs.

    Reloaded only when the base model's path, its files, the device choice or what else the loader's
    ``load`` reads from the spec (``load_key``) change. After a job the
    LoRA layers are taken out again (``PeftModel.unload``, which puts the original linear layers back
    unmerged), so the next job starts from the bare base; the seed is set after loading, so a job
    initialises and trains the same adapter here as in a cold process. A failed job ends the worker
    (``worker serve``), so a half-trained model is never reused.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.model: Any = None
        self.tokenizer: Any = None

    def get(self, spec: Spec, loader: TorchLoader, use_cuda: bool, bf16: bool) -> tuple[Any, Any]:
        key = (
            str(spec.base_model.resolve()), model_files_key(spec.base_model), use_cuda, bf16,
            *loader.load_key(spec),
        )  # fmt: skip
        if self.model is None or self.key != key:
            self.reset()
            self.model, self.tokenizer = loader.load(spec, use_cuda, bf16)
            self.key = key
        return self.model, self.tokenizer

    def release(self, trained: Any) -> None:
        """Take the job's LoRA layers out of the kept base model (or drop it if that fails)."""
        try:
            bare = trained.unload() if hasattr(trained, "unload") else trained
            if bare is not self.model or any("lora_" in n for n, _ in self.model.named_modules()):
                raise RuntimeError("the base model still holds LoRA layers after unload")
            for param in self.model.parameters():
                param.requires_grad_(True)  # as loaded: the next job's PEFT wrapper freezes them again
        except Exception:
            self.reset()
            raise

    def reset(self) -> None:
        self.key, self.model, self.tokenizer = None, None, None
        import gc

        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def n_layers(model: Any) -> int:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers)


def run_training(
    raw_spec: dict[str, Any], emit: Emit, loader: TorchLoader, session: Session | None = None
) -> dict[str, Any]:
    """Train, evaluate, save and write the manifest; return the ``result`` fields. ``session`` (a warm
    worker's) keeps the base model loaded for the next job."""
    started = time.monotonic()
    spec = Spec.parse(raw_spec, loader.name)
    prepare_out_dir(spec.out_dir)
    with protocol_stdout(emit) as out:
        loader.prepare()
        quiet_libraries()
        lib("transformers").set_seed(spec.hyper.seed)
        use_cuda, bf16 = loader.device()
        if use_cuda:
            lib("torch").cuda.reset_peak_memory_stats()
        load_started = time.monotonic()
        if session is not None:
            model, tokenizer = session.get(spec, loader, use_cuda, bf16)
        else:
            model, tokenizer = loader.load(spec, use_cuda, bf16)
        load_s = time.monotonic() - load_started
        lib("transformers").set_seed(spec.hyper.seed)  # after loading: warm and cold start LoRA alike
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        pad_id = int(tokenizer.pad_token_id)
        layers = n_layers(model)
        model, peft_config = loader.lora(model, spec, lora_kwargs(spec.hyper, layers))
        out(
            {
                "type": "log",
                "message": f"{loader.name}: {spec.objective} on {len(spec.train)} pairs, "
                f"{len(spec.heldout)} held out, base {spec.base_model.name} ({layers} layers) on "
                f"{'cuda' if use_cuda else 'cpu'} {'bf16' if bf16 else 'fp32'}"
                + (f", continuing from {spec.init_adapter}" if spec.init_adapter else ""),
            }
        )
        train_started = time.monotonic()
        model, objective_loss = train_trl(
            model, tokenizer, spec, out, peft_config=peft_config, use_cuda=use_cuda, bf16=bf16
        )
        train_s = time.monotonic() - train_started
        save_adapter(model, spec.out_dir)
        loader.before_eval(model)
        losses = evaluate(model, tokenizer, spec, pad_id, loader.load_served)
        train_examples = [encode_pair(tokenizer, p, p.chosen, spec.hyper.max_seq_len) for p in spec.train]
        model.set_adapter("default")
        train_loss = mean_nll(model, train_examples, pad_id, spec.hyper.batch_size)
        out({"type": "log", "message": f"trained {spec.hyper.steps} steps in {train_s:.1f}s; {losses}"})
        measured = {"objective_loss": objective_loss, "train_loss": train_loss, **losses}
        bad = sorted(k for k, v in measured.items() if v is not None and not math.isfinite(v))
        if bad:  # a diverged adapter is never promoted (and NaN is not JSON)
            raise RuntimeError(f"training diverged: {', '.join(f'{k}={measured[k]}' for k in bad)}")
        if session is not None:
            session.release(model)
    result: dict[str, Any] = {
        "train_loss": train_loss,
        "objective_loss": objective_loss,
        **losses,
        "steps": spec.hyper.steps,
        "train_s": round(train_s, 3),
        "load_s": round(load_s, 3),
        "gpu_peak_mb": round(lib("torch").cuda.max_memory_allocated() / 2**20, 1) if use_cuda else None,
        "duration_s": round(time.monotonic() - started, 3),
        "backend": loader.name,
    }
    info = {
        "job_id": spec.job_id,
        "voice": spec.voice,
        "attempt": spec.attempt,
        "backend": loader.name,
        "executor": spec.executor,
        "objective": spec.objective,
        "base_model": str(spec.base_model),
        "base_model_sha256": base_model_sha256(spec.base_model),
        "served_base": spec.served_base,  # written into adapter_config.json
        "init_adapter": str(spec.init_adapter) if spec.init_adapter else None,
        "served_adapter": str(spec.served_adapter) if spec.served_adapter else None,
        "pair_ids": [p.pair_id for p in spec.train],
        "heldout_pair_ids": [p.pair_id for p in spec.heldout],
        "hyper": spec.hyper.to_json(),
        "device": "cuda" if use_cuda else "cpu",
        "versions": library_versions(loader.versions),
        **{k: v for k, v in result.items() if k != "backend"},
    }
    write_manifest(spec.out_dir, info)
    return result
