"""The torch backends on the tiny model: the objective table, and warm vs cold vs a direct TRL script.

    .venv/bin/python bench/torch_jobs.py objectives [--steps 40] [--jobs 3] [--objectives sft,dpo,sft+dpo]
    .venv/bin/python bench/torch_jobs.py warm-cold [--steps 40] [--repeat 3]
    .venv-unsloth/bin/python bench/torch_jobs.py warm-cold --backend unsloth   # Unsloth (CPU fallback here)

``objectives``: for each of ``sft``, ``dpo`` and ``sft+dpo`` (``dpo_weight`` 1), three jobs of the
synthetic voice (16 new pairs each, ``init_adapter`` and ``served_adapter`` = the previous job's adapter,
as a daemon with ``training.init = "current"`` chains them) through one warm ``peft`` worker, every
job judged on the same 8 held-out pairs; prints held-out loss (mean NLL of the better drafts) and
preference accuracy (DPO implicit reward: the share of held-out pairs where the adapter raises the better
draft's log-likelihood over the base's more than the worse draft's) after each job, beside the base.

``warm-cold``: the same job (16 pairs, the daemon's default hyper-parameters) three ways, side by side:
``worker train`` in a fresh process (cold: imports, model load, train, eval, save), the second job of a
warm ``worker serve peft`` (the base already loaded), and a direct TRL script (``_direct_trl.py``:
imports, load, ``SFTTrainer`` with the same LoRA, data and hyper-parameters, save; no evaluation).
Each is wall time from the request to the adapter on disk; the warm adapter must equal the cold one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from beagled.training.corpus import voice_pairs  # noqa: E402
from beagled.training.tinymodel import ensure_tiny_model  # noqa: E402

HYPER = {  # the daemon's defaults (beagled.config.HyperConfig)
    "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "num_layers": -1,
    "learning_rate": 2e-3, "steps": 40, "batch_size": 4, "max_seq_len": 256, "seed": 0,
}  # fmt: skip


def env() -> dict[str, str]:  # (Unsloth's CPU fallback allowed, for --backend unsloth on a CPU machine)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "BEAGLED_UNSLOTH_ALLOW_CPU": "1"}


def rows(pairs: list[tuple[str, str, str]], prefix: str) -> list[dict[str, str]]:
    return [
        {"pair_id": f"{prefix}{i}", "prompt": p, "chosen": good, "rejected": bad}
        for i, (p, bad, good) in enumerate(pairs)
    ]


def spec(base: Path, out: Path, job: str, train: list[dict[str, str]], heldout: list[dict[str, str]],
         **changes: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "job_id": job, "voice": "bench", "attempt": 1, "backend": "peft", "base_model": str(base),
        "out_dir": str(out / job), "init_adapter": None, "served_adapter": None, "objective": "sft",
        "train": train, "heldout": heldout, "hyper": {**HYPER, **changes.pop("hyper", {})}, **changes,
    }  # fmt: skip


class Warm:
    """One ``worker serve BACKEND`` process; ``job(spec)`` sends a spec and waits for its result line."""

    def __init__(self, cwd: Path, backend: str = "peft") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "beagled.training.worker", "serve", backend],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env(), cwd=cwd,
        )  # fmt: skip
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        ready = json.loads(self.stdout.readline())
        assert ready["type"] == "ready", ready

    def job(self, s: dict[str, Any]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        self.stdin.write(json.dumps(s) + "\n")
        self.stdin.flush()
        while True:
            line = json.loads(self.stdout.readline())
            if line["type"] == "result":
                return line, time.perf_counter() - t0
            if line["type"] == "error":
                raise RuntimeError(line["message"])

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(60)


def objectives(args: argparse.Namespace, base: Path, tmp: Path) -> None:
    pairs = voice_pairs(16 * args.jobs + 8, seed=11, style="plain")
    heldout = rows(pairs[-8:], "h")
    print(
        f"# {args.jobs} jobs x 16 pairs per objective, {args.steps} steps each, 8 held-out pairs, peft, CPU"
    )
    print(f"{'objective':9} {'job':>3} {'base loss':>9} {'loss':>7} {'pref acc':>8} {'served acc':>10} s")
    table = []
    warm = Warm(tmp)
    try:
        for objective in args.objectives.split(","):
            prev: str | None = None
            result: dict[str, Any] = {}
            for n in range(args.jobs):
                train = rows(pairs[16 * n : 16 * (n + 1)], f"t{n}-")
                s = spec(base, tmp / objective.replace("+", "_"), f"j{n}", train, heldout,
                         objective=objective, init_adapter=prev, served_adapter=prev,
                         hyper={"steps": args.steps})  # fmt: skip
                result, wall = warm.job(s)
                prev = s["out_dir"]
                r = result
                print(f"{objective:9} {n + 1:>3} {r['base_eval_loss']:>9.3f} {r['eval_loss']:>7.3f} "
                      f"{r['preference_accuracy']:>8.3f} {r['baseline_preference_accuracy']:>10.3f} "
                      f"{wall:.1f}")  # fmt: skip
            table.append((objective, result))
    finally:
        warm.close()
    print("\n| objective | base held-out loss | held-out loss after 3 jobs | base pref. accuracy | "
          "pref. accuracy after 3 jobs |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for objective, r in table:
        print(f"| {objective} | {r['base_eval_loss']:.3f} | {r['eval_loss']:.3f} | 0.000 | "
              f"{r['preference_accuracy']:.3f} |")  # fmt: skip


def warm_cold(args: argparse.Namespace, base: Path, tmp: Path) -> None:
    from safetensors.numpy import load_file

    pairs = voice_pairs(16 + 8 + 16, seed=12, style="plain")
    train, heldout, other = rows(pairs[:16], "t"), rows(pairs[16:24], "h"), rows(pairs[24:], "o")
    cold_s, warm_s, direct_s, train_s = [], [], [], {"cold": [], "warm": []}
    diffs: list[float] = []
    direct_error = ""
    b = args.backend
    warm = Warm(tmp, b)
    try:
        warm.job(spec(base, tmp / "warmup", "w0", other, heldout, hyper={"steps": 2}, backend=b))  # load
        for r in range(args.repeat):
            s = spec(base, tmp / f"cold{r}", "j", train, heldout, hyper={"steps": args.steps}, backend=b)
            path = tmp / f"cold{r}.json"
            path.write_text(json.dumps(s))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "beagled.training.worker", "train", str(path)],
                                  capture_output=True, text=True, env=env(), cwd=tmp, check=True)  # fmt: skip
            cold_s.append(time.perf_counter() - t0)
            cold = json.loads(proc.stdout.splitlines()[-1])
            train_s["cold"].append(cold["train_s"])
            w = spec(base, tmp / f"warm{r}", "j", train, heldout, hyper={"steps": args.steps}, backend=b)
            result, wall = warm.job(w)
            warm_s.append(wall)
            train_s["warm"].append(result["train_s"])
            cold_w = load_file(str(Path(s["out_dir"]) / "adapter_model.safetensors"))
            warm_w = load_file(str(Path(w["out_dir"]) / "adapter_model.safetensors"))
            diff = max(float(abs(cold_w[k] - warm_w[k]).max()) for k in cold_w)
            diffs.append(diff)
            assert diff < 1e-6, f"warm adapter differs from cold by {diff}"
            data = tmp / f"direct{r}.json"
            data.write_text(json.dumps({"base": str(base), "out": str(tmp / f"direct{r}"), "train": train,
                                        "hyper": {**HYPER, "steps": args.steps}}))  # fmt: skip
            t0 = time.perf_counter()
            direct_argv = [sys.executable, str(REPO / "bench" / "_direct_trl.py"), str(data)]
            direct = subprocess.run(direct_argv + (["--unsloth"] if b == "unsloth" else []),
                                    capture_output=True, text=True, env=env(), check=False)  # fmt: skip
            if direct.returncode == 0:
                direct_s.append(time.perf_counter() - t0)
            else:  # say why, and still print the rest of the table
                direct_error = (direct.stderr.strip().splitlines() or ["no stderr"])[-1][:200]
                print(f"direct TRL script failed: {direct_error}", file=sys.stderr)
    finally:
        warm.close()
    med = statistics.median
    print(
        f"# one job: 16 pairs, {args.steps} steps, {b}, CPU, median of {args.repeat}; warm == cold adapters"
        f" (max abs difference {max(diffs):.3g})"
    )
    print("| run | wall s (request → adapter on disk) | of which training s |")
    print("| --- | --- | --- |")
    print(f"| cold (`worker train`, fresh process) | {med(cold_s):.2f} | {med(train_s['cold']):.2f} |")
    print(f"| warm (`worker serve {b}`, 2nd+ job) | {med(warm_s):.2f} | {med(train_s['warm']):.2f} |")
    direct_cell = f"{med(direct_s):.2f}" if direct_s else f"failed: {direct_error}"
    direct_name = "direct TRL script, Unsloth imported first" if b == "unsloth" else "direct TRL script"
    print(f"| {direct_name} (no eval) | {direct_cell} | - |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["objectives", "warm-cold"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--objectives", default="sft,dpo,sft+dpo")
    ap.add_argument("--backend", default="peft", choices=["peft", "unsloth"], help="warm-cold only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="beagled-bench-torch-") as d:
        tmp = Path(d)
        base = ensure_tiny_model(tmp / "models")
        (objectives if args.what == "objectives" else warm_cold)(args, base, tmp)


if __name__ == "__main__":
    main()
