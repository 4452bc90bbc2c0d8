"""Do mlx and peft move the voice equally? The same job on both, measured by each and from outside.

    .venv/bin/python bench/backends_agree.py [--steps 40] [--pairs 16] [--seeds 0,1,2]

One job (the same pairs, prompts and hyper-parameters: the daemon's defaults) is trained by
``worker train`` on ``mlx`` and on ``peft``. Each adapter (both are PEFT format) is then scored by PEFT
in transformers over the base, on the held-out pairs:

- **prompted**: the better drafts after their prompts, rendered as the backends render them (the chat
  template; the loss on the completion only): what the daemon's own evaluation measures;
- **unprompted**: the better drafts alone (``bos + draft + eos``, every token but the first scored):
  the voice as such, whatever the prompt.

Printed per backend and seed (``hyper.seed``: the LoRA init draws and the batch order): mean NLL
before (base) → after (adapter) both ways, the backend's own reported held-out loss and preference
accuracy, and whether both backends rendered the same token ids; then each backend's mean and spread
over the seeds, which says whether a gap between the backends is larger than one backend's seed noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from beagled.training.corpus import voice_pairs  # noqa: E402
from beagled.training.tinymodel import ensure_tiny_model  # noqa: E402

HYPER = {
    "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "num_layers": -1,
    "learning_rate": 2e-3, "steps": 40, "batch_size": 4, "max_seq_len": 256, "seed": 0,
}  # fmt: skip


def rows(pairs: list[tuple[str, str, str]], prefix: str) -> list[dict[str, str]]:
    return [
        {"pair_id": f"{prefix}{i}", "prompt": p, "chosen": good, "rejected": bad}
        for i, (p, bad, good) in enumerate(pairs)
    ]


def train(
    backend: str, base: Path, tmp: Path, data: dict[str, Any], steps: int, seed: int,
    *, tag: str = "", init: Path | None = None, batch_size: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    name = f"{backend}-{seed}{tag}"
    spec = {
        "job_id": f"j-{name}", "voice": "bench", "attempt": 1, "backend": backend,
        "base_model": str(base), "out_dir": str(tmp / name), "init_adapter": str(init) if init else None,
        "served_adapter": None, "objective": "sft", **data,
        "hyper": {**HYPER, "steps": steps, "seed": seed, "batch_size": batch_size or HYPER["batch_size"]},
    }  # fmt: skip
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "beagled.training.worker", "train", str(path)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    last = json.loads(proc.stdout.splitlines()[-1])
    if last["type"] != "result":
        raise SystemExit(f"{backend}: {last}\n{proc.stderr[-2000:]}")
    return {**last, "out_dir": spec["out_dir"]}


def fresh_adapter(base: Path, out: Path, seed: int) -> Path:
    """A fresh PEFT LoRA (A drawn as peft draws it, B = 0) for both backends to start from."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", r=HYPER["rank"], lora_alpha=HYPER["alpha"],
                        lora_dropout=0.0, target_modules=HYPER["target_modules"], bias="none")  # fmt: skip
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def lora_deltas(adapter: Path) -> dict[str, Any]:
    """Each module's weight change ``scale · B·A`` (what the adapter adds to the base)."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    w = load_file(str(adapter / "adapter_model.safetensors"))
    return {k: scale * (w[k.replace("lora_A", "lora_B")] @ w[k]) for k in w if "lora_A" in k}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seeds", default="0", help="comma-separated hyper.seed values, each run on both")
    ap.add_argument("--controlled", action="store_true",
                    help="also: both backends from one fresh LoRA init, one full batch per step")  # fmt: skip
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",") if x]
    import numpy as np
    import torch
    import transformers
    from peft import PeftModel

    from beagled.training.torch_common import completion_logprobs, encode_example, n_loss_tokens

    with tempfile.TemporaryDirectory(prefix="beagled-bench-agree-") as d:
        tmp = Path(d)
        base = ensure_tiny_model(tmp / "models")
        pairs = voice_pairs(args.pairs + 8, seed=21, style="plain")
        data = {"train": rows(pairs[: args.pairs], "t"), "heldout": rows(pairs[args.pairs :], "h")}
        results = {
            (b, str(sd)): train(b, base, tmp, data, args.steps, sd) for sd in seeds for b in ("mlx", "peft")
        }
        if args.controlled:  # one start, the same batches: a gap left is the objective's or optimiser's
            init = fresh_adapter(base, tmp / "init", 0)
            for b in ("mlx", "peft"):
                results[(b, "same init, full batch")] = train(
                    b, base, tmp, data, args.steps, 0, tag="-ctl", init=init, batch_size=args.pairs
                )

        tok = transformers.AutoTokenizer.from_pretrained(str(base))
        eos, bos = tok.eos_token_id, tok.bos_token_id
        held = data["heldout"]
        prompted = [encode_example(tok, p["prompt"], p["chosen"], 256) for p in held]
        bare = []
        for p in held:
            ids = [bos, *tok(p["chosen"], add_special_tokens=False)["input_ids"], eos]
            bare.append((ids, [-100, *ids[1:]]))

        def nll(model: Any, examples: list[tuple[list[int], list[int]]]) -> float:
            lp = completion_logprobs(model, examples, int(tok.pad_token_id or 0), 8)
            return -sum(lp) / sum(n_loss_tokens(e) for e in examples)

        from beagled.training.backend_mlx import Encoder

        class Wrapped:  # how mlx-lm hands the backend its tokenizer
            _tokenizer = tok

        mlx_enc = Encoder(Wrapped(), 256)
        same = all(
            mlx_enc.encode(p["prompt"], p["chosen"])[0]
            == encode_example(tok, p["prompt"], p["chosen"], 256)[0]
            for p in data["train"] + held
        )
        print(f"# one job: {args.pairs} pairs, {args.steps} steps, 8 held-out pairs, seeds {seeds}; "
              f"mlx and peft render identical token ids: {same}")  # fmt: skip
        print("| backend | seed | prompted NLL base → adapter | unprompted NLL base → adapter | "
              "own eval_loss | own pref. accuracy |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        deltas: dict[str, list[tuple[float, float]]] = {"mlx": [], "peft": []}
        for (backend, seed), r in results.items():
            controlled = not seed.isdigit()
            model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            p0, u0 = nll(model, prompted), nll(model, bare)
            tuned = PeftModel.from_pretrained(model, r["out_dir"])
            p1, u1 = nll(tuned, prompted), nll(tuned, bare)
            if not controlled:
                deltas[backend].append((p1 - p0, u1 - u0))
            print(f"| {backend} | {seed} | {p0:.3f} → {p1:.3f} ({p1 - p0:+.3f}) | "
                  f"{u0:.3f} → {u1:.3f} ({u1 - u0:+.3f}) | "
                  f"{r['eval_loss']:.3f} | {r['preference_accuracy']:.3f} |")  # fmt: skip
        if len(seeds) > 1:
            print("\n| backend | prompted Δ mean (min … max) | unprompted Δ mean (min … max) |")
            print("| --- | --- | --- |")
            for backend, ds in deltas.items():
                cells = []
                for k in (0, 1):
                    xs = [d[k] for d in ds]
                    cells.append(f"{sum(xs) / len(xs):+.3f} ({min(xs):+.3f} … {max(xs):+.3f})")
                print(f"| {backend} | {cells[0]} | {cells[1]} |")
        if args.controlled:
            a = lora_deltas(Path(results[("mlx", "same init, full batch")]["out_dir"]))
            b = lora_deltas(Path(results[("peft", "same init, full batch")]["out_dir"]))
            rel = max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b)
            cos = min(float((a[k] * b[k]).sum() / np.sqrt((a[k] ** 2).sum() * (b[k] ** 2).sum())) for k in b)
            print(f"\nsame init, full batch: {len(b)} LoRA modules; the backends' weight changes differ by "
                  f"at most {rel:.2e} of the largest entry, cosine ≥ {cos:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
