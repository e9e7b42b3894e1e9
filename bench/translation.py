"""Image-to-image translation on MNIST test digits 5000..9999 (never trained on): how much of each
digit survives, for plain resizing, a U-Net trained on L1 alone and the pix2pix GAN (the committed
model), so that what the discriminator adds is visible.

Per task (``mnist-sr4``: 7x7 block means -> 28x28; ``mnist-edges``: outline -> digit) and method:
the share of outputs the evaluation classifier (training/classifier.py, 98.9% on the originals)
reads as the original digit's class, PSNR against the original (pixels in [0, 1]), and FD of the
outputs against the test digits beside the real-vs-real floor (10,000 training digits). Pictures
of source | baselines | L1 | GAN | target (bench/results/translation_<task>.png), figures in
bench/results/translation.json.

    .venv/bin/python bench/translation.py --sr4-gan exported/mnist-sr4/1/generator.onnx \\
        --sr4-l1 runs/mnist-sr4-l1 --edges-gan exported/mnist-edges/1/generator.onnx --edges-l1 runs/mnist-edges-l1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, cpu_model, save  # noqa: E402
from dcgan_core import images  # noqa: E402
from training import metrics, translation  # noqa: E402
from training.checkpoint import BEST_NAME  # noqa: E402
from training.config import load_config  # noqa: E402
from training.export import load_run  # noqa: E402
from training.translation import Translate  # noqa: E402

FIRST, COUNT, SHOWN = 5000, 5000, 12


def translator(path: Path) -> Translate:
    """A generator.onnx, or a run directory's best.pt (else its last checkpoint)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda sources: session.run(None, {"source": sources})[0]
    run = load_run(path, checkpoint_name=BEST_NAME if (path / BEST_NAME).exists() else "checkpoint.pt")
    return translation.torch_translator(run.generator)


def resized(method: Image.Resampling) -> Translate:
    """Plain resizing of each source to 28x28 (as uint8 pixels, like any picture)."""
    def translate(sources: np.ndarray) -> np.ndarray:
        pixels = images.model_to_uint8(sources)
        out = [images.pil_to_chw(images.to_pil(p).resize((28, 28), method)) for p in pixels]
        return images.uint8_to_model(np.stack(out))
    return translate


def figures(outputs: np.ndarray, targets: np.ndarray, labels: np.ndarray, reference: metrics.ImageReference) -> dict:
    scores = translation.measure(outputs, targets, labels, reference)
    return {"class_kept": scores["class_kept"], "psnr_db": scores["psnr"], "fd": scores["fd"]}


def run_task(task: str, methods: dict[str, Translate], reference: metrics.ImageReference, data: Path,
             unpictured: set[str]) -> dict:
    config = load_config(task, overrides=[{"data": {"path": str(data)}}])
    sources, targets, labels = translation.held_out_pairs(config, COUNT)
    results, shown = {}, [images.model_to_uint8(translation.resize_to(torch.from_numpy(sources[:SHOWN]), 28).numpy())]
    for name, method in methods.items():
        outputs = translation.translate_all(method, sources)
        results[name] = figures(outputs, targets, labels, reference)
        if name not in unpictured:
            shown.append(images.model_to_uint8(outputs[:SHOWN]))
        print(f"{task:<12} {name:<22} class kept {results[name]['class_kept']:6.1%}  "
              f"PSNR {results[name]['psnr_db']:5.2f} dB  FD {results[name]['fd']:6.2f}", flush=True)
    shown.append(images.model_to_uint8(targets[:SHOWN]))
    grid = images.make_grid(np.concatenate(shown), SHOWN)
    images.save_picture(grid, RESULTS / f"translation_{task.removeprefix('mnist-')}.png", images.GRID_SCALE)
    floor = figures(targets, targets, labels, reference)
    results["originals (targets)"] = {key: value for key, value in floor.items() if key != "psnr_db"}
    pictured = [name for name in methods if name not in unpictured]
    return {"picture_rows": ["source (resized, nearest)", *pictured, "target"], "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    for task in ("sr4", "edges"):
        parser.add_argument(f"--{task}-gan", type=Path, required=True, help="generator.onnx or run directory")
        parser.add_argument(f"--{task}-l1", type=Path, required=True, help="the L1-only run (or its ONNX)")
    parser.add_argument("--also", action="append", default=[], metavar="TASK:NAME=PATH",
                        help="another model beside them, e.g. sr4:lambda 10=runs/mnist-sr4-lambda10 (repeatable)")
    args = parser.parse_args()
    reference = metrics.ImageReference.load(args.data, progress=False)
    floor = float(metrics.real_floor(reference, ["fd"])["fd"])
    tasks = {
        "mnist-sr4": {"bicubic x4": resized(Image.Resampling.BICUBIC), "nearest x4": resized(Image.Resampling.NEAREST),
                      "U-Net, L1 only": translator(args.sr4_l1), "pix2pix (GAN + L1)": translator(args.sr4_gan)},
        "mnist-edges": {"the edge map as it is": lambda sources: sources, "U-Net, L1 only": translator(args.edges_l1),
                        "pix2pix (GAN + L1)": translator(args.edges_gan)},
    }
    extras = {"the edge map as it is"}  # the same picture as the source row
    for extra in args.also:
        task, _, named = extra.partition(":")
        name, _, path = named.partition("=")
        tasks[f"mnist-{task}"][name] = translator(Path(path))
        extras.add(name)
    report = {task: run_task(task, methods, reference, args.data, extras) for task, methods in tasks.items()}
    print(f"FD real-vs-real floor (10,000 training digits vs the test set): {floor:.2f}")
    save("translation", {"cpu": cpu_model(), "digits": f"MNIST test {FIRST}..{FIRST + COUNT - 1}",
                         "judge": "training/classifier.py evaluation classifier", "fd_floor": floor,
                         "models": {k: str(v) for k, v in vars(args).items() if k != "data"}, "tasks": report})



if __name__ == "__main__":
    main()
