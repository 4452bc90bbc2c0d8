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


def test_random_kills_break_no_invariant(tmp_path: Path) -> None:
    out = run(CYCLES, tmp_path, seed=int(os.environ.get("BEAGLED_KILL_SEED", "0")), max_run_s=0.4)
    print(f"kill loop: {out}")
    assert out["cycles"] == CYCLES
    assert out["acked"] > CYCLES  # clients got acknowledgements in most cycles
    assert out["jobs"] > 0 and set(out["jobs_by_state"]) <= {"reloaded", "failed", "rejected"}
