"""Triton (PyTriton) serving an exported ``generator.onnx`` the way dcgan-serve's OIP front end
does: model ``NAME``, input ``z`` FP32 [-1, latent], output ``images`` UINT8 [-1, 1, 28, 28], the
dynamic batcher on, onnxruntime on the CPU with its default threads. The peer of
bench/oip_vs_triton.py; runs in the Triton venv (bench/requirements-triton.txt, Debian's
/usr/bin/python3.11: PyTriton's Python backend stub fails on other interpreters).

    .venv-triton/bin/python bench/triton_server.py exported/mnist-dcgan/4/generator.onnx \\
        --model mnist-dcgan --grpc-port 8101 --http-port 8100 --metrics-port 8102
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcgan_core.images import model_to_uint8  # noqa: E402  (the one image convention, as dcgan-serve has it)

READY = "triton_server: ready"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="as dcgan-serve's 2 ms default")
    args = parser.parse_args()
    session = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    latent = session.get_inputs()[0].shape[1]

    @batch
    def generate(z: np.ndarray) -> dict[str, np.ndarray]:
        return {"images": model_to_uint8(session.run(None, {"z": z})[0])}

    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          grpc_address="127.0.0.1", http_address="127.0.0.1", metrics_address="127.0.0.1",
                          log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name=args.model, infer_func=generate,
                    inputs=[Tensor(name="z", dtype=np.float32, shape=(latent,))],
                    outputs=[Tensor(name="images", dtype=np.uint8, shape=(1, 28, 28))],
                    config=ModelConfig(max_batch_size=args.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
                    strict=True)
        print(READY, flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
