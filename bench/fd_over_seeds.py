"""The noise of each published figure: its spread over sample seeds, several generators side by side.

FD of 10k samples moves with the latents drawn (for the default model, 2.1 to 2.8 between seeds),
so two models are compared on the same seeds and a difference within a figure's spread is noise.
The publishing gate (dcgan_core.publishing.GATES) allows exactly that spread, and a test checks
the gate against this file. Each source is what ``dcgan-eval`` takes (an ONNX generator of a
model repository, or a run directory); conditional generators draw balanced classes.

    .venv/bin/python bench/fd_over_seeds.py exported/mnist-dcgan/3/generator.onnx \
        exported/mnist-cond/2/generator.onnx exported/toy-ring/1/generator.onnx --seeds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model, median, save  # noqa: E402
from dcgan_core import publishing  # noqa: E402
from dcgan_core.repository import Repository  # noqa: E402
from training import quality  # noqa: E402
from training.evaluate import Samples, evaluate, load_samples  # noqa: E402


def samples(source: Path, count: int, seed: int) -> Samples:
    """A repository version's generator (``<repo>/<model>/<version>/generator.onnx``: its manifest
    names a toy's mixture) or anything else dcgan-eval reads."""
    if source.suffix == ".onnx" and source.parent.name.isdigit():
        repository = Repository(source.parents[2])
        manifest = repository.manifest(source.parent.parent.name, int(source.parent.name))
        return quality.version_samples(repository, manifest, {"samples": count, "seed": seed})
    return load_samples(source, count, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, default=quality.DEFAULT_DATA_DIR)
    parser.add_argument("--seeds", type=int, default=5, help="sample seeds 0..N-1")
    parser.add_argument("--count", type=int, default=publishing.DEFAULT_PROTOCOL["samples"])
    args = parser.parse_args()
    report: dict = {"cpu": cpu_model(), "count": args.count, "seeds": list(range(args.seeds)), "figures": {}}
    for seed in range(args.seeds):  # seeds outermost: drift of a shared machine hits every source alike
        for source in args.sources:
            figures = publishing.gated(evaluate(samples(source, args.count, seed), args.data_dir,
                                                floor=False, progress=False))
            for key, value in figures.items():
                report["figures"].setdefault(key, {}).setdefault(str(source), []).append(round(value, 4))
            print(f"seed {seed}  {source}: {figures}", flush=True)
    report["median"] = {key: {source: median(values) for source, values in per_source.items()}
                        for key, per_source in report["figures"].items()}
    report["spread"] = {key: {source: round(max(values) - min(values), 4) for source, values in per_source.items()}
                        for key, per_source in report["figures"].items()}
    print(report["spread"])
    save("fd_over_seeds", report)


if __name__ == "__main__":
    main()
