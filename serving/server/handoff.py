"""Batcher results delivered to the event loop: one loop wake-up per batch, not per request."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future


class Handoff:
    """Delivers batcher results to the event loop: one loop wake-up per batch, not per request.

    ``asyncio.wrap_future`` wakes the loop (a write to its self-pipe) for every finished request;
    with 64 single-image requests per batch those writes and wake-ups cost more than the model.
    Here the first result of a burst schedules one delivery and the rest join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future, Future]] = []

    def wrap(self, future: Future) -> asyncio.Future:
        """An asyncio future for ``future``; cancelling it cancels ``future`` (if still queued)."""
        waiter = self.loop.create_future()
        waiter.add_done_callback(lambda w: w.cancelled() and future.cancel())
        future.add_done_callback(lambda f: self._finished(waiter, f))
        return waiter

    def _finished(self, waiter: asyncio.Future, future: Future) -> None:
        with self._lock:
            self._ready.append((waiter, future))
            if len(self._ready) > 1:
                return  # a delivery is already scheduled and will take this one too
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for waiter, future in ready:
            if waiter.done():
                continue  # the caller stopped waiting (cancelled, timed out)
            if future.cancelled():
                waiter.cancel()
            elif (error := future.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())
