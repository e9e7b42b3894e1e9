"""Export a training run's generator and discriminator to ONNX and publish them as a version.

Steps: rebuild the networks from the checkpoint (EMA generator with recalibrated BatchNorm by
default), export each in eval mode with a dynamic batch dimension, run onnx.checker's full check,
compare onnxruntime with torch on batches of 1, 7 and 64, and only then publish the version
atomically. Any mismatch refuses to publish and reports the figures.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from dcgan_core import images, publishing
from dcgan_core.latents import latents
from dcgan_core.repository import Manifest, NetworkSpec, Repository, sha256_file
from training import checkpoint, quality, translation
from training.config import TrainConfig
from training.encoder import OUTPUTS, AnomalyScorer, Encoder, calibration
from training.models import build_models, recalibrate_batchnorm

log = logging.getLogger(__name__)
for _chatty in ("onnxscript", "onnx_ir"):  # the exporter's optimizer logs every pass at INFO
    logging.getLogger(_chatty).setLevel(logging.WARNING)
# torch.onnx warns that torchvision's operators are not registered: this project uses none of them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
GENERATOR_FILE, DISCRIMINATOR_FILE, ENCODER_FILE = "generator.onnx", "discriminator.onnx", "encoder.onnx"
#: The anomaly scorer chains E, G and D: float32 rounding in E moves G's pixels and D's features
#: (measured up to 4e-5 on the mnist preset), still 1/200 of one uint8 step of an image.
SCORER_ATOL = 1e-4
PARITY_BATCHES = (1, 7, 64)
LABEL_INPUT = "labels"  # int64 [N] class input of both conditional networks
TRANSLATION_SOURCE = "source"  # float32 source images: a translation G's input, its D's second input


class ExportError(RuntimeError):
    """The exported ONNX does not behave like the torch model; nothing was published."""


@dataclass(frozen=True)
class ExportOptions:
    use_ema: bool = True
    checkpoint_name: str = checkpoint.CHECKPOINT_NAME  # or checkpoint.BEST_NAME: the best evaluated epoch
    rtol: float = 1e-3
    atol: float = 1e-5
    evaluate: bool = False  # measure the figures the publishing gate compares (dcgan-export does)
    allow_worse: bool = False  # publish even if the figures are worse than the latest version's
    data_dir: Path = quality.DEFAULT_DATA_DIR  # MNIST, for image figures


@dataclass
class LoadedRun:
    config: TrainConfig
    generator: nn.Module  # eval mode, ready to export
    discriminator: nn.Module
    step: int
    run_dir: Path
    scorer: nn.Module | None = None  # an encoder run's AnomalyScorer (E with this G and D)


def load_run(run_dir: Path, use_ema: bool = True, checkpoint_name: str = checkpoint.CHECKPOINT_NAME) -> LoadedRun:
    """The networks of a run's checkpoint on CPU, in eval mode."""
    saved = checkpoint.load(Path(run_dir) / checkpoint_name)
    config = saved.train_config
    if config.kind == "translation":  # its own networks, no EMA
        generator, discriminator = translation.build_translation_models(config)
        generator.load_state_dict(saved.network("generator"))
        discriminator.load_state_dict(saved.network("discriminator"))
        return LoadedRun(config, generator.eval(), discriminator.eval(), saved.step, Path(run_dir))
    generator, discriminator = build_models(config)
    discriminator.load_state_dict(saved.network("discriminator"))
    if use_ema and saved.model.get("ema") is not None:
        generator.load_state_dict(saved.network("ema"))
        generator = recalibrate_batchnorm(generator, config.model.latent_size, config.run.seed)
    else:
        generator.load_state_dict(saved.network("generator"))
    run = LoadedRun(config, generator.eval(), discriminator.eval(), saved.step, Path(run_dir))
    if saved.model.get("encoder") is not None:  # an encoder run: its source's G and D, and E
        d, e = config.data, config.encoder
        encoder = Encoder(d.channels, d.image_size, e.nef, config.model.latent_size)
        encoder.load_state_dict(saved.model["encoder"])
        run.scorer = AnomalyScorer(encoder.eval(), run.generator, run.discriminator, e.kappa).eval()
    return run


