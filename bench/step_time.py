"""Where a training step's time goes, and what makes it shorter on this CPU.

Times one mnist-cond training step (D update and G update, batch 32, fp32 unless the preset's
precision says otherwise) of the project's GAN step under variants that keep the recipe (memory
format, torch.compile) or change the networks' widths. Every variant is built fresh, warmed up,
then the variants alternate over the repeats so drift hits all alike. Prints median ms per
step and the ratio to the preset; with --profile, also the convolutions' share of the preset's
step (is the step bound by its convolutions' arithmetic, or by overhead?).

    .venv/bin/python bench/step_time.py --data-dir ../shared/datasets/mnist --profile
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench.common import cpu_model, interleaved, median, save, timed  # noqa: E402
from training.config import load_config  # noqa: E402
from training.gan_step import gan_run  # noqa: E402
from training.run_loop import RunLoop  # noqa: E402

#: name -> (config overrides, how the built trainer is changed)
VARIANTS = {
    "preset (channels_last)": ({}, None),
    "contiguous memory format": ({}, "contiguous"),
    "torch.compile(G), torch.compile(D)": ({}, "compile"),
    "ngf = ndf = 48": ({"model": {"ngf": 48, "ndf": 48}}, None),
    "ngf = ndf = 32": ({"model": {"ngf": 32, "ndf": 32}}, None),
    "D without extra layers": ({"model": {"d_extra_layers": 0}}, None),
    "batch 64 (64 images a step)": ({"optim": {"batch_size": 64}}, None),
}


def stepper(trainer: RunLoop, change: str | None, steps: int):
    """A function that runs ``steps`` training steps on consecutive batches of epoch 0."""
    gan = trainer.model
    if change == "contiguous":
        gan.memory_format = torch.contiguous_format  # the batches follow the networks
        gan.G.to(memory_format=gan.memory_format)
        gan.D.to(memory_format=gan.memory_format)
    if change == "compile":
        gan.G, gan.D = torch.compile(gan.G), torch.compile(gan.D)

    def run() -> None:
        for _ in range(steps):
            gan.train_step(*trainer.batch_at(trainer.step % trainer.steps_per_epoch), trainer.step,
                           trainer.progress())
            trainer.step += 1

    return run


def convolution_share(run) -> float:
    """Share of a profiled run's CPU time spent in convolutions (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if "convolution" in e.key) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also profile the preset's step")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for number, (name, (overrides, change)) in enumerate(VARIANTS.items()):
            config = load_config("mnist-cond", overrides=[{"data": {"path": args.data_dir}, "run": {
                "run_dir": f"{scratch}/{number}", "progress": False, "epochs": 1000}}, overrides])
            runs[name] = stepper(gan_run(config), change, args.steps)
            runs[name]()  # warm-up: oneDNN kernels, compilation
        seconds = interleaved({name: (lambda r=run: timed(r)) for name, run in runs.items()}, args.repeats)
        share = convolution_share(runs["preset (channels_last)"]) if args.profile else None
    medians = {name: median(values) for name, values in seconds.items()}
    preset = medians["preset (channels_last)"]
    report: dict = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "steps_per_repeat": args.steps,
                    "repeats": args.repeats, "ms_per_step": {}, "preset_over_variant": {}}
    for name, value in medians.items():
        ms, speed_up = 1000 * value / args.steps, preset / value
        report["ms_per_step"][name] = round(ms, 1)
        report["preset_over_variant"][name] = round(speed_up, 3)
        print(f"{name:>36}: {ms:7.1f} ms/step  (speed-up over the preset {speed_up:.2f}x)")
    if share is not None:
        report["convolution_share_of_preset_step"] = round(share, 3)
        print(f"convolutions take {share:.0%} of the preset's step")
    print(f"CPU: {report['cpu']}, {report['threads']} threads")
    save("step_time", report)


if __name__ == "__main__":
    main()
