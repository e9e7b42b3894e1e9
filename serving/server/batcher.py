"""A dynamic batcher: concurrent requests for one network are merged, run in batches, split back.

Requests queue up; a worker thread takes up to ``max_batch_size`` rows from the head of the queue
once that many are waiting or the oldest request has waited ``max_queue_delay`` seconds, drops the
requests whose deadline passed or whose caller went away (before they cost compute), runs the
batch and hands each request its rows. Results never mix between requests.

No batch holds more than ``max_batch_size`` rows. A larger request is served a batch at a time
and goes to the back of the queue after each (round robin), so nobody waits behind more than one
batch per worker of another request, however large (a guided-sampling round of thousands of
candidates), while with several workers the batches of one large request run side by side. On
CPU, single-threaded runs side by side beat one run spread over every core
(bench/results/serve_cpu.json).
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

from serving.server.config import ServeConfig

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


def _rows(inputs: Inputs, start: int, stop: int) -> Inputs:
    return tuple(part[start:stop] for part in inputs) if isinstance(inputs, tuple) else inputs[start:stop]


def _concatenate(batches: list[Inputs]) -> Inputs:
    if isinstance(batches[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*batches))
    return np.concatenate(batches)


def _settle(future: Future, result: np.ndarray | None = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless it is done already (its caller cancelled, or another batch failed it)."""
    try:
        future.set_exception(error) if error is not None else future.set_result(result)
    except InvalidStateError:
        pass


@dataclass(eq=False)
class _Request:
    """One submitted request; its rows may run in several batches, on several workers."""

    inputs: Inputs
    deadline: float | None  # time.monotonic() value
    is_active: Callable[[], bool]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    taken: int = 0  # rows handed to batches so far (under the batcher's lock)
    _outputs: dict[int, np.ndarray] = field(default_factory=dict)  # first row -> outputs of a batch
    _done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rows(self) -> int:
        return rows(self.inputs)

    def dropped(self, now: float) -> bool:
        """Cancelled or failed already, past its deadline, or its caller went away."""
        return (self.future.done() or (self.deadline is not None and now >= self.deadline)
                or not self.is_active())

    def deliver(self, start: int, outputs: Inputs) -> None:
        """The outputs (one array, or a tuple for a network of several outputs) of rows [start,
        start + their rows); the last part resolves the future."""
        with self._lock:
            self._outputs[start] = outputs
            self._done += rows(outputs)
            if self._done < self.rows:
                return
            parts = [self._outputs[first] for first in sorted(self._outputs)]
        _settle(self.future, parts[0] if len(parts) == 1 else _concatenate(parts))


@dataclass(frozen=True)
class _Segment:
    """Rows [start, stop) of one request, as part of a batch."""

    request: _Request
    start: int
    stop: int

    @property
    def inputs(self) -> Inputs:
        whole = self.start == 0 and self.stop == self.request.rows
        return self.request.inputs if whole else _rows(self.request.inputs, self.start, self.stop)


