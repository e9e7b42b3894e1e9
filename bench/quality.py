"""Quality: a plain pytorch/examples-style DCGAN against the project's MNIST preset, same epochs.

Both train in this run on the same data (28x28, ngf/ndf 64); the reference is the plain DCGAN
(no extra layers, BatchNorm D, Adam 2e-4/0.5, batch 128, BCE, non-saturating G loss, no EMA).
Each then draws 10k samples and is scored with the same classifier metrics (training.metrics).
Optionally also scores a finished run (the committed default model's) against the same
reference. Also reports the toy ring preset over several seeds. Writes
bench/results/quality.json and both sample grids.

    .venv/bin/python bench/quality.py --epochs 5 --extra-run runs/mnist-v7

A class-conditional model (a run or an exported generator.onnx) is scored alone, 1k samples per
class: class consistency and FD overall and per class, IS, and a grid with one labelled row per
class (bench/results/quality_conditional.json and quality_conditional_grid.png):

    .venv/bin/python bench/quality.py --conditional exported/mnist-cond/1/generator.onnx
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, cpu_model, save  # noqa: E402
from bench.reference import ReferenceDCGAN  # noqa: E402
from dcgan_core import images  # noqa: E402
from dcgan_core.latents import latents  # noqa: E402
from training import metrics, reporting  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import build_batches, toy_mixture  # noqa: E402
from training.evaluate import load_samples  # noqa: E402
from training.gan_step import gan_run  # noqa: E402

TOY_HELD_OUT_SEED = 10_000  # the in-training evaluations draw their latents from the run's seed


def train_reference(data_dir: str, epochs: int, seed: int = 0) -> torch.nn.Module:
    """pytorch/examples/dcgan (bench.reference): the plain DCGAN at the preset's widths, batch 128."""
    plain = {"spectral_norm": False, "d_extra_layers": 0, "g_extra_layers": 0}
    config = load_config("mnist", overrides=[{"data": {"path": data_dir}, "optim": {"batch_size": 128},
                                              "model": plain, "run": {"seed": seed}}])
    reference = ReferenceDCGAN(config, seed)
    batches = build_batches(config)
    for epoch in range(epochs):
        for index in tqdm(range(batches.steps_per_epoch), desc=f"reference epoch {epoch + 1}/{epochs}"):
            reference.step(batches.batch(epoch, index))
    return reference.net_g.eval()


def summarize(result: dict) -> dict:
    return {k: result[k] for k in ("fd", "is", "coverage_min", "coverage_max")}


