"""The floor of Python gRPC on this host: a grpc.aio server whose Sample and Score do no work.

It answers every Sample with one precomputed 28x28 uint8 image and every Score with 64 fixed
scores, so the calls/s it reaches with the serving benchmark's clients is what the transport
alone allows on this machine; no amount of batching in the real server can beat it. Started by
bench/serve_throughput.py:

    .venv/bin/python -m bench.grpc_floor --port 0     # prints "listening on port N"
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcgan.v1 import inference_pb2 as pb  # noqa: E402
from dcgan.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

from serving.wire import array_to_tensor  # noqa: E402


class NoWorkServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.response = pb.SampleResponse(model="floor", version=1, seed=1, provider="none",
                                          samples=array_to_tensor(np.zeros((1, 1, 28, 28), np.uint8)))
        self.score_response = pb.ScoreResponse(model="floor", version=1, provider="none",
                                               probabilities=[0.5] * 64, logits=[0.0] * 64)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return self.score_response

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        return self.response


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(NoWorkServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on port {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
