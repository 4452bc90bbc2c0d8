"""The application service: recovery, group-committed submits, queries, and the loops that advance jobs.

The engine owns the projection (``jobs.State``) and is its one writer: every change goes through
``decide`` → the store → ``evolve``, under one lock, so the state is always the fold of the log. It
knows its collaborators only as ports (``beagled.ports``: the store, the adapter store, the trainer,
the reloader, the sleep guard, the metrics sink, the clock), wired by ``daemon``. Effects are bracketed
by intent and outcome events; after a crash, ``recover`` replays the log and the loops find each
unfinished intent and run it again (every effect is idempotent).

The rooms, each a module that owns one concern, sharing one ``context.Context``:

    module        owns
    ------        ----
    context       the shared context; the one writer (execute, catch-up, apply, publish); wake-ups
    facade        ``Engine``: wiring, recovery, leadership and the shared log, starting the loops
    commit        group commit of submits: the committer, acks, drain at shutdown
    snapshots     loading the newest snapshot at recovery, writing new ones in the background
    training      the scheduler (cutting jobs) and the trainer loop (attempts, backends, progress)
    probes        which training backends are available (probe, re-probe with backoff)
    spec          the training spec written for a job
    serving       the serve loop: gate and promotion, pruning, reload, finishing rollbacks
    served_base   the inference server's base model (its name, the start-up check)
    reconcile     checking the server still serves each voice, serving it again if not
    queries       status, jobs, job, voices and watch: the response shapes, in one place
    commands      train, rollback, pause/resume, delete_voice

Several daemons on one (PostgreSQL) log: every node runs the committer and the tail loop, which folds
in what the others append (woken by ``NOTIFY``, reading by position; ``lag_s``); only the leader
(``beagled.leader.Leadership``) runs the effect loops, cancelled the moment it loses the lease. A
follower refuses commands that write effects (``unavailable``, naming the leader).
"""

from beagled.engine.commit import MAX_BATCH, idempotency_key
from beagled.engine.context import Context, Wakeup, new_id
from beagled.engine.facade import Engine
from beagled.engine.queries import WATCH_BATCH
from beagled.engine.spec import training_example
from beagled.engine.training import fault_point_due

__all__ = [
    "MAX_BATCH",
    "WATCH_BATCH",
    "Context",
    "Engine",
    "Wakeup",
    "fault_point_due",
    "idempotency_key",
    "new_id",
    "training_example",
]
