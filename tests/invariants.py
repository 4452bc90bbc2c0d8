"""What must hold after any crash: shared checks for the crash matrix, the kill loop and the fault tests.

Each check talks to a running daemon (``DaemonProc``) or reads its files, and raises ``AssertionError``
with what it saw. ``check_all`` runs them in order:

- every acknowledged submission is in the log: re-submitting its key with other drafts answers
  ``conflict`` naming the same ``pair_id``;
- no pair is trained twice: a job's ``pair_ids`` are unique and a pair is in at most one job
  (``replay_ids`` are deliberate re-use and are not counted);
- every job reaches a final state (``reloaded`` with a reloader, ``promoted`` without; ``failed`` and
  ``rejected`` always);
- each voice's ``current`` link points to a complete adapter whose files match its manifest, and it is
  the adapter the daemon says is current;
- the inference server serves exactly the current adapter (the command reloader's call log, or the
  vLLM stand-in's loaded adapters);
- ``PRAGMA integrity_check`` on the event log (opened read-only) answers ``ok``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beagled import manifest
from beagled.client import Client
from tests.daemon_proc import DaemonProc, poll

FINAL_WITH_RELOADER = frozenset({"reloaded", "failed", "rejected"})
FINAL_WITHOUT_RELOADER = frozenset({"promoted", "reloaded", "failed", "rejected"})


@dataclass(frozen=True)
class Ack:
    key: str
    pair_id: str
    voice: str


def reload_script(tmp: Path) -> tuple[Path, Path]:
    """A command reloader that appends ``<voice> <adapter_dir> <version>`` to a log; (script, log)."""
    calls = tmp / "reloads.log"
    script = tmp / "reload.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $2 $3" >> {calls}\n')
    script.chmod(0o755)
    return script, calls


def command_reload_tables(script: Path) -> dict[str, dict[str, Any]]:
    return {
        "reload": {"method": "command", "reconcile_interval_s": 3600.0, "retry_backoff_s": 0.05},
        "reload.command": {"argv": [str(script), "{voice}", "{adapter_dir}", "{version}"]},
    }


# --- the checks ---------------------------------------------------------------------------------


def check_acked(client: Client, acked: Iterable[Ack], *, chunk: int = 500) -> int:
    """Re-submit every acknowledged key (other drafts, same voice): each must be refused as a
    ``conflict`` naming the pair the key was acknowledged for (so the key is in the log, bound to it)."""
    acks = list(acked)
    for i in range(0, len(acks), chunk):
        part = acks[i : i + chunk]
        responses = client.pipeline(
            [
                ("submit", {"voice": a.voice, "bad": "re-sent bad", "good": "re-sent good", "key": a.key})
                for a in part
            ]
        )
        for a, r in zip(part, responses, strict=True):
            assert r.get("ok") is False, f"acknowledged key {a.key!r} is not in the log: {r}"
            assert r["error"]["code"] == "conflict", f"re-submitting key {a.key!r}: {r}"
            assert a.pair_id in r["error"]["message"], f"key {a.key!r} acked {a.pair_id}, now {r}"
    return len(acks)


def all_jobs(client: Client) -> list[dict[str, Any]]:
    """Every job with its full record (``pair_ids``, ``replay_ids``, history)."""
    listed = client.jobs(limit=10_000)["jobs"]
    if not listed:
        return []
    responses = client.pipeline([("job", {"job_id": j["job_id"]}) for j in listed])
    out = []
    for r in responses:
        assert r.get("ok") is True, r
        out.append(r["result"]["job"])
    return out


def check_pairs_trained_once(jobs: list[dict[str, Any]]) -> None:
    owner: dict[str, str] = {}
    for j in jobs:
        ids = j["pair_ids"]
        assert len(ids) == len(set(ids)), f"job {j['job_id']} lists a pair twice: {ids}"
        for pid in ids:
            assert pid not in owner, f"pair {pid} is in two jobs: {owner[pid]} and {j['job_id']}"
            owner[pid] = j["job_id"]


def wait_final(d: DaemonProc, final: frozenset[str], timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll until every job is in a final state; return the jobs (listing form)."""

    def settled() -> list[dict[str, Any]] | None:
        with d.client(timeout=10) as c:
            js = c.jobs(limit=10_000)["jobs"]
        return js if all(j["state"] in final for j in js) else None

    try:
        return poll(settled, timeout, 0.1, f"every job in {sorted(final)}")  # type: ignore[no-any-return]
    except AssertionError:
        with d.client(timeout=10) as c:
            states = [(j["job_id"], j["state"], j["error"]) for j in c.jobs(limit=10_000)["jobs"]]
        raise AssertionError(f"jobs not final after {timeout}s: {states}\n{d.log_text()[-4000:]}") from None


