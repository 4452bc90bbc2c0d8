"""What the real-worker tests of the torch backends share (tests/test_backend_peft.py and
tests/test_backend_unsloth.py): the ``base_model`` and ``data`` fixtures, a ``worker probe`` run, the
adapter directory's files, a job continuing from an adapter and the warm-worker-against-cold-run case.

Stdlib and pytest only at import time (plus tests.worker_run, itself stdlib): test_backend_unsloth runs
in ``.venv-unsloth``, whose packages are not the main environment's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.worker_run import Run, serve_jobs, spec_for, voice_data

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]  # and nothing else


@pytest.fixture(scope="module")
def base_model(tiny_model: Path) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, str]]]:
    return voice_data()


def probe_worker(backend: str, *, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """The answer of ``worker probe BACKEND``: its stdout is that one JSON line and nothing else."""
    proc = subprocess.run(
        [sys.executable, "-m", "beagled.training.worker", "probe", backend],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
    )
    (answer,) = [json.loads(line) for line in proc.stdout.splitlines()]
    return answer


def adapter_files(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir())


def continue_spec(
    backend: str, base_model: Path, data: dict[str, Any], tmp: Path, first: Run, job_id: str, **more: Any
) -> dict[str, Any]:
    """A job that trains ``first``'s adapter further for 8 steps, with it as the served adapter."""
    adapter = str(first.out_dir)
    more.update(init_adapter=adapter, served_adapter=adapter, hyper={"steps": 8})
    return spec_for(backend, base_model, tmp, data, job_id, **more)


def warm_matches_cold(
    backend: str,
    base_model: Path,
    data: dict[str, Any],
    tmp: Path,
    cold: Run,
    *,
    job_prefix: str,
    same_keys: Iterable[str],
    weight_names: set[str] | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    """Two jobs through one warm worker: another one first (DPO, another seed), then ``cold``'s spec
    again (another out_dir). One process, the base loaded once, and the second job's adapter and the
    results named in ``same_keys`` are ``cold``'s (its weights named ``weight_names``, if given).
    Returns the second job's run."""
    from safetensors.numpy import load_file

    def spec(name: str, **overrides: Any) -> dict[str, Any]:
        return spec_for(backend, base_model, tmp / name, data, f"{job_prefix}-{name}", **overrides)

    other = spec("a", objective="dpo", hyper={"steps": 3, "seed": 7})
    same = spec("b", siblings=data["heldout"][:3])
    first, second = serve_jobs(tmp, backend, [other, same], env=env)
    assert first.rc == 0 and second.rc == 0, second.lines[-3:]
    assert first.result["worker_pid"] == second.result["worker_pid"]  # one process, the base loaded once
    assert second.result["load_s"] < first.result["load_s"] / 5, (first.result, second.result)
    warm_weights = load_file(str(second.out_dir / "adapter_model.safetensors"))
    cold_weights = load_file(str(cold.out_dir / "adapter_model.safetensors"))
    assert warm_weights.keys() == cold_weights.keys()
    if weight_names is not None:
        assert set(cold_weights) == weight_names
    for key, value in cold_weights.items():  # after another job (DPO, another seed), the same adapter
        assert float(abs(warm_weights[key] - value).max()) < 1e-6, key
    for key in same_keys:
        assert second.result[key] == pytest.approx(cold.result[key], abs=1e-6), key
    return second