def conditional(source: Path, samples: int, reference_metrics: metrics.ImageReference) -> None:
    """Score a class-conditional generator and draw its per-class grid."""
    drawn = load_samples(source, samples, 0)
    if drawn.labels is None:
        raise SystemExit(f"{source} is not class-conditional")
    result = metrics.evaluate_images(drawn.values, reference_metrics, labels=drawn.labels)
    floor = metrics.real_floor(reference_metrics)
    keys = ("consistency", "consistency_min", "consistency_per_class", "fd", "fd_class_max", "fd_per_class", "is")
    report = {"source": str(source), "samples": samples, "cpu": cpu_model(),
              "model": {k: result[k] for k in keys}, "real_floor": {k: floor[k] for k in keys if k in floor}}
    classes = int(drawn.labels.max()) + 1
    per_class = np.concatenate([np.flatnonzero(drawn.labels == c)[:8] for c in range(classes)])
    grid = images.make_grid(images.model_to_uint8(drawn.values[per_class]), 8)
    images.save_png(images.caption_rows(grid, [str(c) for c in range(classes)], drawn.values.shape[2]),
                    RESULTS / "quality_conditional_grid.png")
    for name in ("model", "real_floor"):
        row = report[name]
        print(f"{name:<10} consistency {row['consistency']:.4f} (min {row['consistency_min']:.4f})  "
              f"fd {row['fd']:.3f} (class max {row['fd_class_max']:.3f})  is {row['is']:.3f}")
    save("quality_conditional", report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--extra-run", type=Path, help="a finished run to score too (the default model's)")
    parser.add_argument("--toy-seeds", type=int, default=5)
    parser.add_argument("--conditional", type=Path,
                        help="score this class-conditional run or generator.onnx instead (nothing is trained)")
    args = parser.parse_args()
    reference_metrics = metrics.ImageReference.load(Path(args.data_dir))
    if args.conditional:
        return conditional(args.conditional, args.samples, reference_metrics)
    report: dict = {"epochs": args.epochs, "samples": args.samples,
                    "real_floor": summarize(metrics.real_floor(reference_metrics))}
    z = torch.from_numpy(latents(0, args.samples, 100))

    start = time.perf_counter()
    reference = train_reference(args.data_dir, args.epochs)
    report["reference_train_s"] = time.perf_counter() - start
    with torch.no_grad():
        ref_samples = torch.cat([reference(c) for c in z.split(1000)]).numpy()
    report["reference"] = summarize(metrics.evaluate_images(ref_samples, reference_metrics))
    reporting.save_image_grid(ref_samples[:64], RESULTS / "quality_reference_grid.png")

    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config("mnist", overrides=[{"data": {"path": args.data_dir},
                                                  "run": {"run_dir": run_dir, "epochs": args.epochs}}])
        start = time.perf_counter()
        gan_run(config).train()
        report["project_train_s"] = time.perf_counter() - start
        project_samples = load_samples(Path(run_dir), args.samples, 0).values
    report["project"] = summarize(metrics.evaluate_images(project_samples, reference_metrics))
    reporting.save_image_grid(project_samples[:64], RESULTS / "quality_project_grid.png")
    report["fd_ratio_project_over_reference"] = report["project"]["fd"] / report["reference"]["fd"]

    if args.extra_run:
        extra_samples = load_samples(args.extra_run, args.samples, 0).values
        report["extra_run"] = {"path": str(args.extra_run),
                               **summarize(metrics.evaluate_images(extra_samples, reference_metrics))}
        report["fd_ratio_extra_over_reference"] = report["extra_run"]["fd"] / report["reference"]["fd"]
        reporting.save_image_grid(extra_samples[:64], RESULTS / "quality_default_model_grid.png")

    toy = []
    for seed in range(args.toy_seeds):
        with tempfile.TemporaryDirectory() as run_dir:
            config = load_config("ring", overrides=[{"run": {"run_dir": run_dir, "seed": seed, "progress": False}}])
            gan_run(config).train()
            # what would be exported (best.pt when the preset evaluates in training), scored on
            # latents other than the ones that picked it
            points = load_samples(Path(run_dir), 10000, TOY_HELD_OUT_SEED + seed,
                                  best=config.run.eval_every > 0).values
            toy.append(metrics.toy_metrics(points, toy_mixture("ring")))
    report["toy_ring"] = {key: {"mean": statistics.mean(t[key] for t in toy),
                                "sd": statistics.pstdev(t[key] for t in toy)}
                          for key in ("modes_covered", "high_quality", "reverse_kl")}
    report["toy_ring"]["per_seed"] = toy

    for name in ("real_floor", "reference", "project", "extra_run"):
        if name in report:
            row = report[name]
            print(f"{name:<12} fd {row['fd']:8.3f}  is {row['is']:6.3f}  "
                  f"coverage {row['coverage_min']:.3f}..{row['coverage_max']:.3f}")
    ratio = report['fd_ratio_project_over_reference']
    print(f"fd ratio project/reference at {args.epochs} epochs: {ratio:.3f} (target <= 0.6)")
    if args.extra_run:
        print(f"fd ratio {args.extra_run}/reference: {report['fd_ratio_extra_over_reference']:.3f} (target <= 0.35)")
    ring = report["toy_ring"]
    print(f"toy ring over {args.toy_seeds} seeds: "
          f"modes {ring['modes_covered']['mean']:.2f} ± {ring['modes_covered']['sd']:.2f}, "
          f"high quality {ring['high_quality']['mean']:.3f} ± {ring['high_quality']['sd']:.3f}")
    save("quality", report)


if __name__ == "__main__":
    main()
