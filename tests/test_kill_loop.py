"""Random kill loop (default run): 50 cycles of start, concurrent keyed submits and training for a random
short time, SIGKILL; after every restart the invariants of ``tests/invariants.py`` must hold.

The long run is ``python bench/kill_loop.py --cycles 1000`` (same loop; ``--trainer mlx`` for real
training). ``BEAGLED_KILL_CYCLES`` changes the number of cycles here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.kill_loop import run

pytestmark = pytest.mark.slow

CYCLES = int(os.environ.get("BEAGLED_KILL_CYCLES", "50"))
PG_CYCLES = int(os.environ.get("BEAGLED_KILL_CYCLES_PG", "6"))


@pytest.mark.parametrize("log", ["sqlite", "postgres"])
def test_random_kills_break_no_invariant(tmp_path: Path, log: str, request: pytest.FixtureRequest) -> None:
    # PostgreSQL: fewer cycles (each restart waits out the killed daemon's 1 s lease before it leads)
    url = request.getfixturevalue("pg_server").fresh_url() if log == "postgres" else ""
    cycles = CYCLES if log == "sqlite" else PG_CYCLES
    seed = int(os.environ.get("BEAGLED_KILL_SEED", "0"))
    out = run(cycles, tmp_path, seed=seed, max_run_s=0.4, database_url=url)
    print(f"kill loop ({log}): {out}")
    assert out["cycles"] == cycles
    assert out["acked"] > cycles  # clients got acknowledgements in most cycles
    assert out["jobs"] > 0 and set(out["jobs_by_state"]) <= {"reloaded", "failed", "rejected"}
