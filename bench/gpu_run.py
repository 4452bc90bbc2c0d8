"""One CUDA GPU, no network: a ~1B Llama-shaped random model, 8 pairs through a real daemon, cold and warm.

    python bench/gpu_run.py [--size 1b|tiny] [--backends unsloth,peft] [--wheels DIR] [--steps 40]
    python bench/gpu_run.py --smoke        # this path end to end on a CPU: tiny model, 4 steps

On a machine with one CUDA GPU where PyTorch, transformers and peft are installed (anything else, such
as trl, datasets, accelerate and beagled's own dependencies, carried as wheels in ``--wheels DIR`` and
installed with ``pip --no-index``; make that directory on a networked machine with
``pip download -d DIR trl datasets accelerate trio sqlalchemy prometheus-client ...``):

1. builds a Llama-shaped model locally with random weights (``--size 1b``: hidden 2048, 16 layers, MLP
   8192, 32 heads / 8 KV heads, an 8k byte-level BPE vocabulary trained on the project's corpus, tied
   embeddings: ~1.0B parameters, saved in bfloat16), with the tiny model's chat template;
2. for each backend in ``--backends`` that imports (Unsloth is skipped with its reason if it does not):
   a daemon with ``training.warm = false`` takes 8 pairs (the 8th cuts the job) and the script times
   submit → trained (cold: a fresh worker process loads the model); then a daemon with
   ``training.warm = true`` takes two such batches, and the second is the warm figure (the worker kept
   the base model on the GPU); the GPU memory peak is the worker's ``torch.cuda.max_memory_allocated``
   (in the job's manifest);
3. prints one table and PASS/FAIL against the target (submit → trained < 60 s) and the whole run's time
   (< 8 min).

``--size tiny`` runs the same path on the CPU with a small model (how its CPU-runnable parts are tested);
``--smoke`` is ``--size tiny --steps 4``. Without CUDA the peft backend trains in float32 on the CPU,
and the script says which figures it could not measure there (the GPU memory peak, bf16) and does not
judge the GPU targets.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SIZES = {
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab": 8192},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab": 512},
}  # fmt: skip


def install_wheels(wheels: Path) -> None:
    need = [m for m in ("trl", "datasets", "accelerate", "trio", "sqlalchemy", "prometheus_client")
            if importlib.util.find_spec(m) is None]  # fmt: skip
    if need:
        print(f"installing from {wheels}: {', '.join(need)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                        str(wheels), *[n.replace("_", "-") for n in need]], check=True)  # fmt: skip


def build_model(out: Path, size: str) -> Path:
    """A Llama-shaped model with seeded random weights and the tiny model's tokenizer recipe."""
    import torch
    import transformers

    from beagled.training import tinymodel

    shape = dict(SIZES[size])
    vocab = shape.pop("vocab")
    out.mkdir(parents=True, exist_ok=True)
    tok = tinymodel._train_tokenizer(vocab, 0)  # byte-level BPE on the project's corpus, no download
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in tinymodel.SPECIAL_TOKENS}
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=ids[tinymodel.BOS], eos_token_id=ids[tinymodel.EOS], pad_token_id=ids[tinymodel.PAD],
        torch_dtype="bfloat16", **shape,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tinymodel.BOS, "eos_token": tinymodel.EOS,
        "pad_token": tinymodel.PAD, "add_bos_token": False, "add_eos_token": False,
        "chat_template": tinymodel.CHAT_TEMPLATE, "model_max_length": 1024,
        "additional_special_tokens": list(tinymodel.ROLE_TOKENS),
    }))  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    print(f"built {size} model: {n / 1e6:,.1f}M parameters in {out}", flush=True)
    return out


def backend_ok(name: str) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "beagled.training.worker", "probe", name],
                          capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    try:
        answer = json.loads(proc.stdout.splitlines()[-1])
    except (IndexError, ValueError):
        return False, proc.stderr[-300:]
    return bool(answer["available"]), str(answer["reason"])


