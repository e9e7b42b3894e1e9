"""Serving throughput and latency: gRPC service against raw in-process onnxruntime, side by side.

Measures, interleaved over repeats (medians reported):
  raw onnxruntime G and D at batch 1/64/256 (in this process, same files, same provider);
  gRPC Sample(count=1/64/256, raw uint8) from one client;
  64 concurrent clients asking for 1 image each, against a server with batching on and one off;
  gRPC Score of 64 raw uint8 images;
  for the concurrent runs, the CPU time per call of the server process and of this client
  (core-milliseconds): on a CPU-only host that, not batching, sets the ceiling;
  the same concurrent clients and Score calls against bench/grpc_floor.py, a gRPC server that
  does no work: the most any Python gRPC server can answer on this host.
Servers run as real `dcgan-serve` processes on localhost. Raw onnxruntime always runs with its
default thread count (the strongest baseline); ``--ort-threads N`` sets the servers' intra-op
threads and ``--batch-workers N`` their batch workers. Results:
bench/results/serve_<device>[_w<N>][_ort<N>].json

    .venv/bin/python bench/serve_throughput.py --repository exported --model mnist-dcgan
    .venv/bin/python bench/serve_throughput.py --ort-threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcgan.v1 import inference_pb2 as pb  # noqa: E402
from dcgan.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

from bench.common import median, process_cpu_s, save  # noqa: E402
from bench.oip_load import OWN_CONNECTION  # noqa: E402
from dcgan_core import DEVICES  # noqa: E402
from dcgan_core.repository import Repository  # noqa: E402
from serving import processes  # noqa: E402
from serving.server.runtime import OnnxNetwork  # noqa: E402
from serving.wire import array_to_tensor  # noqa: E402

Measurement = tuple[float, list[float]]  # (items per second, per-call latencies in seconds)


def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def timed_loop(call: Callable[[], int], seconds: float) -> Measurement:
    """Call repeatedly for ``seconds``; ``call`` returns the number of items it produced."""
    latencies, items = [], 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        items += call()
        latencies.append(time.perf_counter() - t)
    return items / (time.perf_counter() - start), latencies


def concurrent_clients(target: str, clients: int, seconds: float, request: pb.SampleRequest) -> Measurement:
    """``clients`` concurrent callers (asyncio, a channel and a connection each) looping for ``seconds``."""
    async def run() -> Measurement:
        latencies: list[float] = []
        channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(clients)]
        stop_at = time.perf_counter() + seconds

        async def client(channel: grpc.aio.Channel) -> None:
            stub = pb_grpc.InferenceServiceStub(channel)
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                await stub.Sample(request)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in channels))
        elapsed = time.perf_counter() - start
        for channel in channels:
            await channel.close()
        return len(latencies) * request.count / elapsed, latencies

    return asyncio.run(run())


def costed(measure: Callable[[], Measurement], server: subprocess.Popen,
           costs: list[dict[str, float]]) -> Callable[[], Measurement]:
    """``measure``, also appending the server's and this process's core-ms per call to ``costs``."""
    def run() -> Measurement:
        server_start, client_start = process_cpu_s(server.pid), time.process_time()
        rate, latencies = measure()
        calls = len(latencies)
        costs.append({"server": (process_cpu_s(server.pid) - server_start) / calls * 1e3,
                      "client": (time.process_time() - client_start) / calls * 1e3})
        return rate, latencies
    return run


def start_server(repository: str, device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc, ports = processes.start_server(["--repository", repository, "--metrics-port", "0", "--device", device,
                                         *extra], stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    return proc, f"127.0.0.1:{ports.grpc}"


def start(command: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server that prints "... listening on port N" first; (process, target)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    line = proc.stdout.readline()
    if "listening on port" not in line:
        raise SystemExit(f"server failed to start: {line}")
    return proc, f"127.0.0.1:{line.rsplit(' ', 1)[1].strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--ort-threads", type=int, default=0, help="servers' onnxruntime intra-op threads")
    parser.add_argument("--batch-workers", type=int, default=0, help="servers' batch workers per network")
    args = parser.parse_args()
    server_args = ["--ort-threads", str(args.ort_threads), "--batch-workers", str(args.batch_workers)]

    repository = Repository(args.repository)
    version = max(repository.versions(args.model))
    manifest = repository.manifest(args.model, version)
    folder = repository.version_dir(args.model, version)
    g = OnnxNetwork(folder / manifest.generator.file, args.device)
    d = OnnxNetwork(folder / manifest.discriminator.file, args.device)
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (64, *manifest.sample_shape), dtype=np.uint8)

    batching_on, target_on = start_server(args.repository, args.device, server_args)
    batching_off, target_off = start_server(args.repository, args.device, [*server_args, "--no-batching"])
    floor, target_floor = start([sys.executable, "-m", "bench.grpc_floor"])
    floor_stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(target_floor))
    channel = grpc.insecure_channel(target_on, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.InferenceServiceStub(channel)
    single = pb.SampleRequest(model=args.model, count=1, seed=1, encoding=pb.ENCODING_RAW_UINT8)
    score = pb.ScoreRequest(model=args.model, tensor=array_to_tensor(digits))

    def raw(network: OnnxNetwork, shape: tuple[int, ...], batch: int) -> Callable[[], int]:
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        return lambda: len(network.run(x))

    def sample(count: int) -> Callable[[], int]:
        request = pb.SampleRequest(model=args.model, count=count, seed=1, encoding=pb.ENCODING_RAW_UINT8)
        return lambda: count if stub.Sample(request).samples.data else 0

    measurements: dict[str, Callable[[], Measurement]] = {}
    for batch in (1, 64, 256):
        measurements[f"raw_ort_generator_b{batch}"] = (
            lambda b=batch: timed_loop(raw(g, (manifest.latent_size,), b), args.seconds))
        measurements[f"raw_ort_discriminator_b{batch}"] = (
            lambda b=batch: timed_loop(raw(d, tuple(manifest.sample_shape), b), args.seconds))
        measurements[f"grpc_sample_count{batch}"] = lambda b=batch: timed_loop(sample(b), args.seconds)
    measurements["grpc_score_64"] = lambda: timed_loop(lambda: len(stub.Score(score).logits), args.seconds)
    measurements["grpc_floor_score_64"] = lambda: timed_loop(lambda: len(floor_stub.Score(score).logits), args.seconds)
    costs: dict[str, list[dict[str, float]]] = {}
    for name, (server, target) in {"concurrent_batching_on": (batching_on, target_on),
                                   "concurrent_batching_off": (batching_off, target_off),
                                   "concurrent_grpc_floor": (floor, target_floor)}.items():
        costs[name] = []
        measurements[name] = costed(lambda t=target: concurrent_clients(t, args.clients, args.seconds, single),
                                    server, costs[name])

    results: dict[str, list[Measurement]] = {name: [] for name in measurements}
    try:
        for name, measure in measurements.items():
            measure()  # warm-up
        for cost in costs.values():
            cost.clear()
        for repeat in range(args.repeats):
            for name, measure in measurements.items():
                results[name].append(measure())
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    finally:
        for proc in (batching_on, batching_off, floor):
            proc.terminate()
            proc.wait(30)

    table = {}
    for name, runs in results.items():
        rates = [rate for rate, _ in runs]
        table[name] = {"items_per_s": median(rates), "repeats_items_per_s": rates,
                       **percentiles([lat for _, lats in runs for lat in lats])}
        for side in ("server", "client"):
            if name in costs:
                table[name][f"{side}_core_ms_per_call"] = median([c[side] for c in costs[name]])
    rate = lambda name: table[name]["items_per_s"]  # noqa: E731
    ratios = {
        "sample256_over_raw_g256": (rate("grpc_sample_count256") / rate("raw_ort_generator_b256"), 0.9),
        "concurrent_on_over_off": (rate("concurrent_batching_on") / rate("concurrent_batching_off"), 5.0),
        "concurrent_on_over_raw_g64": (rate("concurrent_batching_on") / rate("raw_ort_generator_b64"), 0.5),
        "score64_over_raw_d64": (rate("grpc_score_64") / rate("raw_ort_discriminator_b64"), 0.8),
    }
    # What the transport alone allows: the no-work server's calls/s; the same, with each call also
    # paying one image of raw G at batch 64 (which keeps every core busy) on top of the no-work
    # server's and client's core-ms; and a Score costing the raw model's time plus a no-work round
    # trip of the same message.
    p50 = lambda name: table[name]["p50_ms"]  # noqa: E731
    cores = len(os.sched_getaffinity(0))
    floor_cost = table["concurrent_grpc_floor"]
    call_core_ms = (floor_cost["server_core_ms_per_call"] + floor_cost["client_core_ms_per_call"]
                    + cores * 1e3 / rate("raw_ort_generator_b64"))
    ceilings = {
        "concurrent_on_over_raw_g64": rate("concurrent_grpc_floor") / rate("raw_ort_generator_b64"),
        "concurrent_on_over_raw_g64_with_compute": cores * 1e3 / call_core_ms / rate("raw_ort_generator_b64"),
        "score64_over_raw_d64": p50("raw_ort_discriminator_b64") / (p50("raw_ort_discriminator_b64")
                                                                   + p50("grpc_floor_score_64")),
    }
    print(f"\n{'measurement':<32} {'items/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for name, row in table.items():
        print(f"{name:<32} {row['items_per_s']:>10.0f} "
              f"{row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    for name in costs:
        row = table[name]
        print(f"{name:<32} CPU per call: server {row['server_core_ms_per_call']:.3f} core-ms, "
              f"client {row['client_core_ms_per_call']:.3f} core-ms")
    print()
    for name, (value, target) in ratios.items():
        print(f"{name:<32} {value:6.3f}  (target >= {target}) {'ok' if value >= target else 'BELOW TARGET'}")
    for name, value in ceilings.items():
        print(f"{name:<40} ceiling on this host: {value:.3f}")
    suffix = ((f"_w{args.batch_workers}" if args.batch_workers else "")
              + (f"_ort{args.ort_threads}" if args.ort_threads else ""))
    save(f"serve_{g.provider.replace('ExecutionProvider', '').lower()}{suffix}", {
        "model": f"{args.model} v{version}", "provider": g.provider, "clients": args.clients,
        "server_ort_threads": args.ort_threads, "server_batch_workers": args.batch_workers,
        "seconds_per_measurement": args.seconds, "repeats": args.repeats, "table": table,
        "ratios": {k: {"value": v, "target": t} for k, (v, t) in ratios.items()},
        "grpc_ceilings": ceilings})


if __name__ == "__main__":
    main()
