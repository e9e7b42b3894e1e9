"""A dynamic batcher: concurrent requests for one network are merged, run once, split back.

Requests queue up; a worker thread takes the oldest ones until ``max_batch_size`` items are
gathered or the oldest has waited ``max_queue_delay`` seconds, drops those whose deadline passed
or whose caller went away (before they cost compute), runs the rest as one batch and hands each
request its own slice. A request is never split and results never mix between requests.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests already."""


class Expired(RuntimeError):
    """The request's deadline passed, or its caller cancelled, before it was run."""


class Stopped(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class _Request:
    inputs: np.ndarray
    deadline: float | None  # time.monotonic() value
    is_active: Callable[[], bool]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return (self.deadline is not None and now >= self.deadline) or not self.is_active()


@dataclass
class BatchStats:
    """What the worker did with one batch (for metrics and tests)."""

    size: int
    requests: int
    queue_wait_s: float
    compute_s: float


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into batched calls of ``run``."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 64,
                 max_queue_delay_s: float = 0.002, max_queue: int = 1024, enabled: bool = True,
                 name: str = "batcher", on_batch: Callable[[BatchStats], None] | None = None):
        self._run = run
        self.max_batch_size, self.max_queue_delay_s, self.max_queue = max_batch_size, max_queue_delay_s, max_queue
        self.enabled = enabled
        self._on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, inputs: np.ndarray, deadline: float | None = None,
               is_active: Callable[[], bool] = lambda: True) -> Future:
        """Queue ``inputs`` (a batch of 1+ items); the future resolves to their outputs."""
        request = _Request(inputs, deadline, is_active)
        with self._cond:
            if self._stopped:
                raise Stopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} requests waiting); retry later")
            self._queue.append(request)
            self._queued_items += len(inputs)
            self._cond.notify()
        return request.future

    def depth(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        """Finish what is queued, then end the worker thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[_Request] | None:
        """Wait for work, then pop the requests of the next batch (None once stopped and empty)."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if not self._queue:
                return None
            if self.enabled:
                flush_at = self._queue[0].enqueued + self.max_queue_delay_s
                while self._queued_items < self.max_batch_size and not self._stopped:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            taken, size = [self._queue.popleft()], 0
            size = len(taken[0].inputs)
            while self.enabled and self._queue and size + len(self._queue[0].inputs) <= self.max_batch_size:
                taken.append(self._queue.popleft())
                size += len(taken[-1].inputs)
            self._queued_items -= size
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            try:
                self._dispatch(taken)
            except Exception:  # never let one bad batch end the worker: every later call would hang
                log.exception("batcher %s: unexpected error", self._thread.name)

    def _dispatch(self, taken: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for request in taken:
            if not request.future.set_running_or_notify_cancel():
                continue  # its caller gave up (future.cancel()) while it was queued
            if request.expired(now):
                request.future.set_exception(Expired("deadline passed or caller cancelled while queued"))
            else:
                live.append(request)
        if live:
            self._execute(live, now)

    def _execute(self, requests: list[_Request], now: float) -> None:
        start = time.perf_counter()
        try:
            batch = requests[0].inputs if len(requests) == 1 else np.concatenate([r.inputs for r in requests])
            outputs = self._run(batch)
        except Exception as exc:  # a failed run fails its requests, never the worker
            log.exception("batch of %d failed", sum(len(r.inputs) for r in requests))
            for request in requests:
                request.future.set_exception(exc)
            return
        compute = time.perf_counter() - start
        offset = 0
        for request in requests:
            request.future.set_result(outputs[offset : offset + len(request.inputs)])
            offset += len(request.inputs)
        if self._on_batch:
            wait = max(now - r.enqueued for r in requests)
            self._on_batch(BatchStats(offset, len(requests), wait, compute))
