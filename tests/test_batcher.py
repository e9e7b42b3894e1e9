import threading
import time
from concurrent.futures import CancelledError, Future

import numpy as np
import pytest

from serving.server.batcher import DynamicBatcher, Expired, QueueFull, Stopped


class Recorder:
    """A run function that records batch sizes and returns its input doubled.

    ``entered`` is set when a run starts; with ``gate`` cleared the run then waits, so a test can
    hold the worker and know it holds it (no sleeps)."""

    def __init__(self):
        self.sizes: list[int] = []
        self.batches: list[np.ndarray] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(10), "gate never opened"
        self.sizes.append(len(batch))
        self.batches.append(batch.copy())
        return batch * 2

    def hold(self, batcher: DynamicBatcher) -> "Future":
        """Submit one item and return once the worker is inside run() with it."""
        self.gate.clear()
        self.entered.clear()
        future = batcher.submit(np.zeros((1, 1), np.float32))
        assert self.entered.wait(10)
        return future


def test_concurrent_requests_are_merged_and_split_back():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_queue_delay_s=0.2)
    blocker = run.hold(batcher)
    futures = [batcher.submit(np.full((n, 3), i, np.float32)) for i, n in enumerate([1, 2, 3, 4])]
    run.gate.set()
    blocker.result(5)
    results = [f.result(5) for f in futures]
    batcher.stop()
    assert run.sizes == [1, 10]  # one run for the four queued requests
    for i, (n, result) in enumerate(zip([1, 2, 3, 4], results)):
        assert result.shape == (n, 3) and np.all(result == 2 * i)


def test_queued_requests_merge_up_to_max_batch_size_and_get_their_own_rows_back():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0.0)
    first = run.hold(batcher)
    sizes = [1, 2, 9]
    futures = [batcher.submit(np.arange(n, dtype=np.float32)[:, None] + 100 * i) for i, n in enumerate(sizes)]
    run.gate.set()
    first.result(5)
    for i, (n, future) in enumerate(zip(sizes, futures)):
        np.testing.assert_array_equal(future.result(5), 2 * (np.arange(n)[:, None] + 100 * i))
    batcher.stop()
    assert run.sizes == [1, 3, 4, 4, 1]  # 1 and 2 merged; 9 a batch at a time


def test_a_large_request_waits_behind_at_most_one_batch_of_another():
    """A request larger than a batch runs a batch at a time and then lets the queue move: a small
    request sent after it waits for one batch of it, not for all of it (guided sampling sends
    rounds of thousands of candidates)."""
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0.0)
    blocker = run.hold(batcher)
    large = batcher.submit(np.arange(40, dtype=np.float32)[:, None])
    small = batcher.submit(np.full((1, 1), -1, np.float32))
    run.gate.set()
    blocker.result(5)
    np.testing.assert_array_equal(large.result(5), 2 * np.arange(40)[:, None])
    assert small.result(5).tolist() == [[-2.0]]
    batcher.stop()
    assert max(run.sizes) <= 4
    small_batch = next(i for i, batch in enumerate(run.batches) if -1 in batch)
    assert sum(run.sizes[1:small_batch]) <= 4  # after the held one, one batch of the large request at most


def test_two_large_requests_take_turns():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0.0)
    blocker = run.hold(batcher)
    first, second = (batcher.submit(np.full((12, 1), value, np.float32)) for value in (1, 2))
    run.gate.set()
    blocker.result(5)
    assert first.result(5).tolist() == [[2.0]] * 12 and second.result(5).tolist() == [[4.0]] * 12
    batcher.stop()
    assert [sorted(set(batch.ravel().tolist())) for batch in run.batches[1:]] == [[1.0], [2.0]] * 3


def test_batching_disabled_runs_each_request_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_queue_delay_s=0.2, enabled=False)
    futures = [batcher.submit(np.zeros((2, 1), np.float32)) for _ in range(3)]
    [f.result(5) for f in futures]
    batcher.stop()
    assert run.sizes == [2, 2, 2]


