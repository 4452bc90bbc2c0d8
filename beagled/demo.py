"""``beagled demo``: the whole job end to end on one machine, no GPU, no download.

Builds the tiny local model, starts a real daemon (a subprocess, as systemd would), plays a writing
loop that sends improvement pairs in one consistent synthetic voice over the socket, shows each job's
training progress, and prints the voice's held-out loss before and after every promotion.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from beagled import config
from beagled.client import Client
from beagled.ctl import ProgressBoard
from beagled.daemon import tiny_model_builder

PAIRS_PER_JOB = 12


def _say(msg: str) -> None:
    print(msg, flush=True)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else "-"


def _pref(j: dict[str, Any]) -> str:
    return f"{_fmt(j.get('baseline_preference_accuracy'))}→{_fmt(j.get('preference_accuracy'))}"


def run_demo(*, state_dir: str | None = None, jobs: int = 5, backends: list[str] | None = None) -> int:
    from beagled.training.corpus import voice_pairs

    root = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="beagled-demo-"))
    sockdir = Path(tempfile.mkdtemp(prefix="bgdemo", dir="/tmp"))
    started = time.monotonic()
    table = {
        "daemon": {
            "state_dir": str(root / "state"),
            "socket": str(sockdir / "beagled.sock"),
            "log_format": "json",
        },
        "metrics": {"listen": ""},
        "scheduler": {"min_pairs": PAIRS_PER_JOB, "max_wait_s": 3600.0},
        "training": {"backends": backends or ["mlx", "peft"], "heldout_share": 0.25, "replay_pairs": 8},
    }
    cfg = config.from_mapping(table)
    cfg_path = root / "config.toml"
    root.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(config.to_toml(cfg))
    _say(f"beagled demo — state in {root}")
    _say("1/4 building a tiny Llama-shaped model and its BPE tokenizer (MLX + tokenizers, no download) …")
    t0 = time.monotonic()
    model = tiny_model_builder(cfg)
    _say(f"    {model} ({time.monotonic() - t0:.1f}s)")

    _say("2/4 starting the daemon …")
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "beagled", "serve", "--config", str(cfg_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    results: list[dict[str, Any]] = []
    try:
        _wait(lambda: Client(cfg.socket_path, timeout=2).ping(), 60, "the daemon to answer")
        with Client(cfg.socket_path) as c:
            _wait(lambda: any(b["available"] for b in c.status()["backends"]), 120, "a training backend")
            for b in c.status()["backends"]:
                state = "available" if b["available"] else "unavailable"
                _say(f"    backend {b['name']:8} {state}: {b['reason']}")
            pairs = voice_pairs(PAIRS_PER_JOB * jobs * 2, seed=7, style="plain")
            _say(f"3/4 the writing loop sends pairs in one voice; a job is cut every {PAIRS_PER_JOB} pairs")
            _say(f"    e.g. worse: {pairs[0][1]!r}\n         better: {pairs[0][2]!r}")
            it = iter(pairs)
            for n in range(jobs):
                job_id = None
                while job_id is None:
                    prompt, bad, good = next(it)
                    c.submit(bad=bad, good=good, prompt=prompt, voice="demo")
                    js = c.jobs(voice="demo")["jobs"]
                    job_id = js[0]["job_id"] if len(js) > n else None
                _say(f"    job {n + 1}/{jobs}: {job_id}")
                results.append(_follow(cfg.socket_path, job_id))
        _say("4/4 results (held-out loss: mean NLL of the voice's better drafts never trained on)")
        _say("    (pref: share of held-out pairs whose better draft the adapter raises over the base")
        _say("     more than the worse one; served → new)")
        _say(
            f"    {'job':28} {'backend':8} {'train s':>8} {'base':>7} {'served':>7} {'new':>7} "
            f"{'pref':>11}  state"
        )
        for j in results:
            _say(
                f"    {j['job_id']:28} {j.get('backend') or '-':8} {_fmt(j.get('train_s')):>8} "
                f"{_fmt(j.get('base_eval_loss')):>7} {_fmt(j.get('baseline_eval_loss')):>7} "
                f"{_fmt(j.get('eval_loss')):>7} "
                f"{_pref(j):>11}"
                f"  {j['state']}"
            )
        with Client(cfg.socket_path) as c:
            (v,) = c.voices()["voices"]
        first, last = results[0], results[-1]
        _say(f"voice 'demo' is at version {v['version']} ({v['adapter_path']})")
        base, served = _fmt(first.get("base_eval_loss")), _fmt(v["eval_loss"])
        _say(f"held-out loss: base model {base} → now served {served}")
        _say(f"preference accuracy of the served voice: {_fmt(v.get('preference_accuracy'))}")
        ok = (
            all(j["state"] == "promoted" for j in results)
            and last.get("eval_loss") is not None
            and last["eval_loss"] < (first.get("base_eval_loss") or 0)
        )
        _say(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s")
        return 0 if ok else 1
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def _follow(socket_path: Path, job_id: str) -> dict[str, Any]:
    """Show the job's progress bar until it is promoted, rejected or failed; return the job."""
    board = ProgressBoard(sys.stdout, tty=sys.stdout.isatty(), width=100)
    t0 = time.monotonic()
    train_s = None
    with Client(socket_path, timeout=None) as c:
        for msg in c.watch():
            if "progress" in msg and msg["progress"].get("job_id") == job_id:
                p = msg["progress"]
                step, total = p.get("step") or 0, p.get("total") or 1
                if sys.stdout.isatty() or step % max(1, total // 4) == 0:
                    board.progress(p, time.monotonic())
            elif "event" in msg and msg["event"]["data"].get("job_id") == job_id:
                e = msg["event"]
                if e["type"] == "TrainingSucceeded":
                    train_s = e["data"].get("duration_s")
                if e["type"] in (
                    "TrainingSucceeded",
                    "TrainingFailed",
                    "Promoted",
                    "JobRejected",
                    "JobFailed",
                ):
                    board.event(e)
                if e["type"] in ("Promoted", "JobRejected", "JobFailed"):
                    board.close()
                    break
            if time.monotonic() - t0 > 600:
                raise TimeoutError(f"job {job_id} did not finish in 600s")
    with Client(socket_path) as c:
        job: dict[str, Any] = c.job(job_id)["job"]
    job["train_s"] = train_s
    return job
