import threading
import time

import numpy as np
import pytest

from serving.batcher import DynamicBatcher, Expired, QueueFull


class Recorder:
    """A run function that records batch sizes and returns its input doubled."""

    def __init__(self, delay: float = 0.0):
        self.sizes: list[int] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        time.sleep(self.delay)
        self.sizes.append(len(batch))
        return batch * 2


def test_concurrent_requests_are_merged_and_split_back():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_queue_delay_s=0.2)
    futures = [batcher.submit(np.full((n, 3), i, np.float32)) for i, n in enumerate([1, 2, 3, 4])]
    results = [f.result(5) for f in futures]
    batcher.stop()
    assert run.sizes == [10]  # one run for all four requests
    for i, (n, result) in enumerate(zip([1, 2, 3, 4], results)):
        assert result.shape == (n, 3) and np.all(result == 2 * i)


def test_max_batch_size_caps_a_merged_batch_and_big_requests_run_whole():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0.0)
    futures = [batcher.submit(np.zeros((n, 1), np.float32)) for n in [3, 1, 2, 9]]
    time.sleep(0.05)
    run.gate.set()
    [f.result(5) for f in futures]
    batcher.stop()
    assert sum(run.sizes) == 15 and max(run.sizes) == 9
    assert all(size <= 4 for size in run.sizes if size != 9)


def test_batching_disabled_runs_each_request_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_queue_delay_s=0.2, enabled=False)
    futures = [batcher.submit(np.zeros((2, 1), np.float32)) for _ in range(3)]
    [f.result(5) for f in futures]
    batcher.stop()
    assert run.sizes == [2, 2, 2]


def test_full_queue_is_refused_at_once():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_s=0, max_queue=2)
    first = batcher.submit(np.zeros((1, 1), np.float32))
    time.sleep(0.05)  # the worker holds `first`; the queue is empty again
    queued = [batcher.submit(np.zeros((1, 1), np.float32)) for _ in range(2)]
    start = time.monotonic()
    with pytest.raises(QueueFull, match="queue full"):
        batcher.submit(np.zeros((1, 1), np.float32))
    assert time.monotonic() - start < 0.1
    run.gate.set()
    for future in [first, *queued]:
        future.result(5)
    batcher.stop()


def test_expired_and_cancelled_requests_cost_no_compute():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_s=0)
    blocker = batcher.submit(np.zeros((1, 1), np.float32))
    time.sleep(0.05)
    late = batcher.submit(np.zeros((5, 1), np.float32), deadline=time.monotonic() + 0.01)
    gone = batcher.submit(np.zeros((6, 1), np.float32), is_active=lambda: False)
    alive = batcher.submit(np.zeros((7, 1), np.float32))
    time.sleep(0.05)
    run.gate.set()
    blocker.result(5)
    assert alive.result(5).shape == (7, 1)
    for future in (late, gone):
        with pytest.raises(Expired):
            future.result(5)
    batcher.stop()
    assert run.sizes == [1, 7]


def test_a_future_cancelled_while_queued_does_not_stop_the_worker():
    run = Recorder()
    run.gate.clear()
    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_s=0)
    blocker = batcher.submit(np.zeros((1, 1), np.float32))
    time.sleep(0.05)
    abandoned = batcher.submit(np.zeros((2, 1), np.float32), deadline=time.monotonic() + 0.01)
    assert abandoned.cancel()  # what the service does when its caller's deadline passes first
    time.sleep(0.05)
    run.gate.set()
    blocker.result(5)
    assert batcher.submit(np.ones((3, 1), np.float32)).result(5).shape == (3, 1)
    batcher.stop()
    assert run.sizes == [1, 3]


def test_a_failing_run_fails_its_requests_but_not_the_worker():
    calls = []

    def run(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return batch

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(np.zeros((1, 1), np.float32)).result(5)
    assert batcher.submit(np.ones((2, 1), np.float32)).result(5).shape == (2, 1)
    batcher.stop()


def test_many_threads_each_get_their_own_rows():
    batcher = DynamicBatcher(lambda b: b + 0.5, max_batch_size=32, max_queue_delay_s=0.005)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        results[i] = batcher.submit(np.full((1 + i % 3, 2), i, np.float32)).result(10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    for i, result in results.items():
        assert result.shape == (1 + i % 3, 2) and np.all(result == i + 0.5)
