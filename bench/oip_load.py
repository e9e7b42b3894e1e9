"""One client program for every server the serving benchmarks compare: ``--clients`` threads, each
with its own connection, each sending requests for ``--count`` images for ``--seconds``; prints one
JSON line (requests/s, images/s, latency percentiles). The same thread harness drives each kind
of client, so peers differ only in the server and its protocol:

- ``tritonclient-grpc``, ``tritonclient-http``: Triton's own client libraries, sending latents
  ``z`` and asking for ``images`` (UINT8): any Open Inference Protocol server (Triton, dcgan-serve).
  They run in the Triton venv (bench/requirements-triton.txt; tritonclient needs protobuf < 7).
- ``dcgan-v1``, ``dcgan-v1-score``, ``oip-grpc``: dcgan-serve's own protocol (Sample with a seed,
  raw uint8; Score of uint8 pixels) and OIP with the ``seed`` and ``count`` parameters, from
  generated stubs (the project's venv).

    python bench/oip_load.py tritonclient-grpc 127.0.0.1:8001 --model mnist-dcgan --clients 64 --count 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Callable

import numpy as np

Call = Callable[[], None]
LATENT_SEED = 0
MAX_MESSAGE = 64 * 1024 * 1024
# gRPC shares one connection among channels with the same target and arguments (its global
# subchannel pool): 64 client threads would be 64 streams on one connection, unlike 64 clients,
# and a server of several processes on one port would see one of them busy and the rest idle.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", MAX_MESSAGE),
                  ("grpc.max_receive_message_length", MAX_MESSAGE)]


def tritonclient_call(protocol: str, target: str, model: str, count: int, latent: int) -> Call:
    if protocol == "grpc":
        import tritonclient.grpc as triton
        client = triton.InferenceServerClient(target, channel_args=OWN_CONNECTION)
    else:
        import tritonclient.http as triton
        client = triton.InferenceServerClient(target)
    z = triton.InferInput("z", [count, latent], "FP32")
    z.set_data_from_numpy(np.random.default_rng(LATENT_SEED).standard_normal((count, latent), np.float32))
    outputs = [triton.InferRequestedOutput("images")]
    return lambda: client.infer(model, [z], outputs=outputs).as_numpy("images")


def dcgan_v1_call(target: str, model: str, count: int) -> Call:
    import grpc
    from dcgan.v1 import inference_pb2 as pb
    from dcgan.v1 import inference_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(target, options=OWN_CONNECTION))
    request = pb.SampleRequest(model=model, count=count, seed=LATENT_SEED, encoding=pb.ENCODING_RAW_UINT8)
    return lambda: stub.Sample(request)


def dcgan_v1_score_call(target: str, model: str, count: int) -> Call:
    import grpc
    from dcgan.v1 import inference_pb2 as pb
    from dcgan.v1 import inference_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(target, options=OWN_CONNECTION))
    pixels = np.random.default_rng(LATENT_SEED).integers(0, 256, (count, 1, 28, 28), dtype=np.uint8)
    request = pb.ScoreRequest(model=model, tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=pixels.shape,
                                                            data=pixels.tobytes()))
    return lambda: stub.Score(request)


def oip_grpc_call(target: str, model: str, count: int) -> Call:
    import grpc
    from dcgan.oip import grpc_predict_v2_pb2 as oip
    from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target, options=OWN_CONNECTION))
    request = oip.ModelInferRequest(model_name=model, outputs=[{"name": "images"}])
    request.parameters["seed"].int64_param, request.parameters["count"].int64_param = LATENT_SEED, count
    return lambda: stub.ModelInfer(request)


def make_call(kind: str, target: str, model: str, count: int, latent: int) -> Call:
    if kind.startswith("tritonclient-"):
        return tritonclient_call(kind.removeprefix("tritonclient-"), target, model, count, latent)
    return {"dcgan-v1": dcgan_v1_call, "dcgan-v1-score": dcgan_v1_score_call,
            "oip-grpc": oip_grpc_call}[kind](target, model, count)


def run(connect: Callable[[], Call], clients: int, seconds: float) -> dict:
    """``clients`` threads, each connecting (``connect()`` in its own thread: tritonclient.http's
    gevent client belongs to the thread that made it) and warming up, then all calling together for
    ``seconds``; any failure is raised."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []
    end = [0.0]  # set once every client is ready, before any is released
    start = threading.Barrier(clients + 1, action=lambda: end.__setitem__(0, time.perf_counter() + seconds))

    def worker(mine: list[float]) -> None:
        try:
            call = connect()
            call()  # connected and warm before the timed window
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            start.abort()
            return
        start.wait()
        try:
            while (began := time.perf_counter()) < end[0]:
                call()
                mine.append(time.perf_counter() - began)
        except BaseException as exc:  # noqa: BLE001 - reported below: a failed call fails the benchmark
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client that failed to connect
        start.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed; the first: {failures[0]!r}")
    flat = np.array([x for mine in latencies for x in mine])
    return {"requests_per_s": len(flat) / seconds, "p50_ms": 1000 * float(np.percentile(flat, 50)),
            "p99_ms": 1000 * float(np.percentile(flat, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["tritonclient-grpc", "tritonclient-http", "dcgan-v1", "dcgan-v1-score",
                                         "oip-grpc"])
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--model", required=True)
    parser.add_argument("--latent", type=int, default=100)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--count", type=int, default=1, help="images per request")
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    result = run(lambda: make_call(args.kind, args.target, args.model, args.count, args.latent), args.clients,
                 args.seconds)
    result["images_per_s"] = result["requests_per_s"] * args.count
    print(json.dumps(result))


if __name__ == "__main__":
    main()
