"""Does a preset reproduce? Train it on several seeds with ``dcgan-train`` and evaluate each best.pt.

A GAN recipe that works on one seed of one machine may fail on the next: CPU arithmetic differs
(AMX/bf16 or not, BLAS kernels) and GAN dynamics amplify it. This trains the preset once per seed,
one after another, through the real CLI, and evaluates what ``dcgan-export --best`` would publish
with the export protocol (``training.quality``): the figures the README states come from here.

    .venv/bin/python bench/preset_seeds.py --preset ring --seeds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import cpu_model, median, save  # noqa: E402
from dcgan_core import publishing  # noqa: E402
from training import quality  # noqa: E402
from training.checkpoint import BEST_NAME  # noqa: E402


def train(preset: str, seed: int, run_dir: Path, extra: list[str]) -> float:
    """Wall seconds of one ``dcgan-train`` run (the whole command, start-up included)."""
    command = [str(ROOT / ".venv/bin/dcgan-train"), "--preset", preset, "--seed", str(seed),
               "--run-dir", str(run_dir), "--no-progress", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ring")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/datasets/mnist")
    parser.add_argument("--name", help="result file name (default: preset_<preset>)")
    parser.add_argument("train_args", nargs="*", help="more dcgan-train arguments, after --")
    args = parser.parse_args()
    runs: list[dict] = []
    report = {"cpu": cpu_model(), "preset": args.preset, "train_args": args.train_args,
              "protocol": publishing.protocol_of({}), "runs": runs}
    with tempfile.TemporaryDirectory(prefix="preset-seeds-") as work:
        for seed in range(args.seeds):
            run_dir = Path(work) / f"seed{seed}"
            seconds = train(args.preset, seed, run_dir, args.train_args)
            figures = quality.evaluate_run(run_dir, BEST_NAME, args.data_dir)
            runs.append({"seed": seed, "train_s": round(seconds, 1), "best": figures})
            print(f"seed {seed}: {seconds:.0f} s, best.pt {json.dumps(figures)}", flush=True)
            report["median_train_s"] = median([r["train_s"] for r in runs])
            save(args.name or f"preset_{args.preset}", report)  # after every seed: a long run keeps what it did


if __name__ == "__main__":
    main()
