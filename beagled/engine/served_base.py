"""The inference server's base model, as the serving side and the training specs both need it: the
name it serves the base under, and the start-up check that it is the training base."""

from __future__ import annotations

import logging

import trio

from beagled.engine.context import Context
from beagled.errors import ReloadError

log = logging.getLogger("beagled.engine")


class ServedBase:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.found: str | None = None  # the server's base entry id, found at start-up
        self.checked = False

    def name(self) -> str | None:
        """The name the inference server serves the base under, when known (reload.vllm.served_base,
        else the base entry found at start-up): trained adapters record it as their base."""
        if self.ctx.reloader.method != "vllm":
            return None
        return self.ctx.cfg.reload.vllm.served_base or self.found

    async def known(self) -> str | None:
        """``name``, asking the server first if nobody has yet (the first job may be cut before
        reconcile has asked)."""
        if self.name() is None and not self.checked:
            await self.check()
        return self.name()

    async def check(self) -> None:
        """At start-up: is the server's base model the training base? A mismatch is logged loudly
        (each load checks again and fails with the same message)."""
        self.checked = True
        ctx = self.ctx
        try:
            with trio.fail_after(ctx.reloader.reload_timeout_s):
                found = await ctx.reloader.check_base(ctx.cfg.training.base_model or None)
            if isinstance(found, str) and found:
                self.found = found  # written into adapters' base_model_name_or_path
        except ReloadError as e:
            if not e.retryable:
                log.error("the inference server's base model does not match: %s", e)
        except trio.TooSlowError:
            log.warning("cannot check the inference server's base model: no answer")
