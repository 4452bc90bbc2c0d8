"""Voice quality with real training on the tiny model (mlx): held-out loss falls job after job, the gate
rejects a poisoned batch, DPO moves the chain to a backend that supports it, and the replay window
keeps older pairs' loss."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from beagled.training.corpus import voice_pairs
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.slow

HYPER = {"steps": 30, "learning_rate": 0.005, "batch_size": 4}


def quality_daemon(
    make_daemon: Any, tiny_model: Path, scheduler: dict[str, Any] | None = None, **training: Any
) -> DaemonProc:
    return make_daemon(
        {
            "training": {
                "backends": ["mlx"],
                "base_model": str(tiny_model),
                "heldout_share": 0.25,
                "replay_pairs": 8,
                **training,
            },
            "training.hyper": HYPER,
            "scheduler": scheduler or {"min_pairs": 12},
        }
    )


def feed_until_job(
    d: DaemonProc, pairs: Iterable[tuple[str, str, str]], n_jobs: int, voice: str = "bea"
) -> str:
    """Submit pairs until the voice has ``n_jobs`` jobs; return the newest job id."""
    with d.client() as c:
        for prompt, bad, good in pairs:
            c.submit(bad=bad, good=good, prompt=prompt, voice=voice)
            js = c.jobs(voice=voice)["jobs"]
            if len(js) >= n_jobs:
                return str(js[0]["job_id"])
    raise AssertionError("ran out of pairs before the job was cut")


# The split between training and held-out pairs is random in the product (a hash of a random pair id);
# these tests make it explicit (submit's ``heldout``) from a seeded RNG, so that every run holds out the
# same pairs, including runs that hold poisoned pairs out.
ONLY_TRAIN = {"min_pairs": 10**6, "max_wait_s": 10**6}  # jobs are cut by ``train`` alone


def train_split(
    d: DaemonProc, pairs: list[tuple[str, str, str]], n_held: int, rng: random.Random, voice: str = "bea"
) -> dict[str, Any]:
    """Submit ``pairs``, holding out ``n_held`` of them chosen by ``rng``, cut a job, wait for its end."""
    held = set(rng.sample(range(len(pairs)), n_held))
    with d.client() as c:
        for i, (prompt, bad, good) in enumerate(pairs):
            c.submit(bad=bad, good=good, prompt=prompt, voice=voice, heldout=i in held)
        jid = c.train(voice)["job_id"]
    d.wait_job(jid, ("promoted", "rejected", "failed"), timeout=180)
    with d.client() as c:
        job: dict[str, Any] = c.job(jid)["job"]
    assert job["pairs"] == len(pairs) - n_held, job
    return job


def assert_rejected_and_unchanged(d: DaemonProc, job: dict[str, Any], before: dict[str, Any]) -> None:
    assert job["state"] == "rejected", job
    assert job["eval_loss"] > job["baseline_eval_loss"]
    with d.client() as c:
        after = c.voices()["voices"][0]
    assert len([e for e in job["history"] if e["event"] == "JobRejected"]) == 1
    assert after["current_job"] == before["current_job"] and after["version"] == before["version"]
    cur = d.state_dir / "voices" / "bea" / "current"
    assert cur.resolve().name == before["current_job"]


def test_a_consistent_voice_lowers_heldout_loss_and_a_poisoned_batch_is_rejected(
    make_daemon: Any, tiny_model: Path
) -> None:
    # no replay: the replayed pairs are sampled by a hash of the (random) job id, and clean pairs replayed
    # into the noise job made it genuinely better on the clean set in one run of four; without replay every
    # input of every job is fixed here (pairs, split, order, seed), so the run is the same every time
    d = quality_daemon(make_daemon, tiny_model, ONLY_TRAIN, replay_pairs=0)
    rng = random.Random(3)
    plain = voice_pairs(48, seed=3, style="plain")
    losses = []
    for n in range(3):
        job = train_split(d, plain[16 * n : 16 * (n + 1)], 4, rng)
        assert job["state"] == "promoted", job
        assert job["eval_pairs"] == 4 * max(n, 1) and job["sibling_pairs"] == 4
        losses.append((job["base_eval_loss"], job["baseline_eval_loss"], job["eval_loss"]))
    base0, _, first = losses[0]
    assert first < base0 - 0.5  # the first adapter already beats the base on held-out drafts
    assert all(new <= served for _, served, new in losses)  # the gate held every time
    assert losses[-1][2] < losses[0][2]  # and the voice kept improving

    with d.client() as c:
        before = c.voices()["voices"][0]
    job = train_split(d, voice_pairs(15, seed=4, style="noise"), 3, rng)  # 3 poisoned pairs held out
    assert job["eval_pairs"] == 12 and job["sibling_pairs"] == 3  # judged on the clean set only
    assert_rejected_and_unchanged(d, job, before)


@pytest.mark.parametrize(("seed", "poison_held"), [(5, 0), (6, 6)])
def test_a_poisoned_batch_is_rejected_however_its_pairs_fall(
    make_daemon: Any, tiny_model: Path, seed: int, poison_held: int
) -> None:
    # no replay: after one clean job the voice is still young, and clean pairs replayed into the noise
    # job could make it genuinely better on the clean set; here the job trains on the noise alone
    d = quality_daemon(make_daemon, tiny_model, ONLY_TRAIN, replay_pairs=0)
    rng = random.Random(seed)
    first = train_split(d, voice_pairs(16, seed=seed, style="plain"), 4, rng)
    assert first["state"] == "promoted", first
    with d.client() as c:
        before = c.voices()["voices"][0]
    noise = voice_pairs(12 + poison_held, seed=seed + 100, style="noise")
    job = train_split(d, noise, poison_held, rng)
    assert job["eval_pairs"] == 4 and job["sibling_pairs"] == poison_held
    assert_rejected_and_unchanged(d, job, before)


def test_dpo_is_refused_by_mlx_and_trained_by_peft(make_daemon: Any, tiny_model: Path) -> None:
    d = make_daemon(
        {
            "training": {
                "backends": ["mlx", "peft"],
                "base_model": str(tiny_model),
                "objective": "dpo",
                "heldout_share": 0.25,
            },
            "training.hyper": {"steps": 10, "learning_rate": 0.005, "batch_size": 4},
            "scheduler": {"min_pairs": 8},
        }
    )
    jid = feed_until_job(d, voice_pairs(60, seed=5), 1)
    job = d.wait_job(jid, ("promoted", "rejected", "failed"), timeout=240)
    with d.client() as c:
        hist = c.job(jid)["job"]["history"]
    assert [h["event"] for h in hist][:3] == ["JobCreated", "TrainingStarted", "TrainingFailed"]
    assert job["backend"] == "peft" and job["state"] in ("promoted", "rejected")
    failed = [e for e in d.events() if e["type"] == "TrainingFailed"]
    assert failed[0]["data"]["backend"] == "mlx"
    assert "objective 'dpo' is not supported by the mlx backend" in failed[0]["data"]["error"]


# --- the replay window, at the worker level ----------------------------------------------------


def _examples(triples: list[tuple[str, str, str]], tag: str) -> list[dict[str, str]]:
    return [
        {"pair_id": f"{tag}{i}", "prompt": p, "chosen": g, "rejected": b}
        for i, (p, b, g) in enumerate(triples)
    ]


def _train(
    tmp: Path,
    name: str,
    tiny: Path,
    train: list[dict[str, str]],
    heldout: list[dict[str, str]],
    init: Path | None,
    served: Path | None = None,
    steps: int = 30,
    lr: float = 0.005,
) -> dict[str, Any]:
    out = tmp / name
    spec = {
        "job_id": name,
        "voice": "v",
        "attempt": 1,
        "backend": "mlx",
        "base_model": str(tiny),
        "out_dir": str(out),
        "init_adapter": str(init) if init else None,
        "served_adapter": str(served) if served else None,
        "objective": "sft",
        "train": train,
        "heldout": heldout,
        "hyper": {
            "rank": 8,
            "alpha": 16.0,
            "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "num_layers": -1,
            "learning_rate": lr,
            "steps": steps,
            "batch_size": 4,
            "max_seq_len": 256,
            "seed": 0,
        },
    }
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "beagled.training.worker", "train", str(tmp / f"{name}.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert done.returncode == 0, lines[-1]
    return {**lines[-1], "out": out}


def test_replay_window_keeps_older_pairs_loss(tmp_path: Path, tiny_model: Path) -> None:
    old = _examples(voice_pairs(40, seed=11, style="plain"), "a")
    old_train, old_heldout = old[:28], old[28:]
    shifted = _examples(voice_pairs(36, seed=12, style="shifted"), "b")
    first = _train(tmp_path, "j1", tiny_model, old_train, old_heldout, None)
    after_first = first["eval_loss"]

    def run_on_shifted(replay: int, tag: str) -> float:
        adapter = first["out"]
        for k in range(3):
            train = shifted[12 * k : 12 * (k + 1)] + old_train[:replay]
            adapter = _train(tmp_path, f"{tag}{k}", tiny_model, train, [], adapter)["out"]
        # the old voice's held-out loss under the final adapter (as the eval baseline of a 1-step, lr≈0 run)
        probe = _train(
            tmp_path,
            f"{tag}-eval",
            tiny_model,
            old_train[:4],
            old_heldout,
            None,
            served=adapter,
            steps=1,
            lr=1e-12,
        )
        return float(probe["baseline_eval_loss"])

    without = run_on_shifted(0, "noreplay")
    with_replay = run_on_shifted(16, "replay")
    print(
        f"old-voice held-out loss: after job 1 {after_first:.3f}; after 3 shifted jobs without replay "
        f"{without:.3f}, with 16 replayed pairs {with_replay:.3f}"
    )
    assert without > after_first + 0.3  # forgetting, without the window
    assert with_replay < without - 0.2  # the window keeps the old voice
    assert with_replay <= after_first + 0.3  # within tolerance of where it was


def test_two_voices_train_fairly_and_never_see_each_other_s_pairs(make_daemon: Any, tiny_model: Path) -> None:
    d = make_daemon(
        {
            "training": {
                "backends": ["mlx"],
                "base_model": str(tiny_model),
                "heldout_share": 0.0,
                "replay_pairs": 4,
            },
            "training.hyper": {"steps": 5, "learning_rate": 0.005, "batch_size": 4},
            "scheduler": {"min_pairs": 4},
        }
    )
    mine: dict[str, set[str]] = {"flood": set(), "quiet": set()}
    plain, shifted = voice_pairs(60, seed=21, style="plain"), voice_pairs(8, seed=22, style="shifted")
    with d.client() as c:
        for prompt, bad, good in plain[:4]:
            mine["flood"].add(c.submit(bad=bad, good=good, prompt=prompt, voice="flood")["pair_id"])
        d.wait_jobs(
            lambda js: len(js) == 1 and js[0]["state"] in ("training", "trained", "promoted"), timeout=120
        )
        for prompt, bad, good in plain[4:]:  # the flood goes on …
            mine["flood"].add(c.submit(bad=bad, good=good, prompt=prompt, voice="flood")["pair_id"])
        for prompt, bad, good in shifted[:4]:  # … while a quiet voice sends one batch
            mine["quiet"].add(c.submit(bad=bad, good=good, prompt=prompt, voice="quiet")["pair_id"])
    js = d.wait_jobs(lambda js: sum(j["state"] == "promoted" for j in js) >= 3, timeout=300)
    order = [j["voice"] for j in sorted(js, key=lambda j: j["updated_at"]) if j["state"] == "promoted"]
    assert "quiet" in order[:3], order  # served within the flood's first jobs, not after all of them
    for voice in ("flood", "quiet"):
        for adapter in (d.state_dir / "voices" / voice / "adapters").iterdir():
            if adapter.name.startswith("."):
                continue
            trained_on = set(json.loads((adapter / "manifest.json").read_text())["pair_ids"])
            assert trained_on and trained_on <= mine[voice], (voice, adapter.name)
