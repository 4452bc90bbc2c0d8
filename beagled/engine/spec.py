"""What a training run is given: the spec the engine writes for a job (pairs as examples, the base
model, the adapter to start from, the hyper-parameters)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from beagled import events as ev
from beagled import hfcache, jobs
from beagled.engine.context import Context
from beagled.errors import TrainingError
from beagled.training_spec import Example, TrainingSpec


def training_example(p: ev.PairSubmitted, prompt_template: str) -> Example:
    """A pair as a spec's training example. A chat-shaped pair carries its ``system`` and ``messages``
    (rendered by ``beagled.training.render``) and its ``prompt`` only when given; any other pair without
    a prompt gets ``training.prompt_template``."""
    if p.messages:
        prompt = p.prompt or ""
    else:
        prompt = p.prompt if p.prompt is not None else prompt_template.format(bad=p.bad, voice=p.voice)
    messages = tuple(dict(m) for m in p.messages) if p.messages else ()
    return Example(
        p.pair_id, chosen=p.good, rejected=p.bad, prompt=prompt, system=p.system, messages=messages
    )


def base_model_path(ctx: Context, base_model: Callable[[], Path] | None) -> str:
    if ctx.cfg.training.base_model:  # a directory, or a repo id in the local HF cache
        return str(hfcache.resolve(ctx.cfg.training.base_model))
    if base_model is None:
        raise TrainingError("no base model configured (training.base_model)")
    return str(base_model())


async def build_spec(
    ctx: Context, job: jobs.Job, base_model: Callable[[], Path] | None, served_base: str | None
) -> TrainingSpec:
    t = ctx.cfg.training
    v = ctx.state.voice(job.voice)
    ids = list(job.pair_ids) + list(job.replay_ids)
    pairs = await trio.to_thread.run_sync(
        ctx.store.get_pairs, ids + list(job.eval_ids) + list(job.sibling_ids)
    )

    def examples(pids: Iterable[str]) -> tuple[Example, ...]:
        return tuple(training_example(pairs[pid], t.prompt_template) for pid in pids if pid in pairs)

    current = ctx.voices.adapter_dir(job.voice, v.current_job) if v.current_job else None
    base = await trio.to_thread.run_sync(base_model_path, ctx, base_model)
    return TrainingSpec(
        job_id=job.job_id,
        voice=job.voice,
        attempt=job.attempt,
        base_model=base,
        served_base=served_base,
        init_adapter=str(current) if current and t.init == "current" else None,
        served_adapter=str(current) if current else None,
        objective=t.objective,
        dpo_weight=t.dpo_weight,
        train=examples(ids),
        # judged on the evaluation set as it was when the job was cut (never its own siblings,
        # unless the voice had no set yet); the siblings travel apart, for reports only
        heldout=examples(job.eval_ids),
        siblings=examples(job.sibling_ids),
        hyper=t.hyper,  # [training.hyper], checked when the config was read
    )
