"""Does a score tell images like the training data from others? AUROC of three scores, through a real server.

Scores of each image, all through the served API: the discriminator's logit (Score; lower means
less like the data), the encoder's anomaly score (Score with include_anomaly; higher means less
like the data), and a brute-force baseline, the pixel distance to the nearest of ``--pool``
samples the model generated (Sample). Real images are MNIST test digits the encoder's
calibration did not use (5000 onwards); every other kind is built from them or from nothing:
far (uniform noise, blank white, inverted, shifted 8 px) and near (rotated 90 degrees, the left
half of one digit beside the right half of another), and the model's own samples. AUROC is the
probability that an image of the kind scores as more anomalous than a real one (0.5: chance).
Throughput: Score(64) with and without the anomaly path, interleaved repeats, medians.

    .venv/bin/python bench/anomaly.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model, interleaved, median, save  # noqa: E402
from serving.client.library import InferenceClient  # noqa: E402
from serving.server.app import InferenceServer  # noqa: E402
from serving.server.config import ServeConfig  # noqa: E402
from training.data import load_mnist  # noqa: E402

FIRST_UNSEEN = 5000  # the encoder's calibration used MNIST test digits 0..4999


def kinds(real: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """uint8 [N, 28, 28] images of each kind, as many as ``real``."""
    pasted = np.concatenate([real[:, :, :14], np.roll(real, 1, axis=0)[:, :, 14:]], axis=2)
    return {"noise": rng.integers(0, 256, real.shape, dtype=np.uint8), "blank white": np.full_like(real, 255),
            "inverted": 255 - real, "shifted 8 px": np.roll(real, 8, axis=2),
            "rotated 90": np.rot90(real, 1, axes=(1, 2)).copy(), "two halves pasted": pasted}


def auroc(real: np.ndarray, other: np.ndarray) -> float:
    """P(an image of the other kind scores higher than a real one), ties counted half."""
    ranks = np.concatenate([real, other]).argsort(kind="stable").argsort() + 1.0
    return float((ranks[len(real):].sum() - len(other) * (len(other) + 1) / 2) / (len(real) * len(other)))


def scores(client: InferenceClient, model: str, pixels: np.ndarray, pool: np.ndarray) -> dict[str, np.ndarray]:
    """Each score of uint8 [N, 28, 28] images, oriented so that higher means more anomalous."""
    batches = [client.score(pixels[i : i + 512, None], model=model, anomaly=True) for i in range(0, len(pixels), 512)]
    flat = pixels.reshape(len(pixels), -1).astype(np.float32)
    nearest = (flat**2).sum(1)[:, None] - 2 * flat @ pool.T + (pool**2).sum(1)[None]
    return {"discriminator": -np.concatenate([b.logits for b in batches]),
            "anomaly": np.concatenate([b.anomaly for b in batches]),
            "nearest of the pool": np.sqrt(np.maximum(nearest.min(1), 0))}


def throughput(client: InferenceClient, model: str, images: np.ndarray, repeats: int) -> dict[str, float]:
    def rate(anomaly: bool) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for _ in range(10):
                client.score(images, model=model, anomaly=anomaly)
            return 10 * len(images) / (time.perf_counter() - start)
        return run
    runs = interleaved({"score": rate(False), "score with anomaly": rate(True)}, repeats)
    return {name: median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets/mnist"))
    parser.add_argument("--count", type=int, default=2000, help="real images, and images of each kind")
    parser.add_argument("--pool", type=int, default=20000, help="generated samples of the baseline")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="anomaly")
    args = parser.parse_args()
    test, _ = load_mnist(args.data_dir, "test")
    real = test[FIRST_UNSEEN : FIRST_UNSEEN + args.count].reshape(-1, 28, 28)
    config = ServeConfig(repository=args.repository, host="127.0.0.1", port=0, metrics_port=-1, poll_s=0).validate()
    server = InferenceServer(config).start()
    try:
        with InferenceClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            pool = np.concatenate([client.sample(1024, model=args.model, seed=100 + i, encoding="uint8").images
                                   for i in range((args.pool + 1023) // 1024)])[: args.pool]
            pool = pool.reshape(len(pool), -1).astype(np.float32)
            generated = np.concatenate([client.sample(1000, model=args.model, seed=7 + i, encoding="uint8").images
                                        for i in range((args.count + 999) // 1000)])[: args.count, 0]
            version = client.get_model(args.model).latest_version
            reference = scores(client, args.model, real, pool)
            table = {}
            for kind, pixels in {**kinds(real, np.random.default_rng(0)), "generated": generated}.items():
                other = scores(client, args.model, pixels, pool)
                table[kind] = {score: round(auroc(reference[score], other[score]), 4) for score in reference}
                print(f"{kind:<18} " + "  ".join(f"{s} {v:.3f}" for s, v in table[kind].items()), flush=True)
            rates = throughput(client, args.model, real[:64, None], args.repeats)
    finally:
        server.stop(grace=1)
    ratio = rates["score with anomaly"] / rates["score"]
    print(f"Score(64): {rates['score']:.0f} img/s, with anomaly {rates['score with anomaly']:.0f} img/s: {ratio:.2f}")
    save(args.name, {"cpu": cpu_model(), "model": args.model, "version": version, "count": args.count,
                     "pool": args.pool, "auroc": table, "score_img_per_s": rates, "anomaly_throughput_ratio": ratio})


if __name__ == "__main__":
    main()
