"""Deleting adapter directories without taking an inference server down.

vLLM re-reads a registered adapter's directory when it drops out of its CPU cache; if the directory is
gone, the next request for that adapter kills the engine and the whole server exits. So a directory is
deleted only after every server that had it registered no longer lists it: unload, verify in
``/v1/models``, then delete (``Reloader.release``, where the reloader has one; ``ssh`` and ``command``
servers read their own copies).

Crash safety is re-derived from the disk, with no events: retention (``prune``) recomputes what may go
at every promotion and at start-up, so a crash between an unload and the delete only leaves a
directory for the next pass. ``delete_voice --remove-adapters`` writes its intent first (a marker file
listing the voice's adapters, ``AdapterStore.mark_removal``); ``sweep`` finishes it at start-up, at each
reconcile pass and right away, deleting only what no server lists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from beagled.errors import ReloadError
from beagled.ports import AdapterStore, Reloader

log = logging.getLogger("beagled.retention")


async def release(reloader: Reloader, dirs: list[Path]) -> set[Path]:
    """The dirs that no server lists any more (after unloading them); all of them for reloaders
    that do not serve from the daemon's directories."""
    if not dirs:
        return set()
    try:
        with trio.fail_after(120):
            released = await reloader.release(dirs)
    except (ReloadError, trio.TooSlowError) as e:
        log.warning("keeping %d adapter director%s: %s", len(dirs), "y" if len(dirs) == 1 else "ies", e)
        return set()
    return released


async def prune(voices: AdapterStore, reloader: Reloader, voice: str, keep: list[str]) -> list[str]:
    """Retention: remove the voice's adapters beyond ``keep`` that no server lists; returns them."""
    candidates = await trio.to_thread.run_sync(voices.prunable, voice, keep)
    if not candidates:
        return []
    safe = await release(reloader, [voices.adapter_dir(voice, j) for j in candidates])
    held = [j for j in candidates if voices.adapter_dir(voice, j) not in safe]
    if held:
        log.info("retention keeps %s until no server lists them", held, extra={"voice": voice})
    return await trio.to_thread.run_sync(voices.prune, voice, keep + held)


async def remove_voice(
    voices: AdapterStore, reloader: Reloader, voice: str, exists: Callable[[str], bool]
) -> bool:
    """``delete_voice --remove-adapters``: mark, then sweep. True when everything is gone now."""
    await trio.to_thread.run_sync(voices.mark_removal, voice)
    await sweep(voices, reloader, exists)
    return not voices.voice_dir(voice).exists()


async def sweep(voices: AdapterStore, reloader: Reloader, exists: Callable[[str], bool]) -> None:
    """Finish every marked removal as far as the servers allow. ``exists(voice)``: is the voice in
    the log again (a new voice of the same name keeps its new adapters and directory)."""
    for voice, jobs in (await trio.to_thread.run_sync(voices.pending_removals)).items():
        dirs = [voices.adapter_dir(voice, j) for j in jobs]
        present = [d for d in dirs if d.exists()]
        safe = await release(reloader, present)
        done = [d.name for d in present if d in safe]
        if len(done) == len(present):
            whole = not exists(voice)
            await trio.to_thread.run_sync(partial(voices.finish_removal, voice, done, whole_voice=whole))
            log.info("adapters removed", extra={"voice": voice, "adapters": len(done)})
        else:
            await trio.to_thread.run_sync(
                partial(voices.finish_removal, voice, done, whole_voice=False, keep_marker=True)
            )
            log.warning(
                "a server still lists some adapters of the deleted voice: kept until it does not",
                extra={"voice": voice, "kept": len(present) - len(done)},
            )