def _export(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str]) -> None:
    """torch.onnx (dynamo) export with one dynamic batch dimension shared by every input, then
    onnx's full check."""
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=tuple({0: batch} for _ in example), external_data=False, verbose=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_parity(model: nn.Module, path: Path, inputs: list[tuple[np.ndarray, ...]],
                 options: ExportOptions) -> dict[str, float]:
    """Max abs/rel error of onnxruntime vs torch for each batch; ExportError past the tolerance."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    report = {}
    for arrays in inputs:
        with torch.no_grad():
            expected = model(*(torch.from_numpy(a) for a in arrays))
        expected = [t.numpy() for t in expected] if isinstance(expected, tuple) else [expected.numpy()]
        size, errors = len(arrays[0]), []
        for output, actual, wanted in zip(session.get_outputs(), session.run(None, dict(zip(names, arrays))), expected):
            errors.append(_compare(f"{path.name} ({output.name})", size, actual, wanted, options))
        report[f"batch_{size}_max_abs_error"] = max(errors)
    return report


def _compare(where: str, size: int, actual: np.ndarray, expected: np.ndarray, options: ExportOptions) -> float:
    """The max abs error of one output; ExportError past the tolerance, naming the worst element."""
    if actual.shape != expected.shape:
        raise ExportError(f"{where}: batch {size} gives shape {actual.shape}, torch {expected.shape}")
    error = np.abs(actual - expected)
    if not np.all(error <= options.atol + options.rtol * np.abs(expected)):
        worst = np.unravel_index(np.argmax(error - options.rtol * np.abs(expected)), error.shape)
        raise ExportError(
            f"{where}: onnxruntime differs from torch at batch {size}: max abs error "
            f"{error.max():.3g}, at {tuple(int(i) for i in worst)} ort={actual[worst]:.6g} "
            f"torch={expected[worst]:.6g}; tolerance rtol={options.rtol} atol={options.atol}")
    return float(error.max())


def _parity_inputs(config: TrainConfig) -> tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]]]:
    """(latents[, labels]) for G and (model-range inputs[, labels]) for D, per parity batch size;
    for a translation model (sources) for G and (images, sources) for D."""
    rng = np.random.default_rng(0)
    pictures = lambda side: [images.uint8_to_model(rng.integers(  # noqa: E731
        0, 256, (n, config.data.channels, side, side), dtype=np.uint8)) for n in PARITY_BATCHES]
    if config.kind == "translation":
        sources = pictures(translation.source_size(config))
        return [(s,) for s in sources], list(zip(pictures(config.data.image_size), sources))
    z = [latents(1000 + n, n, config.model.latent_size) for n in PARITY_BATCHES]
    if config.kind == "toy2d":
        x = [rng.normal(0, 2, (n, 2)).astype(np.float32) for n in PARITY_BATCHES]
    else:
        x = pictures(config.data.image_size)
    if not config.model.num_classes:
        return [(a,) for a in z], [(a,) for a in x]
    labels = [rng.integers(0, config.model.num_classes, n, dtype=np.int64) for n in PARITY_BATCHES]
    return list(zip(z, labels)), list(zip(x, labels))


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def draft_manifest(name: str, run: LoadedRun, options: ExportOptions, files: Path | None = None,
                   parity: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                   anomaly: dict[str, Any] | None = None) -> Manifest:
    """The manifest a run publishes (version 0: publish numbers it); without ``files`` the
    checksums and opset are left blank, enough to check compatibility before any work."""
    config = run.config
    sample_shape = [2] if config.kind == "toy2d" else [config.data.channels, config.data.image_size,
                                                       config.data.image_size]
    label_input = [LABEL_INPUT] if config.model.num_classes else []
    spec = lambda file, i, o, i_shape, o_shape, *extra: NetworkSpec(  # noqa: E731
        file, i, [None, *i_shape], o, [None, *o_shape], sha256_file(files / file) if files else "", *label_input,
        *extra)
    translating = config.kind == "translation"
    latent_size = 0 if translating else config.model.latent_size
    side = translation.source_size(config) if translating else 0
    g_input = (TRANSLATION_SOURCE, [config.data.channels, side, side]) if translating else ("z", [latent_size])
    return Manifest(
        name=name, version=0, kind=config.kind, latent_size=latent_size,
        sample_shape=sample_shape, value_range=list(images.VALUE_RANGE),
        opset=_opset(files / GENERATOR_FILE) if files else 0,
        generator=spec(GENERATOR_FILE, g_input[0], "samples", g_input[1], sample_shape),
        discriminator=spec(DISCRIMINATOR_FILE, "samples", "logits", sample_shape, [],
                           *(["", TRANSLATION_SOURCE] if translating else [])),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source_run=str(run.run_dir.resolve()),
        training={"config": config.to_dict(), "step": run.step, "checkpoint": options.checkpoint_name,
                  "generator_weights": "ema" if options.use_ema and config.run.ema_decay > 0 else "raw",
                  "parity": {**(parity or {}), "rtol": options.rtol, "atol": options.atol}},
        metrics=metrics or {}, num_classes=config.model.num_classes, class_names=list(config.model.class_names),
        encoder=spec(ENCODER_FILE, "samples", OUTPUTS["score"], sample_shape, []) if run.scorer else None,
        anomaly=anomaly or {})


def _protocol(config: TrainConfig, latest: Manifest | None) -> dict[str, int]:
    """The latest version's protocol (a first version: the default of its kind)."""
    if latest is None and config.kind == "translation":
        return dict(translation.PROTOCOL)
    return publishing.protocol_of(latest.metrics if latest else {})


