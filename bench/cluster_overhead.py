"""Envoy's cost and what a second replica buys, on this machine: throughput and p50/p99 latency
of ``Sample`` calls direct to one replica, through Envoy to that one replica, and through Envoy
to two replicas. Repeats alternate between the three so drift hits all alike; the report gives
medians and the ratios to the direct figure.

    .venv/bin/python bench/cluster_overhead.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model, interleaved, median, save  # noqa: E402
from serving.client.library import InferenceClient  # noqa: E402
from serving.cluster import Upstreams, envoy_config, start_envoy, start_replica, wait_healthy  # noqa: E402


def load(target: str, model: str, count: int, clients: int, seconds: float) -> dict:
    """``clients`` threads calling Sample(count) back to back for ``seconds``."""
    latencies: list[float] = []
    lock, start = threading.Lock(), threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        with InferenceClient(target) as client:
            client.sample(count, model=model, seed=index)  # connect before the clock starts
            start.wait()
            mine, end = [], time.perf_counter() + seconds
            while (now := time.perf_counter()) < end:
                client.sample(count, model=model, seed=index)
                mine.append(time.perf_counter() - now)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return {"calls_per_s": len(latencies) / elapsed, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--count", type=int, default=16, help="samples per call")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    serve = ["--repository", args.repository, "--poll-s", "0", "--metrics-port", "-1"]
    replicas = [start_replica(serve) for _ in range(2)]
    envoys = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            targets = {"direct": f"127.0.0.1:{replicas[0][1].grpc}"}
            for n in (1, 2):
                upstreams = Upstreams(addresses=tuple(("127.0.0.1", p) for _, p in replicas[:n]))
                work_dir = Path(scratch) / f"envoy{n}"
                work_dir.mkdir()
                envoy, ports, admin = start_envoy(envoy_config(upstreams, 0, 0, host="127.0.0.1"), work_dir)
                envoys.append(envoy)
                wait_healthy(admin, n, envoy)
                targets[f"envoy_{n}_replica{'s' if n > 1 else ''}"] = f"127.0.0.1:{ports.grpc}"
            runs = {name: (lambda t=target: load(t, args.model, args.count, args.clients, args.seconds))
                    for name, target in targets.items()}
            results = interleaved(runs, args.repeats)
    finally:
        for process in [*envoys, *(p for p, _ in replicas)]:
            process.terminate()
            process.wait(timeout=30)
    report = {"cpu": cpu_model(), "count": args.count, "clients": args.clients, "seconds": args.seconds,
              "repeats": args.repeats, "runs": results, "median": {}}
    for name, repeats in results.items():
        report["median"][name] = {key: median([r[key] for r in repeats]) for key in repeats[0]}
    direct = report["median"]["direct"]
    print(f"CPU: {report['cpu']}; Sample({args.count}) from {args.clients} clients, medians of {args.repeats}")
    for name, row in report["median"].items():
        ratio = row["calls_per_s"] / direct["calls_per_s"]
        report["median"][name]["throughput_over_direct"] = ratio
        print(f"{name:>18}: {row['calls_per_s']:7.1f} calls/s ({ratio:.2f} x direct)  p50 {row['p50_ms']:6.2f} ms  "
              f"p99 {row['p99_ms']:6.2f} ms")
    save("cluster_overhead", report)


if __name__ == "__main__":
    main()
