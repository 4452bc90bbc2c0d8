"""The MLX backend through the real worker subprocess (docs/internals.md): probe, train, continue, refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from beagled.errors import BeagledError
from beagled.manifest import sha256_file, verify
from beagled.training import backend_mlx
from tests.spec_cases import MLX_HYPER, pair_rows

REPO = Path(__file__).resolve().parent.parent


def make_spec(tiny_model: Path, out_dir: Path, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "job_id": "j-test", "voice": "default", "attempt": 1, "backend": "mlx",
        "base_model": str(tiny_model), "out_dir": str(out_dir),
        "init_adapter": None, "served_adapter": None, "objective": "sft",
        "train": pair_rows(32, seed=1), "heldout": pair_rows(8, seed=2, start=100),
        "hyper": dict(MLX_HYPER),
    }  # fmt: skip
    spec.update(changes)
    return spec


def run_worker(tmp: Path, *args: str, spec: dict[str, Any] | None = None) -> tuple[int, list[dict[str, Any]]]:
    argv = [sys.executable, "-m", "beagled.training.worker", *args]
    if spec is not None:
        path = tmp / f"spec-{len(list(tmp.glob('spec-*')))}.json"
        path.write_text(json.dumps(spec))
        argv.append(str(path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines


def result_of(lines: list[dict[str, Any]]) -> dict[str, Any]:
    results = [line for line in lines if line.get("type") == "result"]
    assert len(results) == 1, lines[-3:]
    assert lines[-1] is results[0]
    return results[0]


@pytest.fixture(scope="module")
def trained(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("mlx-train")
    out = tmp / "adapter.partial-1"
    rc, lines = run_worker(tmp, "train", spec=make_spec(tiny_model, out))
    return out, rc, lines


def test_probe_says_available(tmp_path: Path) -> None:
    rc, lines = run_worker(tmp_path, "probe", "mlx")
    assert rc == 0
    assert len(lines) == 1
    assert lines[0]["available"] is True, lines[0]
    assert "mlx-lm" in lines[0]["reason"]


@pytest.mark.slow
def test_train_writes_a_verified_peft_adapter(
    trained: tuple[Path, int, list[dict[str, Any]]], tiny_model: Path
) -> None:
    out, rc, lines = trained
    assert rc == 0, lines[-2:]
    progress = [line for line in lines if line["type"] == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 41))
    assert all(p["total"] == 40 and p["loss"] > 0 and p["tokens_per_s"] > 0 for p in progress)
    result = result_of(lines)
    assert result["backend"] == "mlx"
    assert result["steps"] == 40
    assert result["duration_s"] > 0
    assert result["eval_loss"] < result["base_eval_loss"] - 0.1, result
    assert result["baseline_eval_loss"] == result["base_eval_loss"]  # nothing served yet: the base
    assert result["train_loss"] < progress[0]["loss"]

    manifest = verify(out)
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert manifest["job_id"] == "j-test"
    assert manifest["voice"] == "default"
    assert manifest["backend"] == "mlx"
    assert manifest["base_model"] == str(tiny_model)
    assert manifest["base_model_sha256"] == sha256_file(tiny_model / "model.safetensors")
    assert manifest["pair_ids"] == [f"p{i}" for i in range(32)]
    assert manifest["hyper"]["rank"] == 8
    assert manifest["eval_loss"] == result["eval_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8
    assert config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] is None
    assert config["base_model_name_or_path"] == str(tiny_model)


@pytest.mark.slow
def test_continue_from_init_adapter(
    trained: tuple[Path, int, list[dict[str, Any]]], tiny_model: Path, tmp_path: Path
) -> None:
    first, rc, lines = trained
    assert rc == 0
    before = result_of(lines)
    spec = make_spec(
        tiny_model, tmp_path / "next", init_adapter=str(first), served_adapter=str(first),
        train=pair_rows(16, seed=3, start=200), hyper={**MLX_HYPER, "steps": 10, "alpha": 8.0},
        served_base="tiny-served",
    )  # fmt: skip
    rc, lines = run_worker(tmp_path, "train", spec=spec)
    assert rc == 0, lines[-2:]
    result = result_of(lines)
    # the served adapter's held-out loss, measured again in a new process, is what the first job reported
    assert result["baseline_eval_loss"] == pytest.approx(before["eval_loss"], abs=1e-4)
    assert result["base_eval_loss"] == pytest.approx(before["base_eval_loss"], abs=1e-6)
    # continuing (with alpha changed: the init adapter is rescaled to the new scale) starts where it left off
    assert lines[[line["type"] for line in lines].index("progress")]["loss"] < before["base_eval_loss"] - 0.1
    assert result["eval_loss"] < result["base_eval_loss"]
    info = verify(tmp_path / "next")  # the hashes cover the served base written into the config
    assert info["init_adapter"] == str(first)
    assert info["served_base"] == "tiny-served" and info["base_model"] == str(tiny_model)
    config = json.loads((tmp_path / "next" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-served"  # what vLLM serves the base as


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hyper": {**MLX_HYPER, "rank": 0}}, "hyper.rank"),
        ({"objective": "dpo"}, "objective 'dpo' is not supported by the mlx backend"),
    ],
)
def test_refusals_are_error_lines(
    tiny_model: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    rc, lines = run_worker(tmp_path, "train", spec=make_spec(tiny_model, tmp_path / "out", **changes))
    assert rc != 0
    assert lines[-1]["type"] == "error"
    assert message in lines[-1]["message"], lines[-1]
    assert not any(line["type"] == "result" for line in lines)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hyper": {**MLX_HYPER, "dropout": 1.5}}, "hyper.dropout"),
        ({"hyper": {**MLX_HYPER, "steps": 0}}, "hyper.steps"),
        ({"hyper": {**MLX_HYPER, "num_layers": 0}}, "hyper.num_layers"),
        ({"hyper": {**MLX_HYPER, "num_layers": 9}}, "hyper.num_layers: is 9 but the model has 2 layers"),
        ({"hyper": {**MLX_HYPER, "use_dora": True}}, "hyper.use_dora: is not supported by the mlx backend"),
        ({"hyper": {k: v for k, v in MLX_HYPER.items() if k != "seed"}}, "hyper.seed: is required"),
        ({"hyper": {**MLX_HYPER, "target_modules": ["nope_proj"]}}, "'nope_proj' is not a linear layer"),
        ({"train": []}, "no training pairs"),
    ],
)
def test_refusals_in_process(tiny_model: Path, tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    lines: list[dict[str, Any]] = []
    with pytest.raises(BeagledError) as caught:
        backend_mlx.train(make_spec(tiny_model, tmp_path / "out", **changes), lines.append)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_empty_heldout_gives_null_losses(tiny_model: Path, tmp_path: Path) -> None:
    hyper = {**MLX_HYPER, "steps": 2, "num_layers": 1, "target_modules": ["down_proj"]}
    spec = make_spec(tiny_model, tmp_path / "out", heldout=[], hyper=hyper)
    rc, lines = run_worker(tmp_path, "train", spec=spec)
    assert rc == 0, lines[-2:]
    result = result_of(lines)
    assert result["eval_loss"] is None
    assert result["baseline_eval_loss"] is None
    assert result["base_eval_loss"] is None
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    assert config["target_modules"] == ["down_proj"]
    verify(tmp_path / "out")
