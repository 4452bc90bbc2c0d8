"""An inference server's health URL, asked over HTTP: once (``verify``) or until it answers 200.

``HealthCheck.wait`` polls every ``HEALTH_POLL_S`` and raises ``ReloadError`` when ``timeout_s`` passes
without a 200 (used after ``method = "ssh"`` restarts the server).
"""

from __future__ import annotations

import logging

import httpx
import trio

from beagled.errors import ReloadError

log = logging.getLogger("beagled.reload.ssh")

HEALTH_POLL_S = 0.25


class HealthCheck:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s

    async def once(self, client: httpx.AsyncClient | None = None) -> bool:
        """Whether ``url`` answers 200 now (an unreachable server is ``False``)."""
        try:
            if client is None:
                async with httpx.AsyncClient(timeout=10.0) as own:
                    response = await own.get(self.url)
            else:
                response = await client.get(self.url)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def wait(self) -> None:
        """Poll until ``url`` answers 200; ``ReloadError`` after ``timeout_s``."""
        start = trio.current_time()
        attempts = 0
        async with httpx.AsyncClient(timeout=min(10.0, self.timeout_s)) as client:
            with trio.move_on_after(self.timeout_s):
                while True:
                    attempts += 1
                    if await self.once(client):
                        log.info("%s answered 200 after %.2f s", self.url, trio.current_time() - start)
                        return
                    await trio.sleep(HEALTH_POLL_S)
        raise ReloadError(
            f"{self.url} did not answer 200 within {self.timeout_s:g} s after the restart ({attempts} tries)"
        )
