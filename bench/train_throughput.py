"""Training throughput: the project's run loop against a plain pytorch/examples-style loop.

Both train the same architecture (the MNIST preset's G and D) on the same in-memory MNIST
batches; repeats alternate between them and the report gives medians and the ratio
project / reference (target >= 1.0: checkpoints, EMA and metrics must not slow training).

    .venv/bin/python bench/train_throughput.py --data-dir ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, median, save, timed  # noqa: E402
from bench.reference import ReferenceDCGAN  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import build_batches  # noqa: E402
from training.gan_step import gan_run  # noqa: E402


def reference_loop(config, batches, steps: int):
    reference = ReferenceDCGAN(config, config.run.seed)
    state = {"step": 0}

    def run() -> None:
        for _ in range(steps):
            epoch, index = divmod(state["step"], batches.steps_per_epoch)
            reference.step(batches.batch(epoch, index))
            state["step"] += 1

    return run


def project_trainer(config, batches, steps: int):
    trainer = gan_run(config, batches=batches)

    def run() -> None:
        trainer.train(max_steps=trainer.step + steps)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "auto", "bf16"],
                        help="the project trainer's run.precision; the reference loop is always fp32 "
                             "(default fp32: what is measured is the trainer's own overhead)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config("mnist", overrides=[{"data": {"path": args.data_dir}, "run": {
            "run_dir": run_dir, "progress": False, "epochs": 1000, "checkpoint_every": 10**9,
            "precision": args.precision}}])
        batches = build_batches(config)
        runs = {"reference": reference_loop(config, batches, args.steps),
                "project": project_trainer(config, batches, args.steps)}
        for run in runs.values():
            run()  # warm-up: allocator, oneDNN kernels
        seconds = interleaved({name: (lambda r=run: timed(r)) for name, run in runs.items()}, args.repeats)
    images = args.steps * config.optim.batch_size
    rates = {name: [images / s for s in values] for name, values in seconds.items()}
    ratio = median(rates["project"]) / median(rates["reference"])
    for name, values in rates.items():
        print(f"{name:>10}: median {median(values):8.1f} img/s  (repeats: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"ratio project/reference: {ratio:.3f} (target >= 1.0)")
    m, o = config.model, config.optim
    label = (f"mnist preset: 28x28, ngf {m.ngf}, ndf {m.ndf}, spectral_norm {m.spectral_norm}, "
             f"extra layers G {m.g_extra_layers} D {m.d_extra_layers}, "
             f"batch {o.batch_size}, loss {config.loss.name}, EMA {config.run.ema_decay}, "
             f"project precision {config.run.precision}")
    name = "train_throughput_cpu" + ("" if args.precision == "fp32" else f"_{args.precision}")
    save(name, {"config": label, "steps_per_repeat": args.steps, "repeats": args.repeats,
                "images_per_second": rates,
                "median_images_per_second": {k: median(v) for k, v in rates.items()},
                "ratio_project_over_reference": ratio})


if __name__ == "__main__":
    main()
