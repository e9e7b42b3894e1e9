"""Latent controls measured: what truncation and discriminator-guided sampling do to FD, IS and
class coverage of a served model, so a user can choose a setting.

Starts a real server on the repository, draws ``--samples`` samples per setting through the
client (SampleStream, seeded), and scores them with the project's metrics (training.metrics, the
MNIST classifier): truncation at 0.5, 1, 1.5, 2 and none; guided sampling at min_score thresholds
set at quantiles of the unfiltered samples' scores, and keep_top shares. Writes
bench/results/latent_controls.json and a grid per setting.

    .venv/bin/python bench/latent_controls.py --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, cpu_model, save  # noqa: E402
from dcgan_core import images  # noqa: E402
from serving.client.library import Controls, InferenceClient  # noqa: E402
from serving.server.app import InferenceServer  # noqa: E402
from serving.server.config import ServeConfig  # noqa: E402
from training import metrics  # noqa: E402

TRUNCATIONS = [0.5, 1.0, 1.5, 2.0, None]
SCORE_QUANTILES = [0.25, 0.5, 0.75]  # min_score thresholds: these quantiles of unfiltered scores
KEEP_TOP = [0.5, 0.25]
CHUNK = 1000


def draw(client: InferenceClient, model: str, count: int, controls: Controls) -> tuple[np.ndarray, np.ndarray, int]:
    """``count`` float32 samples (seeds 0, 1, ... of CHUNK each), their scores and candidates drawn."""
    parts, scores, candidates = [], [], 0
    for seed, start in enumerate(range(0, count, CHUNK)):
        batch = client.sample(min(CHUNK, count - start), model=model, seed=seed, encoding="float32",
                              include_scores=True, controls=controls)
        parts.append(batch.images)
        scores.append(batch.probabilities)
        candidates += batch.candidates or len(batch.images)
    return np.concatenate(parts), np.concatenate(scores), candidates


def measure(client, model, count, controls, reference, name) -> dict:
    start = time.perf_counter()
    samples, scores, candidates = draw(client, model, count, controls)
    seconds = time.perf_counter() - start
    result = metrics.evaluate_images(samples, reference, names=["fd", "is", "coverage"])
    images.save_png(images.make_grid(images.model_to_uint8(samples[:64])), RESULTS / f"latent_controls_{name}.png")
    row = {"setting": name, **{k: result[k] for k in ("fd", "is", "coverage_min", "coverage_max")},
           "mean_score": float(scores.mean()), "acceptance": count / candidates, "candidates": candidates,
           "seconds": seconds}
    print(f"{name:>18}: FD {row['fd']:7.2f}  IS {row['is']:5.2f}  coverage {row['coverage_min']:.3f}.."
          f"{row['coverage_max']:.3f}  acceptance {row['acceptance']:.3f}  ({seconds:.1f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--data-dir", default="../shared/datasets/mnist")
    parser.add_argument("--samples", type=int, default=10000)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    reference = metrics.ImageReference.load(Path(args.data_dir))
    config = ServeConfig(repository=args.repository, host="127.0.0.1", port=0, http_port=-1, metrics_port=-1, poll_s=0,
                         max_count=CHUNK, max_candidates=8 * CHUNK).validate()
    server = InferenceServer(config).start()
    report: dict = {"model": args.model, "samples": args.samples, "cpu": cpu_model(), "truncation": [],
                    "guided": []}
    try:
        with InferenceClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            report["version"] = client.get_model(args.model).latest_version
            for t in TRUNCATIONS:
                report["truncation"].append({"truncation": t, **measure(
                    client, args.model, args.samples, Controls(truncation=t), reference, f"t{t or 'none'}")})
            _, unfiltered, _ = draw(client, args.model, args.samples, Controls())
            for q in SCORE_QUANTILES:
                threshold = float(np.quantile(unfiltered, q))
                report["guided"].append({"min_score": threshold, "quantile": q, **measure(
                    client, args.model, args.samples, Controls(min_score=threshold), reference, f"min_score_q{q}")})
            for share in KEEP_TOP:
                report["guided"].append({"keep_top": share, **measure(
                    client, args.model, args.samples, Controls(keep_top=share), reference, f"keep_top_{share}")})
    finally:
        server.stop(grace=1)
    save("latent_controls", report)


if __name__ == "__main__":
    main()
