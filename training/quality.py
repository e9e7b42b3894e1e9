"""The figures a published version carries, computed by one protocol so that versions compare.

A version's figures (FD/IS/class figures for 1x28x28 images, modes and high-quality share for
toys) are measured on ``samples`` draws from ``latents(seed)``, balanced classes for conditional
models. The publishing gate (``dcgan_core.publishing``) compares a candidate with the latest
version only under the same protocol, so the candidate is measured with the latest's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dcgan_core import publishing
from dcgan_core.repository import Manifest, Repository
from training.checkpoint import BEST_NAME
from training.config import TrainConfig
from training.evaluate import DEFAULT_DATA_DIR, Samples, evaluate, from_generator, load_samples


def measurable(samples: Samples) -> bool:
    """Toys always; images when the MNIST classifier can read them (1x28x28)."""
    return samples.values.ndim == 2 or samples.values.shape[1:] == (1, 28, 28)


def figures(samples: Samples, protocol: dict[str, int], data_dir: Path) -> dict[str, Any]:
    """The manifest's figures of ``samples`` with their protocol, or {} when none can be measured."""
    if not measurable(samples):
        return {}
    return {**evaluate(samples, data_dir, progress=False), publishing.PROTOCOL: protocol}


def evaluate_run(run_dir: Path, checkpoint_name: str, data_dir: Path = DEFAULT_DATA_DIR,
                 protocol: dict[str, int] | None = None) -> dict[str, Any]:
    """Figures of a run's checkpoint (its EMA generator, as export publishes it)."""
    protocol = protocol or publishing.protocol_of({})
    samples = load_samples(Path(run_dir), protocol["samples"], protocol["seed"],
                           best=checkpoint_name == BEST_NAME)
    return figures(samples, protocol, data_dir)


def evaluate_generator(generator: nn.Module, config: TrainConfig, protocol: dict[str, int],
                       data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """Figures of the generator about to be exported."""
    return figures(from_generator(generator, config, protocol["samples"], protocol["seed"]), protocol, data_dir)


def version_samples(repository: Repository, manifest: Manifest, protocol: dict[str, int]) -> Samples:
    """A published version's samples under ``protocol``, drawn from its generator file."""
    path = repository.version_dir(manifest.name, manifest.version) / manifest.generator.file
    toy = manifest.training.get("config", {}).get("data", {}).get("dataset")
    return load_samples(path, protocol["samples"], protocol["seed"], toy)


def evaluate_version(repository: Repository, manifest: Manifest, protocol: dict[str, int],
                     data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """Figures of a published version, measured again from its generator file."""
    return figures(version_samples(repository, manifest, protocol), protocol, data_dir)


def incumbent_figures(repository: Repository, latest: Manifest | None, protocol: dict[str, int],
                      data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Any]:
    """The latest version's figures under ``protocol``: its manifest's when they state that
    protocol, else measured again (manifests from before protocols were recorded)."""
    if latest is None:
        return {}
    if latest.metrics.get(publishing.PROTOCOL) == protocol:
        return latest.metrics
    return evaluate_version(repository, latest, protocol, data_dir)
