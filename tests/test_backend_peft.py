"""The ``peft`` backend for real: the training worker as a subprocess on the tiny model.

Each job runs ``python -m beagled.training.worker train SPEC.json`` and parses every stdout line as JSON
(anything else on stdout fails the test), so these tests cover the worker protocol, TRL's SFT and DPO
trainers, the held-out evaluation and the adapter directory the daemon promotes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")

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

pytestmark = pytest.mark.slow

BACKEND = "peft"
base_model, data = backend_cases.base_model, backend_cases.data  # the shared fixtures


def make_spec(*args: Any, **overrides: Any) -> dict[str, Any]:
    return spec_for(BACKEND, *args, **overrides)


@pytest.fixture(scope="module")
def sft_run(base_model: Path, data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("sft")
    return run_worker(tmp, make_spec(base_model, tmp, data, "j-sft", siblings=data["heldout"][:3]))


def test_probe_reports_versions_and_device() -> None:
    answer = probe_worker(BACKEND, timeout=120, env=worker_env())
    assert answer["available"] is True, answer
    assert "torch" in answer["reason"]
    assert "trl" in answer["reason"]
    assert "cpu" in answer["reason"] or "cuda" in answer["reason"]


def test_sft_learns_the_voice(sft_run: Run) -> None:
    assert sft_run.rc == 0, sft_run.stderr[-3000:]
    progress = sft_run.of_type("progress")
    assert [p["step"] for p in progress] == list(range(1, 25))
    assert all(p["total"] == 24 and p["loss"] > 0 and p["tokens_per_s"] > 0 for p in progress)
    result = sft_run.result
    assert result["backend"] == BACKEND
    assert result["steps"] == 24
    assert result["eval_loss"] < result["base_eval_loss"], result
    assert result["baseline_eval_loss"] == result["base_eval_loss"]  # no served adapter: the base
    assert 0 < result["train_loss"] < result["base_eval_loss"]  # mean completion NLL over the train pairs
    assert result["objective_loss"] > 0  # the trainer's own mean loss
    assert result["duration_s"] > 0
    assert 0.0 <= result["preference_accuracy"] <= 1.0
    assert result["baseline_preference_accuracy"] == 0.0  # the base against itself prefers nothing
    assert result["sibling_eval_loss"] < result["base_eval_loss"]  # the siblings, measured apart
    assert result["sibling_preference_accuracy"] is not None
    assert manifest.verify(sft_run.out_dir)["preference_accuracy"] == result["preference_accuracy"]


def test_sft_writes_a_verified_peft_adapter(sft_run: Run, base_model: Path) -> None:
    assert sft_run.rc == 0, sft_run.stderr[-3000:]
    out = sft_run.out_dir
    assert adapter_files(out) == ADAPTER_FILES
    info = manifest.verify(out)
    result = sft_run.result
    assert info["job_id"] == "j-sft"
    assert info["backend"] == BACKEND
    assert info["objective"] == "sft"
    assert info["base_model"] == str(base_model)
    assert info["base_model_sha256"] == manifest.sha256_file(base_model / "model.safetensors")
    assert info["pair_ids"] == [f"t{i}" for i in range(32)]
    assert info["hyper"]["rank"] == 8
    for key in ("train_loss", "eval_loss", "baseline_eval_loss", "base_eval_loss"):
        assert info[key] == result[key]

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8
    assert config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base_model)

    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    hidden = json.loads((base_model / "config.json").read_text())["hidden_size"]
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (8, hidden)
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] == (hidden, 8)
    assert len(shapes) == 2 * 2 * 2  # layers x modules x (A, B)


# PEFT asks transformers 5 for the renamed attribute; nothing of ours.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_adapter_loads_with_peft_and_reproduces_eval_loss(
    sft_run: Run, base_model: Path, data: dict[str, Any]
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from beagled.training.torch_common import encode_example, mean_nll

    assert sft_run.rc == 0, sft_run.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(sft_run.out_dir))
    examples = [encode_example(tokenizer, r["prompt"], r["chosen"], 256) for r in data["heldout"]]
    loss = mean_nll(model, examples, tokenizer.pad_token_id, 4)
    assert loss == pytest.approx(sft_run.result["eval_loss"], rel=1e-4)
    with model.disable_adapter():
        assert mean_nll(model, examples, tokenizer.pad_token_id, 4) == pytest.approx(
            sft_run.result["base_eval_loss"], rel=1e-4
        )


def test_encode_example_masks_the_prompt_and_truncates_like_mlx(base_model: Path) -> None:
    from transformers import AutoTokenizer

    from beagled.training.torch_common import IGNORE, encode_example

    tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
    ids, labels = encode_example(tokenizer, "Write to Ana.", "Hey Ana", 256)
    n_prompt = labels.count(IGNORE)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]).startswith("Hey Ana")  # the chat template's assistant turn
    assert tokenizer.decode(ids[n_prompt:]).rstrip().endswith(tokenizer.eos_token)

    long_ids, long_labels = encode_example(tokenizer, "word " * 200, "more " * 200, 64)
    assert len(long_ids) == len(long_labels) == 64
    assert long_labels.count(IGNORE) == 32  # the prompt's end keeps half, the completion's start the rest


def test_continue_from_init_adapter(
    sft_run: Run, base_model: Path, data: dict[str, Any], tmp_path: Path
) -> None:
    assert sft_run.rc == 0, sft_run.stderr[-3000:]
    first = sft_run.result
    spec = continue_spec(BACKEND, base_model, data, tmp_path, sft_run, "j-next", served_base="tiny-served")
    run = run_worker(tmp_path, spec)
    assert run.rc == 0, run.stderr[-3000:]
    result = run.result
    # The served adapter is the one we continued from: the baseline is its held-out loss.
    assert result["baseline_eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-4)
    assert result["base_eval_loss"] == pytest.approx(first["base_eval_loss"], rel=1e-4)
    assert result["eval_loss"] < result["baseline_eval_loss"], result
    assert run.of_type("progress")[0]["loss"] < sft_run.of_type("progress")[0]["loss"]
    info = manifest.verify(run.out_dir)  # the hashes cover the served base written into the config
    assert info["init_adapter"] == str(sft_run.out_dir)
    assert info["served_base"] == "tiny-served" and info["base_model"] == str(base_model)
    config = json.loads((run.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-served"


@pytest.mark.parametrize("objective", ["dpo", "sft+dpo"])
def test_dpo_raises_the_heldout_margin(
    base_model: Path, data: dict[str, Any], tmp_path: Path, objective: str
) -> None:
    spec = make_spec(
        base_model,
        tmp_path,
        data,
        "j-dpo",
        objective=objective,
        hyper={"num_layers": 1, "steps": 16, "learning_rate": 0.001},
    )
    run = run_worker(tmp_path, spec)
    assert run.rc == 0, run.stderr[-3000:]
    result = run.result
    assert len(run.of_type("progress")) == 16
    assert result["eval_margin"] > result["base_eval_margin"], result
    assert result["baseline_eval_margin"] == result["base_eval_margin"]
    assert result["preference_accuracy"] > 0.5, result  # it prefers the better draft of most pairs
    if objective == "sft+dpo":  # the SFT term lowers the better drafts' loss as well
        assert result["eval_loss"] < result["base_eval_loss"], result
    info = manifest.verify(run.out_dir)
    assert info["objective"] == objective
    assert info["eval_margin"] == result["eval_margin"]
    assert info["base_eval_margin"] == result["base_eval_margin"]
    config = json.loads((run.out_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]  # the last num_layers blocks of 2
    assert adapter_files(run.out_dir) == ADAPTER_FILES  # DPO's frozen reference copy is not saved


def test_a_warm_worker_keeps_the_base_and_trains_what_a_cold_run_trains(
    base_model: Path, data: dict[str, Any], sft_run: Run, tmp_path: Path
) -> None:
    same_keys = ("eval_loss", "preference_accuracy", "base_eval_loss")
    warm_matches_cold(BACKEND, base_model, data, tmp_path, sft_run, job_prefix="j-warm", same_keys=same_keys)


@pytest.mark.parametrize(
    ("hyper", "message"),
    [
        ({"rank": 0}, "hyper.rank"),
        ({"target_modules": ["no_such_proj"]}, "no_such_proj"),
        ({"num_layers": 3}, "num_layers"),
    ],
)
def test_bad_hyper_parameter_fails_cleanly(
    base_model: Path, data: dict[str, Any], tmp_path: Path, hyper: dict[str, Any], message: str
) -> None:
    run = run_worker(tmp_path, make_spec(base_model, tmp_path, data, "j-bad", hyper=hyper))
    assert run.rc != 0
    errors = run.of_type("error")
    assert len(errors) == 1
    assert run.lines[-1] is errors[0]
    assert message in errors[0]["message"]
    assert not run.of_type("result")
    assert not (run.out_dir / "manifest.json").exists()
