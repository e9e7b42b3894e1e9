"""Per-call cost against Triton: the same client program (bench/oip_load.py, tritonclient over the
Open Inference Protocol's gRPC) against Triton (PyTriton, the same generator.onnx, its dynamic
batcher), dcgan-serve with default flags, and dcgan-serve as several processes sharing the ports
(``--processes N``, with its default batch workers, and with ``--batch-workers 1``). Loads: 64 single-image clients, and
one client asking for 256 images per request. Besides images/s and latency, each run records
the server's CPU time (its whole process tree: Triton's stub processes included) per call.
Interleaved repeats, medians, ratios of one run (bench/results/serve_vs_triton.json).

    .venv/bin/python bench/serve_vs_triton.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import cpu_model, median, proc_stat, save  # noqa: E402
from bench.oip_vs_triton import TRITON_VENV, measure, served_version, start_triton, triton_python  # noqa: E402
from dcgan_core.repository import Repository  # noqa: E402
from serving import processes  # noqa: E402

ONE_WORKER = ["--batch-workers", "1", "--ort-threads", "1"]


def tree_cpu_s(roots: list[int]) -> float:
    """User + system CPU seconds of ``roots`` and all their descendants, from /proc."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = proc_stat(entry / "stat")
            except OSError:
                continue  # gone meanwhile
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0.0, list(roots)
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def start_dcgan(repository: str, flags: list[str]) -> tuple[subprocess.Popen, int]:
    """dcgan-serve with ``flags`` (with --processes, the supervisor: its workers are its children)."""
    base = ["--repository", repository, "--metrics-port", "-1", "--http-port", "-1"]
    process, ports = processes.start_server([*base, *flags], stderr=subprocess.DEVNULL)
    return process, ports.grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="dcgan-serve --processes of the multi-process peers (default: one per core)")
    parser.add_argument("--triton-venv", type=Path, default=TRITON_VENV)
    args = parser.parse_args()
    triton_py = triton_python(args.triton_venv)
    loads = {f"{args.clients}x1": (args.clients, 1), f"1x{args.batch}": (1, args.batch)}
    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as scratch:
        try:
            several = ["--processes", str(args.processes)]
            variants = {" ".join(["dcgan-serve", *flags]): flags for flags in ([], several, [*several, *ONE_WORKER])}
            servers = {name: start_dcgan(args.repository, flags) for name, flags in variants.items()}
            started += [process for process, _ in servers.values()]
            version = served_version(servers["dcgan-serve"][1], args.model)
            onnx = Repository(Path(args.repository)).version_dir(args.model, version) / "generator.onnx"
            triton, ports = start_triton(triton_py, onnx, args.model, Path(scratch) / "triton.log")
            started.append(triton)
            peers = {"triton": ([triton.pid], ports["grpc"]),
                     **{name: ([process.pid], port) for name, (process, port) in servers.items()}}
            runs = {load: {peer: [] for peer in peers} for load in loads}
            for repeat in range(args.repeats):
                for load, (clients, count) in loads.items():
                    for peer, (pids, port) in peers.items():
                        before = tree_cpu_s(pids)
                        result = measure(triton_py, "tritonclient-grpc", f"127.0.0.1:{port}", args.model, clients,
                                         count, args.seconds)
                        calls = result["requests_per_s"] * args.seconds
                        result["server_core_ms_per_call"] = 1000 * (tree_cpu_s(pids) - before) / calls
                        runs[load][peer].append(result)
                        print(f"repeat {repeat + 1}/{args.repeats} {load:>6} {peer:<52} "
                              f"{result['images_per_s']:7.0f} img/s  p99 {result['p99_ms']:6.1f} ms  "
                              f"{result['server_core_ms_per_call']:.3f} server core-ms/call", flush=True)
        finally:
            for process in started:
                process.terminate()
                process.wait(timeout=60)
    keys = ("images_per_s", "p50_ms", "p99_ms", "server_core_ms_per_call")
    medians = {load: {peer: {k: median([r[k] for r in results]) for k in keys} for peer, results in by_peer.items()}
               for load, by_peer in runs.items()}
    ratios = {load: {peer: medians[load][peer]["images_per_s"] / medians[load]["triton"]["images_per_s"]
                     for peer in peers if peer != "triton"} for load in loads}
    for load, named in ratios.items():
        for peer, ratio in named.items():
            print(f"{load:>6} {peer:<52} {ratio:5.2f}x Triton")
    save("serve_vs_triton", {"cpu": cpu_model(), "model": f"{args.model}/{version}", "seconds": args.seconds,
                             "repeats": args.repeats, "client": "bench/oip_load.py tritonclient-grpc",
                             "variants": variants, "median": medians, "ratios_vs_triton": ratios,
                             "runs": runs})


if __name__ == "__main__":
    main()
