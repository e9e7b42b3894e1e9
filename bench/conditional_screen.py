"""Conditional G at equal training time: label embedding joined to z (CGAN) vs conditional BatchNorm.

Both variants train the mnist-cond preset in this run for the same number of steps (their step
times are printed so the comparison can be read as equal-time), then draw 10k samples (1k per
class, seed 0) scored by the project's classifier metrics: class consistency (overall and the
worst digit), FD and IS. Writes bench/results/conditional_screen.json and one grid per variant.

    .venv/bin/python bench/conditional_screen.py --epochs 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from bench.common import RESULTS, cpu_model, save  # noqa: E402
from dcgan_core import images  # noqa: E402
from training import metrics  # noqa: E402
from training.evaluate import load_samples  # noqa: E402

VARIANTS = ("embed", "cbn")
KEYS = ("consistency", "consistency_min", "fd", "fd_class_max", "is", "coverage_min")


def train(variant: str, run_dir: Path, data_dir: str, epochs: int) -> float:
    """Wall seconds of one preset run (a separate process, as an operator would run it)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training.cli", "--preset", "mnist-cond", "--data-dir", data_dir,
                    "--run-dir", str(run_dir), "--epochs", str(epochs), "--no-progress",
                    "--set", f"model.g_conditioning={variant}"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    reference = metrics.ImageReference.load(Path(args.data_dir))
    report: dict = {"epochs": args.epochs, "cpu": cpu_model(), "variants": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in VARIANTS:
            run_dir = Path(scratch) / variant
            seconds = train(variant, run_dir, args.data_dir, args.epochs)
            samples = load_samples(run_dir, 10_000, seed=0)
            result = metrics.evaluate_images(samples.values, reference, labels=samples.labels)
            report["variants"][variant] = {"train_seconds": round(seconds, 1),
                                           **{k: round(float(result[k]), 4) for k in KEYS},
                                           "consistency_per_class": result["consistency_per_class"]}
            picked = [i for c in range(10) for i in np.flatnonzero(samples.labels == c)[:8]]  # 8 per class
            RESULTS.mkdir(parents=True, exist_ok=True)
            grid_image = images.make_grid(images.model_to_uint8(samples.values[picked]), 8)
            images.save_png(images.caption_rows(grid_image, [str(c) for c in range(10)], 28),
                            RESULTS / f"conditional_screen_{variant}.png")
            print(variant, report["variants"][variant])
    save("conditional_screen", report)


if __name__ == "__main__":
    main()
