"""Running a training worker as a real subprocess in tests: spec building, JSON-lines parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    rc: int
    lines: list[dict[str, Any]]
    stderr: str
    out_dir: Path

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["type"] == kind]

    @property
    def result(self) -> dict[str, Any]:
        results = self.of_type("result")
        assert len(results) == 1, (self.lines, self.stderr[-3000:])
        assert self.lines[-1] is results[0], "the result line is the last line"
        return results[0]


def worker_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    for name in drop:
        env.pop(name, None)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def _worker(
    tmp: Path, args: list[str], *, timeout: float, env: dict[str, str] | None, stdin: str | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    """``python -m beagled.training.worker ARGS`` in ``tmp``: its exit status, stdout lines, stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "beagled.training.worker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env=env or worker_env(),
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is JSON lines only
    return proc.returncode, lines, proc.stderr


def run_worker(
    tmp: Path, spec: dict[str, Any], *, timeout: float = 300, env: dict[str, str] | None = None
) -> Run:
    spec_path = tmp / f"{spec['job_id']}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    rc, lines, stderr = _worker(tmp, ["train", str(spec_path)], timeout=timeout, env=env)
    return Run(rc, lines, stderr, Path(spec["out_dir"]))


def rows(pairs: list[tuple[str, str, str]], prefix: str) -> list[dict[str, str]]:
    return [
        {"pair_id": f"{prefix}{i}", "prompt": p, "chosen": good, "rejected": bad}
        for i, (p, bad, good) in enumerate(pairs)
    ]


def voice_data() -> dict[str, list[dict[str, str]]]:
    """32 training and 8 held-out pairs of the plain synthetic voice (the backend tests' data)."""
    from beagled.training.corpus import voice_pairs

    pairs = voice_pairs(40, seed=1, style="plain")
    return {"train": rows(pairs[:32], "t"), "heldout": rows(pairs[32:], "h")}


def spec_for(
    backend: str,
    base: Path,
    out_dir: Path,
    data: dict[str, list[dict[str, str]]],
    job_id: str,
    **overrides: Any,
) -> dict[str, Any]:
    hyper = {
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "num_layers": -1,
        "learning_rate": 0.002,
        "steps": 24,
        "batch_size": 4,
        "max_seq_len": 256,
        "seed": 0,
        **overrides.pop("hyper", {}),
    }
    return {
        "job_id": job_id,
        "voice": "default",
        "attempt": 1,
        "backend": backend,
        "base_model": str(base),
        "out_dir": str(out_dir / f"{job_id}.partial-1"),
        "init_adapter": None,
        "served_adapter": None,
        "objective": "sft",
        "train": data["train"],
        "heldout": data["heldout"],
        "hyper": hyper,
        **overrides,
    }


def serve_jobs(
    tmp: Path,
    backend: str,
    specs: list[dict[str, Any]],
    *,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> list[Run]:
    """Run ``specs`` one after another through one warm worker (``worker serve BACKEND``)."""
    stdin = "".join(json.dumps(spec) + "\n" for spec in specs)
    rc, lines, stderr = _worker(tmp, ["serve", backend], timeout=timeout, env=env, stdin=stdin)
    assert rc == 0 and lines[0]["type"] == "ready", (lines[:3], stderr[-3000:])
    runs, current = [], []
    for line in lines[1:]:
        current.append(line)
        if line["type"] in ("result", "error"):
            runs.append(Run(0 if line["type"] == "result" else 1, current, stderr, Path("")))
            current = []
    assert len(runs) == len(specs), (lines, stderr[-3000:])
    for run, spec in zip(runs, specs, strict=True):
        run.out_dir = Path(spec["out_dir"])
    return runs
