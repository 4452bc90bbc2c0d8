"""Training latency of a real daemon (mlx backend, tiny model) against ``mlx_lm lora`` run directly.

    .venv/bin/python bench/job_latency.py [--steps 40] [--batch-size 4] [--pairs 16] [--jobs 3]

What it does, on this machine, in one run:

1. builds the tiny model (``beagled.training.tinymodel``) and ``corpus.voice_pairs`` drafts;
2. starts ``beagled serve`` (mlx backend, ``reload.method = "command"`` with ``argv = ["true"]``,
   ``scheduler.min_pairs = --pairs``, the tiny model as ``base_model``, ``training.warm = true``), lets
   it come up (the probe and the warm worker's imports happen before the first pair, as on any daemon
   that has been running a while), then for each of ``--jobs`` jobs submits pairs one by one until the
   scheduler cuts a job and times, from the send of the pair that triggered the cut: ``trained`` and
   ``reloaded``; the job's training time is its ``training -> trained`` span in the event log;
3. after each job, runs ``python -m mlx_lm lora`` directly on exactly that job's data (its manifest's
   train pairs as ``train.jsonl``, its held-out pairs as ``valid.jsonl``) with the same iterations, batch
   size, learning rate, seed, max sequence length, LoRA rank/scale/modules/layers and prompt masking;
   and a 1-iteration direct run, whose time is the direct run's start-up;
4. optionally (``--cold-daemon``) the same first job on a daemon with ``training.warm = false``.

Targets (from the issue): first (cold) job <= 1.05 x the direct run; warm jobs (second and later)
<= 1.1 x (direct run - 1-iteration direct run); submit -> reloaded <= training time + 1 s.

The daemon's job also measures the held-out loss of the base and of the served adapter before training,
the held-out and train loss after it, converts the adapter to PEFT and writes its manifest; the worker's
per-phase timings (from the manifest) are printed so that this overhead is visible. mlx-lm's run does a
validation pass at iteration 1 and at the end (on the same held-out pairs) and saves its adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _common import write_config  # noqa: E402

from beagled.client import Client  # noqa: E402
from beagled.errors import BeagledError  # noqa: E402
from beagled.training.corpus import voice_pairs  # noqa: E402


def poll(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


class Daemon:
    def __init__(self, root: Path, model: Path, args: argparse.Namespace, *, warm: bool) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.sockdir = Path(tempfile.mkdtemp(prefix="bgl", dir="/tmp"))
        self.socket = self.sockdir / "s.sock"
        self.state = root / "state"
        self.args = args
        tables: dict[str, dict[str, Any]] = {
            "daemon": {"state_dir": str(self.state), "socket": str(self.socket), "log_format": "json"},
            "metrics": {"listen": ""},
            "scheduler": {"min_pairs": args.pairs, "max_wait_s": 3600.0},
            "training": {
                "backends": ["mlx"], "base_model": str(model), "warm": warm, "eval_tolerance": 1000.0,
                "timeout_s": 900.0,
            },
            "training.hyper": {
                "rank": args.rank, "alpha": args.alpha, "target_modules": ["q_proj", "v_proj"],
                "num_layers": -1, "learning_rate": args.lr, "steps": args.steps,
                "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "seed": args.seed,
                "dropout": 0.0,
            },
            "reload": {"method": "command"},
            "reload.command": {"argv": ["true"]},
        }  # fmt: skip
        write_config(root / "config.toml", tables)
        self.log = (root / "daemon.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "beagled", "serve", "--config", str(root / "config.toml")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        poll(self._up, 60, "the daemon")
        self.client = Client(self.socket, timeout=60)
        poll(self._probed, 120, "the backend probe")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"daemon exited: {(self.root / 'daemon.log').read_text()[-3000:]}")
        try:
            with Client(self.socket, timeout=2) as c:
                c.ping()
        except (OSError, BeagledError):
            return False
        return True

    def _probed(self) -> bool:
        backends = self.client.status()["backends"]
        mlx = [b for b in backends if b["name"] == "mlx"]
        if mlx and not mlx[0]["available"] and "not probed" not in mlx[0]["reason"]:
            raise SystemExit(f"mlx backend unavailable: {mlx[0]['reason']}")
        return bool(mlx and mlx[0]["available"])

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


class Feeder:
    """Hands out the corpus' pairs in order; remembers when each pair was sent, by pair id."""

    def __init__(self, seed: int) -> None:
        self.pairs = voice_pairs(2000, seed=seed)
        self.next = 0
        self.sent_at: dict[str, float] = {}
        self.by_id: dict[str, tuple[str, str, str]] = {}

    def submit(self, client: Client, voice: str) -> None:
        prompt, bad, good = self.pairs[self.next]
        self.next += 1
        at = time.time()
        pair_id = client.submit(bad, good, voice=voice, prompt=prompt)["pair_id"]
        self.sent_at[pair_id] = at
        self.by_id[pair_id] = (prompt, bad, good)


