"""The MLX training backend: LoRA SFT with mlx-lm's LoRA layers and an own small training loop.

Runs only inside a worker subprocess (``beagled.training.worker``). ``train`` follows the worker protocol
of docs/internals.md: it reads the spec (``read_spec``: ``beagled.training_spec.TrainingSpec``), loads
the base model, measures the held-out completion NLL of the base and of the served adapter, applies
fresh LoRA layers (or the ``init_adapter`` read back from PEFT), trains
``steps`` Adam steps (bias-corrected, gradient norm clipped to 1, as transformers' Trainer) on the
completion tokens only, measures again, writes the adapter in PEFT format
(``convert.mlx_to_peft``) and finally the manifest.

A warm worker (``worker serve mlx``) passes one ``Session`` to every job: it keeps the base model (and
its sha256) loaded while the path and the files stay the same, and each job removes its LoRA layers
again when it ends, so the next job starts from the bare base model; seeds are set per job, so a job
trains the same adapter on a warm session as in a cold process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import math
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn as _nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import remove_lora_layers

from beagled.errors import ConfigError, TrainingError
from beagled.manifest import base_model_sha256 as manifest_base_sha256
from beagled.manifest import model_files_key, sha256_file, write_manifest
from beagled.training import render
from beagled.training.convert import PeftAdapter, mlx_to_peft, peft_to_mlx
from beagled.training.preference import preference_accuracy
from beagled.training_spec import Example, TrainingSpec

nn: Any = _nn  # mlx's stubs do not export everything mlx.nn holds
clip_grad_norm: Callable[..., tuple[Any, Any]] = optim.clip_grad_norm  # untyped in mlx


def _flat(tree: Any) -> list[tuple[str, Any]]:
    items: Any = tree_flatten(tree)
    return list(items)


Emit = Callable[[dict[str, Any]], None]
BACKEND = "mlx"


def probe() -> tuple[bool, str]:
    """Importing this module needs mlx and mlx-lm (the worker reports an ImportError as the reason)."""
    try:
        value: Any = (mx.array([1.0, 2.0]) * 2).sum().item()
    except Exception as e:
        return False, f"mlx cannot run an array op: {type(e).__name__}: {e}"
    if value != 6.0:
        return False, f"mlx computed 2*(1+2) = {value}"
    return True, f"mlx-lm {importlib.metadata.version('mlx-lm')} on {mx.default_device()}"


# --- spec validation --------------------------------------------------------------------------------


def read_spec(raw: dict[str, Any]) -> TrainingSpec:
    """The wire spec through ``TrainingSpec.from_json`` (every hyper-parameter required here), refused
    unless this backend can train it: SFT only, no hyper-parameter it does not honour, a pair to train;
    ``target_modules`` sorted, without repeats."""
    spec = TrainingSpec.from_json(raw, complete=True)
    if spec.objective != "sft":
        raise TrainingError(
            f"objective {spec.objective!r} is not supported by the mlx backend (sft only): the next "
            "backend in training.backends takes the job",
            backend=BACKEND,
        )
    unknown = sorted(spec.hyper.extra)
    if unknown:
        raise ConfigError(f"hyper.{unknown[0]}", "is not supported by the mlx backend")
    if spec.out_dir is None:
        raise TrainingError("the spec has no out_dir", backend=BACKEND)
    out_dir = Path(spec.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainingError(f"out_dir {out_dir} exists and is not empty", backend=BACKEND)
    if not spec.train:
        raise TrainingError("the spec holds no training pairs", backend=BACKEND)
    targets = tuple(sorted(set(spec.hyper.target_modules)))
    return dataclasses.replace(spec, hyper=dataclasses.replace(spec.hyper, target_modules=targets))


PAIR_SIDES = ("chosen", "rejected")
MAX_GRAD_NORM = 1.0  # as transformers' Trainer (the peft and unsloth backends)

# --- data -------------------------------------------------------------------------------------------


class Encoder:
    """Turns (conversation, draft) into token ids and the number of prompt tokens (masked in the loss),
    by ``beagled.training.render``: the same rendering as the torch backends."""

    def __init__(self, tokenizer: Any, max_seq_len: int) -> None:
        self.tok = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF tokenizer
        self.max_seq_len = max_seq_len
        self.chat = render.has_chat_template(self.tok)
        eos = self.tok.eos_token_id
        self.eos_id: int | None = int(eos) if eos is not None else None
        pad = self.tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else (self.eos_id or 0)

    def encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """A prompt-only pair (one user turn)."""
        return self.encode_turns(render.conversation(prompt), completion)

    def encode_turns(self, turns: list[render.Turn], completion: str) -> tuple[list[int], int]:
        try:
            return render.encode(self.tok, turns, completion, self.max_seq_len)
        except TrainingError as e:
            raise TrainingError(str(e), backend=BACKEND) from e

    def encode_example(self, example: Example, side: str) -> tuple[list[int], int]:
        """A spec example's ``side`` (``chosen``/``rejected``) after its conversation."""
        draft = example.chosen if side == "chosen" else example.rejected
        return self.encode_turns(render.example_turns(example), draft)