@dataclass
class BatchStats:
    """What the worker did with one batch (for metrics and tests)."""

    size: int
    requests: int
    queue_wait_s: float
    compute_s: float


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into batched calls of ``run``."""

    def __init__(self, run: Callable[[Inputs], np.ndarray], max_batch_size: int = ServeConfig.max_batch_size,
                 max_queue_delay_s: float = ServeConfig.max_queue_delay_ms / 1000,
                 max_queue: int = ServeConfig.max_queue, enabled: bool = True,
                 name: str = "batcher", on_batch: Callable[[BatchStats], None] | None = None,
                 workers: int = 1):
        self._run = run
        self.max_batch_size, self.max_queue_delay_s, self.max_queue = max_batch_size, max_queue_delay_s, max_queue
        self.enabled, self.workers = enabled, workers
        self._on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0  # rows not yet handed to a batch
        self._cond = threading.Condition()
        self._gather = threading.Lock()  # one worker gathers a batch at a time; the others run theirs
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}#{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Inputs, deadline: float | None = None,
               is_active: Callable[[], bool] = lambda: True) -> Future:
        """Queue ``inputs`` (a batch of 1+ items); the future resolves to their outputs.

        Admission and queueing are one step under the lock: the queue never holds more than
        ``max_queue`` requests, whatever their size.
        """
        request = _Request(inputs, deadline, is_active)
        with self._cond:
            if self._stopped:
                raise Stopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} requests waiting); retry later")
            self._queue.append(request)
            self._queued_rows += request.rows
            self._cond.notify_all() if request.rows > self.max_batch_size else self._cond.notify()
        return request.future

    def depth(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        """Refuse new requests, fail the queued ones, and return once no batch is running: only
        then may the network behind ``run`` be released."""
        with self._cond:
            self._stopped = True
            abandoned, self._queue, self._queued_rows = self._queue, collections.deque(), 0
            self._cond.notify_all()
        for request in abandoned:
            _settle(request.future, error=Stopped("the server is shutting down"))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def _take(self) -> tuple[list[_Segment], list[_Request]] | None:
        """Wait for work, then take the next batch's rows (None once stopped and empty); also
        returns the requests dropped on the way."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if not self._queue:
                return None
            if self.enabled:  # wait for company, up to the oldest request's batching window
                flush_at = self._queue[0].enqueued + self.max_queue_delay_s
                while self._queued_rows < self.max_batch_size and not self._stopped:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            return self._pop_rows(time.monotonic())

    def _pop_rows(self, now: float) -> tuple[list[_Segment], list[_Request]]:
        """The next batch: the requests at the head of the queue that fit in ``max_batch_size``
        rows whole (only the first with batching off), or one batch of rows of a request larger
        than that, which then goes to the back of the queue with the rest of its rows. A small
        request never waits for a large one's rows in its own batch."""
        segments: list[_Segment] = []
        dropped: list[_Request] = []
        room = self.max_batch_size
        while self._queue and (self.enabled or not segments):
            request = self._queue[0]
            left = request.rows - request.taken
            if request.dropped(now):
                self._queue.popleft()
                self._queued_rows -= left
                dropped.append(request)
                continue
            if segments and left > room:
                break  # it starts the next batch
            self._queue.popleft()
            size = min(left, room)
            segments.append(_Segment(request, request.taken, request.taken + size))
            request.taken += size
            self._queued_rows -= size
            room -= size
            if request.taken < request.rows:
                self._queue.append(request)
        return segments, dropped

    def _loop(self) -> None:
        while True:
            with self._gather:
                taken = self._take()
            if taken is None:
                return
            segments, dropped = taken
            for request in dropped:
                _settle(request.future, error=Expired("deadline passed or caller cancelled while queued"))
            try:
                if segments:
                    self._execute(segments)
            except Exception:  # never let one bad batch end the worker: every later call would hang
                log.exception("batcher %s: unexpected error", threading.current_thread().name)

    def _execute(self, segments: list[_Segment]) -> None:
        taken_at, start = time.monotonic(), time.perf_counter()
        try:
            batch = segments[0].inputs if len(segments) == 1 else _concatenate([s.inputs for s in segments])
            outputs = self._run(batch)
        except Exception as exc:  # a failed run fails its requests, never the worker
            log.exception("batch of %d failed", sum(s.stop - s.start for s in segments))
            for segment in segments:
                _settle(segment.request.future, error=exc)
            return
        compute = time.perf_counter() - start
        offset = 0
        for segment in segments:
            size = segment.stop - segment.start
            segment.request.deliver(segment.start, _rows(outputs, offset, offset + size))
            offset += size
        if self._on_batch:
            requests = {id(s.request): s.request for s in segments}.values()
            wait = max(taken_at - r.enqueued for r in requests)
            self._on_batch(BatchStats(offset, len(requests), wait, compute))
