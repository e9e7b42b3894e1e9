"""Export a training run's generator and discriminator to ONNX and publish them as a version.

Steps: rebuild the networks from the checkpoint (EMA generator with recalibrated BatchNorm by
default), export each in eval mode with a dynamic batch dimension, run onnx.checker's full check,
compare onnxruntime with torch on batches of 1, 7 and 64, and only then publish the version
atomically. Any mismatch refuses to publish and reports the figures.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from dcgan_core import images
from dcgan_core.latents import latents
from dcgan_core.repository import Manifest, NetworkSpec, Repository, sha256_file
from training import checkpoint
from training.config import TrainConfig, from_dict
from training.models import build_models, recalibrate_batchnorm

log = logging.getLogger(__name__)
for _chatty in ("onnxscript", "onnx_ir"):  # the exporter's optimizer logs every pass at INFO
    logging.getLogger(_chatty).setLevel(logging.WARNING)
GENERATOR_FILE, DISCRIMINATOR_FILE = "generator.onnx", "discriminator.onnx"
PARITY_BATCHES = (1, 7, 64)


class ExportError(RuntimeError):
    """The exported ONNX does not behave like the torch model; nothing was published."""


@dataclass(frozen=True)
class ExportOptions:
    use_ema: bool = True
    checkpoint_name: str = checkpoint.CHECKPOINT_NAME  # or checkpoint.BEST_NAME: the best evaluated epoch
    rtol: float = 1e-3
    atol: float = 1e-5


@dataclass
class LoadedRun:
    config: TrainConfig
    generator: nn.Module  # eval mode, ready to export
    discriminator: nn.Module
    step: int
    run_dir: Path


def load_run(run_dir: Path, use_ema: bool = True, checkpoint_name: str = checkpoint.CHECKPOINT_NAME) -> LoadedRun:
    """The networks of a run's checkpoint on CPU, in eval mode."""
    state = checkpoint.load(Path(run_dir) / checkpoint_name)
    config = from_dict(state["config"])
    generator, discriminator = build_models(config)
    discriminator.load_state_dict(state["discriminator"])
    if use_ema and state.get("ema") is not None:
        generator.load_state_dict(state["ema"])
        generator = recalibrate_batchnorm(generator, config.model.latent_size, config.run.seed)
    else:
        generator.load_state_dict(state["generator"])
    return LoadedRun(config, generator.eval(), discriminator.eval(), state["step"], Path(run_dir))


def _export(model: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    """torch.onnx (dynamo) export with a dynamic batch dimension, then onnx's full check."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                          verbose=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_parity(model: nn.Module, path: Path, inputs: list[np.ndarray], options: ExportOptions) -> dict[str, float]:
    """Max abs/rel error of onnxruntime vs torch for each batch; ExportError past the tolerance."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    report = {}
    for batch in inputs:
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        actual = session.run(None, {input_name: batch})[0]
        if actual.shape != expected.shape:
            raise ExportError(f"{path.name}: batch {len(batch)} gives shape {actual.shape}, torch {expected.shape}")
        error = np.abs(actual - expected)
        report[f"batch_{len(batch)}_max_abs_error"] = float(error.max())
        if not np.all(error <= options.atol + options.rtol * np.abs(expected)):
            worst = np.unravel_index(np.argmax(error - options.rtol * np.abs(expected)), error.shape)
            raise ExportError(
                f"{path.name}: onnxruntime differs from torch at batch {len(batch)}: max abs error "
                f"{error.max():.3g}, at {tuple(int(i) for i in worst)} ort={actual[worst]:.6g} "
                f"torch={expected[worst]:.6g}; tolerance rtol={options.rtol} atol={options.atol}")
    return report


def _parity_inputs(config: TrainConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Latents for G and model-range inputs for D, for each parity batch size."""
    z = [latents(1000 + n, n, config.model.latent_size) for n in PARITY_BATCHES]
    rng = np.random.default_rng(0)
    if config.kind == "toy2d":
        x = [rng.normal(0, 2, (n, 2)).astype(np.float32) for n in PARITY_BATCHES]
    else:
        shape = (config.data.channels, config.data.image_size, config.data.image_size)
        x = [images.uint8_to_model(rng.integers(0, 256, (n, *shape), dtype=np.uint8)) for n in PARITY_BATCHES]
    return z, x


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def export_run(run_dir: Path, repository: Repository, name: str, metrics: dict[str, Any] | None = None,
               options: ExportOptions = ExportOptions()) -> Manifest:
    """Export, verify and publish a run as the next version of ``name``."""
    run = load_run(run_dir, options.use_ema, options.checkpoint_name)
    config = run.config
    sample_shape = [2] if config.kind == "toy2d" else [config.data.channels, config.data.image_size,
                                                       config.data.image_size]
    z_inputs, x_inputs = _parity_inputs(config)

    def build(folder: Path) -> Manifest:
        parity = {}
        for net, model, inputs, file, names in [
            ("generator", run.generator, z_inputs, GENERATOR_FILE, ("z", "samples")),
            ("discriminator", run.discriminator, x_inputs, DISCRIMINATOR_FILE, ("samples", "logits")),
        ]:
            log.info("exporting %s to %s", net, file)
            _export(model, torch.from_numpy(inputs[1][:2]), folder / file, *names)
            parity[net] = check_parity(model, folder / file, inputs, options)
        spec = lambda file, i, o, i_shape, o_shape: NetworkSpec(  # noqa: E731
            file, i, [None, *i_shape], o, [None, *o_shape], sha256_file(folder / file))
        return Manifest(
            name=name, version=0, kind=config.kind, latent_size=config.model.latent_size,
            sample_shape=sample_shape, value_range=list(images.VALUE_RANGE), opset=_opset(folder / GENERATOR_FILE),
            generator=spec(GENERATOR_FILE, "z", "samples", [config.model.latent_size], sample_shape),
            discriminator=spec(DISCRIMINATOR_FILE, "samples", "logits", sample_shape, []),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source_run=str(Path(run_dir).resolve()),
            training={"config": config.to_dict(), "step": run.step, "checkpoint": options.checkpoint_name,
                      "generator_weights":
                      "ema" if options.use_ema and config.run.ema_decay > 0 else "raw",
                      "parity": {**parity, "rtol": options.rtol, "atol": options.atol}},
            metrics=metrics or {})

    return repository.publish(name, build)