def test_full_queue_is_refused_at_once():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_s=0, max_queue=2)
    first = run.hold(batcher)  # the worker holds `first`; the queue is empty again
    queued = [batcher.submit(np.zeros((1, 1), np.float32)) for _ in range(2)]
    with pytest.raises(QueueFull, match="queue full"):
        batcher.submit(np.zeros((1, 1), np.float32))
    run.gate.set()
    for future in [first, *queued]:
        future.result(5)
    batcher.stop()


def test_a_large_request_takes_one_place_in_the_queue():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0, max_queue=2)
    blocker = run.hold(batcher)
    small = batcher.submit(np.zeros((1, 1), np.float32))
    big = batcher.submit(np.arange(64, dtype=np.float32).reshape(64, 1))
    assert batcher.depth() == 2
    with pytest.raises(QueueFull):
        batcher.submit(np.zeros((1, 1), np.float32))
    run.gate.set()
    np.testing.assert_array_equal(big.result(5), np.arange(64, dtype=np.float32).reshape(64, 1) * 2)
    blocker.result(5), small.result(5)
    batcher.stop()
    assert sum(run.sizes) == 66 and max(run.sizes) == 4


def test_expired_and_cancelled_requests_cost_no_compute():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0, enabled=False)
    blocker = run.hold(batcher)
    late = batcher.submit(np.zeros((5, 1), np.float32), deadline=time.monotonic() - 1)  # passed while queued
    gone = batcher.submit(np.zeros((6, 1), np.float32), is_active=lambda: False)
    alive = batcher.submit(np.zeros((7, 1), np.float32))
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
    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0, enabled=False)
    blocker = run.hold(batcher)
    abandoned = batcher.submit(np.zeros((2, 1), np.float32))
    assert abandoned.cancel()  # what the service does when its caller's deadline passes first
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


def test_the_batches_of_a_large_request_run_side_by_side_and_join_in_order():
    seen: list[tuple[int, str]] = []
    both_running = threading.Barrier(2, timeout=5)  # passes only if two batches run at once

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append((len(batch), threading.current_thread().name))
        both_running.wait()
        return batch * 2

    batcher = DynamicBatcher(run, max_batch_size=25, max_queue_delay_s=0, workers=2)
    inputs = np.arange(100, dtype=np.float32).reshape(50, 2)
    result = batcher.submit(inputs).result(5)
    batcher.stop()
    np.testing.assert_array_equal(result, inputs * 2)
    assert sorted(size for size, _ in seen) == [25, 25]
    assert len({name for _, name in seen}) == 2


def test_several_workers_keep_results_apart():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0.001, workers=3)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        results[i] = batcher.submit(np.full((1 + i % 20, 2), i, np.float32)).result(10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    for i, result in results.items():
        assert result.shape == (1 + i % 20, 2) and np.all(result == 2 * i)
    assert sum(run.sizes) == sum(1 + i % 20 for i in range(60))


def test_a_failing_batch_fails_the_whole_request_and_cancelling_drops_its_queued_rows():
    def run(batch: np.ndarray) -> np.ndarray:
        if batch[0, 0] >= 0:
            raise RuntimeError("batch failed")
        return batch

    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0, workers=2)
    inputs = np.concatenate([-np.ones((4, 1)), np.ones((4, 1))]).astype(np.float32)
    with pytest.raises(RuntimeError, match="batch failed"):
        batcher.submit(inputs).result(5)
    batcher.stop()

    gated = Recorder()
    batcher = DynamicBatcher(gated, max_batch_size=4, max_queue_delay_s=0, workers=1)
    gated.gate.clear()
    started = batcher.submit(np.zeros((8, 1), np.float32))  # its first 4 rows run, 4 wait
    assert gated.entered.wait(10)
    assert started.cancel()
    gated.gate.set()
    with pytest.raises(CancelledError):
        started.result(5)
    assert batcher.submit(np.ones((1, 1), np.float32)).result(5).tolist() == [[2.0]]
    batcher.stop()
    assert gated.sizes == [4, 1]  # the cancelled request's other rows never ran


