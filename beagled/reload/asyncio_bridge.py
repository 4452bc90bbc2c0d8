"""A dedicated asyncio event loop driven from trio, for asyncio-only libraries (asyncssh).

``AsyncioThread.call`` runs one coroutine on the loop's thread and wakes trio when it is done; a trio
cancellation cancels the asyncio task and waits (briefly, shielded) for it to unwind, so whatever it
holds (an SSH connection) is closed before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

from beagled.errors import ReloadError

T = TypeVar("T")
CANCEL_GRACE_S = 5.0


class AsyncioThread:
    """One asyncio event loop on a dedicated daemon thread, driven from trio.

    ``await call(factory)`` runs ``factory()`` as a task on that loop and wakes trio from the task's
    done callback, so no worker thread is parked. If the trio side is cancelled (or times out), the
    asyncio task is cancelled too and ``call`` waits (shielded, at most ``CANCEL_GRACE_S``) for it to
    unwind, so connections are closed before the cancellation propagates.
    """

    def __init__(self, name: str = "beagled-asyncio") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, started), name=self._name, daemon=True
                )
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        loop = self._ensure()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        tasks: list[asyncio.Task[T]] = []

        def wake(_: object) -> None:  # asyncio thread: the task has fully unwound (connections closed)
            with contextlib.suppress(trio.RunFinishedError):  # trio already gone
                token.run_sync_soon(done.set)

        def start() -> None:  # asyncio thread
            task = loop.create_task(factory())
            task.add_done_callback(wake)
            tasks.append(task)

        def cancel() -> None:  # asyncio thread; always runs after start() (FIFO)
            for task in tasks:
                task.cancel()

        loop.call_soon_threadsafe(start)
        try:
            await done.wait()
        except trio.Cancelled:
            loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
                await done.wait()
            raise
        task = tasks[0]
        if task.cancelled():
            raise ReloadError("the SSH operation was cancelled on the asyncio side")
        return task.result()

    async def aclose(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            await trio.to_thread.run_sync(thread.join)
