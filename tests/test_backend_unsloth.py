"""The ``unsloth`` backend for real: the training worker as a subprocess on the tiny model.

Unsloth pins its own transformers, trl and peft, so it lives in its own environment, ``.venv-unsloth``
(``scripts/unsloth-venv`` builds it). ``scripts/test`` runs this file there after the main run, as

    BEAGLED_TEST_UNSLOTH=1 .venv-unsloth/bin/python -m pytest tests/test_backend_unsloth.py

and with ``BEAGLED_TEST_UNSLOTH=1`` a missing Unsloth is a failure, not a skip; without it (the main
run) the file skips. The worker runs under the interpreter that runs pytest. Without a CUDA device
Unsloth falls back to the CPU; the tests then set ``BEAGLED_UNSLOTH_ALLOW_CPU=1`` so the backend trains
there for real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("BEAGLED_TEST_UNSLOTH") != "1":
    pytest.skip(
        "runs in .venv-unsloth with BEAGLED_TEST_UNSLOTH=1 (scripts/test's second run)",
        allow_module_level=True,
    )

import unsloth  # noqa: F401  (asked for: a missing or broken Unsloth fails here)

from beagled import manifest
from tests import backend_cases
from tests.backend_cases import (
    ADAPTER_FILES,
    adapter_files,
    continue_spec,
    probe_worker,
    warm_matches_cold,
)
from tests.worker_run import Run, run_worker, spec_for, worker_env

pytestmark = [pytest.mark.unsloth, pytest.mark.slow]

BACKEND = "unsloth"
base_model, data = backend_cases.base_model, backend_cases.data  # the shared fixtures
PEFT_KEYS = {
    f"base_model.model.model.layers.{n}.self_attn.{m}.lora_{ab}.weight"
    for n in (0, 1)
    for m in ("q_proj", "v_proj")
    for ab in ("A", "B")
}


def unsloth_env(allow_cpu: bool = True) -> dict[str, str]:
    extra = {"BEAGLED_UNSLOTH_ALLOW_CPU": "1"} if allow_cpu else {}
    return worker_env(extra, drop=("BEAGLED_UNSLOTH_ALLOW_CPU",))


def run_unsloth(tmp: Path, spec: dict[str, Any]) -> Run:
    return run_worker(tmp, spec, timeout=600, env=unsloth_env())


def probe(allow_cpu: bool) -> dict[str, Any]:
    return probe_worker(BACKEND, timeout=300, env=unsloth_env(allow_cpu))  # Unsloth's banner: on stderr


def make_spec(*args: Any, **overrides: Any) -> dict[str, Any]:
    return spec_for(BACKEND, *args, **overrides)


@pytest.fixture(scope="module")
def sft_run(base_model: Path, data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("sft")
    return run_unsloth(tmp, make_spec(base_model, tmp, data, "j-usft"))


def test_probe_says_where_unsloth_runs() -> None:
    import torch

    answer = probe(allow_cpu=True)
    assert answer["available"] is True, answer
    assert "unsloth" in answer["reason"]
    if torch.cuda.is_available():
        assert "cuda" in answer["reason"]
    else:
        assert "CPU fallback" in answer["reason"]
        strict = probe(allow_cpu=False)
        assert strict["available"] is False
        assert "BEAGLED_UNSLOTH_ALLOW_CPU" in strict["reason"]


def test_sft_trains_and_writes_a_peft_adapter(sft_run: Run, base_model: Path) -> None:
    from safetensors import safe_open

    assert sft_run.rc == 0, sft_run.stderr[-4000:]
    assert [p["step"] for p in sft_run.of_type("progress")] == list(range(1, 25))
    result = sft_run.result
    assert result["backend"] == BACKEND
    assert result["eval_loss"] < result["base_eval_loss"], result
    assert adapter_files(sft_run.out_dir) == ADAPTER_FILES
    info = manifest.verify(sft_run.out_dir)
    assert info["backend"] == BACKEND
    assert info["eval_loss"] == result["eval_loss"]
    config = json.loads((sft_run.out_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "CAUSAL_LM", 8)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    with safe_open(str(sft_run.out_dir / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == PEFT_KEYS


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_adapter_loads_with_plain_peft(sft_run: Run, base_model: Path, data: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from beagled.training.torch_common import encode_example, mean_nll

    assert sft_run.rc == 0, sft_run.stderr[-4000:]
    tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(sft_run.out_dir))
    examples = [encode_example(tokenizer, r["prompt"], r["chosen"], 256) for r in data["heldout"]]
    # Unsloth trained (and evaluated) in its own dtype; float32 agrees to bf16 precision.
    assert mean_nll(model, examples, tokenizer.pad_token_id, 4) == pytest.approx(
        sft_run.result["eval_loss"], rel=1e-2
    )


def test_continue_from_init_adapter(
    sft_run: Run, base_model: Path, data: dict[str, Any], tmp_path: Path
) -> None:
    assert sft_run.rc == 0, sft_run.stderr[-4000:]
    spec = continue_spec(BACKEND, base_model, data, tmp_path, sft_run, "j-unext")
    run = run_unsloth(tmp_path, spec)
    assert run.rc == 0, run.stderr[-4000:]
    result = run.result
    assert result["baseline_eval_loss"] == pytest.approx(sft_run.result["eval_loss"], rel=1e-3)
    assert result["eval_loss"] < result["baseline_eval_loss"], result
    manifest.verify(run.out_dir)


def test_dpo_raises_the_heldout_margin(base_model: Path, data: dict[str, Any], tmp_path: Path) -> None:
    spec = make_spec(
        base_model, tmp_path, data, "j-udpo", objective="dpo", hyper={"steps": 16, "learning_rate": 0.001}
    )
    run = run_unsloth(tmp_path, spec)
    assert run.rc == 0, run.stderr[-4000:]
    result = run.result
    assert result["eval_margin"] > result["base_eval_margin"], result
    assert adapter_files(run.out_dir) == ADAPTER_FILES
    manifest.verify(run.out_dir)


def test_a_warm_worker_keeps_the_base_and_trains_what_a_cold_run_trains(
    base_model: Path, data: dict[str, Any], sft_run: Run, tmp_path: Path
) -> None:
    assert sft_run.rc == 0, sft_run.stderr[-4000:]
    second = warm_matches_cold(
        BACKEND,
        base_model,
        data,
        tmp_path,
        sft_run,
        job_prefix="j-uwarm",
        same_keys=("eval_loss", "train_loss", "base_eval_loss"),
        weight_names=PEFT_KEYS,
        env=unsloth_env(),
    )
    manifest.verify(second.out_dir)


def test_the_daemons_warm_unsloth_worker_is_recycled_and_replaced(
    base_model: Path, data: dict[str, Any], tmp_path: Path
) -> None:
    """``SubprocessTrainer(warm=True)``: kept between jobs, a fresh one after ``warm_max_jobs`` jobs and
    after a failed job (its whole process group gone), and the job after a failure trains normally."""
    import trio

    from beagled.errors import TrainingError
    from beagled.training.runner import SubprocessTrainer
    from beagled.training_spec import TrainingSpec
    from tests.test_warm_trainer import poll_dead

    small = {"steps": 4, "max_seq_len": 128}

    def job(name: str, **hyper: Any) -> TrainingSpec:
        wire = make_spec(base_model, tmp_path / name, data, f"j-{name}", hyper={**small, **hyper})
        return TrainingSpec.from_json(wire)

    def ignore(_msg: dict[str, Any]) -> None:
        pass

    async def main() -> tuple[list[dict[str, Any]], int]:
        t = SubprocessTrainer(
            [BACKEND],
            spec_dir=tmp_path / "specs",
            env={"BEAGLED_UNSLOTH_ALLOW_CPU": "1"},
            warm=True,
            warm_max_jobs=2,
            timeout_s=600.0,
            probe_timeout_s=300.0,
        )
        try:
            results = [await t.run(BACKEND, job(name), ignore) for name in ("w1", "w2")]
            replacement = t.warm_pid(BACKEND)  # started when the first one retired after 2 jobs
            assert replacement is not None
            with pytest.raises(TrainingError, match="no_such_proj"):
                await t.run(BACKEND, job("bad", target_modules=["no_such_proj"]), ignore)
            results.append(await t.run(BACKEND, job("w3"), ignore))
            return results, replacement
        finally:
            await t.aclose()

    (r1, r2, r3), failed_pid = trio.run(main)
    assert r1["worker_pid"] == r2["worker_pid"]  # the base model kept between jobs
    assert r2["load_s"] < r1["load_s"] / 5, (r1, r2)
    assert failed_pid != r1["worker_pid"]  # retired after warm_max_jobs = 2
    assert r3["worker_pid"] not in (r1["worker_pid"], failed_pid)  # the failed job's worker replaced
    assert poll_dead(failed_pid)
    assert not (tmp_path / "bad" / "j-bad.partial-1" / "manifest.json").exists()
    for name in ("w1", "w2", "w3"):
        manifest.verify(tmp_path / name / f"j-{name}.partial-1")
    for warm_or_fresh in (r2, r3):  # the same spec (another out_dir): the same adapter's losses
        assert warm_or_fresh["eval_loss"] == pytest.approx(r1["eval_loss"], abs=1e-6)
