"""``Leadership`` over a fake lease (the real one is exercised by tests/test_failover.py): effects run
only while the lease holds, stop the moment a renewal fails, and the lease is released on the way out."""

from __future__ import annotations

import trio

from beagled.leader import LeaderInfo, Leadership


class FakeLease:
    """Hands out the terms it is given (None: another node leads); renewals fail once told to."""

    def __init__(self, terms: list[int | None], timeout_s: float = 0.4) -> None:
        self.terms = terms
        self.timeout_s = timeout_s
        self.node = "me"
        self.renew_ok = True
        self.renewals = 0
        self.released = 0
        self.asked = 0

    def try_acquire(self) -> int | None:
        return self.terms.pop(0) if self.terms else None

    def renew(self) -> bool:
        self.renewals += 1
        return self.renew_ok

    def current(self) -> tuple[LeaderInfo | None, list[str]]:
        self.asked += 1
        return LeaderInfo("other", 0), ["me", "other"]

    def release(self) -> None:
        self.released += 1


async def test_effects_run_only_while_the_lease_holds() -> None:
    lease = FakeLease([None, 1, 2])
    lead = Leadership(lease)  # type: ignore[arg-type]
    log: list[str] = []
    deposed = trio.Event()
    elected_as = {1: trio.Event(), 2: trio.Event()}  # (term 1 is awaited through `running`)

    running = trio.Event()

    async def elected(term: int) -> None:
        log.append(f"elected {term}")
        elected_as[term].set()

    async def effects() -> None:
        log.append("effects")
        running.set()
        try:
            await trio.sleep_forever()
        finally:
            log.append("effects stopped")

    def on_deposed() -> None:
        log.append("deposed")
        deposed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead.run, elected, effects, on_deposed)
        await running.wait()
        assert lease.asked >= 1  # the first try found another leader: it followed and asked who leads
        assert log == ["elected 1", "effects"]
        assert lead.is_leader and lead.term == 1 and lead.leader == LeaderInfo("me", 1)
        lease.renew_ok = False  # the database cut us off
        await deposed.wait()
        assert lead.is_leader is False
        assert log[-2:] == ["effects stopped", "deposed"]
        lease.renew_ok = True
        await elected_as[2].wait()
        assert lead.is_leader and lead.term == 2  # leads again, under a new term
        nursery.cancel_scope.cancel()
    assert lease.released == 1


async def test_a_failed_take_over_steps_down_instead_of_dying() -> None:
    lease = FakeLease([1, 2])
    lead = Leadership(lease)  # type: ignore[arg-type]
    terms: list[int] = []
    second = trio.Event()

    async def elected(term: int) -> None:
        terms.append(term)
        if term == 1:
            raise OSError("the log cannot be read")
        second.set()

    async def effects() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lead.run, elected, effects, lambda: None)
        await second.wait()
        assert terms == [1, 2] and lead.is_leader and lease.released == 1
        nursery.cancel_scope.cancel()
