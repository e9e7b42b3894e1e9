"""What each front end costs on the same load: dcgan.v1 Sample, the Open Inference Protocol over
gRPC, and OIP over HTTP (JSON tensors, and Triton's binary extension), all asking one real server
for the same seeded images.

One client program for all four: ``--clients`` threads, each sending requests for ``--count``
uint8 images for ``--seconds``; requests per second and images per second, interleaved repeats,
medians, ratios against dcgan.v1 measured in the same run.

    .venv/bin/python bench/protocol_overhead.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcgan.oip import grpc_predict_v2_pb2 as oip  # noqa: E402
from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc  # noqa: E402
from dcgan.v1 import inference_pb2 as pb  # noqa: E402
from dcgan.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

from bench.common import cpu_model, interleaved, median, save  # noqa: E402
from serving.server.app import InferenceServer  # noqa: E402
from serving.server.config import ServeConfig  # noqa: E402

Call = Callable[[int], None]  # one request, for a seed


def dcgan_v1(port: int, model: str, count: int) -> Callable[[], Call]:
    def client() -> Call:
        stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return lambda seed: stub.Sample(pb.SampleRequest(model=model, count=count, seed=seed,
                                                          encoding=pb.ENCODING_RAW_UINT8))
    return client


def oip_grpc_client(port: int, model: str, count: int) -> Callable[[], Call]:
    def client() -> Call:
        stub = oip_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def call(seed: int) -> None:
            request = oip.ModelInferRequest(model_name=model, outputs=[{"name": "images"}])
            request.parameters["seed"].int64_param, request.parameters["count"].int64_param = seed, count
            stub.ModelInfer(request)
        return call
    return client


def oip_http(port: int, model: str, count: int, binary: bool) -> Callable[[], Call]:
    def client() -> Call:
        connection = http.client.HTTPConnection("127.0.0.1", port)  # keep-alive, as real clients do

        def call(seed: int) -> None:
            body = {"parameters": {"seed": seed, "count": count},
                    "outputs": [{"name": "images", "parameters": {"binary_data": binary}}]}
            connection.request("POST", f"/v2/models/{model}/infer", json.dumps(body))
            reply = connection.getresponse()
            reply.read()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}")
        return call
    return client


def load(make_client: Callable[[], Call], clients: int, seconds: float) -> Callable[[], float]:
    """Requests per second of ``clients`` threads, each with its own connection."""
    def run() -> float:
        calls = [make_client() for _ in range(clients)]
        done, stop = [0] * clients, time.perf_counter() + seconds

        failures: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                while time.perf_counter() < stop:
                    calls[i](done[i])
                    done[i] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below, a failed call is no measurement
                failures.append(exc)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return sum(done) / (time.perf_counter() - start)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--count", type=int, default=16, help="images per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="protocol_overhead")
    args = parser.parse_args()
    config = ServeConfig(repository=args.repository, host="127.0.0.1", port=0, http_port=0, metrics_port=-1,
                         poll_s=0).validate()
    server = InferenceServer(config).start()
    try:
        fronts = {"dcgan.v1 Sample": dcgan_v1(server.port, args.model, args.count),
                  "OIP gRPC": oip_grpc_client(server.port, args.model, args.count),
                  "OIP HTTP binary": oip_http(server.http_port, args.model, args.count, True),
                  "OIP HTTP JSON": oip_http(server.http_port, args.model, args.count, False)}
        runs = interleaved({name: load(front, args.clients, args.seconds) for name, front in fronts.items()},
                           args.repeats)
    finally:
        server.stop(grace=1)
    rates = {name: median(values) for name, values in runs.items()}
    base = rates["dcgan.v1 Sample"]
    for name, rate in rates.items():
        print(f"{name:<18} {rate:8.1f} req/s  {rate * args.count:9.0f} img/s  {rate / base:.2f}x dcgan.v1")
    save(args.name, {"cpu": cpu_model(), "model": args.model, "count": args.count, "clients": args.clients,
                     "seconds": args.seconds, "requests_per_s": runs, "median_requests_per_s": rates,
                     "ratio_to_dcgan_v1": {name: rate / base for name, rate in rates.items()}})


if __name__ == "__main__":
    main()
