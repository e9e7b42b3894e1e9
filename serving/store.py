"""Loaded model versions: onnxruntime sessions and a dynamic batcher per network.

The store reads the repository at start-up, validates each version (manifest, sha256), loads and
warms it up; a version that fails is recorded with its error and never served.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from dcgan_core.repository import Manifest, Repository, RepositoryError
from serving.batcher import BatchStats, DynamicBatcher
from serving.config import ServeConfig
from serving.errors import NotFound
from serving.metrics import ServingMetrics
from serving.runtime import OnnxNetwork

log = logging.getLogger(__name__)
READY, FAILED = "READY", "FAILED"


@dataclass
class LoadedVersion:
    """One ready version: its manifest and a batcher in front of each network."""

    manifest: Manifest
    provider: str
    generator: DynamicBatcher
    discriminator: DynamicBatcher

    def close(self) -> None:
        self.generator.stop()
        self.discriminator.stop()


@dataclass
class VersionEntry:
    version: int
    state: str
    loaded: LoadedVersion | None = None
    error: str = ""
    manifest_json: str = ""


@dataclass
class ModelEntry:
    name: str
    versions: dict[int, VersionEntry] = field(default_factory=dict)

    def ready(self) -> list[int]:
        return sorted(v for v, e in self.versions.items() if e.state == READY)


def _observer(metrics: ServingMetrics, model: str, network: str):
    def observe(stats: BatchStats) -> None:
        metrics.queue_wait.labels(model, network).observe(stats.queue_wait_s)
        metrics.compute.labels(model, network).observe(stats.compute_s)
        metrics.batch_size.labels(model, network).observe(stats.size)
    return observe


def load_version(repository: Repository, name: str, version: int, config: ServeConfig,
                 metrics: ServingMetrics) -> LoadedVersion:
    """Validate, load and warm up one version; raises on any problem."""
    manifest = repository.manifest(name, version)
    folder = repository.version_dir(name, version)
    networks = {}
    for net in ("generator", "discriminator"):
        spec = getattr(manifest, net)
        network = OnnxNetwork(folder / spec.file, config.device, config.ort_threads)
        input_shape = tuple(spec.input_shape[1:])
        network.warm_up(input_shape, (1, config.max_batch_size))
        networks[net] = network
    batchers = {net: DynamicBatcher(network.run, config.max_batch_size, config.max_queue_delay_ms / 1000,
                                    config.max_queue, config.batching, name=f"{name}/{version}/{net}",
                                    on_batch=_observer(metrics, name, net))
                for net, network in networks.items()}
    for net, batcher in batchers.items():
        metrics.queue_depth.labels(name, net).set_function(batcher.depth)
    provider = networks["generator"].provider
    metrics.loaded.labels(name, str(version), provider).set(1)
    log.info("model %s version %s ready on %s", name, version, provider)
    return LoadedVersion(manifest, provider, batchers["generator"], batchers["discriminator"])


class ModelStore:
    """Every model of a repository and the state of each of its versions."""

    def __init__(self, repository: Repository, config: ServeConfig, metrics: ServingMetrics | None = None):
        self.repository, self.config = repository, config
        self.metrics = metrics or ServingMetrics()
        self._lock = threading.Lock()
        self._models: dict[str, ModelEntry] = {}
        self.default_model = ""

    def load(self) -> None:
        self.default_model = self.repository.default_model()
        for name in self.repository.models():
            entry = ModelEntry(name)
            for version in self.repository.versions(name):
                entry.versions[version] = self._load_entry(name, version)
            with self._lock:
                self._models[name] = entry

    def _load_entry(self, name: str, version: int) -> VersionEntry:
        manifest_path = self.repository.version_dir(name, version) / "manifest.json"
        text = manifest_path.read_text() if manifest_path.exists() else ""
        try:
            return VersionEntry(version, READY, load_version(self.repository, name, version, self.config,
                                                             self.metrics), manifest_json=text)
        except (RepositoryError, OSError, RuntimeError) as exc:  # onnxruntime raises RuntimeError subclasses
            log.error("model %s version %s failed to load: %s", name, version, exc)
            self.metrics.load_failures.labels(name).inc()
            return VersionEntry(version, FAILED, error=str(exc), manifest_json=text)

    def models(self) -> dict[str, ModelEntry]:
        with self._lock:
            return dict(self._models)

    def entry(self, name: str) -> ModelEntry:
        name = name or self.default_model
        with self._lock:
            entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"model {name!r} not found; models: {', '.join(sorted(self._models)) or 'none'}")
        return entry

    def resolve(self, name: str, version: int) -> LoadedVersion:
        """The ready version asked for (0: the latest ready one), or NotFound saying why."""
        entry = self.entry(name)
        ready = entry.ready()
        if version < 0:
            raise NotFound(f"version must be >= 0 (0 = latest), got {version}")
        if version == 0:
            if not ready:
                raise NotFound(f"model {entry.name!r} has no ready version")
            version = ready[-1]
        state = entry.versions.get(version)
        if state is None or state.loaded is None:
            why = f"failed to load: {state.error}" if state and state.error else "does not exist"
            raise NotFound(f"model {entry.name!r} version {version} {why}; "
                           f"ready versions: {', '.join(map(str, ready)) or 'none'}")
        return state.loaded

    def close(self) -> None:
        for entry in self.models().values():
            for state in entry.versions.values():
                if state.loaded:
                    state.loaded.close()