def test_stop_fails_what_is_queued_and_returns_only_after_the_running_batch():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0)
    running = run.hold(batcher)
    queued = batcher.submit(np.zeros((1, 1), np.float32))
    stopped = threading.Event()

    def stop() -> None:
        batcher.stop()
        stopped.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    with pytest.raises(Stopped):
        queued.result(5)  # failed at once: nobody waits for work after shutdown
    assert not stopped.is_set()  # the batch still runs: the network must not be released yet
    run.gate.set()
    stopper.join(10)
    assert stopped.is_set() and running.result(0).tolist() == [[0.0]]
    with pytest.raises(Stopped):
        batcher.submit(np.zeros((1, 1), np.float32))


def test_execution_plan_and_its_settings():
    import os

    from serving.server.config import ServeConfigError, load_serve_config
    from serving.server.runtime import execution_plan

    cores = len(os.sched_getaffinity(0))
    assert execution_plan("cpu") == (cores, 1 if cores > 1 else 0)  # single-threaded workers, one per core
    assert execution_plan("cpu", workers=1) == (1, 0)  # one worker: onnxruntime spreads it over the cores
    assert execution_plan("cpu", workers=3, threads=2) == (3, 2)  # explicit settings win
    with pytest.raises(ServeConfigError, match="batch_workers = -1 must be >= 0"):
        load_serve_config(None, {"batch_workers": -1})


def test_handoff_delivers_a_whole_batch_to_the_event_loop_and_cancels_through():
    """Results reach their own awaiting coroutine (errors too); a cancelled wait cancels the queued request."""
    import asyncio

    from serving.server.handoff import Handoff

    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_queue_delay_s=0.05)

    async def scenario() -> None:
        handoff = Handoff(asyncio.get_running_loop())
        waits = [handoff.wrap(batcher.submit(np.full((1, 2), i, np.float32))) for i in range(40)]
        results = await asyncio.gather(*waits)
        assert [float(r[0, 0]) for r in results] == [2.0 * i for i in range(40)]
        assert run.sizes == [40]  # one batch, delivered through the burst of 40 completions

        failing = DynamicBatcher(lambda batch: 1 / 0, max_queue_delay_s=0)
        with pytest.raises(ZeroDivisionError):
            await handoff.wrap(failing.submit(np.zeros((1, 2), np.float32)))
        failing.stop()

        run.gate.clear()  # hold the worker on the next batch so that a second request stays queued
        run.entered.clear()
        busy = handoff.wrap(batcher.submit(np.zeros((64, 2), np.float32)))
        assert await asyncio.to_thread(run.entered.wait, 10)
        queued = batcher.submit(np.zeros((1, 2), np.float32))
        waiter = handoff.wrap(queued)
        waiter.cancel()
        await asyncio.sleep(0)
        assert queued.cancelled()
        run.gate.set()
        await busy

    asyncio.run(scenario())
    batcher.stop()
    assert run.sizes == [40, 64]  # the cancelled request never ran


def test_the_service_answers_from_one_event_loop_after_another(serving_repo):
    """Embedding code may call the service from successive asyncio.run() loops."""
    import asyncio

    from dcgan_core.repository import Repository
    from serving.server.config import ServeConfig
    from serving.server.plans import SampleSpec
    from serving.server.service import Call, InferenceService
    from serving.server.store import ModelStore

    config = ServeConfig(repository=str(serving_repo)).validate()
    store = ModelStore(Repository(serving_repo), config)
    store.load()
    service = InferenceService(store, config)
    try:
        for seed in (1, 2):
            call = service.sample(SampleSpec(3, seed, model="tiny"), Call())
            result = asyncio.run(asyncio.wait_for(call, 10))
            assert result.samples.shape == (3, *result.manifest.sample_shape) and result.seed == seed
    finally:
        store.close()
