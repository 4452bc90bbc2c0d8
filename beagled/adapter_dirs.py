"""The adapter directories on disk (``ports.AdapterStore``): one per trained adapter, an atomic ``current``.

Layout under ``<state_dir>/voices/<voice>/``::

    adapters/.staging/<job>-a<attempt>/   a training subprocess writes here (never promoted)
    adapters/<job>/                       a finished adapter: PEFT files + manifest.json
    current -> adapters/<job>             swapped by writing a new link and renaming it over the old
    served.json                           the served name, for loops that poll a file

Every operation is idempotent so that the engine can simply redo one after a crash. Promotion refuses a
directory whose files do not match its manifest.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from beagled import manifest
from beagled.errors import AdapterError
from beagled.faults import fault


class AdapterDirs:
    """The ``AdapterStore`` port on a local (or shared) file system, rooted at ``<state_dir>/voices``."""

    def __init__(self, root: Path, *, keep_versions: int = 5) -> None:
        self.root = root
        self.keep_versions = keep_versions
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def voice_dir(self, voice: str) -> Path:
        return self.root / voice

    def adapters_dir(self, voice: str) -> Path:
        return self.voice_dir(voice) / "adapters"

    def adapter_dir(self, voice: str, job_id: str) -> Path:
        return self.adapters_dir(voice) / job_id

    def staging_dir(self, voice: str, job_id: str, attempt: int, backend: str) -> Path:
        """A fresh, empty parent for one backend's try; the worker creates ``out_dir`` inside."""
        d = self.adapters_dir(voice) / ".staging" / f"{job_id}-a{attempt}-{backend}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def finalize(self, voice: str, job_id: str, out_dir: Path) -> Path:
        """Check a worker's output against its manifest and move it to its final name (idempotent)."""
        manifest.verify(out_dir)
        final = self.adapter_dir(voice, job_id)
        if final.exists():  # an earlier attempt got this far before a crash: its result is not recorded
            shutil.rmtree(final)
        out_dir.rename(final)
        manifest.fsync_dir(final.parent)
        shutil.rmtree(out_dir.parent, ignore_errors=True)
        return final

    def promote(self, voice: str, job_id: str) -> Path:
        """Point ``current`` at the job's adapter: verify it, write a new link, rename it over the old."""
        target = self.adapter_dir(voice, job_id)
        manifest.verify(target)
        self._swap(voice, target)
        return target

    def _swap(self, voice: str, target: Path) -> None:
        vdir = self.voice_dir(voice)
        # a name of its own per swap: two swaps at once (a rollback's request and the serve loop) never
        # collide on the temporary link; the rename is atomic, the last one wins
        tmp = vdir / f".current.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.symlink_to(target.relative_to(vdir))
        fault("mid_promotion")
        tmp.replace(vdir / "current")
        manifest.fsync_dir(vdir)

    def current(self, voice: str) -> Path | None:
        link = self.voice_dir(voice) / "current"
        if not link.is_symlink():
            return None
        return (link.parent / os.readlink(link)).resolve()

    def current_job(self, voice: str) -> str | None:
        cur = self.current(voice)
        return cur.name if cur is not None else None

    def verify(self, voice: str, job_id: str) -> dict[str, Any]:
        return manifest.verify(self.adapter_dir(voice, job_id))

    def write_served(self, voice: str, info: dict[str, Any]) -> None:
        vdir = self.voice_dir(voice)
        vdir.mkdir(parents=True, exist_ok=True)
        tmp = vdir / ".served.json.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(vdir / "served.json")
        manifest.fsync_dir(vdir)

    def prunable(self, voice: str, keep: list[str]) -> list[str]:
        """Finished adapters that ``prune(voice, keep)`` would remove (neither in ``keep`` nor current)."""
        adir = self.adapters_dir(voice)
        if not adir.is_dir():
            return []
        protected = set(keep)
        cur = self.current_job(voice)
        if cur:
            protected.add(cur)
        return sorted(
            d.name
            for d in adir.iterdir()
            if not d.name.startswith(".") and d.name not in protected and d.is_dir()
        )

    def prune(self, voice: str, keep: list[str]) -> list[str]:
        """Remove finished adapters not in ``keep`` (the engine passes the newest versions) nor current.

        The engine keeps, too, every directory a server may still have registered (``retention``)."""
        removed = self.prunable(voice, keep)
        for name in removed:
            shutil.rmtree(self.adapter_dir(voice, name))
        return removed

    # -- removing a deleted voice's adapters (an intent on disk, finished by ``retention.sweep``) ----
    REMOVAL = ".remove.json"

    def mark_removal(self, voice: str) -> list[str]:
        """Record (durably) that the voice's adapters are to go; returns their job ids."""
        adir = self.adapters_dir(voice)
        jobs = sorted(d.name for d in adir.iterdir() if not d.name.startswith(".")) if adir.is_dir() else []
        vdir = self.voice_dir(voice)
        if not vdir.is_dir():
            return []
        tmp = vdir / (self.REMOVAL + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump({"voice": voice, "jobs": jobs}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(vdir / self.REMOVAL)
        manifest.fsync_dir(vdir)
        return jobs

    def pending_removals(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for vdir in self.root.iterdir() if self.root.is_dir() else []:
            marker = vdir / self.REMOVAL
            try:
                data = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            jobs = data.get("jobs") if isinstance(data, dict) else None
            out[vdir.name] = [j for j in jobs if isinstance(j, str)] if isinstance(jobs, list) else []
        return out

    def finish_removal(
        self, voice: str, jobs: list[str], *, whole_voice: bool, keep_marker: bool = False
    ) -> None:
        """Delete the released adapters; then the marker (unless some are still held), or the whole
        voice directory."""
        for job in jobs:
            d = self.adapter_dir(voice, job)
            if d.is_dir():
                shutil.rmtree(d)
        if keep_marker:
            return
        if whole_voice:
            self.remove(voice)
        else:
            (self.voice_dir(voice) / self.REMOVAL).unlink(missing_ok=True)

    def remove(self, voice: str) -> bool:
        """Delete every adapter of the voice (its events stay in the log). True if anything was there."""
        vdir = self.voice_dir(voice)
        if not vdir.exists():
            return False
        for p in (self.root, vdir):  # rmtree must never follow a link planted on the way to the voice
            if p.is_symlink():
                raise AdapterError(f"{p} is a symbolic link; refusing to delete through it")
        shutil.rmtree(vdir)
        manifest.fsync_dir(self.root)
        return True

    def clean_staging(self) -> None:
        for vdir in self.root.iterdir() if self.root.is_dir() else []:
            staging = vdir / "adapters" / ".staging"
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
