"""``dcgan-eval SOURCE``: quality metrics of a generator or a set of samples, beside the real floor.

SOURCE is a training run directory (its EMA generator; --best for best.pt), an ONNX generator file, a folder of PNGs,
or a .npy array (uint8 NCHW images, float32 model-range images, or float32 [N, 2] points).

Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcgan_core import helptext, images
from dcgan_core.atomic import atomic_write_text
from dcgan_core.latents import latents
from training import metrics
from training.checkpoint import BEST_NAME, CHECKPOINT_NAME, CheckpointError
from training.config import TOY_DATASETS, TrainConfig
from training.data import DataError, toy_mixture

DEFAULT_DATA_DIR = Path(TrainConfig().data.path)  # MNIST, where training finds it too


class EvalError(ValueError):
    pass


@dataclass
class Samples:
    values: np.ndarray  # model-range float32 NCHW, or [N, 2] points
    toy: str | None  # mixture name for 2-D points
    labels: np.ndarray | None = None  # the classes a conditional generator was asked for


def balanced_labels(count: int, classes: int) -> np.ndarray | None:
    """Class i % classes for sample i: equal shares (10k samples of 10 classes: 1k each)."""
    return np.arange(count, dtype=np.int64) % classes if classes else None


def from_generator(generator: torch.nn.Module, config: TrainConfig, count: int, seed: int) -> Samples:
    """``count`` samples of a torch generator from ``latents(seed)`` (balanced classes if conditional)."""
    z = torch.from_numpy(latents(seed, count, config.model.latent_size))
    labels = balanced_labels(count, config.model.num_classes)
    y = [None] * len(z.split(1000)) if labels is None else torch.from_numpy(labels).split(1000)
    with torch.no_grad():
        values = np.concatenate([generator(a, b).numpy() for a, b in zip(z.split(1000), y)])
    return Samples(values, config.data.dataset if config.kind == "toy2d" else None, labels)


def _from_checkpoint(run_dir: Path, count: int, seed: int, checkpoint_name: str) -> Samples:
    from training.export import load_run

    run = load_run(run_dir, checkpoint_name=checkpoint_name)
    return from_generator(run.generator, run.config, count, seed)


def _from_onnx(path: Path, count: int, seed: int, toy: str | None) -> Samples:
    """An exported generator; a conditional one (a second input) gets balanced labels, its class
    count read from the manifest beside it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    z = latents(seed, count, int(inputs[0].shape[1]))
    labels = None
    if len(inputs) > 1:
        manifest = path.parent / "manifest.json"
        classes = json.loads(manifest.read_text()).get("num_classes", 0) if manifest.exists() else 0
        if not classes:
            raise EvalError(f"{path} takes class labels but no manifest.json beside it says how many classes")
        labels = balanced_labels(count, classes)
    feeds = lambda i: {inputs[0].name: z[i : i + 1000], **({} if labels is None else  # noqa: E731
                                                            {inputs[1].name: labels[i : i + 1000]})}
    values = np.concatenate([session.run(None, feeds(i))[0] for i in range(0, count, 1000)])
    return Samples(values, toy if values.ndim == 2 else None, labels)


def _from_array(array: np.ndarray, toy: str | None, where: str) -> Samples:
    if array.ndim == 2 and array.shape[1] == 2:
        return Samples(array.astype(np.float32), toy)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise EvalError(f"{where}: expected images [N, C, H, W] or points [N, 2], got shape {array.shape}")
    return Samples(images.uint8_to_model(array) if array.dtype == np.uint8 else array.astype(np.float32), None)


def load_samples(source: Path, count: int, seed: int, toy: str | None = None,
                 best: bool = False) -> Samples:
    """Samples from any supported source (generators draw ``count`` from ``seed``); ``best``
    takes a run's best.pt (its best in-training evaluation) instead of its last checkpoint."""
    if best:
        if not (source / BEST_NAME).exists():
            raise EvalError(f"{source}: no {BEST_NAME} (a run keeps one only with run.eval_every)")
        return _from_checkpoint(source, count, seed, BEST_NAME)
    if (source / CHECKPOINT_NAME).exists():
        return _from_checkpoint(source, count, seed, CHECKPOINT_NAME)
    if source.suffix == ".onnx" and source.is_file():
        return _from_onnx(source, count, seed, toy)
    if source.suffix == ".npy" and source.is_file():
        return _from_array(np.load(source), toy, str(source))
    if source.is_dir():
        files = sorted(source.glob("*.png"))
        if not files:
            raise EvalError(f"{source}: no checkpoint.pt and no PNG files")
        return _from_array(np.stack([images.decode_image(f.read_bytes()) for f in files]), toy, str(source))
    raise EvalError(f"{source}: not a run directory, .onnx, .npy or folder of PNGs")


def evaluate(samples: Samples, mnist_dir: Path, names: list[str] | None = None,
             floor: bool = True, progress: bool = True) -> dict:
    """Metrics of ``samples`` and, for images, the real-vs-real floor beside them."""
    if samples.values.ndim == 2:
        if samples.toy not in TOY_DATASETS:
            raise EvalError("2-D points need --toy ring|grid to know the target mixture")
        return {"toy": samples.toy, **metrics.toy_metrics(samples.values, toy_mixture(samples.toy))}
    if samples.values.shape[1:] != (1, 28, 28):
        raise EvalError(f"image metrics use the MNIST classifier: samples must be 1x28x28, "
                        f"got {list(samples.values.shape[1:])}")
    reference = metrics.ImageReference.load(mnist_dir, progress=progress)
    result = metrics.evaluate_images(samples.values, reference, names, samples.labels)
    if floor:
        result["real_floor"] = metrics.real_floor(reference, names)
    return result


def format_table(result: dict) -> str:
    floor = result.get("real_floor", {})
    rows = [f"{'metric':<16} {'value':>10} {'real floor':>11}"]
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ref = floor.get(key)
            rows.append(f"{key:<16} {value:>10.4g} {ref:>11.4g}" if isinstance(ref, (int, float))
                        else f"{key:<16} {value:>10.4g}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = helptext.parser("dcgan-eval", __doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("--count", type=int, default=10000, help="samples drawn from a generator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--best", action="store_true", help="a run's best.pt instead of its last checkpoint")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="MNIST (classifier, real set)")
    parser.add_argument("--metrics", help=f"comma list of {', '.join(metrics.IMAGE_METRICS)} (default: all)")
    parser.add_argument("--toy", choices=TOY_DATASETS, help="target mixture of 2-D point samples")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floor")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.metrics.split(",") if args.metrics else None
    try:
        unknown = [n for n in names or [] if n not in metrics.IMAGE_METRICS]
        if unknown:
            raise EvalError(f"unknown metric {unknown[0]!r}; metrics are {', '.join(metrics.IMAGE_METRICS)}")
        if args.count < 2:
            raise EvalError("--count must be >= 2")
        result = evaluate(load_samples(args.source, args.count, args.seed, args.toy, args.best), args.data_dir,
                          names, not args.no_floor)
    except (EvalError, DataError, CheckpointError, OSError, ValueError) as exc:
        print(f"dcgan-eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
