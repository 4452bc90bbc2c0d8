"""The ``unsloth`` backend for real: the training worker as a subprocess on the tiny model.

Opt-in: Unsloth brings its own torch (several GB), so it lives in its own environment. Run with

    BEAGLED_TEST_UNSLOTH=1 .venv-unsloth/bin/python -m pytest tests/test_backend_unsloth.py

The worker runs under the interpreter that runs pytest. Without a CUDA device Unsloth falls back to
the CPU; the tests then set ``BEAGLED_UNSLOTH_ALLOW_CPU=1`` so the backend trains there for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("BEAGLED_TEST_UNSLOTH") != "1":
    pytest.skip("set BEAGLED_TEST_UNSLOTH=1 (in the .venv-unsloth environment)", allow_module_level=True)

pytest.importorskip("unsloth", exc_type=ImportError)

from beagled import manifest
from tests.worker_run import Run, run_worker, spec_for, voice_data, worker_env

pytestmark = [pytest.mark.unsloth, pytest.mark.slow]

BACKEND = "unsloth"
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
    proc = subprocess.run(
        [sys.executable, "-m", "beagled.training.worker", "probe", BACKEND],
        capture_output=True,
        text=True,
        timeout=300,
        env=unsloth_env(allow_cpu),
        check=True,
    )
    (answer,) = [json.loads(line) for line in proc.stdout.splitlines()]  # Unsloth's banner went to stderr
    return answer


@pytest.fixture(scope="module")
def base_model(tiny_model: Path) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, str]]]:
    return voice_data()


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
    assert sorted(p.name for p in sft_run.out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
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
    spec = make_spec(
        base_model,
        tmp_path,
        data,
        "j-unext",
        init_adapter=str(sft_run.out_dir),
        served_adapter=str(sft_run.out_dir),
        hyper={"steps": 8},
    )
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
    assert sorted(p.name for p in run.out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    manifest.verify(run.out_dir)
