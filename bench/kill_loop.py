"""Random kill loop: SIGKILL a real ``beagled serve`` at random moments while clients submit and jobs
train, restart it, and check the invariants of ``tests/invariants.py`` after every restart.

    python bench/kill_loop.py --cycles 1000                 # fake trainer (slow:0.3), command reloader
    python bench/kill_loop.py --cycles 50 --trainer mlx     # real MLX training on the tiny model

A cycle: start the daemon (its recovery runs), re-submit every key acknowledged in the previous cycle
(each must come back ``duplicate: true`` with the same pair id), check that no pair is in two jobs, that
each ``current`` link points to a complete adapter and that the log passes ``PRAGMA integrity_check``;
then let client threads submit keyed pairs (recording every ack) for a random 0-``--max-run`` seconds
while the scheduler cuts jobs and the trainer runs, and SIGKILL the daemon. At the end the daemon is
started once more, every job must reach a final state and every invariant must hold, including that the
reloader's last call for each voice names its current adapter. Prints the number of cycles survived;
exits 1 at the first broken invariant. ``tests/test_kill_loop.py`` runs the same loop (50 cycles).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from beagled import errors, manifest  # noqa: E402
from tests.daemon_proc import DaemonProc, fake_backend  # noqa: E402
from tests.invariants import (  # noqa: E402
    Ack,
    all_jobs,
    check_acked,
    check_all,
    check_log,
    check_pairs_trained_once,
    command_reload_tables,
    reload_script,
)

VOICES = ("default", "alt")


class KillLoop:
    def __init__(
        self,
        root: Path,
        *,
        trainer: str = "fake",
        seed: int = 0,
        clients: int = 3,
        max_run_s: float = 0.4,
        tiny_model: Path | None = None,
        database_url: str = "",
    ) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.clients = clients
        self.max_run_s = max_run_s
        self.script, self.calls = reload_script(root)
        (root / "base").mkdir(parents=True, exist_ok=True)
        tables: dict[str, dict[str, Any]] = {
            "scheduler": {"min_pairs": 4, "max_wait_s": 1.0, "retry_backoff_s": 0.05, "max_attempts": 1000},
            **command_reload_tables(self.script),
        }
        if trainer == "mlx":
            assert tiny_model is not None
            tables["training"] = {
                "backends": ["mlx"],
                "base_model": str(tiny_model),
                "heldout_share": 0.0,
                "replay_pairs": 4,
            }
            tables["training.hyper"] = {"steps": 5}
        else:
            tables["training"] = {
                "backends": ["fake"],
                "base_model": str(root / "base"),
                "heldout_share": 0.0,
                "replay_pairs": 4,
            }
            tables["training.custom_backends"] = {"fake": fake_backend("slow:0.3")}
        if database_url:  # the log on PostgreSQL: each restart first waits out the killed one's lease
            tables["daemon"] = {"database_url": database_url, "node_name": "solo", "leader_timeout_s": 1.0}
        (root / "d").mkdir(parents=True, exist_ok=True)
        self.daemon = DaemonProc(root / "d", tables)
        self.acked: list[Ack] = []
        self.unchecked: list[Ack] = []
        self.lock = threading.Lock()
        self.cycles = 0
        self.submits = 0

    # -- one cycle ---------------------------------------------------------------------------------
    def _client(self, cycle: int, n: int, stop: threading.Event) -> None:
        voice = VOICES[n % len(VOICES)]
        try:
            with self.daemon.client(timeout=10) as c:
                i = 0
                while not stop.is_set():
                    key = f"c{cycle}-t{n}-{i}"
                    r = c.submit(
                        bad=f"{key} plain draft", good=f"{key} draft in my voice", voice=voice, key=key
                    )
                    with self.lock:
                        ack = Ack(key, r["pair_id"], voice)
                        self.acked.append(ack)
                        self.unchecked.append(ack)
                        self.submits += 1
                    i += 1
        except errors.BeagledError:
            return  # the daemon was killed under us: the in-flight submit was not acknowledged

    def check_live(self) -> None:
        """The invariants that hold at any moment of a live daemon (right after its recovery)."""
        d = self.daemon
        with d.client(timeout=30) as c:
            with self.lock:
                todo, self.unchecked = self.unchecked, []
            check_acked(c, todo)
            check_pairs_trained_once(all_jobs(c))
        for voice in VOICES:
            link = d.state_dir / "voices" / voice / "current"
            if link.is_symlink():
                manifest.verify(link.resolve())
        check_log(d)

    def cycle(self) -> None:
        d = self.daemon
        d.start()
        self.check_live()
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._client, args=(self.cycles, n, stop), daemon=True)
            for n in range(self.clients)
        ]
        for t in threads:
            t.start()
        time.sleep(self.rng.uniform(0.0, self.max_run_s))  # the random moment of the kill is the point
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
        self.cycles += 1

    def finish(self, timeout: float = 180.0) -> dict[str, Any]:
        d = self.daemon
        d.start()
        summary = check_all(d, self.acked, reloader="command", calls=self.calls, timeout=timeout)
        d.stop()
        return {
            "cycles": self.cycles,
            "acked": len(self.acked),
            "jobs": len(summary["jobs"]),
            "jobs_by_state": _count(j["state"] for j in summary["jobs"]),
        }

    def close(self) -> None:
        self.daemon.close()


class KillLoopFailure(AssertionError):
    def __init__(self, survived: int, cause: AssertionError) -> None:
        super().__init__(f"after {survived} cycles: {cause}")
        self.survived = survived


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def run(
    cycles: int,
    root: Path,
    *,
    trainer: str = "fake",
    seed: int = 0,
    max_run_s: float = 0.4,
    progress: int = 0,
    database_url: str = "",
) -> dict[str, Any]:
    tiny = None
    if trainer == "mlx":
        from beagled.training.tinymodel import ensure_tiny_model

        tiny = ensure_tiny_model(root / "models")
    loop = KillLoop(
        root, trainer=trainer, seed=seed, max_run_s=max_run_s, tiny_model=tiny, database_url=database_url
    )
    started = time.monotonic()
    try:
        try:
            for i in range(cycles):
                loop.cycle()
                if progress and (i + 1) % progress == 0:
                    print(
                        f"cycle {i + 1}: {loop.submits} acked so far, {time.monotonic() - started:.0f}s",
                        flush=True,
                    )
            out = loop.finish()
        except AssertionError as e:
            raise KillLoopFailure(loop.cycles, e) from e
    finally:
        loop.close()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--trainer", choices=("fake", "mlx"), default="fake")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-run", type=float, default=0.4, help="longest run before a kill, seconds")
    ap.add_argument("--workdir", type=Path, default=None, help="kept on failure (default: a temp dir)")
    a = ap.parse_args()
    root = a.workdir or Path(tempfile.mkdtemp(prefix="beagled-kill-loop-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        out = run(a.cycles, root, trainer=a.trainer, seed=a.seed, max_run_s=a.max_run, progress=50)
    except KillLoopFailure as e:
        print(f"INVARIANT BROKEN {e}\ncycles survived: {e.survived}\nstate kept in {root}", flush=True)
        return 1
    print(json.dumps(out), flush=True)
    print(f"cycles survived: {out['cycles']}", flush=True)
    if a.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
