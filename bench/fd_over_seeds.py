"""FD of several generators over several sample seeds, side by side.

FD of 10k samples moves with the latents drawn (for the default model, 2.1 to 2.8 between seeds),
so a target that compares two models' FD is judged on medians over the same seeds, not on one
draw each. Each source is what ``dcgan-eval`` takes (an ONNX generator or a run directory);
conditional generators draw 1k samples per class, as in every other conditional figure.

    .venv/bin/python bench/fd_over_seeds.py exported/mnist-dcgan/3/generator.onnx \
        exported/mnist-cond/2/generator.onnx --seeds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model, median, save  # noqa: E402
from training import metrics  # noqa: E402
from training.evaluate import load_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--seeds", type=int, default=5, help="sample seeds 0..N-1")
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    reference = metrics.ImageReference.load(Path(args.data_dir))
    report: dict = {"cpu": cpu_model(), "count": args.count, "seeds": list(range(args.seeds)), "fd": {}}
    for seed in range(args.seeds):  # seeds outermost: drift of a shared machine hits every source alike
        for source in args.sources:
            samples = load_samples(source, args.count, seed)
            fd = metrics.evaluate_images(samples.values, reference, ["fd"])["fd"]  # overall only: no labels
            report["fd"].setdefault(str(source), []).append(round(fd, 3))
            print(f"seed {seed}  {source}: FD {fd:.3f}")
    report["median"] = {source: median(values) for source, values in report["fd"].items()}
    for source, value in report["median"].items():
        print(f"median FD {value:.3f}  {source}")
    save("fd_over_seeds", report)


if __name__ == "__main__":
    main()
