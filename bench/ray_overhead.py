"""Per-job overhead of the Ray executor over the local one, and submit acks while Ray is down.

    .venv/bin/python bench/ray_overhead.py [--jobs 5] [--steps 10] [--submits 500]

On this machine, in one run (needs the [ray] extra; starts its own Ray head on 127.0.0.1, 2 CPUs, and
stops it by its process group):

1. the same training spec (tiny model, mlx backend, ``--steps`` steps) run ``--jobs`` times each by the
   local trainer and by the Ray trainer, cold (a fresh process — and for Ray a fresh driver and actor —
   per job) and warm (one warm worker / one warm actor; one warm-up job first, not counted). Each job's
   wall time is measured around ``Trainer.run``; the figure is median(Ray) - median(local) per mode;
2. two daemons on fresh state dirs, one with ``executor = "local"``, one with ``executor = "ray"`` and
   an address where nothing listens (its first job then waits for the cluster); after a job has been cut
   (the Ray one is retrying its connection), ``--submits`` submits one after the other from one client
   on each; p50/p99 of the client-side ack time, side by side.
Target (issue 16): with Ray down, submit acks as usual (p99 within 1.5x of the local daemon's, or 5 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from beagled.config import RayConfig  # noqa: E402
from beagled.training.executor_ray import RayTrainer  # noqa: E402
from beagled.training.runner import SubprocessTrainer  # noqa: E402
from beagled.training.tinymodel import ensure_tiny_model  # noqa: E402
from tests.daemon_proc import DaemonProc, free_port  # noqa: E402
from tests.ray_head import LOOPBACK_ENV, RayHead  # noqa: E402
from tests.test_warm_trainer import HYPER, spec_for  # noqa: E402


def _ignore(_msg: dict[str, Any]) -> None:
    pass


async def _timed_jobs(trainer: Any, model: Path, out: Path, n: int, steps: int, warmup: bool) -> list[float]:
    await trainer.probe_all()
    times = []
    try:
        for i in range(n + (1 if warmup else 0)):
            spec = spec_for(model, out / f"j{i}" / "adapter", f"j{i}", hyper={**HYPER, "steps": steps})
            t0 = time.perf_counter()
            await trainer.run("mlx", spec, _ignore)
            if warmup and i == 0:
                continue
            times.append(time.perf_counter() - t0)
    finally:
        closer = getattr(trainer, "aclose", None)
        if closer is not None:
            await closer()
    return times


def training_overhead(head: RayHead, model: Path, tmp: Path, jobs: int, steps: int) -> dict[str, Any]:
    cfg = RayConfig(address=head.address, num_cpus=1)
    out: dict[str, Any] = {}
    for mode, warm in (("cold", False), ("warm", True)):
        local = SubprocessTrainer(["mlx"], spec_dir=tmp / f"l-{mode}", warm=warm, timeout_s=600)
        ray = RayTrainer(
            ["mlx"], cfg, spec_dir=tmp / f"r-{mode}", warm=warm, timeout_s=600, env=dict(LOOPBACK_ENV)
        )
        lt = trio.run(_timed_jobs, local, model, tmp / f"lo-{mode}", jobs, steps, warm)
        rt = trio.run(_timed_jobs, ray, model, tmp / f"ro-{mode}", jobs, steps, warm)
        out[mode] = {
            "local": lt,
            "ray": rt,
            "overhead_s": statistics.median(rt) - statistics.median(lt),
        }
        print(
            f"{mode}: local median {statistics.median(lt):.3f}s {[round(t, 2) for t in lt]}; "
            f"ray median {statistics.median(rt):.3f}s {[round(t, 2) for t in rt]}; "
            f"overhead {out[mode]['overhead_s']:+.3f}s",
            flush=True,
        )
    return out


def _acks(d: DaemonProc, n: int) -> list[float]:
    times = []
    with d.client() as c:
        for i in range(4):  # cut a job first: the ray daemon's job is then waiting for the cluster
            c.submit(bad=f"cut {i} plain words", good=f"cut {i} in my voice", key=f"cut{i}")
        deadline = time.monotonic() + 60
        while not c.jobs()["jobs"] and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval
        for i in range(n):
            t0 = time.perf_counter()
            c.submit(bad=f"draft {i} plain words here", good=f"draft {i} in my own voice", key=f"k{i}")
            times.append(time.perf_counter() - t0)
    return times


def acks_while_ray_down(model: Path, tmp: Path, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for executor in ("local", "ray"):
        root = tmp / f"d-{executor}"
        (root / "base").mkdir(parents=True)
        tables: dict[str, dict[str, Any]] = {
            "training": {"backends": ["mlx"], "base_model": str(model), "executor": executor},
            "training.ray": {"address": f"127.0.0.1:{free_port()}", "backoff_s": 0.5, "backoff_max_s": 5.0},
            "scheduler": {"min_pairs": 4, "max_wait_s": 300.0},
            "reload": {"method": "none"},
        }
        if executor == "local":  # no training competing for the CPUs: a fair baseline
            tables["training"]["backends"] = ["fake"]
            tables["training.custom_backends"] = {"fake": [sys.executable, "-c", "import sys; sys.exit(1)"]}
        d = DaemonProc(root, tables, LOOPBACK_ENV).start()
        try:
            t = sorted(_acks(d, n))
        finally:
            d.close()
        q = statistics.quantiles(t, n=100)
        res[executor] = {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "max_ms": t[-1] * 1000}
        label = f"executor={executor}" + (" (ray down)" if executor == "ray" else "")
        p50, p99, top = q[49] * 1000, q[98] * 1000, t[-1] * 1000
        print(f"acks, {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {top:.2f} ms", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--submits", type=int, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    model = ensure_tiny_model(tmp / "models")
    acks = acks_while_ray_down(model, tmp, args.submits)
    head = RayHead(num_cpus=2)
    try:
        training_overhead(head, model, tmp, args.jobs, args.steps)
    finally:
        head.close()
    local, ray = acks["local"]["p99_ms"], acks["ray"]["p99_ms"]
    ok = ray <= max(1.5 * local, local + 5.0)
    print(f"ack p99 with ray down {ray:.2f} ms vs local {local:.2f} ms: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
