"""Training-spec pieces shared by the MLX tests (backend and warm trainer): synthetic pair rows and the
tiny LoRA hyperparameters the real tiny model trains with."""

from __future__ import annotations

from typing import Any

from beagled.training.corpus import voice_pairs

MLX_HYPER: dict[str, Any] = {
    "rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "num_layers": -1,
    "learning_rate": 0.005, "steps": 40, "batch_size": 4, "max_seq_len": 256, "seed": 0,
}  # fmt: skip


def pair_rows(n: int, seed: int, start: int = 0, style: str = "plain") -> list[dict[str, str]]:
    """``n`` synthetic pairs of ``style`` as a spec's rows, ids ``p<start>``, ``p<start+1>``, …"""
    return [
        {"pair_id": f"p{start + i}", "prompt": prompt, "rejected": bad, "chosen": good}
        for i, (prompt, bad, good) in enumerate(voice_pairs(n, seed=seed, style=style))
    ]
