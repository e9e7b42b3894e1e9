"""onnxruntime sessions for one network: provider selection, IOBinding on CUDA, warm-up.

onnxruntime-gpu lists the CUDA provider even on machines without a GPU, and silently falls back
to the CPU when CUDA cannot start. So the provider actually in use is read back from the session,
logged, and reported to clients.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dcgan_core import DEVICES
from dcgan_core.repository import NetworkSpec, RepositoryError
from serving.server.batcher import Inputs

log = logging.getLogger(__name__)
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


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


WARM_UP_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def execution_plan(device: str, workers: int = 0, threads: int = 0) -> tuple[int, int]:
    """(batch workers, onnxruntime intra-op threads per session) for one network; 0 = automatic.

    On CPU: one single-threaded worker per core. Runs side by side beat one run spread over the
    cores (2 cores, generator at batch 64: 9.6k vs 6.8k images/s), and single-threaded sessions
    do not spin-wait on cores that the gRPC event loop needs. On CUDA one worker feeds the GPU.
    """
    cuda = providers_for(device)[0] == CUDA
    workers = workers or (1 if cuda else len(os.sched_getaffinity(0)))
    threads = threads or (1 if workers > 1 and not cuda else 0)
    return workers, threads


class OnnxNetwork:
    """One ONNX file run on whole batches: one float32 input (and, for a class-conditional
    network, an int64 labels input); one output, or a tuple of them (the anomaly scorer's)."""

    def __init__(self, path: Path, device: str = "auto", threads: int = 0):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise RuntimeUnavailable(f"{path.name}: CUDA provider failed to start; got {self.provider}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.path = path
        log.info("loaded %s on %s", path, self.provider)

    def check_signature(self, network: str, spec: NetworkSpec,
                        outputs: list[tuple[str, list[int | None]]] | None = None,
                        source_shape: Sequence[int] = ()) -> None:
        """The file must be the network the manifest says (a swapped or foreign file is refused
        here, with both signatures, instead of failing on the first request); ``outputs``: every
        output by name and shape, for a network of several (else the spec's one); ``source_shape``:
        a translation discriminator's source input (C, h, w)."""
        signature = lambda tensors: [(t.name, [d if isinstance(d, int) else None for d in t.shape[1:]])  # noqa: E731
                                     for t in tensors]
        actual = signature([*self.session.get_inputs(), *self.session.get_outputs()])
        expected = [(spec.input_name, list(spec.input_shape[1:]))]
        expected += [(spec.label_input, [])] if spec.label_input else []
        expected += [(spec.source_input, list(source_shape))] if spec.source_input else []
        expected += outputs or [(spec.output_name, list(spec.output_shape[1:]))]
        if actual != expected:
            show = lambda sig: ", ".join(f"{n!r} [{', '.join(['N', *map(str, s)])}]" for n, s in sig)  # noqa: E731
            raise RepositoryError(f"{self.path.name} has {show(actual)}, but the manifest's {network} "
                                  f"has {show(expected)} (wrong or swapped file)")

    def run(self, batch: Inputs) -> Inputs:
        """Outputs for a float32 batch (with its int64 labels, for a conditional network): the
        array, or a tuple for several outputs; on CUDA through IOBinding (copied back once)."""
        arrays = batch if isinstance(batch, tuple) else (batch,)
        if self.provider != CUDA:
            outputs = self.session.run(self.output_names, dict(zip(self.input_names, arrays)))
        else:
            binding = self.session.io_binding()
            for name, array in zip(self.input_names, arrays):
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run once per batch size so the first request does not pay for allocation/tuning: zeros
        of every input's own type and shape (after check_signature: the shapes are the manifest's)."""
        for size in batch_sizes:
            feeds = tuple(np.zeros((size, *i.shape[1:]), WARM_UP_DTYPES[i.type]) for i in self.session.get_inputs())
            self.run(feeds if len(feeds) > 1 else feeds[0])