def one_job(d: Daemon, feeder: Feeder, voice: str, known: set[str]) -> dict[str, Any]:
    """Submit until a job is cut, wait until it is reloaded; times from the triggering pair's send."""
    c = d.client

    def new_job() -> str | None:
        fresh = [j["job_id"] for j in c.jobs(voice=voice)["jobs"] if j["job_id"] not in known]
        return fresh[0] if fresh else None

    job_id = None
    while job_id is None:
        feeder.submit(c, voice)
        job_id = new_job()
        if job_id is None:
            pending = [v for v in c.voices()["voices"] if v["voice"] == voice]
            if pending and pending[0]["pending_pairs"] >= d.args.pairs:
                job_id = poll(new_job, 10, "the cut")
    known.add(job_id)

    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = c.job(job_id)["job"]
        if job["state"] in ("failed", "rejected"):
            raise SystemExit(f"job {job_id} ended {job['state']}: {job['error']}")
        return job if job["state"] == "reloaded" else None

    job = poll(done, 900, f"job {job_id} reloaded")
    first_at = {}
    for h in job["history"]:
        first_at.setdefault(h["state"], h["at"])
    manifest = json.loads((d.state / "voices" / voice / "adapters" / job_id / "manifest.json").read_text())
    trigger = max(feeder.sent_at[p] for p in manifest["pair_ids"] if p in feeder.sent_at)
    return {
        "job_id": job_id,
        "submit_to_cut": first_at["queued"] - trigger,
        "submit_to_trained": first_at["trained"] - trigger,
        "submit_to_reloaded": first_at["reloaded"] - trigger,
        "training": first_at["trained"] - first_at["training"],
        "trained_to_reloaded": first_at["reloaded"] - first_at["trained"],
        "worker_timings": manifest.get("timings", {}),
        "manifest": manifest,
    }


def direct_runs(
    model: Path, job: dict[str, Any], feeder: Feeder, work: Path, args: argparse.Namespace
) -> tuple[float, float]:
    """``mlx_lm lora`` on the job's own data: (full run, 1-iteration run) wall seconds."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    m = job["manifest"]
    train = [feeder.by_id[p] for p in m["pair_ids"]]
    valid = [feeder.by_id[p] for p in m["heldout_pair_ids"]] or train
    while len(valid) < args.batch_size:  # mlx-lm needs a batch's worth of validation examples
        valid = valid + valid
    for name, rows in (("train", train), ("valid", valid)):
        with (data / f"{name}.jsonl").open("w") as f:
            for prompt, _bad, good in rows:
                f.write(json.dumps({"prompt": prompt, "completion": good}) + "\n")
    lora = {"keys": ["self_attn.q_proj", "self_attn.v_proj"], "rank": args.rank,
            "scale": args.alpha / args.rank, "dropout": 0.0}  # fmt: skip
    (work / "lora.yaml").write_text(json.dumps({"lora_parameters": lora}))  # JSON is YAML
    times = []
    for iters in (args.steps, 1):
        shutil.rmtree(work / "adapters", ignore_errors=True)
        argv = [
            sys.executable, "-m", "mlx_lm", "lora", "--model", str(model), "--train", "--data", str(data),
            "--iters", str(iters), "--batch-size", str(args.batch_size), "--learning-rate", str(args.lr),
            "--seed", str(args.seed), "--num-layers", "-1", "--mask-prompt", "--max-seq-length",
            str(args.max_seq_len), "--val-batches", "-1", "-c", str(work / "lora.yaml"),
            "--adapter-path", str(work / "adapters"),
        ]  # fmt: skip
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=work)
        times.append(time.monotonic() - t0)
        if done.returncode != 0:
            raise SystemExit(f"mlx_lm lora failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return times[0], times[1]


def verdict(value: float, limit: float) -> str:
    return "PASS" if value <= limit else "FAIL"


def run_round(r: int, model: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh daemon, ``--jobs`` jobs of one voice, each followed by its direct runs."""
    feeder = Feeder(seed=11 + r)
    jobs: list[dict[str, Any]] = []
    direct: list[tuple[float, float]] = []
    d = Daemon(work / f"round-{r}" / "daemon-warm", model, args, warm=True)
    try:
        time.sleep(args.settle)  # a daemon that has been up a while: probe and warm worker's imports done
        known: set[str] = set()
        for i in range(args.jobs):
            job = one_job(d, feeder, "bench", known)
            jobs.append(job)
            direct.append(direct_runs(model, job, feeder, work / f"round-{r}" / f"direct-{i}", args))
            print(
                f"round {r + 1} job {i + 1}: submit->trained {job['submit_to_trained']:.2f}s  "
                f"training {job['training']:.2f}s  submit->reloaded {job['submit_to_reloaded']:.2f}s | "
                f"direct {direct[-1][0]:.2f}s, 1-iter {direct[-1][1]:.2f}s | worker: "
                + " ".join(f"{k}={v:.2f}" for k, v in job["worker_timings"].items()),
                flush=True,
            )
    finally:
        d.close()
    cold = None
    if args.cold_daemon:
        d = Daemon(work / f"round-{r}" / "daemon-cold", model, args, warm=False)
        try:
            time.sleep(args.settle)
            cold = one_job(d, Feeder(seed=11 + r), "bench", set())
        finally:
            d.close()
        print(
            f"round {r + 1} warm=false first job: submit->trained {cold['submit_to_trained']:.2f}s",
            flush=True,
        )
    return {"jobs": jobs, "direct": direct, "cold": cold}