def check_current_links(d: DaemonProc, voices: list[dict[str, Any]]) -> dict[str, Path]:
    """Each voice's ``current`` link: the adapter the daemon names, complete, matching its manifest."""
    out: dict[str, Path] = {}
    for v in voices:
        link = d.state_dir / "voices" / v["voice"] / "current"
        if v["current_job"] is None:
            assert not link.is_symlink(), f"voice {v['voice']} has no current job but a current link"
            continue
        assert link.is_symlink(), f"voice {v['voice']} serves {v['current_job']} but has no current link"
        target = link.resolve()
        assert target.name == v["current_job"], f"current -> {target.name}, the log says {v['current_job']}"
        manifest.verify(target)
        out[v["voice"]] = target
    return out


def check_served_command(calls: Path, voices: list[dict[str, Any]], current: Mapping[str, Path]) -> None:
    """The command reloader's last call for each served voice named the current adapter directory."""
    lines = calls.read_text().splitlines() if calls.exists() else []
    last: dict[str, str] = {}
    for ln in lines:
        voice, adapter_dir, _version = ln.split(" ")
        last[voice] = adapter_dir
    for v in voices:
        if v["current_job"] is None:
            continue
        assert v["voice"] in last, f"voice {v['voice']} was never reloaded"
        assert Path(last[v["voice"]]).resolve() == current[v["voice"]], (
            f"last reload of {v['voice']} was {last[v['voice']]}, current is {current[v['voice']]}"
        )
        assert v["served_name"] == f"{v['voice']}-v{v['version']:04d}", v


def check_served_vllm(
    adapters: Mapping[str, str], voices: list[dict[str, Any]], current: Mapping[str, Path]
) -> None:
    """The stand-in has exactly the current version of each voice loaded, from the current directory."""
    for v in voices:
        if v["current_job"] is None:
            continue
        mine = {n: p for n, p in adapters.items() if n.startswith(v["voice"] + "-v")}
        assert set(mine) == {v["served_name"]}, f"{v['voice']}: loaded {mine}, served_name {v['served_name']}"
        assert Path(mine[v["served_name"]]).resolve() == current[v["voice"]], (mine, current)


def check_integrity(db: Path) -> None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        (res,) = con.execute("PRAGMA integrity_check").fetchone()
        assert res == "ok", f"integrity_check: {res}"
        (n,) = con.execute("SELECT count(*) FROM events").fetchone()
        (m,) = con.execute("SELECT count(*) FROM pairs").fetchone()
        (k,) = con.execute("SELECT count(*) FROM idempotency").fetchone()
        assert m == k, f"{m} pairs but {k} idempotency keys"
        assert n >= m
    finally:
        con.close()


def check_log(d: DaemonProc) -> None:
    """The daemon's event log passes its checks: the SQLite file, or the shared PostgreSQL log."""
    url = d.tables.get("daemon", {}).get("database_url")
    if url:
        check_shared_log(str(url))
    else:
        check_integrity(d.state_dir / "events.sqlite3")


def check_shared_log(url: str) -> None:
    """PostgreSQL: positions without gaps, one key per pair, and every effect event stamped with a
    term no older than any before it (no deposed leader wrote after its successor)."""
    from beagled.dialects import PostgresDialect
    from beagled.store import SqlStore

    store = SqlStore(PostgresDialect(url))
    try:
        res = store.integrity_check()
        assert res == "ok", f"integrity_check: {res}"
        with store._writer.connect() as c:
            m = c.exec_driver_sql("SELECT count(*) FROM pairs").scalar()
            k = c.exec_driver_sql("SELECT count(*) FROM idempotency").scalar()
        assert m == k, f"{m} pairs but {k} idempotency keys"
        rows = store.terms()
    finally:
        store.close()
    newest = 0
    for seq, type_, term in rows:
        if type_ == "PairSubmitted":
            continue
        assert term is not None, f"effect event {seq} {type_} carries no term"
        assert term >= newest, f"event {seq} {type_} written under deposed term {term} after term {newest}"
        newest = term


def check_no_orphans(marker: str) -> None:
    """No process whose command line contains ``marker`` is left running (killed training groups)."""

    def gone() -> bool:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                return False
        return True

    poll(gone, 15, 0.1, f"no process running {marker!r}")


def check_all(
    d: DaemonProc,
    acked: Iterable[Ack],
    *,
    reloader: str = "none",
    calls: Path | None = None,
    vllm_adapters: Any = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Every invariant above, on a running daemon; returns a summary (jobs, voices, pairs checked)."""
    final = FINAL_WITH_RELOADER if reloader != "none" else FINAL_WITHOUT_RELOADER
    wait_final(d, final, timeout)
    with d.client(timeout=60) as c:
        n = check_acked(c, acked)
        jobs = all_jobs(c)
        voices = c.voices()["voices"]
    check_pairs_trained_once(jobs)
    current = check_current_links(d, voices)
    if reloader == "command":
        assert calls is not None
        check_served_command(calls, voices, current)
    elif reloader == "vllm":
        check_served_vllm(vllm_adapters() if callable(vllm_adapters) else vllm_adapters, voices, current)
    check_log(d)
    return {"acked": n, "jobs": jobs, "voices": voices}
