"""Build a realistic event log of N events through ``SqliteStore`` (used by ``startup.py``).

Mix: pairs (~200-byte drafts) across 4 voices; every 8 pairs of a voice a job runs its whole life
(JobCreated, TrainingStarted, TrainingSucceeded, PromotionStarted, Promoted, ReloadStarted, Reloaded;
every 10th job first fails one backend). Events are decided by ``jobs.decide`` against a projection,
so the log replays cleanly. Written with ``synchronous=OFF`` in large transactions (it is a fixture,
not a durability test); the idempotency and pairs indexes are filled the way ``submit_batch`` fills them.

    .venv/bin/python bench/gen_log.py PATH N
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from beagled import events as ev
from beagled import jobs
from beagled.store import SqliteStore

DRAFT = (
    "The quick brown fox jumps over the lazy dog while the writer searches for a better sentence, "
    "one that says the same thing in fewer words and with a voice that sounds like a person. "
)
VOICES = ("alice", "bob", "carol", "dave")


def generate(path: Path, n: int, *, seed: int = 0) -> None:
    rnd = random.Random(seed)
    store = SqliteStore(path)
    store._db.execute("PRAGMA synchronous=OFF")  # a fixture: speed over durability
    state = jobs.State()
    buf: list[ev.Payload] = []
    clock = [1.7e9]

    def flush() -> None:
        if buf:
            clock[0] += 0.5
            for e in store.append(buf, clock[0]):
                jobs.evolve(state, e)
            buf.clear()

    def run(cmd: jobs.Command) -> None:
        flush()  # decide needs the state up to here
        buf.extend(jobs.decide(state, cmd))
        flush()

    total = 0
    k = 0
    while total < n:
        for voice in VOICES:
            for _ in range(8):
                k += 1
                pid = f"p-{rnd.getrandbits(64):016x}"
                buf.append(
                    ev.PairSubmitted(
                        pair_id=pid,
                        voice=voice,
                        bad=f"{k} {DRAFT}",
                        good=f"{DRAFT} {k}",
                        key=f"k:{voice}-{k}",
                        heldout=rnd.random() < 0.1,
                    )
                )
            flush()
            v = state.voices[voice]
            jid = f"j-{k:08d}-{rnd.getrandbits(32):08x}"
            pend = tuple(p for p, _ in v.pending)
            replay = tuple(rnd.sample(v.trained[-1000:], min(16, len(v.trained))))
            buf.append(ev.JobCreated(job_id=jid, voice=voice, pair_ids=pend, replay_ids=replay))
            flush()
            run(jobs.StartAttempt(jid, ("mlx", "peft")))
            if k % 10 == 0:
                run(jobs.BackendFailed(jid, "mlx", "out of memory", False, 3.0))
            run(jobs.FinishTraining(jid, "peft", f"/state/voices/{voice}/{jid}", 1.2, 1.1, 1.3, 2.0, 20.0))
            run(jobs.Gate(jid, 0.0))
            j = state.jobs[jid]
            if j.state == jobs.JobState.TRAINED:
                run(jobs.FinishPromotion(jid, f"/state/voices/{voice}/{jid}/adapter"))
                run(jobs.StartReload(jid, "vllm"))
                run(jobs.FinishReload(jid, "vllm", f"{voice}-v{j.version or 0:04d}", 0.3))
            total = store.last_seq()
            if total >= n:
                break
    flush()
    db = store._db
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "INSERT OR IGNORE INTO idempotency (key, pair_id, seq) SELECT json_extract(data, '$.key'), "
        "json_extract(data, '$.pair_id'), seq FROM events WHERE type = 'PairSubmitted'"
    )
    db.execute(
        "INSERT OR IGNORE INTO pairs (pair_id, seq) SELECT json_extract(data, '$.pair_id'), seq "
        "FROM events WHERE type = 'PairSubmitted'"
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()


def cached(n: int) -> Path:
    """A generated log of ``n`` events, built once per machine under /tmp (copy it before use)."""
    d = Path("/tmp/beagled-bench-logs")
    d.mkdir(exist_ok=True)
    p = d / f"events-{n}.sqlite3"
    if not p.exists():
        tmp = d / f"tmp-{n}.sqlite3"
        for q in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            q.unlink(missing_ok=True)
        t0 = time.perf_counter()
        generate(tmp, n)
        print(f"generated {n:,} events in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        tmp.rename(p)
    return p


if __name__ == "__main__":
    t0 = time.perf_counter()
    generate(Path(sys.argv[1]), int(sys.argv[2]))
    print(f"{time.perf_counter() - t0:.1f}s")
