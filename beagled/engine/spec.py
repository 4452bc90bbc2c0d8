"""What a training run is given: the spec the engine writes for a job (pairs as examples, the base
model, the adapter to start from, the hyper-parameters)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from beagled import events as ev
from beagled import hfcache, jobs
from beagled.engine.context import Context
from beagled.errors import TrainingError


def training_example(p: ev.PairSubmitted, prompt_template: str) -> dict[str, Any]:
    """A pair as a spec's training example. A chat-shaped pair carries its ``system`` and ``messages``
    (rendered by ``beagled.training.render``) and its ``prompt`` only when given; any other pair without
    a prompt gets ``training.prompt_template``."""
    out: dict[str, Any] = {"pair_id": p.pair_id, "chosen": p.good, "rejected": p.bad}
    if p.messages:
        out["prompt"] = p.prompt or ""
        out["messages"] = [dict(m) for m in p.messages]
    else:
        out["prompt"] = p.prompt if p.prompt is not None else prompt_template.format(bad=p.bad, voice=p.voice)
    if p.system is not None:
        out["system"] = p.system
    return out


def base_model_path(ctx: Context, base_model: Callable[[], Path] | None) -> str:
    if ctx.cfg.training.base_model:  # a directory, or a repo id in the local HF cache
        return str(hfcache.resolve(ctx.cfg.training.base_model))
    if base_model is None:
        raise TrainingError("no base model configured (training.base_model)")
    return str(base_model())


async def build_spec(
    ctx: Context, job: jobs.Job, base_model: Callable[[], Path] | None, served_base: str | None
) -> dict[str, Any]:
    t = ctx.cfg.training
    v = ctx.state.voice(job.voice)
    ids = list(job.pair_ids) + list(job.replay_ids)
    pairs = await trio.to_thread.run_sync(
        ctx.store.get_pairs, ids + list(job.eval_ids) + list(job.sibling_ids)
    )

    def example(pid: str) -> dict[str, Any]:
        return training_example(pairs[pid], t.prompt_template)

    current = ctx.voices.adapter_dir(job.voice, v.current_job) if v.current_job else None
    base = await trio.to_thread.run_sync(base_model_path, ctx, base_model)
    return {
        "job_id": job.job_id,
        "voice": job.voice,
        "attempt": job.attempt,
        "base_model": base,
        "served_base": served_base,
        "init_adapter": str(current) if current and t.init == "current" else None,
        "served_adapter": str(current) if current else None,
        "objective": t.objective,
        "dpo_weight": t.dpo_weight,
        "train": [example(pid) for pid in ids if pid in pairs],
        # judged on the evaluation set as it was when the job was cut (never its own siblings,
        # unless the voice had no set yet); the siblings travel apart, for reports only
        "heldout": [example(pid) for pid in job.eval_ids if pid in pairs],
        "siblings": [example(pid) for pid in job.sibling_ids if pid in pairs],
        "hyper": {
            "rank": t.hyper.rank,
            "alpha": t.hyper.alpha,
            "dropout": t.hyper.dropout,
            "target_modules": list(t.hyper.target_modules),
            "num_layers": t.hyper.num_layers,
            "learning_rate": t.hyper.learning_rate,
            "steps": t.hyper.steps,
            "batch_size": t.hyper.batch_size,
            "max_seq_len": t.hyper.max_seq_len,
            "seed": t.hyper.seed,
        },
    }
