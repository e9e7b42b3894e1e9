"""Garbage-collector pauses under load, with and without ``gc.freeze`` after start-up (dcgan-serve's
default; ``--no-gc-freeze`` turns it off). A collection stops the event loop and so every call in
flight: a full one that scans every module, servicer and model object takes tens of milliseconds.

One client program (bench/oip_load.py ``dcgan-v1``: 64 single-image Sample clients, a connection
each) against both servers, interleaved repeats; each run reads the server's own
``dcgan_gc_pause_seconds`` histogram before and after (bench/results/gc_pauses.json).

    .venv/bin/python bench/gc_pauses.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.common import cpu_model, median, save  # noqa: E402
from bench.oip_vs_triton import measure  # noqa: E402
from serving import processes  # noqa: E402

VARIANTS = {"gc.freeze (default)": [], "--no-gc-freeze": ["--no-gc-freeze"]}


def gc_histogram(metrics_port: int) -> dict[str, dict[str, float]]:
    """Per generation: count, sum and cumulative bucket counts (by upper bound) of the server's pauses."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "dcgan_gc_pause_seconds":
            for sample in family.samples:
                key = sample.labels.get("le", sample.name.rsplit("_", 1)[1])
                found.setdefault(sample.labels["generation"], {})[key] = sample.value
    return found


def pauses(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per generation over a run: collections, mean and longest (as the bucket bound it fell under) in ms."""
    result = {}
    for generation, now in after.items():
        was = before.get(generation, {})
        count = now["count"] - was.get("count", 0.0)
        if count:
            bounds = sorted((float(le), now[le] - was.get(le, 0.0)) for le in now if le not in ("count", "sum"))
            longest = next(bound for bound, seen in bounds if seen == count)
            result[generation] = {"collections": count, "mean_ms": 1000 * (now["sum"] - was.get("sum", 0.0)) / count,
                                  "longest_under_ms": 1000 * longest}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    servers = {name: processes.start_server(["--repository", args.repository, "--metrics-port", "0",
                                             "--http-port", "-1", *flags], stderr=subprocess.DEVNULL)
               for name, flags in VARIANTS.items()}
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for repeat in range(args.repeats):
            for name, (_, ports) in servers.items():
                before = gc_histogram(ports.metrics)
                result = measure(sys.executable, "dcgan-v1", f"127.0.0.1:{ports.grpc}", args.model, args.clients, 1,
                                 args.seconds)
                result["gc"] = pauses(before, gc_histogram(ports.metrics))
                runs[name].append(result)
                full = result["gc"].get("2", {})
                print(f"repeat {repeat + 1}/{args.repeats} {name:<20} {result['images_per_s']:6.0f} img/s  "
                      f"p99 {result['p99_ms']:6.1f} ms  full collections {full.get('collections', 0):.0f}, "
                      f"mean {full.get('mean_ms', 0):.1f} ms", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    medians = {name: {key: median([r[key] for r in results]) for key in ("images_per_s", "p50_ms", "p99_ms")}
               for name, results in runs.items()}
    for name, figures in medians.items():
        print(f"{name:<20} {figures['images_per_s']:6.0f} img/s  p50 {figures['p50_ms']:5.1f}  p99 "
              f"{figures['p99_ms']:5.1f} ms")
    save("gc_pauses", {"cpu": cpu_model(), "client": f"bench/oip_load.py dcgan-v1, {args.clients} x 1",
                       "seconds": args.seconds, "repeats": args.repeats, "median": medians, "runs": runs})


if __name__ == "__main__":
    main()
