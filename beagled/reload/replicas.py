"""Several vLLM servers serving the same voices (``reload.vllm.urls``): the reloader the daemon uses
for ``method = "vllm"``, with one ``VllmReloader`` per replica (one replica for plain ``url``).

A promotion is served once every replica that answers lists the new name with the right ``root``; the
engine publishes ``served_name`` only then. Older versions are retired (unloaded beyond ``keep``) only
after that, on every replica, so the previous name keeps answering everywhere until the new one is
published. A replica that does not answer does not hold a promotion back: it is shown as behind and
``verify`` reports the voice unserved as soon as it answers again without it, so the engine's
reconcile loads it there. Each replica is reconciled on its own: ``load`` on a replica that lists the
adapter already sends nothing, so a restarted replica is served again without touching the others.

``replicas(voice)`` is what ``voices``/``status`` show per replica: url, served_name, verified_at,
behind, error. ``release`` answers the directories that no replica lists: a replica that cannot be
asked keeps every directory (it may still have them registered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client.core import GaugeMetricFamily, Metric

from beagled.errors import ConfigError, ReloadError
from beagled.reload import Reloader, ServeTarget
from beagled.reload.vllm import VllmReloader

log = logging.getLogger(__name__)

# the gauges ``collect`` yields, labelled by replica URL
REPLICA_GAUGES = (
    ("beagled_vllm_replica_behind", "Voices a vLLM replica is behind on."),
    (
        "beagled_vllm_replica_verified_timestamp_seconds",
        "When a vLLM replica was last seen serving a voice's current adapter.",
    ),
)


@dataclass
class ReplicaView:
    url: str
    served_name: str | None = None
    verified_at: float | None = None
    behind: bool = False
    error: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "served_name": self.served_name,
            "verified_at": self.verified_at,
            "behind": self.behind,
            "error": self.error,
        }


class VllmReplicas(Reloader):
    method = "vllm"

    def __init__(self, servers: Sequence[VllmReloader]) -> None:
        if not servers:
            raise ConfigError("reload.vllm.urls", "at least one server is needed")
        urls = [s.url for s in servers]
        if len(set(urls)) != len(urls):
            raise ConfigError("reload.vllm.urls", f"a server is listed twice: {urls}")
        self.servers = list(servers)
        # the engine's budget for one reload/verify/check_base: several requests to each server
        self.reload_timeout_s = max(s.timeout_s for s in servers) * 4 + 30
        self._views: dict[str, dict[str, ReplicaView]] = {}

    # --- what status shows ------------------------------------------------------------------------

    def _view(self, voice: str, url: str) -> ReplicaView:
        return self._views.setdefault(voice, {}).setdefault(url, ReplicaView(url))

    def replicas(self, voice: str) -> list[dict[str, Any]]:
        return [self._view(voice, s.url).public() for s in self.servers]

    def forget(self, voice: str) -> None:
        self._views.pop(voice, None)

    def collect(self) -> Iterator[Metric]:
        """``beagled_vllm_replica_behind{replica}``: voices a replica does not serve as it should;
        ``beagled_vllm_replica_verified_timestamp_seconds{replica}``: its newest verification."""
        behind, verified = (GaugeMetricFamily(name, doc, labels=["replica"]) for name, doc in REPLICA_GAUGES)
        for server in self.servers:
            views = [v[server.url] for v in self._views.values() if server.url in v]
            behind.add_metric([server.url], sum(1 for v in views if v.behind))
            verified.add_metric([server.url], max((v.verified_at or 0.0 for v in views), default=0.0))
        yield behind
        yield verified

    # --- the port ---------------------------------------------------------------------------------

    async def _each(self, fn: Any, *args: Any) -> list[tuple[VllmReloader, Any, ReloadError | None]]:
        """Run ``fn(server, *args)`` on every replica at once; (server, result, error) per replica."""
        out: list[tuple[VllmReloader, Any, ReloadError | None]] = [(s, None, None) for s in self.servers]

        async def one(i: int, server: VllmReloader) -> None:
            try:
                out[i] = (server, await fn(server, *args), None)
            except ReloadError as e:
                out[i] = (server, None, e)

        async with trio.open_nursery() as nursery:
            for i, server in enumerate(self.servers):
                nursery.start_soon(one, i, server)
        return out

    async def reload(self, target: ServeTarget) -> str:
        results = await self._each(lambda s, t: s.load(t), target)
        name = self.servers[0].served_name(target)
        fatal = [e for _, _, e in results if e is not None and not e.retryable]
        if fatal:
            for server, _, e in results:
                if e is not None:
                    self._view(target.voice, server.url).error = str(e)
            raise fatal[0]
        served = [s for s, _, e in results if e is None]
        if not served:
            errors = "; ".join(str(e) for _, _, e in results)
            for server, _, e in results:
                v = self._view(target.voice, server.url)
                v.behind, v.error = True, str(e)
            raise ReloadError(f"no vLLM replica could serve {name!r}: {errors}")
        now = time.time()
        for server, _, e in results:
            v = self._view(target.voice, server.url)
            if e is None:
                v.served_name, v.verified_at, v.behind, v.error = name, now, False, None
            else:
                v.behind, v.error = True, str(e)
                log.warning("vLLM replica %s is behind on %r: %s", server.url, name, e)
        # the new name is listed on every replica that answers: only now retire older versions
        await self._each(lambda s, t: s.retire(t), target)
        return name

    async def verify(self, target: ServeTarget) -> bool:
        """True when every replica that answers lists ``target`` (and at least one answers)."""
        results = await self._each(_verify_one, target)
        answered = [(s, ok) for s, ok, e in results if e is None]
        now = time.time()
        for server, ok, e in results:
            v = self._view(target.voice, server.url)
            if e is not None:
                v.behind, v.error = True, str(e)
            elif ok:
                v.served_name, v.verified_at, v.behind, v.error = server.served_name(target), now, False, None
            else:
                v.behind, v.error = True, "does not list the current adapter (restarted?)"
        return bool(answered) and all(ok for _, ok in answered)

    async def release(self, dirs: Sequence[Path]) -> set[Path]:
        """The dirs no replica lists any more (after unloading them everywhere)."""
        results = await self._each(lambda s, d: s.release(d), list(dirs))
        safe = set(dirs)
        for server, released, e in results:
            if e is not None:
                log.warning(
                    "cannot confirm vLLM at %s no longer serves %d adapter(s): %s", server.url, len(dirs), e
                )
                return set()
            safe &= released
        return safe

    async def check_base(self, training_base: str | None) -> str | None:
        """Check every replica's base; returns the base id the first answering one serves."""
        results = await self._each(lambda s, b: s.check_base(b), training_base)
        for _, _, e in results:
            if e is not None and not e.retryable:
                raise e
        return next((base.id for _, base, e in results if e is None and base is not None), None)

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()


async def _verify_one(server: VllmReloader, target: ServeTarget) -> bool:
    served = (await server.models()).get(server.served_name(target))
    return served is not None and served.root == server.server_path(target)
