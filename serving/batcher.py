"""A dynamic batcher: concurrent requests for one network are merged, run once, split back.

Requests queue up; a worker thread takes the oldest ones until ``max_batch_size`` items are
gathered or the oldest has waited ``max_queue_delay`` seconds, drops those whose deadline passed
or whose caller went away (before they cost compute), runs the rest as one batch and hands each
request its own slice. Results never mix between requests.

With several workers, one gathers the next batch while the others run theirs, and a request
large enough to keep every worker busy is cut into one piece per worker, run in parallel and
joined back in order. On CPU, single-threaded runs of pieces side by side beat one run spread
over every core (bench/results/serve_cpu.json).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests already."""


class Expired(RuntimeError):
    """The request's deadline passed, or its caller cancelled, before it was run."""


class Stopped(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


#: One request's inputs: an array, or a tuple of arrays with the same rows (a conditional
#: network's inputs and labels); rows are what is merged, cut and counted.
Inputs = np.ndarray | tuple[np.ndarray, ...]


def rows(inputs: Inputs) -> int:
    return len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)


def _split(inputs: Inputs, pieces: int) -> list[Inputs]:
    if isinstance(inputs, tuple):
        return list(zip(*(np.array_split(part, pieces) for part in inputs)))
    return np.array_split(inputs, pieces)


def _concatenate(batches: list[Inputs]) -> Inputs:
    if isinstance(batches[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*batches))
    return np.concatenate(batches)


@dataclass
class _Request:
    inputs: Inputs
    deadline: float | None  # time.monotonic() value
    is_active: Callable[[], bool]
    piece: bool = False  # one piece of a cut request: runs alone, beside its sibling pieces
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return rows(self.inputs)

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

    def __init__(self, run: Callable[[Inputs], np.ndarray], max_batch_size: int = 64,
                 max_queue_delay_s: float = 0.002, max_queue: int = 1024, enabled: bool = True,
                 name: str = "batcher", on_batch: Callable[[BatchStats], None] | None = None,
                 workers: int = 1, min_piece: int = 16):
        self._run = run
        self.max_batch_size, self.max_queue_delay_s, self.max_queue = max_batch_size, max_queue_delay_s, max_queue
        self.enabled, self.workers, self.min_piece = enabled, workers, min_piece
        self._on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._gather = threading.Lock()  # one worker gathers a batch at a time; the others run theirs
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}#{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Inputs, deadline: float | None = None,
               is_active: Callable[[], bool] = lambda: True) -> Future:
        """Queue ``inputs`` (a batch of 1+ items); the future resolves to their outputs.

        Admission and queueing are one step under the lock, and a request is cut into no more
        pieces than the queue has free places, so the queue never holds more than ``max_queue``.
        """
        with self._cond:
            if self._stopped:
                raise Stopped("the server is shutting down")
            free = self.max_queue - len(self._queue)
            if free <= 0:
                raise QueueFull(f"queue full ({self.max_queue} requests waiting); retry later")
            pieces = max(1, min(self.workers, rows(inputs) // self.min_piece, free))
            parts = [inputs] if pieces == 1 else _split(inputs, pieces)
            requests = [_Request(part, deadline, is_active, pieces > 1) for part in parts]
            self._queue.extend(requests)
            self._queued_items += rows(inputs)
            self._cond.notify_all() if pieces > 1 else self._cond.notify()
        return requests[0].future if pieces == 1 else _joined([r.future for r in requests])

    def depth(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        """Finish what is queued, then end the worker threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _take(self) -> list[_Request] | None:
        """Wait for work, then pop the requests of the next batch (None once stopped and empty)."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if not self._queue:
                return None
            if self.enabled and not self._queue[0].piece:  # a piece is big enough: no waiting for company
                flush_at = self._queue[0].enqueued + self.max_queue_delay_s
                while self._queued_items < self.max_batch_size and not self._stopped:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            taken = [self._queue.popleft()]
            size = taken[0].rows
            while (self.enabled and not taken[0].piece and self._queue and not self._queue[0].piece
                   and size + self._queue[0].rows <= self.max_batch_size):
                taken.append(self._queue.popleft())
                size += taken[-1].rows
            self._queued_items -= size
            return taken

    def _loop(self) -> None:
        while True:
            with self._gather:
                taken = self._take()
            if taken is None:
                return
            try:
                self._dispatch(taken)
            except Exception:  # never let one bad batch end the worker: every later call would hang
                log.exception("batcher %s: unexpected error", threading.current_thread().name)

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
            batch = requests[0].inputs if len(requests) == 1 else _concatenate([r.inputs for r in requests])
            outputs = self._run(batch)
        except Exception as exc:  # a failed run fails its requests, never the worker
            log.exception("batch of %d failed", sum(r.rows for r in requests))
            for request in requests:
                request.future.set_exception(exc)
            return
        compute = time.perf_counter() - start
        offset = 0
        for request in requests:
            request.future.set_result(outputs[offset : offset + request.rows])
            offset += request.rows
        if self._on_batch:
            wait = max(now - r.enqueued for r in requests)
            self._on_batch(BatchStats(offset, len(requests), wait, compute))


def _joined(parts: list[Future]) -> Future:
    """One future for the pieces of a split request: their outputs in order, or the first error.

    Cancelling it cancels the pieces still queued.
    """
    joined: Future = Future()
    left, lock = [len(parts)], threading.Lock()

    def part_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = next((p for p in parts if p.cancelled() or p.exception() is not None), None)
        try:
            if failed is None:
                joined.set_result(np.concatenate([p.result() for p in parts]))
            elif failed.cancelled():
                joined.cancel()
            else:
                joined.set_exception(failed.exception())
        except InvalidStateError:
            pass  # the caller cancelled the joined future meanwhile

    for part in parts:
        part.add_done_callback(part_done)
    joined.add_done_callback(lambda f: f.cancelled() and [p.cancel() for p in parts])
    return joined
