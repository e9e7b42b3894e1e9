"""Data-parallel training on this CPU: 2 torchrun processes x 1 thread against 1 process x 2
threads, the MNIST preset (fp32, global batch 32) on the real data.

Each configuration trains N and 2N steps from scratch; the difference of the two wall times is
the time of N steps without start-up (imports, data loading, process group). Repeats alternate
between the configurations; the report gives medians and the ratio of images per second.

    .venv/bin/python bench/ddp_throughput.py --data-dir ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model, interleaved, median, save  # noqa: E402

SETTINGS = ["--set", "run.precision=fp32", "--set", "run.progress=false", "--set", "run.checkpoint_every=1000000"]


def run(processes: int, steps: int, data_dir: str) -> float:
    """Wall seconds of one training command that stops after ``steps`` steps."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["-m", "training.cli", "--preset", "mnist", "--data-dir", data_dir, "--run-dir", run_dir,
                "--set", f"run.max_steps={steps}", *SETTINGS]
        if processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(processes), *args]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
        else:
            command, env = [sys.executable, *args], {**os.environ, "OMP_NUM_THREADS": "2"}
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = args.steps
    configs = {"1proc_x_2threads": 1, "2procs_x_1thread": 2}
    runs = {f"{name}_{count}": (lambda p=processes, c=count: run(p, c, args.data_dir))
            for name, processes in configs.items() for count in (n, 2 * n)}
    results = interleaved(runs, args.repeats)
    report = {"cpu": cpu_model(), "steps": n, "batch": 32, "repeats": args.repeats, "runs": results, "img_per_s": {}}
    for name in configs:
        seconds = median([b - a for a, b in zip(results[f"{name}_{n}"], results[f"{name}_{2 * n}"])])
        report["img_per_s"][name] = n * 32 / seconds
    ratio = report["img_per_s"]["2procs_x_1thread"] / report["img_per_s"]["1proc_x_2threads"]
    report["ratio_2procs_over_1proc"] = ratio
    print(f"CPU: {report['cpu']}; mnist preset, fp32, global batch 32, {n} steps, medians of {args.repeats}")
    for name, rate in report["img_per_s"].items():
        print(f"{name:>18}: {rate:7.1f} img/s")
    print(f"2 processes x 1 thread / 1 process x 2 threads: {ratio:.2f}")
    save("ddp_throughput", report)


if __name__ == "__main__":
    main()
