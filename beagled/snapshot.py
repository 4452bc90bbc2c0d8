"""Snapshots of the projected state (``jobs.State``): pure, versioned, exact serialisation. No I/O.

Recovery that does not grow with history: the engine stores ``to_snapshot(state)`` in the log's
``snapshots`` table every ``daemon.snapshot_every`` events and, at start-up, loads the newest one it can
read and replays only the events after its ``seq``. ``from_snapshot(to_snapshot(s)) == s`` exactly.

Format (``SCHEMA`` 1): three lines of UTF-8 JSON — a header, the voices, the jobs. Records are
positional lists, not objects: a log of a million events holds tens of thousands of jobs, and repeating
field names would double the size. The header names the fields of ``Job`` and ``Voice`` in the order
they were written, carries a CRC-32 of the two record lines, and holds the servers the daemon put to
sleep (``sleeping``: URL -> a ``Sleeping`` record as a list, its fields named by ``sleeping_fields``).
A snapshot that is damaged, of another schema, or whose field lists differ from this build's records
(the projection changed shape) is refused with ``SnapshotError`` and recovery falls back to an older
snapshot or a full replay — a stale or corrupt projection is never loaded. Tuples are restored from
lists, ``JobState`` from its value; floats round-trip exactly (``repr``). Not compressed: at a million
events, zlib costs more CPU than the disk space it saves is worth. Records are encoded one by one, so a
writer thread yields the GIL to the event loop between them (one C-level ``json.dumps`` of the whole
state would hold it for a second).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable
from typing import Any

from beagled import jobs
from beagled.jobs import Intent, Job, JobState, Voice

SCHEMA = 4  # 2: keep_finished and archived counts in the header; 3: held-out window, jobs' eval ids;
# 4: the servers asleep (``State.sleeping``) in the header
MAGIC = "beagled-state"
# fields renamed since a snapshot of this schema could be written: read under their new name
RENAMED = {"reload_intent": "rollback_to"}  # Voice: the rollback's target job


class SnapshotError(ValueError):
    """The blob is not a snapshot this build can load (corrupt, another schema, another shape)."""


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _converter(annotation: Any) -> Callable[[Any], Any] | None:
    """How to turn a JSON value back into a field of this annotation (None: as decoded)."""
    a = str(annotation).replace(" ", "")
    if a.startswith("list[tuple["):
        return lambda v: [tuple(x) for x in v]
    if a.startswith("tuple[tuple["):
        return lambda v: tuple(map(tuple, v))
    if a.startswith("tuple["):
        return tuple
    if a == "JobState":
        return JobState
    if a == "Intent|None":
        return lambda v: None if v is None else Intent(v)
    return None


def _converters(cls: type) -> list[tuple[int, Callable[[Any], Any]]]:
    out = []
    for i, f in enumerate(dataclasses.fields(cls)):
        conv = _converter(f.type)
        if conv is not None:
            out.append((i, conv))
    return out


_JOB_FIELDS = _names(Job)
_VOICE_FIELDS = _names(Voice)
_SLEEPING_FIELDS = _names(jobs.Sleeping)
_JOB_CONV = _converters(Job)
_VOICE_CONV = _converters(Voice)
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode


def _row(rec: Any, names: list[str]) -> list[Any]:
    d = rec.__dict__
    return [d[n] for n in names]


def to_snapshot(state: jobs.State) -> bytes:
    """Serialise ``state``. Take the view on the event loop (``view(state)``) and call this anywhere."""
    voices = "[" + ",".join(_encode(_row(v, _VOICE_FIELDS)) for v in state.voices.values()) + "]"
    job_rows = "[" + ",".join(_encode(_row(j, _JOB_FIELDS)) for j in state.jobs.values()) + "]"
    body = (voices + "\n" + job_rows).encode("utf-8")
    header = {
        "magic": MAGIC,
        "schema": SCHEMA,
        "seq": state.seq,
        "paused": state.paused,
        "heldout_max": state.heldout_max,
        "keep_finished": state.keep_finished,
        "archived": state.archived,
        "sleeping": {url: _row(rec, _SLEEPING_FIELDS) for url, rec in state.sleeping.items()},
        "sleeping_fields": _SLEEPING_FIELDS,
        "job_fields": _JOB_FIELDS,
        "voice_fields": _VOICE_FIELDS,
        "crc32": zlib.crc32(body),
        "bytes": len(body),
    }
    return _encode(header).encode("utf-8") + b"\n" + body


def view(state: jobs.State) -> jobs.State:
    """A consistent copy to serialise off the event loop: ``Job`` records are frozen and replaced, so
    copying the dict is enough; ``Voice`` records are updated in place, so their lists are copied too."""
    return jobs.State(
        seq=state.seq,
        paused=state.paused,
        jobs=dict(state.jobs),
        voices={
            name: dataclasses.replace(
                v,
                pending=list(v.pending),
                heldout=list(v.heldout),
                heldout_window=list(v.heldout_window),
                trained=list(v.trained),
            )
            for name, v in state.voices.items()
        },
        heldout_max=state.heldout_max,
        keep_finished=state.keep_finished,
        archived=dict(state.archived),
        sleeping=dict(state.sleeping),  # records are frozen
    )


def _build(cls: type, names: list[str], conv: list[tuple[int, Callable[[Any], Any]]], row: list[Any]) -> Any:
    for i, c in conv:
        row[i] = c(row[i])
    if "__slots__" in cls.__dict__:  # pragma: no cover - the records are plain frozen dataclasses today
        return cls(*row)
    # A frozen dataclass without slots keeps its fields in __dict__; filling it directly skips the
    # per-field object.__setattr__ of the generated __init__ (most of the cost of loading 100k jobs).
    obj: Any = object.__new__(cls)
    obj.__dict__.update(zip(names, row, strict=True))
    return obj


def _bad_record() -> Any:
    raise SnapshotError("sleeping record of the wrong length")


def read_header(blob: bytes) -> dict[str, Any]:
    """The header of a snapshot (cheap: it does not decode the records)."""
    nl = blob.find(b"\n")
    try:
        header = json.loads(blob[:nl]) if nl > 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise SnapshotError("not a beagled state snapshot")
    return header


def from_snapshot(blob: bytes) -> jobs.State:
    """The state a snapshot holds; raises ``SnapshotError`` when it cannot be loaded exactly."""
    header = read_header(blob)
    if header.get("schema") != SCHEMA:
        raise SnapshotError(f"snapshot schema {header.get('schema')!r} is not {SCHEMA}")
    voice_fields = [RENAMED.get(n, n) for n in header.get("voice_fields") or ()]
    if (
        header.get("job_fields") != _JOB_FIELDS
        or voice_fields != _VOICE_FIELDS
        or header.get("sleeping_fields") != _SLEEPING_FIELDS
    ):
        raise SnapshotError("snapshot was written for records of another shape")
    body = memoryview(blob)[blob.find(b"\n") + 1 :]
    if len(body) != header.get("bytes") or zlib.crc32(body) != header.get("crc32"):
        raise SnapshotError("snapshot is damaged (length or checksum mismatch)")
    try:
        voice_line, job_line = bytes(body).split(b"\n")
        voice_rows, job_rows = json.loads(voice_line), json.loads(job_line)
        state = jobs.State(
            seq=int(header["seq"]),
            paused=bool(header["paused"]),
            heldout_max=int(header["heldout_max"]),
            keep_finished=int(header["keep_finished"]),
            archived={str(k): int(n) for k, n in dict(header["archived"]).items()},
            sleeping={
                str(url): jobs.Sleeping(*row) if len(row) == len(_SLEEPING_FIELDS) else _bad_record()
                for url, row in dict(header["sleeping"]).items()
            },
        )
        nv, nj = len(_VOICE_FIELDS), len(_JOB_FIELDS)
        for row in voice_rows:
            if len(row) != nv:
                raise SnapshotError("voice record of the wrong length")
            v = _build(Voice, _VOICE_FIELDS, _VOICE_CONV, row)
            state.voices[v.name] = v
        for row in job_rows:
            if len(row) != nj:
                raise SnapshotError("job record of the wrong length")
            j = _build(Job, _JOB_FIELDS, _JOB_CONV, row)
            state.jobs[j.job_id] = j
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"snapshot is malformed: {e}") from None
    return state
