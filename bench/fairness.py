"""How long a small Sample waits behind another client's large work, on one dcgan-serve process.

One client sends Sample(count=4) every few milliseconds while a second client sends one
"background" request; the small calls' latencies are recorded only while the background call is
in flight. Backgrounds, interleaved over repeats (medians of each repeat's p50 and max reported):
  none                      the small calls alone;
  sample_1024               Sample(count=1024), an ordinary large request;
  guided_1024               Sample(count=1024, min_score=0.999): rounds of thousands of candidates
                            until --max-candidates (answered RESOURCE_EXHAUSTED, as intended).
The server runs with default flags. Results: bench/results/fairness.json

    .venv/bin/python bench/fairness.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcgan.v1 import inference_pb2 as pb  # noqa: E402
from dcgan.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

from bench.common import interleaved, median, save  # noqa: E402
from serving import processes  # noqa: E402

SMALL_EVERY_S = 0.005


def start_server(repository: str) -> tuple[subprocess.Popen, int]:
    process, ports = processes.start_server(["--repository", repository, "--metrics-port", "-1", "--poll-s", "0"],
                                            stderr=subprocess.DEVNULL)
    return process, ports.grpc


def small_latencies_during(small_stub, big_stub, background: pb.SampleRequest | None, model: str) -> list[float]:
    """Latencies of Sample(4) calls on ``small_stub`` while ``background`` runs on ``big_stub``
    (or for 2 s with none)."""
    done = threading.Event()

    def run_background() -> None:
        try:
            if background is None:
                done.wait(2.0)
            else:
                big_stub.Sample(background, timeout=120)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        finally:
            done.set()

    thread = threading.Thread(target=run_background)
    thread.start()
    latencies, seed = [], 0
    while not done.is_set():
        start = time.perf_counter()
        small_stub.Sample(pb.SampleRequest(model=model, count=4, seed=seed), timeout=60)
        if not done.is_set():  # finished while the background was still in flight
            latencies.append(time.perf_counter() - start)
        seed += 1
        time.sleep(SMALL_EVERY_S)
    thread.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="fairness", help="results file name (bench/results/NAME.json)")
    args = parser.parse_args()
    backgrounds = {
        "none": None,
        "sample_1024": pb.SampleRequest(model=args.model, count=1024, seed=300),
        "guided_1024": pb.SampleRequest(model=args.model, count=1024, seed=301, min_score=0.999),
    }
    proc, port = start_server(args.repository)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as small, grpc.insecure_channel(f"127.0.0.1:{port}") as big:
            small_stub, big_stub = pb_grpc.InferenceServiceStub(small), pb_grpc.InferenceServiceStub(big)
            small_stub.Sample(pb.SampleRequest(model=args.model, count=4, seed=0), timeout=60)  # warm
            seen: dict[str, list[list[float]]] = {name: [] for name in backgrounds}

            def measure(name: str):
                def run() -> float:
                    seen[name].append(small_latencies_during(small_stub, big_stub, backgrounds[name], args.model))
                    return max(seen[name][-1], default=float("nan"))
                return run

            interleaved({name: measure(name) for name in backgrounds}, args.repeats)
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"model": args.model, "repeats": args.repeats, "server_flags": "defaults", "results": {}}
    for name, repeats in seen.items():
        p50 = [float(np.median(r)) * 1000 for r in repeats if r]
        worst = [float(np.max(r)) * 1000 for r in repeats if r]
        report["results"][name] = {"small_calls": sum(len(r) for r in repeats),
                                   "p50_ms_median": median(p50), "max_ms_median": median(worst),
                                   "max_ms_worst": max(worst)}
        print(f"{name:12s} small Sample(4): p50 {median(p50):7.1f} ms, max {median(worst):7.1f} ms "
              f"(worst repeat {max(worst):7.1f} ms)")
    save(args.name, report)


if __name__ == "__main__":
    main()
