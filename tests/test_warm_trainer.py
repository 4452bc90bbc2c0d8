"""The warm trainer (``SubprocessTrainer(warm=True)`` + ``worker serve mlx``) on the real tiny model.

A warm worker must train the same adapter as a cold process for the same spec, even after another job
changed its state; a worker killed, cancelled or timed out mid-job fails that try cleanly (its whole
process group gone) and the next job gets a fresh worker; ``warm_max_jobs`` recycles it; a worker that
cannot start makes the job run cold; orphan reaping finds it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from safetensors.numpy import load_file

from beagled.errors import TrainingError
from beagled.training.runner import SubprocessTrainer, reap_orphans
from beagled.training_spec import TrainingSpec
from tests.spec_cases import MLX_HYPER, pair_rows

HYPER = {**MLX_HYPER, "steps": 4, "max_seq_len": 128}  # short jobs: a warm worker is what is tested


def spec_for(tiny_model: Path, out_dir: Path, job: str, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "job_id": job, "voice": "default", "attempt": 1, "base_model": str(tiny_model),
        "out_dir": str(out_dir), "init_adapter": None, "served_adapter": None, "objective": "sft",
        "train": pair_rows(8, seed=1), "heldout": pair_rows(3, seed=2, start=100), "hyper": dict(HYPER),
    }  # fmt: skip
    spec.update(changes)
    return spec


def training_spec(tiny_model: Path, out_dir: Path, job: str, **changes: Any) -> TrainingSpec:
    """``spec_for`` as the engine hands it to a trainer."""
    return TrainingSpec.from_json(spec_for(tiny_model, out_dir, job, **changes))


def trainer(tmp: Path, **kw: Any) -> SubprocessTrainer:
    kw.setdefault("warm", True)
    kw.setdefault("timeout_s", 240.0)
    return SubprocessTrainer(["mlx"], spec_dir=tmp / "specs", **kw)


Callback = Callable[[dict[str, Any]], None]


def _ignore(_msg: dict[str, Any]) -> None:
    pass


async def run_job(t: SubprocessTrainer, spec: dict[str, Any], cb: Callback = _ignore) -> dict[str, Any]:
    return await t.run("mlx", TrainingSpec.from_json(spec), cb)


def alive(pid: int) -> bool:
    """Does the process (a group leader) still run? A zombie waiting for its parent does not."""
    try:
        os.killpg(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state not in ("Z", "X")


def poll_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_warm_adapter_equals_cold(tiny_model: Path, tmp_path: Path) -> None:
    """Second job on a warm worker (after a different first job) == the same spec in a cold process."""
    first_out = tmp_path / "a" / "adapter"
    second = {
        "init_adapter": str(first_out),  # continue from the first job's adapter, judged against it
        "served_adapter": str(first_out),
        "train": pair_rows(12, seed=5),
        "hyper": {**HYPER, "steps": 5, "seed": 3, "learning_rate": 0.003},
    }
    progress: dict[str, list[float]] = {"warm": [], "cold": []}

    async def main() -> tuple[dict[str, Any], dict[str, Any], list[int]]:
        warm = trainer(tmp_path)
        try:
            first = spec_for(
                tiny_model, first_out, "j-a", train=pair_rows(10, seed=9, style="shifted"),
                hyper={**HYPER, "steps": 3, "seed": 7, "batch_size": 2},
            )  # fmt: skip
            r1 = await run_job(warm, first)
            r2 = await run_job(
                warm,
                spec_for(tiny_model, tmp_path / "b-warm" / "adapter", "j-b", **second),
                lambda m: progress["warm"].append(m["loss"]),
            )
        finally:
            await warm.aclose()
        cold = trainer(tmp_path, warm=False)
        rc = await run_job(
            cold,
            spec_for(tiny_model, tmp_path / "b-cold" / "adapter", "j-b", **second),
            lambda m: progress["cold"].append(m["loss"]),
        )
        assert "worker_pid" not in rc  # it really ran cold
        return r2, rc, [r1["worker_pid"], r2["worker_pid"]]

    r_warm, r_cold, pids = trio.run(main)
    assert pids[0] == pids[1], "both jobs ran on one warm worker"
    assert r_warm["timings"]["load_s"] < r_cold["timings"]["load_s"] or r_warm["timings"]["load_s"] < 0.05
    w = load_file(str(tmp_path / "b-warm" / "adapter" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "b-cold" / "adapter" / "adapter_model.safetensors"))
    assert sorted(w) == sorted(c) and w
    for key in w:
        assert w[key].shape == c[key].shape
        assert float(np.max(np.abs(w[key] - c[key]))) <= 1e-5, key
    for key in ("train_loss", "eval_loss", "baseline_eval_loss", "base_eval_loss"):
        assert r_warm[key] == pytest.approx(r_cold[key], abs=1e-5), key
    assert r_warm["baseline_eval_loss"] != pytest.approx(r_warm["base_eval_loss"])  # served adapter used
    assert progress["warm"] == pytest.approx(progress["cold"], abs=1e-5) and len(progress["warm"]) == 5
    mw = json.loads((tmp_path / "b-warm" / "adapter" / "manifest.json").read_text())
    mc = json.loads((tmp_path / "b-cold" / "adapter" / "manifest.json").read_text())
    assert mw["base_model_sha256"] == mc["base_model_sha256"]
    assert not list((tmp_path / "specs").glob("warm-*")), "aclose removed the worker's records"


def test_killed_mid_job_fails_cleanly_and_next_job_gets_a_fresh_worker(
    tiny_model: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        t = trainer(tmp_path)
        try:
            killed: list[int] = []

            def kill_on_first_step(_msg: dict[str, Any]) -> None:
                pid = t.warm_pid("mlx")
                if pid and not killed:
                    killed.append(pid)
                    os.killpg(pid, signal.SIGKILL)

            long = spec_for(tiny_model, tmp_path / "k" / "adapter", "j-k", hyper={**HYPER, "steps": 5000})
            with pytest.raises(TrainingError, match="killed by signal 9") as info:
                await run_job(t, long, kill_on_first_step)
            assert not info.value.timeout
            assert killed and not alive(killed[0])
            records = [r.read_text() for r in (tmp_path / "specs").glob("*.pgid")]
            assert not [r for r in records if r.startswith(f"{killed[0]}\n")], records
            ok = await run_job(t, spec_for(tiny_model, tmp_path / "ok" / "adapter", "j-ok"))
            assert ok["worker_pid"] != killed[0]
            assert (tmp_path / "ok" / "adapter" / "manifest.json").is_file()

            # cancelled mid-job (daemon shutdown): the group is killed, nothing leaks
            pid = t.warm_pid("mlx")
            assert pid is not None
            with trio.move_on_after(60) as scope:
                started = trio.Event()
                async with trio.open_nursery() as nursery:

                    async def job() -> None:
                        hyper = {**HYPER, "steps": 5000}
                        spec = spec_for(tiny_model, tmp_path / "c" / "adapter", "j-c", hyper=hyper)
                        await run_job(t, spec, lambda _m: started.set())

                    nursery.start_soon(job)
                    await started.wait()
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
            assert not alive(pid)
            assert t.warm_pid("mlx") is None
        finally:
            await t.aclose()

    trio.run(main)


def test_warm_max_jobs_recycles_the_worker(tiny_model: Path, tmp_path: Path) -> None:
    async def main() -> list[int]:
        t = trainer(tmp_path, warm_max_jobs=2)
        try:
            pids = []
            for i in range(3):
                r = await run_job(t, spec_for(tiny_model, tmp_path / f"r{i}" / "adapter", f"j-{i}"))
                pids.append(int(r["worker_pid"]))
            return pids
        finally:
            await t.aclose()

    pids = trio.run(main)
    assert pids[0] == pids[1] != pids[2]
    assert poll_dead(pids[0]) and poll_dead(pids[2])


def test_timeout_kills_the_warm_worker(tiny_model: Path, tmp_path: Path) -> None:
    async def main() -> None:
        t = trainer(tmp_path, timeout_s=3.0)
        try:
            await t.start_warm("mlx")
            pid = t.warm_pid("mlx")
            assert pid is not None
            long = spec_for(tiny_model, tmp_path / "t" / "adapter", "j-t", hyper={**HYPER, "steps": 100000})
            with pytest.raises(TrainingError, match="timed out") as info:
                await run_job(t, long)
            assert info.value.timeout
            assert poll_dead(pid)
            assert t.warm_pid("mlx") != pid
        finally:
            await t.aclose()

    trio.run(main)


def test_warm_worker_that_cannot_start_falls_back_to_cold(tiny_model: Path, tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/bin/sh\n[ "$3" = serve ] && {{ echo "no warm here" >&2; exit 3; }}\nexec {sys.executable} "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)

    async def main() -> dict[str, Any]:
        t = trainer(tmp_path, python=str(fake))
        try:
            return await run_job(t, spec_for(tiny_model, tmp_path / "f" / "adapter", "j-f"))
        finally:
            await t.aclose()

    result = trio.run(main)
    assert "worker_pid" not in result  # trained by the cold path
    assert (tmp_path / "f" / "adapter" / "manifest.json").is_file()


def test_orphaned_warm_worker_is_reaped(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves its warm worker; the next daemon's reaping kills its group."""

    async def main() -> None:
        t = trainer(tmp_path)
        try:
            await t.start_warm("mlx")
            pid = t.warm_pid("mlx")
            assert pid is not None and alive(pid)
            assert reap_orphans(tmp_path / "specs") == 1  # what the next daemon does at start
            assert poll_dead(pid)
            assert not list((tmp_path / "specs").glob("warm-*"))
        finally:
            await t.aclose()

    trio.run(main)
