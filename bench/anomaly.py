"""Does a score tell images like the training data from others? AUROC of three scores, through a real server.

Scores of each image, all through the served API: the discriminator's logit (Score; lower means
less like the data), the encoder's anomaly score (Score with include_anomaly; higher means less
like the data), and a brute-force baseline, the pixel distance to the nearest of ``--pool``
samples the model generated (Sample). Real images are MNIST test digits the encoder's
calibration did not use (5000 onwards); every other kind is built from them or from nothing:
far (uniform noise, blank white, inverted, shifted 8 px) and near (rotated 90 degrees, the left
half of one digit beside the right half of another, the digit at half size in the middle, 10%
of pixels set to black or white), and the model's own samples; with
``--held-out MODEL:DIGIT``, the test digits of a class that a model (trained with
data.hold_out=DIGIT) never saw, against its other classes. AUROC is the probability that an
image of the kind scores as more anomalous than a real one (0.5: chance). Throughput: Score(64)
with and without the anomaly path, and the baseline on the same batches, interleaved repeats,
medians.

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
    half = np.zeros_like(real)
    half[:, 7:21, 7:21] = real.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).astype(np.uint8)
    speckled = np.where(rng.random(real.shape) < 0.1, rng.choice([0, 255], real.shape), real).astype(np.uint8)
    return {"noise": rng.integers(0, 256, real.shape, dtype=np.uint8), "blank white": np.full_like(real, 255),
            "inverted": 255 - real, "shifted 8 px": np.roll(real, 8, axis=2),
            "rotated 90": np.rot90(real, 1, axes=(1, 2)).copy(), "two halves pasted": pasted,
            "half size": half, "10% salt and pepper": speckled}


def auroc(real: np.ndarray, other: np.ndarray) -> float:
    """P(an image of the other kind scores higher than a real one), ties counted half."""
    ranks = np.concatenate([real, other]).argsort(kind="stable").argsort() + 1.0
    return float((ranks[len(real):].sum() - len(other) * (len(other) + 1) / 2) / (len(real) * len(other)))


class NearestOfPool:
    """The brute-force baseline: each image's pixel distance to the nearest of a pool of the
    model's samples (the pool's squared norms computed once, as a deployed baseline would)."""

    def __init__(self, pool: np.ndarray):
        self.pool = pool.reshape(len(pool), -1).astype(np.float32)
        self.norms = (self.pool**2).sum(1)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        flat = pixels.reshape(len(pixels), -1).astype(np.float32)
        squared = (flat**2).sum(1)[:, None] - 2 * flat @ self.pool.T + self.norms[None]
        return np.sqrt(np.maximum(squared.min(1), 0))


def pool_of(client: InferenceClient, model: str, size: int) -> NearestOfPool:
    """The baseline's pool: ``size`` samples of the model (seeds 100, 101, ...)."""
    chunks = [client.sample(1024, model=model, seed=100 + i, encoding="uint8").images
              for i in range((size + 1023) // 1024)]
    return NearestOfPool(np.concatenate(chunks)[:size])


def scores(client: InferenceClient, model: str, pixels: np.ndarray, nearest: NearestOfPool) -> dict[str, np.ndarray]:
    """Each score of uint8 [N, 28, 28] images, oriented so that higher means more anomalous."""
    batches = [client.score(pixels[i : i + 512, None], model=model, anomaly=True) for i in range(0, len(pixels), 512)]
    return {"discriminator": -np.concatenate([b.logits for b in batches]),
            "anomaly": np.concatenate([b.anomaly for b in batches]), "nearest of the pool": nearest(pixels)}


def auroc_table(client: InferenceClient, model: str, real: np.ndarray, others: dict[str, np.ndarray],
                nearest: NearestOfPool) -> dict[str, dict[str, float]]:
    """AUROC of each score, real images against each other kind."""
    reference = scores(client, model, real, nearest)
    table = {}
    for kind, pixels in others.items():
        other = scores(client, model, pixels, nearest)
        table[kind] = {score: round(auroc(reference[score], other[score]), 4) for score in reference}
        print(f"{kind:<24} " + "  ".join(f"{s} {v:.3f}" for s, v in table[kind].items()), flush=True)
    return table


def held_out_digit(client: InferenceClient, spec: str, test: np.ndarray, labels: np.ndarray, count: int,
                   pool: int) -> dict[str, dict[str, float]]:
    """``MODEL:DIGIT``: a model trained without DIGIT (data.hold_out), its unseen test digits of
    the other classes against the test digits of the one it never saw."""
    model, _, digit = spec.partition(":")
    unseen = np.arange(len(test)) >= FIRST_UNSEEN
    real = test[unseen & (labels != int(digit))][:count].reshape(-1, 28, 28)
    held = test[labels == int(digit)][:count].reshape(-1, 28, 28)
    return auroc_table(client, model, real, {f"held-out digit {digit} ({model})": held},
                       pool_of(client, model, pool))


def class_read_back(repository: Path, model: str, test: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A conditional version's two ways to name an unlabelled digit's class, run from its files on
    MNIST test digits 5000..6999: the discriminator's most likely class, and the class whose
    reconstruction scores lowest (what the server uses); the share of digits each gets right."""
    import onnxruntime as ort

    from dcgan_core.images import uint8_to_model
    from dcgan_core.repository import Repository

    store = Repository(repository)
    folder = store.version_dir(model, store.versions(model)[-1])
    session = {net: ort.InferenceSession(str(folder / f"{net}.onnx"), providers=["CPUExecutionProvider"])
               for net in ("discriminator", "encoder")}
    x, y = uint8_to_model(test[FIRST_UNSEEN : FIRST_UNSEEN + 2000]), labels[FIRST_UNSEEN : FIRST_UNSEEN + 2000]
    classes = store.manifest(model, store.versions(model)[-1]).num_classes
    every = [{"samples": x, "labels": np.full(len(x), c, np.int64)} for c in range(classes)]
    logits = np.stack([session["discriminator"].run(None, feed)[0] for feed in every])
    anomaly = np.stack([session["encoder"].run(["anomaly"], feed)[0] for feed in every])
    return {"discriminator's most likely class": float((logits.argmax(0) == y).mean()),
            "best reconstruction": float((anomaly.argmin(0) == y).mean()),
            "share the discriminator calls 1": float((logits.argmax(0) == 1).mean())}


def throughput(client: InferenceClient, model: str, images: np.ndarray, nearest: NearestOfPool,
               repeats: int) -> dict[str, float]:
    """Images per second: Score without and with the anomaly path (a real server), and the
    baseline computed in this process on the same batches (no decoding or RPC: in its favour)."""
    def timed(call: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for _ in range(10):
                call()
            return 10 * len(images) / (time.perf_counter() - start)
        return run
    runs = interleaved({"score": timed(lambda: client.score(images, model=model)),
                        "score with anomaly": timed(lambda: client.score(images, model=model, anomaly=True)),
                        "nearest of the pool": timed(lambda: nearest(images))}, repeats)
    return {name: median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets/mnist"))
    parser.add_argument("--count", type=int, default=2000, help="real images, and images of each kind")
    parser.add_argument("--pool", type=int, default=20000, help="generated samples of the baseline")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--held-out", action="append", default=[], metavar="MODEL:DIGIT",
                        help="a model of the repository trained without DIGIT (data.hold_out), with an encoder")
    parser.add_argument("--conditional", metavar="MODEL", help="a conditional model with an encoder: how often "
                        "each way of naming an unlabelled image's class is right")
    parser.add_argument("--name", default="anomaly")
    args = parser.parse_args()
    test, labels = load_mnist(args.data_dir, "test")
    real = test[FIRST_UNSEEN : FIRST_UNSEEN + args.count].reshape(-1, 28, 28)
    config = ServeConfig(repository=args.repository, host="127.0.0.1", port=0, http_port=-1, metrics_port=-1,
                         poll_s=0).validate()
    server = InferenceServer(config).start()
    try:
        with InferenceClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            nearest = pool_of(client, args.model, args.pool)
            generated = np.concatenate([client.sample(1000, model=args.model, seed=7 + i, encoding="uint8").images
                                        for i in range((args.count + 999) // 1000)])[: args.count, 0]
            version = client.get_model(args.model).latest_version
            others = {**kinds(real, np.random.default_rng(0)), "generated": generated}
            table = auroc_table(client, args.model, real, others, nearest)
            for spec in args.held_out:
                table.update(held_out_digit(client, spec, test, labels, args.count, args.pool))
            rates = throughput(client, args.model, real[:64, None], nearest, args.repeats)
    finally:
        server.stop(grace=1)
    classes = class_read_back(Path(args.repository), args.conditional, test, labels) if args.conditional else {}
    if classes:
        print(f"{args.conditional}, class right: " + ", ".join(f"{k} {v:.3f}" for k, v in classes.items()))
    ratio = rates["score with anomaly"] / rates["score"]
    shown = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
    print(f"Score(64), img/s: {shown}; with anomaly / without {ratio:.2f}")
    save(args.name, {"cpu": cpu_model(), "model": args.model, "version": version, "count": args.count,
                     "pool": args.pool, "held_out": args.held_out, "auroc": table, "score_img_per_s": rates,
                     "anomaly_throughput_ratio": ratio, "conditional": args.conditional, "class_read_back": classes,
                     "anomaly_vs_baseline": rates["score with anomaly"] / rates["nearest of the pool"]})


if __name__ == "__main__":
    main()
