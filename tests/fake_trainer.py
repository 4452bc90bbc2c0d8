"""A test fixture, not a product backend: a real subprocess that speaks the worker protocol.

Used as a custom backend (``[training.custom_backends] fake = [python, tests/fake_trainer.py, --mode, ok]``)
so that engine tests run real subprocesses without ML libraries. Modes: ``ok`` (writes an
adapter-shaped PEFT directory and its manifest), ``crash`` (exits 3 after a progress line), ``hang``
(sleeps forever), ``slow:<seconds>`` (progress over that long, then ok), ``garbage`` (a result line but
an adapter that does not match its manifest), ``noresult`` (exit 0, nothing). ``--mode-file F`` reads
the mode from a file at start, so a test can change it between attempts. ``--log F`` appends
``job_id attempt pair_ids`` to F for every run. ``--tiny`` writes a LoRA that real vLLM loads over the
project's tiny model (rank 8, q_proj/v_proj of both layers, weights seeded by the job id);
``--wait-file F`` waits (polling) until F exists before writing the adapter.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

from beagled.manifest import write_manifest


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def write_adapter(out: Path, spec: dict) -> None:  # type: ignore[type-arg]
    out.mkdir(parents=True)
    r = spec["hyper"]["rank"]
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": spec["hyper"]["alpha"],
                "target_modules": spec["hyper"]["target_modules"],
                "base_model_name_or_path": spec["base_model"],
            }
        )
    )
    tensors = {}
    blob = b""
    for name, shape in (
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", [r, 4]),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", [4, r]),
    ):
        n = shape[0] * shape[1]
        data = struct.pack(f"<{n}f", *([0.01] * n))
        tensors[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    header = json.dumps(tensors).encode()
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + blob)


def write_tiny_adapter(out: Path, spec: dict) -> None:  # type: ignore[type-arg]
    """A rank-8 q_proj/v_proj LoRA for the tiny model (hidden 64, one 32-wide kv head, 2 layers)."""
    import zlib

    out.mkdir(parents=True)
    r = 8
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": spec["base_model"],
            }
        )
    )
    seed = zlib.crc32(spec["job_id"].encode())
    tensors = {}
    blob = b""
    for layer in (0, 1):
        for module, n_out in (("q_proj", 64), ("v_proj", 32)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            for name, shape in ((f"{key}.lora_A.weight", [r, 64]), (f"{key}.lora_B.weight", [n_out, r])):
                n = shape[0] * shape[1]
                values = [((seed * 2654435761 + i * 40503) % 2001 - 1000) / 20000 for i in range(n)]
                data = struct.pack(f"<{n}f", *values)
                offsets = [len(blob), len(blob) + len(data)]
                tensors[name] = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
                blob += data
    header = json.dumps(tensors).encode()
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + blob)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--mode-file")
    ap.add_argument("--log")
    ap.add_argument("--eval-loss", type=float, default=1.0)
    ap.add_argument("--baseline-loss", type=float, default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--wait-file")
    ap.add_argument("spec")
    a = ap.parse_args()
    mode = Path(a.mode_file).read_text().strip() if a.mode_file else a.mode
    spec = json.loads(Path(a.spec).read_text())
    if a.log:
        with open(a.log, "a") as f:
            f.write(f"{spec['job_id']} {spec['attempt']} {','.join(p['pair_id'] for p in spec['train'])}\n")
    total = 4
    emit({"type": "progress", "step": 1, "total": total, "loss": 2.0, "tokens_per_s": 100.0})
    if mode == "crash":
        sys.stderr.write("fake trainer: crashing as told\n")
        return 3
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "noresult":
        return 0
    if mode.startswith("slow:"):
        secs = float(mode.split(":")[1])
        for step in range(2, total + 1):
            time.sleep(secs / total)
            emit(
                {"type": "progress", "step": step, "total": total, "loss": 2.0 / step, "tokens_per_s": 100.0}
            )
    if a.wait_file:
        while not Path(a.wait_file).exists():
            time.sleep(0.05)  # a file the test creates: no other signal crosses the process boundary
    out = Path(spec["out_dir"])
    (write_tiny_adapter if a.tiny else write_adapter)(out, spec)
    write_manifest(
        out,
        {
            "job_id": spec["job_id"],
            "voice": spec["voice"],
            "backend": "fake",
            "base_model": spec["base_model"],
            "served_base": spec.get("served_base"),
            "pair_ids": [p["pair_id"] for p in spec["train"]],
        },
    )
    if mode == "garbage":
        (out / "adapter_model.safetensors").write_bytes(b"not what the manifest says")
    baseline = (
        a.baseline_loss if a.baseline_loss is not None else (a.eval_loss + 0.5 if spec["heldout"] else None)
    )
    emit(
        {
            "type": "result",
            "train_loss": 0.5,
            "eval_loss": a.eval_loss if spec["heldout"] else None,
            "baseline_eval_loss": baseline,
            "base_eval_loss": 3.0,
            "steps": total,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
