"""Where the event loop thread's time per call goes: dcgan-serve's own Python (validation, planning,
latents, hand-off, responses, metrics) against grpc.aio and asyncio's. The part that code changes
in this project can cut is the first; bench/loop_cost.py gives the thread's CPU per call.

py-spy (``pip install py-spy``) samples the running server's ``grpc-aio`` thread while one client
sends sequential calls of each kind (as bench/loop_cost.py); each busy sample counts for dcgan-serve
when any of its frames (below the loop's own) is in serving/ or dcgan_core/, else for grpc.aio +
asyncio; samples waiting in epoll are idle. The shares times the thread's CPU per call (from /proc,
same calls) give microseconds per call (bench/results/loop_profile.json).

    .venv/bin/python bench/loop_profile.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import cpu_model, save  # noqa: E402
from bench.loop_cost import calls, thread_cpu_s  # noqa: E402
from serving import processes  # noqa: E402
from serving.server.app import LOOP_THREAD  # noqa: E402

OURS = ("serving/", "dcgan_core/")
IDLE = ("select (selectors.py", "EpollSelector.select")
LOOP_FRAME = "InferenceServer._run_loop"


def classify(raw: Path) -> tuple[collections.Counter, collections.Counter]:
    """Samples of the loop thread by part (dcgan-serve, grpc.aio + asyncio, idle), and the
    dcgan-serve functions they were in (inclusive: a function counts once per sample)."""
    parts, functions = collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        if not thread.endswith(LOOP_THREAD):
            continue
        ours = [f for f in frames if f.split(" (")[1].startswith(OURS) and not f.startswith(LOOP_FRAME)]
        part = "idle" if frames and frames[-1].startswith(IDLE) else "dcgan-serve" if ours else "grpc.aio + asyncio"
        parts[part] += int(count)
        for function in {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" for f in ours}:
            functions[function] += int(count)
    return parts, functions


def profile(pid: int, call, seconds: float, raw: Path) -> tuple[float, int]:
    """py-spy on ``pid`` while ``call`` repeats for ``seconds``: (loop thread CPU s, calls made)."""
    spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                            "-p", str(pid), "-d", str(int(seconds)), "-r", "500", "--format", "raw", "--threads",
                            "--nonblocking", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before, made, until = thread_cpu_s(pid, LOOP_THREAD), 0, time.monotonic() + seconds
    while time.monotonic() < until:
        call()
        made += 1
    spent = thread_cpu_s(pid, LOOP_THREAD) - before
    spy.wait(timeout=60)
    return spent, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    server, ports = processes.start_server(["--repository", args.repository, "--metrics-port", "-1",
                                            "--http-port", "-1", "--max-queue-delay-ms", "0"],
                                           stderr=subprocess.DEVNULL)
    results = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel, tempfile.TemporaryDirectory() as scratch:
            for name, call in calls(channel, args.model).items():
                for _ in range(50):
                    call()  # warm
                spent, made = profile(server.pid, call, args.seconds, Path(scratch) / "raw.txt")
                parts, functions = classify(Path(scratch) / "raw.txt")
                busy = parts["dcgan-serve"] + parts["grpc.aio + asyncio"]
                per_call = 1e6 * spent / made
                results[name] = {"loop_us_per_call": per_call, "calls": made, "samples": dict(parts),
                                 "us_per_call": {part: per_call * parts[part] / busy
                                                 for part in ("dcgan-serve", "grpc.aio + asyncio")},
                                 "dcgan_functions_us": {f: per_call * n / busy for f, n in functions.most_common(12)}}
                split = results[name]["us_per_call"]
                print(f"{name:<22} loop {per_call:5.0f} us/call: dcgan-serve {split['dcgan-serve']:4.0f}, "
                      f"grpc.aio + asyncio {split['grpc.aio + asyncio']:4.0f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    save("loop_profile", {"cpu": cpu_model(), "seconds": args.seconds, "sampler": "py-spy 500 Hz, --nonblocking",
                          "results": results})


if __name__ == "__main__":
    main()
