"""What vLLM serves is what was trained: logprobs of real vLLM (float32) for an adapter trained by each
backend that runs here (mlx, peft), in three shapes, against the same adapter applied over the base
outside vLLM (transformers + PEFT), within 1e-3 per token, and different from the base model's.

One case goes end to end through a real daemon (submit → trained → promoted → reloaded, the real mlx
backend); the others train with the worker directly and load with the reloader. Training is kept
short (the adapter only has to move the logprobs well beyond 1e-3). Worst differences are printed
(``-s``) for BENCHMARKS.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from beagled.reload import ServeTarget
from beagled.reload.vllm import VllmReloader
from tests.daemon_proc import DaemonProc
from tests.vllm_real import RealVllm
from tests.worker_run import run_worker, spec_for, voice_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
torch = pytest.importorskip("torch")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOLERANCE = 1e-3
PROMPT = "Rewrite in my voice: The meeting moved to Thursday.\n"

SHAPES: dict[str, dict[str, Any]] = {
    "qv-r8": {"rank": 8, "target_modules": ["q_proj", "v_proj"]},
    "all7": {
        "rank": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "last-layer": {"rank": 8, "target_modules": ["q_proj", "v_proj"], "num_layers": 1},
}


def vllm_logprobs(
    server: RealVllm, model: str, prompt_ids: list[int], n: int = 8
) -> tuple[list[int], list[float]]:
    from tests.vllm_real import http

    status, body = http(
        "POST",
        server.url + "/v1/completions",
        {
            "model": model, "prompt": prompt_ids, "max_tokens": n, "temperature": 0.0, "logprobs": 0,
            "return_tokens_as_token_ids": True, "ignore_eos": True,
        },
        timeout=120,
    )  # fmt: skip
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    tokens = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
    return tokens, [float(x) for x in lp["token_logprobs"]]


def reference_logprobs(
    base: Path, adapter: Path | None, prompt_ids: list[int], tokens: list[int]
) -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return [float(logp[start + i, t]) for i, t in enumerate(tokens)]


@pytest.fixture(scope="module")
def prompt_ids(tiny_model: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(tiny_model))(PROMPT)["input_ids"])


def compare(
    server: RealVllm, name: str, base: Path, adapter: Path, prompt_ids: list[int]
) -> tuple[float, float]:
    """(worst |vLLM - reference| per token, worst |adapter - base| per token)."""
    tokens, served = vllm_logprobs(server, name, prompt_ids)
    ref = reference_logprobs(base, adapter, prompt_ids, tokens)
    plain = reference_logprobs(base, None, prompt_ids, tokens)
    return (
        max(abs(a - b) for a, b in zip(served, ref, strict=True)),
        max(abs(a - b) for a, b in zip(ref, plain, strict=True)),
    )


@pytest.mark.parametrize("backend", ["mlx", "peft"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_served_logprobs_match_the_trained_adapter(
    vllm: RealVllm, tiny_model: Path, prompt_ids: list[int], tmp_path: Path, backend: str, shape: str
) -> None:
    hyper = {"steps": 4, "learning_rate": 0.02, **SHAPES[shape]}
    run = run_worker(
        tmp_path, spec_for(backend, tiny_model, tmp_path, voice_data(), f"j-{backend}-{shape}", hyper=hyper)
    )
    assert run.rc == 0, run.stderr[-3000:]
    adapter = run.out_dir

    async def load() -> str:
        reloader = VllmReloader(vllm.url, max_lora_rank=16)
        try:
            return await reloader.reload(ServeTarget("default", 1, adapter.name, adapter))
        finally:
            await reloader.aclose()

    name = trio.run(load)
    worst, moved = compare(vllm, name, tiny_model, adapter, prompt_ids)
    print(
        f"\nFIGURE logprobs backend={backend} shape={shape} worst_diff={worst:.2e} "
        f"adapter_vs_base={moved:.2e}"
    )
    assert worst <= TOLERANCE
    assert moved > 10 * TOLERANCE, "the adapter does not change the logprobs: the comparison shows nothing"


def test_end_to_end_through_the_daemon_serves_what_was_trained(
    make_daemon: Callable[..., DaemonProc], vllm: RealVllm, tiny_model: Path, prompt_ids: list[int]
) -> None:
    d = make_daemon(
        {
            "training": {"backends": ["mlx"], "base_model": str(tiny_model), "heldout_share": 0.0},
            "training.hyper": {"steps": 6, "learning_rate": 0.02},
            "reload": {"method": "vllm", "reconcile_interval_s": 5.0},
            "reload.vllm": {"url": vllm.url},
        }
    )
    with d.client() as c:
        for p in voice_data()["train"][:4]:
            c.submit(bad=p["rejected"], good=p["chosen"], prompt=p["prompt"], key=p["pair_id"])
    (job,) = d.wait_jobs(lambda js: bool(js) and js[0]["state"] in ("reloaded", "failed", "rejected"), 300)
    assert job["state"] == "reloaded", job
    with d.client() as c:
        (v,) = c.voices()["voices"]
    adapter = Path(v["adapter_path"])
    worst, moved = compare(vllm, v["served_name"], tiny_model, adapter, prompt_ids)
    print(
        f"\nFIGURE logprobs e2e daemon backend=mlx shape=qv-r8 worst_diff={worst:.2e} "
        f"adapter_vs_base={moved:.2e}"
    )
    assert worst <= TOLERANCE
    assert moved > 10 * TOLERANCE