def _batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Inputs, targets and the completion mask (B, L-1), right-padded."""

    width = max(len(ids) for ids, _ in examples) - 1
    inputs = np.full((len(examples), width), pad_id, dtype=np.int32)
    targets = np.full((len(examples), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.float32)
    for row, (ids, prompt_len) in enumerate(examples):
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        mask[row, max(prompt_len - 1, 0) : n] = 1.0  # position t predicts token t+1
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def _nll_sum(model: Any, inputs: Any, targets: Any, mask: Any) -> Any:

    logits = model(inputs).astype(mx.float32)
    return (nn.losses.cross_entropy(logits, targets) * mask).sum()


NllCache = dict[tuple[Any, tuple[int, ...], int], tuple[float, float]]


def nll_sums(
    model: Any,
    examples: list[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
    *,
    cache: NllCache | None = None,
    cache_key: Any = None,
) -> list[tuple[float, float]]:
    """Each example's (completion NLL sum, completion token count) under ``model``.

    With ``cache`` (a warm session's) and ``cache_key`` (what identifies the model's function: the base
    model's files, or an adapter's bytes), each example's sum and count are kept, so only examples not
    seen under that key are computed again."""
    if not examples:
        return []
    model.eval()
    keys = [(cache_key, tuple(ids), prompt_len) for ids, prompt_len in examples]
    known: NllCache = {}
    if cache is not None and cache_key is not None:
        known = {k: cache[k] for k in keys if k in cache}
    todo = [i for i, k in enumerate(keys) if k not in known]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        inputs, targets, mask = _batch([examples[i] for i in rows], pad_id)
        logits = model(inputs).astype(mx.float32)
        sums = (nn.losses.cross_entropy(logits, targets) * mask).sum(axis=1)
        counts = mask.sum(axis=1)
        mx.eval(sums, counts)
        for i, total, count in zip(rows, sums.tolist(), counts.tolist(), strict=True):
            known[keys[i]] = (float(total), float(count))
    if cache is not None and cache_key is not None:
        cache.update(known)
    return [known[k] for k in keys]


# --- LoRA layers --------------------------------------------------------------------------------------


def module_paths(model: Any, short_names: list[str] | tuple[str, ...]) -> list[str]:
    """Map short names (q_proj) onto module paths inside a block (self_attn.q_proj)."""

    block = model.layers[0]
    linears = [k for k, m in block.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)]
    paths = []
    for short in short_names:
        found = [k for k in linears if k.rsplit(".", 1)[-1] == short]
        if not found:
            names = sorted({k.rsplit(".", 1)[-1] for k in linears})
            raise ConfigError(
                "hyper.target_modules", f"{short!r} is not a linear layer of this model ({names})"
            )
        paths.extend(found)
    return sorted(paths)


def apply_lora(
    model: Any, paths: list[str], layers: list[int], *, rank: int, scale: float, dropout: float
) -> None:

    for index in layers:
        block = model.layers[index]
        wanted = [(k, m) for k, m in block.named_modules() if k in paths]
        lora = [(k, LoRALinear.from_base(m, r=rank, dropout=dropout, scale=scale)) for k, m in wanted]
        block.update_modules(tree_unflatten(lora))


def _load_lora_weights(model: Any, weights: dict[str, np.ndarray], what: str) -> None:

    params = dict(_flat(model.parameters()))
    for key, value in weights.items():
        if key not in params:
            raise TrainingError(f"{what}: {key} is not a LoRA weight of this model", backend=BACKEND)
        if tuple(params[key].shape) != value.shape:
            raise TrainingError(
                f"{what}: {key} has shape {value.shape}, the model wants {tuple(params[key].shape)}",
                backend=BACKEND,
            )
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())


def _adapter_sums(
    model: Any,
    adapter: PeftAdapter,
    sets: list[list[tuple[list[int], int]]],
    pad: int,
    bs: int,
    *,
    session: Session,
    adapter_id: Any,
) -> list[list[tuple[float, float]]]:
    """``nll_sums`` of each set with a PEFT adapter applied temporarily (the served one)."""
    examples = [e for examples in sets for e in examples]
    if all(session.nll_cache.get((adapter_id, tuple(ids), n)) for ids, n in examples):
        return [nll_sums(model, x, pad, bs, cache=session.nll_cache, cache_key=adapter_id) for x in sets]

    apply_lora(
        model,
        list(adapter.modules),
        list(adapter.layer_indices),
        rank=adapter.rank,
        scale=adapter.scale,
        dropout=0.0,
    )
    try:
        _load_lora_weights(model, adapter.weights, "served_adapter")
        return [nll_sums(model, x, pad, bs, cache=session.nll_cache, cache_key=adapter_id) for x in sets]
    finally:
        remove_lora_layers(model)


def _scores(
    new: list[list[tuple[float, float]]],
    base: list[list[tuple[float, float]]],
) -> tuple[float | None, float | None]:
    """(mean NLL of the better drafts, preference accuracy) from the sums of [good, bad] under the model
    judged and the base."""
    (good, bad), (good0, bad0) = new, base
    count = sum(n for _, n in good)
    loss = sum(t for t, _ in good) / count if count else None
    lp = [[-t for t, _ in x] for x in (good, bad, good0, bad0)]
    return loss, preference_accuracy(*lp)


def base_model_sha256(base: Path) -> str:
    digest = manifest_base_sha256(base)
    if digest is None:
        raise TrainingError(f"{base} holds no model*.safetensors", backend=BACKEND)
    return digest


# --- the base model, loaded once per worker ------------------------------------------------------------


class Session:
    """The base model of a worker, kept between jobs: reloaded only when the path or its files change."""

    def __init__(self) -> None:
        self.base: Path | None = None
        self.key: tuple[tuple[str, int, int, int], ...] = ()
        self.model: Any = None
        self.tokenizer: Any = None
        self._sha256: str | None = None
        self.loads = 0
        # per-example held-out NLL under the base model and under adapters this worker wrote or read
        self.nll_cache: NllCache = {}

    def load(self, base: Path, emit: Emit) -> tuple[Any, Any]:
        key = model_files_key(base)
        if self.model is not None and self.base == base and self.key == key:
            emit({"type": "log", "message": f"mlx: base model {base} already loaded"})
            return self.model, self.tokenizer
        self.model = self.tokenizer = self._sha256 = None
        self.nll_cache = {}
        gc.collect()
        emit({"type": "log", "message": f"mlx: loading {base}"})
        try:
            loaded: Any = load(str(base))
        except Exception as e:
            raise TrainingError(
                f"cannot load base model {base}: {type(e).__name__}: {e}", backend=BACKEND
            ) from e
        self.model, self.tokenizer = loaded[0], loaded[1]
        self.base, self.key = base, key
        self.loads += 1
        return self.model, self.tokenizer

    def sha256(self) -> str:
        assert self.base is not None
        if self._sha256 is None:
            self._sha256 = base_model_sha256(self.base)
        return self._sha256

    def reset(self, *, release: bool = True) -> None:
        """Leave the bare, frozen base model for the next job (and give the job's buffers back)."""
        if self.model is not None:
            remove_lora_layers(self.model)
            self.model.freeze()
            self.model.eval()
        if release:
            gc.collect()
            mx.clear_cache()


PRELOAD = (  # what mlx_lm.load imports lazily on its first call (transformers' config machinery, ~3 s)
    "transformers.activations",
    "transformers.core_model_loading",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_fast",
)


def new_session() -> Session:
    """For ``worker serve``: this backend can keep its base model loaded between jobs.

    Also imports what the first ``load`` would, so that a worker started ahead of its first job has
    paid for it before it says it is ready.
    """
    for name in PRELOAD:  # another transformers version may lack one: the first load pays for it then
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    return Session()


# --- the job ----------------------------------------------------------------------------------------------


def train(spec: dict[str, Any], emit: Emit, session: Session | None = None) -> dict[str, Any]:
    """One job; ``session`` (a warm worker's) keeps the base model loaded for the next job."""
    session = session or Session()
    try:
        return _train(spec, emit, session)
    finally:
        session.reset()


def _train(raw: dict[str, Any], emit: Emit, session: Session) -> dict[str, Any]:
    started = time.monotonic()
    timings: dict[str, float] = {}
    mark = [started]

    def phase(name: str) -> None:
        now = time.monotonic()
        timings[name] = round(now - mark[0], 4)
        mark[0] = now

    spec = read_spec(raw)
    hyper = spec.hyper
    base = Path(spec.base_model)
    out_dir = Path(str(spec.out_dir))  # read_spec refuses a spec without one

    seed = hyper.seed
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)

    model, tokenizer = session.load(base, emit)
    session.reset(release=False)  # bare and frozen, whoever used it before
    phase("load_s")
    encoder = Encoder(tokenizer, hyper.max_seq_len)
    train_set = [encoder.encode_example(p, "chosen") for p in spec.train]
    # [better drafts, worse drafts] of the held-out pairs that judge the job, and of its own siblings
    judged, siblings = (
        [[encoder.encode_example(p, k) for p in examples] for k in PAIR_SIDES]
        for examples in (spec.heldout, spec.siblings)
    )  # fmt: skip
    heldout = judged[0]
    bs, pad = hyper.batch_size, encoder.pad_id

    phase("encode_s")

    cache = session.nll_cache
    base_sums = [
        nll_sums(model, x, pad, bs, cache=cache, cache_key=("base", session.key)) for x in judged + siblings
    ]
    served_sums = base_sums[:2]
    served = spec.served_adapter
    if served and heldout:
        served_id = ("adapter", sha256_file(Path(served) / "adapter_model.safetensors"))
        served_sums = _adapter_sums(
            model, peft_to_mlx(Path(served)), judged, pad, bs, session=session, adapter_id=served_id
        )
    base_eval = _scores(base_sums[:2], base_sums[:2])[0]
    baseline_eval, baseline_accuracy = _scores(served_sums, base_sums[:2])
    phase("eval_before_s")

    n_layers = len(model.layers)
    if hyper.num_layers > n_layers:
        raise ConfigError("hyper.num_layers", f"is {hyper.num_layers} but the model has {n_layers} layers")
    layers = hyper.layers_to_transform(n_layers) or list(range(n_layers))
    paths = module_paths(model, hyper.target_modules)
    scale = hyper.alpha / hyper.rank
    mx.random.seed(seed)
    apply_lora(model, paths, layers, rank=hyper.rank, scale=scale, dropout=hyper.dropout)

    init = spec.init_adapter
    if init:
        adapter = peft_to_mlx(Path(init))
        for what, have, want in (
            ("rank", adapter.rank, hyper.rank),
            ("target modules", list(adapter.modules), paths),
            ("layers", list(adapter.layer_indices), layers),
        ):
            if have != want:
                raise TrainingError(
                    f"init_adapter {init} has {what} {have}, the hyper-parameters ask for {want}",
                    backend=BACKEND,
                )
        weights = dict(adapter.weights)
        for key, value in adapter.weights.items():  # same function under the new scale: b · old/new
            if key.endswith(".lora_b"):
                weights[key] = np.asarray(value * (adapter.scale / scale), dtype=np.float32)
        _load_lora_weights(model, weights, "init_adapter")
        emit({"type": "log", "message": f"mlx: continuing from {init}"})

    trainable = sum(v.size for _, v in _flat(model.trainable_parameters()))
    emit({"type": "log", "message": f"mlx: {len(train_set)} train / {len(heldout)} held-out examples, "
          f"{trainable} trainable parameters, layers {layers}, modules {paths}"})  # fmt: skip

    # the torch backends' optimiser exactly: Adam *with* bias correction (mlx's default has none, which
    # multiplies early steps by (1 - b1^t) / sqrt(1 - b2^t): x3.2 at step 1, x5.0 at step 40) and the
    # gradient clipped to norm 1 (transformers' Trainer default, max_grad_norm)
    optimizer = optim.Adam(learning_rate=hyper.learning_rate, bias_correction=True)
    phase("setup_s")

    def loss_fn(m: Any, inputs: Any, targets: Any, mask: Any) -> Any:
        return _nll_sum(m, inputs, targets, mask) / mx.maximum(mask.sum(), 1.0)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    steps = hyper.steps
    # train_loss: token-weighted mean loss of the last epoch's steps (every pair seen once), read off
    # the steps themselves rather than from one more forward pass over the whole training set
    epoch_steps = math.ceil(len(train_set) / min(bs, len(train_set)))
    recent: deque[tuple[float, float]] = deque(maxlen=epoch_steps)
    model.train()
    loop_started = time.monotonic()
    for step in range(1, steps + 1):
        batch_idx: list[int] = []
        while len(batch_idx) < min(bs, len(train_set)):
            if not order:
                order = [int(i) for i in rng.permutation(len(train_set))]
            batch_idx.append(order.pop())
        t0 = time.perf_counter()
        inputs, targets, mask = _batch([train_set[i] for i in batch_idx], pad)
        loss, grads = loss_and_grad(model, inputs, targets, mask)
        grads, _ = clip_grad_norm(grads, max_norm=MAX_GRAD_NORM)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        step_loss = float(loss.item())
        if not math.isfinite(step_loss):
            raise TrainingError(f"loss is {step_loss} at step {step}", backend=BACKEND)
        recent.append((step_loss, float(mask.sum().item())))
        tokens = int(inputs.shape[0] * inputs.shape[1])
        emit({"type": "progress", "step": step, "total": steps, "loss": step_loss,
              "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9)})  # fmt: skip

    emit({"type": "log", "message": f"mlx: {steps} steps in {time.monotonic() - loop_started:.2f} s"})
    phase("train_s")
    eval_nll: NllCache = {}
    new_sums = [nll_sums(model, x, pad, bs, cache=eval_nll, cache_key="new") for x in judged + siblings]
    eval_loss, accuracy = _scores(new_sums[:2], base_sums[:2])
    sibling_loss, sibling_accuracy = _scores(new_sums[2:], base_sums[2:])
    seen = sum(n for _, n in recent)
    train_loss = sum(loss * n for loss, n in recent) / seen if seen else None
    phase("eval_after_s")

    weights = {k: np.array(v, dtype=np.float32) for k, v in _flat(model.trainable_parameters())}
    mlx_to_peft(
        weights,
        rank=hyper.rank,
        scale=scale,
        target_modules=list(hyper.target_modules),
        layer_indices=layers,
        base_model_path=base,
        out_dir=out_dir,
        dropout=hyper.dropout,
        num_hidden_layers=n_layers,
    )
    written = ("adapter", sha256_file(out_dir / "adapter_model.safetensors"))
    for (_, ids, n), nll in eval_nll.items():  # the next job's served adapter is likely this one
        session.nll_cache[(written, ids, n)] = nll
    phase("convert_s")
    duration = time.monotonic() - started
    result: dict[str, Any] = {
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "baseline_eval_loss": baseline_eval,
        "base_eval_loss": base_eval,
        "preference_accuracy": accuracy,
        "baseline_preference_accuracy": baseline_accuracy,
        "sibling_eval_loss": sibling_loss,
        "sibling_preference_accuracy": sibling_accuracy,
        "steps": steps,
        "duration_s": duration,
        "backend": BACKEND,
    }
    write_manifest(
        out_dir,
        {
            "job_id": spec.job_id,
            "voice": spec.voice,
            "attempt": spec.attempt,
            "backend": BACKEND,
            "executor": raw.get("executor", "local"),  # the worker's own key (Ray's driver writes it)
            "objective": spec.objective,
            "base_model": str(base),
            "base_model_sha256": session.sha256(),
            "served_base": spec.served_base or None,  # written into adapter_config.json
            "pair_ids": [p.pair_id for p in spec.train],
            "heldout_pair_ids": [p.pair_id for p in spec.heldout],
            "sibling_pair_ids": [p.pair_id for p in spec.siblings],
            "init_adapter": init,
            "served_adapter": served,
            "hyper": hyper.to_json(),
            "timings": dict(timings),  # seconds per phase, up to the conversion
            **{k: v for k, v in result.items() if k != "backend"},
        },
    )
    phase("manifest_s")
    timings["total_s"] = round(time.monotonic() - started, 4)
    emit({"type": "log", "message": "mlx: timings " + " ".join(f"{k}={v}" for k, v in timings.items())})
    result["timings"] = timings
    return result