def summary(name: str, values: list[float], what: str, refs: list[float], limit: float) -> str:
    ratios = [v / ref for v, ref in zip(values, refs, strict=True)]
    ratio = statistics.median(ratios)
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return (f"| {name} | {statistics.median(values):.2f} | {what} | {statistics.median(refs):.2f} | "
            f"{ratio:.3f}{spread} | <= {limit} | {verdict(ratio, limit)} |")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=16, help="scheduler.min_pairs: pairs per job")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="fresh daemons; medians over rounds are judged")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds between start-up and the first pair")
    ap.add_argument("--cold-daemon", action="store_true", help="also time a first job with warm = false")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="beagled-job-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    from beagled.training.tinymodel import ensure_tiny_model

    model = ensure_tiny_model(work / "models")
    print(f"# job latency: tiny model {model.name}, {args.steps} steps, batch {args.batch_size}, "
          f"{args.pairs} pairs/job, {args.rounds} rounds x {args.jobs} jobs, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, work dir {work}")  # fmt: skip
    rounds = [run_round(r, model, work, args) for r in range(args.rounds)]

    rows = [
        summary(
            "cold job (first of the voice): submit -> trained",
            [r["jobs"][0]["submit_to_trained"] for r in rounds],
            "direct mlx_lm lora",
            [r["direct"][0][0] for r in rounds],
            1.05,
        )
    ]
    if args.jobs > 1:
        rows.append(
            summary(
                f"warm jobs (2..{args.jobs}): submit -> trained",
                [j["submit_to_trained"] for r in rounds for j in r["jobs"][1:]],
                "direct - 1-iter direct",
                [full - one for r in rounds for full, one in r["direct"][1:]],
                1.1,
            )
        )
    every = [j for r in rounds for j in r["jobs"]]
    slack = [j["submit_to_reloaded"] - j["training"] for j in every]
    reloaded = statistics.median(j["submit_to_reloaded"] for j in every)
    rows.append(
        f"| submit -> reloaded (every job) | {reloaded:.2f} | "
        f"training time | {statistics.median(j['training'] for j in every):.2f} | "
        f"+{statistics.median(slack):.2f}s (max +{max(slack):.2f}s) | <= +1 s | {verdict(max(slack), 1.0)} |"
    )
    if args.cold_daemon:
        rows.append(
            summary(
                "(info) first job with training.warm = false",
                [r["cold"]["submit_to_trained"] for r in rounds],
                "direct mlx_lm lora",
                [r["direct"][0][0] for r in rounds],
                1.05,
            )
        )
    print()
    print("| figure (median) | seconds | compared with | seconds | ratio (range) | target | verdict |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print(row)
    print()
    phases: dict[str, list[float]] = {}
    for j in [j for r in rounds for j in r["jobs"][1:]] or every:
        for k, v in j["worker_timings"].items():
            phases.setdefault(k, []).append(v)
    print("worker phases, median over warm jobs (s): "
          + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in sorted(phases.items())))  # fmt: skip
    print("daemon overhead, median (s): submit->cut "
          f"{statistics.median(j['submit_to_cut'] for j in every):.3f}, trained->reloaded "
          f"{statistics.median(j['trained_to_reloaded'] for j in every):.3f}")  # fmt: skip
    startup = statistics.median(o for r in rounds for _, o in r["direct"])
    print(f"direct start-up (1-iter run), median: {startup:.2f}s")
    if args.json:
        for r in rounds:
            r["jobs"] = [{k: v for k, v in j.items() if k != "manifest"} for j in r["jobs"]]
            if r["cold"]:
                r["cold"] = {k: v for k, v in r["cold"].items() if k != "manifest"}
        args.json.write_text(json.dumps(rounds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