def run_daemon(
    root: Path, base: Path, backend: str, *, warm: bool, batches: int, steps: int
) -> list[dict[str, Any]]:
    """Submit ``batches`` x 8 pairs; for each job: submit of its 8th pair → trained, and its manifest."""
    from _common import Daemon, write_config

    from beagled.client import Client
    from beagled.training.corpus import voice_pairs

    d = Daemon(root)
    write_config(d.config, {
        "daemon": {"state_dir": str(d.state_dir), "socket": str(d.sock), "log_format": "json"},
        "metrics": {"listen": ""},
        "scheduler": {"min_pairs": 8, "max_wait_s": 1e9},
        "training": {"backends": [backend], "base_model": str(base), "warm": warm, "heldout_share": 0.0,
                     "replay_pairs": 0},
        "training.hyper": {"steps": steps, "batch_size": 4, "max_seq_len": 256},
        "reload": {"method": "none"},
    })  # fmt: skip
    d.start()
    out = []
    try:
        d.ready(timeout=600)
        pairs = voice_pairs(8 * batches, seed=5, style="plain")
        with Client(d.sock, timeout=None) as c:
            deadline = time.monotonic() + 600
            while not any(b["available"] for b in c.status()["backends"]):  # the probe, as a running daemon
                if time.monotonic() > deadline:
                    raise SystemExit(f"{backend}: never available: {c.status()['backends']}")
                time.sleep(0.5)
            for b in range(batches):
                for prompt, bad, good in pairs[8 * b : 8 * b + 7]:
                    c.submit(bad=bad, good=good, prompt=prompt, voice="gpu")
                prompt, bad, good = pairs[8 * b + 7]
                t0 = time.perf_counter()
                c.submit(bad=bad, good=good, prompt=prompt, voice="gpu")
                while True:
                    js = c.jobs(voice="gpu")["jobs"]
                    if len(js) > b and js[0]["state"] in (
                        "trained",
                        "promoted",
                        "rejected",
                        "failed",
                        "reloaded",
                    ):
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - t0
                job = c.job(js[0]["job_id"])["job"]
                if job["state"] == "failed":
                    raise SystemExit(f"{backend}: job failed: {job['error']}")
                manifest = json.loads((Path(job["adapter_dir"]) / "manifest.json").read_text())
                out.append({"submit_to_trained_s": elapsed, **manifest, "state": job["state"]})
    finally:
        d.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--backends", default="unsloth,peft")
    ap.add_argument("--wheels", type=Path)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--smoke", action="store_true", help="the whole path on a CPU: --size tiny --steps 4")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.steps = "tiny", 4
    started = time.monotonic()
    if args.wheels:
        install_wheels(args.wheels)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="beagled-gpu-") as d:
        tmp = Path(d)
        base = build_model(tmp / "model", args.size)
        for backend in args.backends.split(","):
            ok, reason = backend_ok(backend)
            if not ok:
                print(f"{backend}: skipped ({reason})", flush=True)
                continue
            print(f"{backend}: {reason}", flush=True)
            (cold,) = run_daemon(
                tmp / f"{backend}-cold", base, backend, warm=False, batches=1, steps=args.steps
            )
            warm = run_daemon(tmp / f"{backend}-warm", base, backend, warm=True, batches=2, steps=args.steps)
            rows.append((backend, cold, warm[-1]))
    header = "| backend | device | cold submit→trained s | warm submit→trained s | train s (warm) | GPU MiB |"
    print("\n" + header)
    print("| --- | --- | --- | --- | --- | --- |")
    for backend, cold, warm in rows:
        print(f"| {backend} | {warm.get('device')} | {cold['submit_to_trained_s']:.1f} | "
              f"{warm['submit_to_trained_s']:.1f} | {warm.get('train_s')} | "
              f"{max(cold.get('gpu_peak_mb') or 0, warm.get('gpu_peak_mb') or 0) or '-'} |")  # fmt: skip
    total = time.monotonic() - started
    best = min((w["submit_to_trained_s"] for _, _, w in rows), default=float("inf"))
    if not torch.cuda.is_available():
        print(f"\nno CUDA device: trained on the CPU in float32 ({args.size} model, {args.steps} steps)")
        print(f"measured: submit → trained cold and warm per backend above; whole run {total:.0f} s")
        print("not measured here: GPU memory peak (no CUDA), bf16 training, Unsloth's GPU path, and the")
        print("1B targets (submit → trained < 60 s, whole run < 8 min): run without --smoke on one GPU")
        if not rows:
            raise SystemExit("no backend ran")
        return
    verdict = "PASS" if best < 60 else "FAIL"
    print(f"\nsubmit → trained (warm, best backend): {best:.1f} s, target < 60 s: {verdict}")
    print(f"whole run: {total:.0f} s, target < 480 s: {'PASS' if total < 480 else 'FAIL'}")


if __name__ == "__main__":
    main()
