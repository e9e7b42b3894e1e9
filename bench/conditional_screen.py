"""Variants of the mnist-cond preset at (about) equal training time, scored alike.

Each variant trains the preset with its own settings and epochs (pick the epochs so the wall
times match: the seconds are reported), then draws 10k samples (1k per class, seed 0) scored by
the project's classifier metrics: class consistency (overall and the worst digit), FD and IS.
Writes bench/results/<name>.json and one grid per variant. The default compares the label
embedding joined to z (CGAN) with conditional BatchNorm:

    .venv/bin/python bench/conditional_screen.py --epochs 1
    .venv/bin/python bench/conditional_screen.py --name conditional_width \
        --variant w64:1:model.ngf=64,model.ndf=64 --variant w32:2:model.ngf=32,model.ndf=32
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

VARIANTS = ("embed:{epochs}:model.g_conditioning=embed", "cbn:{epochs}:model.g_conditioning=cbn")
KEYS = ("consistency", "consistency_min", "fd", "fd_class_max", "is", "coverage_min")


def parse_variant(text: str) -> tuple[str, int, list[str]]:
    """``name:epochs:key=value,key=value`` -> (name, epochs, settings)."""
    name, epochs, settings = text.split(":", 2)
    return name, int(epochs), [s for s in settings.split(",") if s]


def train(settings: list[str], run_dir: Path, data_dir: str, epochs: int) -> float:
    """Wall seconds of one preset run (a separate process, as an operator would run it)."""
    start = time.perf_counter()
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    subprocess.run([sys.executable, "-m", "training.cli", "--preset", "mnist-cond", "--data-dir", data_dir,
                    "--run-dir", str(run_dir), "--epochs", str(epochs), "--no-progress", *overrides], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the default variants")
    parser.add_argument("--variant", action="append", help="name:epochs:key=value,... (repeatable)")
    parser.add_argument("--name", default="conditional_screen", help="results file and grid prefix")
    args = parser.parse_args()
    reference = metrics.ImageReference.load(Path(args.data_dir))
    variants = [parse_variant(v.format(epochs=args.epochs)) for v in args.variant or VARIANTS]
    report: dict = {"cpu": cpu_model(), "variants": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for variant, epochs, settings in variants:
            run_dir = Path(scratch) / variant
            seconds = train(settings, run_dir, args.data_dir, epochs)
            samples = load_samples(run_dir, 10_000, seed=0)
            result = metrics.evaluate_images(samples.values, reference, labels=samples.labels)
            report["variants"][variant] = {"epochs": epochs, "settings": settings, "train_seconds": round(seconds, 1),
                                           **{k: round(float(result[k]), 4) for k in KEYS},
                                           "consistency_per_class": result["consistency_per_class"]}
            picked = [i for c in range(10) for i in np.flatnonzero(samples.labels == c)[:8]]  # 8 per class
            RESULTS.mkdir(parents=True, exist_ok=True)
            grid_image = images.make_grid(images.model_to_uint8(samples.values[picked]), 8)
            images.save_png(images.caption_rows(grid_image, [str(c) for c in range(10)], 28),
                            RESULTS / f"{args.name}_{variant}.png")
            print(variant, report["variants"][variant])
    save(args.name, report)


if __name__ == "__main__":
    main()
