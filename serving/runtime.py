"""onnxruntime sessions for one network: provider selection, IOBinding on CUDA, warm-up.

onnxruntime-gpu lists the CUDA provider even on machines without a GPU, and silently falls back
to the CPU when CUDA cannot start. So the provider actually in use is read back from the session,
logged, and reported to clients.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


class RuntimeUnavailable(RuntimeError):
    """The requested device cannot be used on this machine."""


def cuda_usable() -> bool:
    """CUDA provider compiled in and an NVIDIA driver present (no driver: no point trying)."""
    if CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def providers_for(device: str) -> list[str]:
    if device not in DEVICES:
        raise RuntimeUnavailable(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not cuda_usable()):
        return [CPU]
    if device == "cuda" and not cuda_usable():
        raise RuntimeUnavailable("device 'cuda' requested but onnxruntime's CUDA provider or the "
                                 "NVIDIA driver is not available on this machine")
    return [CUDA, CPU]


def execution_plans(device: str, workers: int = 0, threads: int = 0) -> list[tuple[int, int]]:
    """Candidate (batch workers, onnxruntime intra-op threads per session) plans; 0 = automatic.

    Settings given by the operator are the only candidate, and so is one worker on CUDA (it feeds
    the GPU). On a CPU with several cores there are two ways to use them, and which one is faster
    depends on the network: one single-threaded worker per core, running pieces of a batch side
    by side (the generator's transposed convolutions: 9.6k vs 6.8k images/s at batch 64 on 2
    cores), or one worker whose session spreads each run over the cores (the discriminator's
    convolutions: 18.3k vs 13.5k). :func:`load_network` times both.
    """
    cuda = providers_for(device)[0] == CUDA
    cores = len(os.sched_getaffinity(0))
    if workers or threads or cuda or cores == 1:
        workers = workers or (1 if cuda else cores)
        return [(workers, threads or (1 if workers > 1 and not cuda else 0))]
    return [(cores, 1), (1, 0)]


class OnnxNetwork:
    """One ONNX file with one input and one output, run on whole batches."""

    def __init__(self, path: Path, device: str = "auto", threads: int = 0):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise RuntimeUnavailable(f"{path.name}: CUDA provider failed to start; got {self.provider}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.path, self.threads = path, threads
        log.info("loaded %s on %s", path, self.provider)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Outputs for a float32 batch; on CUDA through IOBinding (output copied back once)."""
        if self.provider != CUDA:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def warm_up(self, sample_shape: tuple[int, ...], batch_sizes: tuple[int, ...]) -> None:
        """Run once per batch size so the first request does not pay for allocation/tuning."""
        for size in batch_sizes:
            self.run(np.zeros((size, *sample_shape), np.float32))

    def seconds_per_batch(self, batch: np.ndarray, workers: int, repeats: int = 5) -> float:
        """Median wall time of ``batch`` cut into one piece per worker, the pieces run side by
        side (as the dynamic batcher runs them)."""
        pieces = np.array_split(batch, workers) if workers > 1 else [batch]
        times = []
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(self.run, pieces))
                times.append(time.perf_counter() - start)
        return float(np.median(times))


def load_network(path: Path, device: str, sample_shape: tuple[int, ...], max_batch: int,
                 plans: list[tuple[int, int]]) -> tuple[OnnxNetwork, int]:
    """The network loaded and warmed up under the fastest of ``plans`` at ``max_batch``, and
    that plan's number of batch workers. With one plan nothing is timed."""
    timed = []
    for workers, threads in plans:
        network = OnnxNetwork(path, device, threads)
        network.warm_up(sample_shape, (1, max_batch))
        if len(plans) == 1:
            return network, workers
        seconds = network.seconds_per_batch(np.zeros((max_batch, *sample_shape), np.float32), workers)
        timed.append((seconds, workers, threads, network))
    seconds, workers, threads, network = min(timed, key=lambda t: t[0])
    log.info("%s: %s -> %d worker(s) x %s thread(s)", path.name, ", ".join(
        f"{w} x {t or 'default'}: {s * 1000:.2f} ms" for s, w, t, _ in timed), workers, threads or "default")
    return network, workers
