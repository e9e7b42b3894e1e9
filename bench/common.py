"""Helpers shared by the benchmarks: side-by-side repeats, medians, saving results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model as lscpu names it: figures from different CPUs of one kind are not comparable."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": cpu_model(), "processor": platform.processor(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def proc_stat(path: Path) -> tuple[int, float]:
    """(parent pid, CPU seconds: user + system) from a Linux /proc ``stat`` file, of a process
    (/proc/PID/stat) or of one of its threads (/proc/PID/task/TID/stat)."""
    fields = path.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    return proc_stat(Path(f"/proc/{pid}/stat"))[1]


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each named measurement ``repeats`` times, alternating, so drift hits all alike."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def save(name: str, report: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), **report}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path}")
    return path