def _figures(run: LoadedRun, protocol: dict[str, int], data_dir: Path) -> dict[str, Any]:
    if run.config.kind != "translation":
        return quality.evaluate_generator(run.generator, run.config, protocol, data_dir)
    return translation.figures(translation.torch_translator(run.generator), run.config, data_dir, protocol)


def _incumbent_figures(repository: Repository, latest: Manifest, config: TrainConfig, protocol: dict[str, int],
                       data_dir: Path) -> dict[str, Any]:
    """The latest version's figures under ``protocol``: its manifest's, or measured from its files."""
    if config.kind != "translation" or latest.metrics.get(publishing.PROTOCOL) == protocol:
        return quality.incumbent_figures(repository, latest, protocol, data_dir)
    path = repository.version_dir(latest.name, latest.version) / latest.generator.file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return translation.figures(lambda s: session.run(None, {latest.generator.input_name: s})[0], config, data_dir,
                               protocol)


def export_run(run_dir: Path, repository: Repository, name: str, options: ExportOptions = ExportOptions()) -> Manifest:
    """Export, verify and publish a run as the next version of ``name`` through the publishing
    gate (dcgan_core.publishing): its interface is checked before anything is measured; with
    ``options.evaluate`` its figures are measured under the latest version's protocol (and the
    latest's beside them if its manifest lacks that protocol)."""
    run = load_run(run_dir, options.use_ema, options.checkpoint_name)
    latest = repository.latest(name)
    if latest is not None:
        publishing.check_compatible(latest, draft_manifest(name, run, options))
    metrics, incumbent = {}, None
    if options.evaluate:
        protocol = _protocol(run.config, latest)
        log.info("measuring the candidate's figures (%s)", protocol)
        metrics = _figures(run, protocol, options.data_dir)
        if metrics and latest is not None and not options.allow_worse:
            incumbent = _incumbent_figures(repository, latest, run.config, protocol, options.data_dir)
    z_inputs, x_inputs = _parity_inputs(run.config)
    label_input = [LABEL_INPUT] if run.config.model.num_classes else []
    g_input, d_inputs = ("z", ["samples", *label_input])
    if run.config.kind == "translation":
        g_input, d_inputs = TRANSLATION_SOURCE, ["samples", TRANSLATION_SOURCE]

    def build(folder: Path) -> Manifest:
        parity = {}
        for net, model, inputs, file, input_names, output_name in [
            ("generator", run.generator, z_inputs, GENERATOR_FILE, [g_input, *label_input], "samples"),
            ("discriminator", run.discriminator, x_inputs, DISCRIMINATOR_FILE, d_inputs, "logits"),
        ]:
            log.info("exporting %s to %s", net, file)
            example = tuple(torch.from_numpy(a[:2]) for a in inputs[1])
            _export(model, example, folder / file, input_names, [output_name])
            parity[net] = check_parity(model, folder / file, inputs, options)
        anomaly = None
        if run.scorer is not None:
            log.info("exporting the encoder (with G and D's features: the anomaly scorer) to %s", ENCODER_FILE)
            example = tuple(torch.from_numpy(a[:2]) for a in x_inputs[1])
            _export(run.scorer, example, folder / ENCODER_FILE, ["samples", *label_input], list(OUTPUTS.values()))
            scorer_options = replace(options, atol=max(options.atol, SCORER_ATOL))
            parity["encoder"] = {**check_parity(run.scorer, folder / ENCODER_FILE, x_inputs, scorer_options),
                                 "atol": scorer_options.atol}
            anomaly = calibration(run.scorer, run.config)
        return draft_manifest(name, run, options, folder, parity, metrics, anomaly)

    return repository.publish(name, build, options.allow_worse, incumbent)
