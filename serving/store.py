"""Loaded model versions, kept in step with the repository on disk.

``rescan()`` compares the repository with what is loaded: a new version is validated (manifest,
sha256), loaded and warmed up beside the old ones and only then becomes visible; a version that
fails is recorded with its error and never served; a version that left the disk or the version
policy stops taking new calls and is unloaded once its in-flight calls finish.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from dcgan_core.repository import Manifest, Repository, RepositoryError
from serving.batcher import BatchStats, DynamicBatcher
from serving.config import ServeConfig
from serving.errors import NotFound
from serving.metrics import ServingMetrics
from serving.runtime import OnnxNetwork, execution_plan

log = logging.getLogger(__name__)
READY, FAILED = "READY", "FAILED"


@dataclass
class LoadedVersion:
    """One ready version: its manifest and a batcher in front of each network.

    Calls hold it with ``acquire``/``release``; once ``retire``d it is closed when the last
    call releases it.
    """

    manifest: Manifest
    provider: str
    generator: DynamicBatcher
    discriminator: DynamicBatcher
    _users: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self.close()

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


def parse_policy(text: str) -> tuple[str, int | set[int] | None]:
    """``all``, ``latest:N`` or ``specific:1,3``."""
    kind, _, arg = text.partition(":")
    try:
        if kind == "all" and not arg:
            return "all", None
        if kind == "latest" and int(arg) >= 1:
            return "latest", int(arg)
        if kind == "specific" and arg:
            return "specific", {int(v) for v in arg.split(",")}
    except ValueError:
        pass
    raise ValueError(f"version policy {text!r}: expected all, latest:N or specific:V1,V2")


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
    workers, threads = execution_plan(config.device, config.batch_workers, config.ort_threads)
    networks = {}
    for net in ("generator", "discriminator"):
        spec = getattr(manifest, net)
        network = OnnxNetwork(folder / spec.file, config.device, threads)
        network.warm_up(tuple(spec.input_shape[1:]), (1, config.max_batch_size))
        networks[net] = network
    batchers = {net: DynamicBatcher(network.run, config.max_batch_size, config.max_queue_delay_ms / 1000,
                                    config.max_queue, config.batching, name=f"{name}/{version}/{net}",
                                    on_batch=_observer(metrics, name, net), workers=workers)
                for net, network in networks.items()}
    for net, batcher in batchers.items():
        metrics.queue_depth.labels(name, net).set_function(batcher.depth)
    provider = networks["generator"].provider
    log.info("model %s version %s ready on %s (%d batch workers, %s intra-op threads each)", name, version,
             provider, workers, threads or "onnxruntime's default")
    return LoadedVersion(manifest, provider, batchers["generator"], batchers["discriminator"])


class ModelStore:
    """Every model of a repository and the state of each of its versions."""

    def __init__(self, repository: Repository, config: ServeConfig, metrics: ServingMetrics | None = None):
        self.repository, self.config = repository, config
        self.metrics = metrics or ServingMetrics()
        self._lock = threading.Lock()  # guards _models (readers take snapshots)
        self._scan_lock = threading.Lock()  # one rescan at a time
        self._models: dict[str, ModelEntry] = {}
        self.default_model = ""

    def load(self) -> None:
        self.rescan()

    def policy(self, name: str) -> str:
        return self.config.version_policies.get(name, self.config.version_policy)

    def rescan(self) -> bool:
        """Bring the loaded versions in line with the disk; True if anything changed."""
        with self._scan_lock:
            self.default_model = self.repository.default_model()
            changed = False
            names = self.repository.models()
            for name in names:
                current = self.models().get(name, ModelEntry(name))
                entry = self._wanted(name, current)
                changed |= entry.versions.keys() != current.versions.keys()
                changed |= self._publish(name, entry, current)
            for name in set(self.models()) - set(names):
                changed |= self._publish(name, None, self.models()[name])
            return changed

    def _wanted(self, name: str, current: ModelEntry) -> ModelEntry:
        """The versions the policy selects, loading new ones (a known version is reused as is).

        ``latest:N`` counts only versions that loaded, newest first: a broken new version is
        reported as FAILED but never pushes out a working older one.
        """
        kind, arg = parse_policy(self.policy(name))
        on_disk = self.repository.versions(name)
        entry, ready = ModelEntry(name), 0
        for version in reversed(on_disk):
            if kind == "specific" and version not in arg:
                continue
            state = current.versions.get(version) or self._load_entry(name, version)
            entry.versions[version] = state
            ready += state.state == READY
            if kind == "latest" and ready == arg:
                break
        return entry

    def _publish(self, name: str, entry: ModelEntry | None, previous: ModelEntry) -> bool:
        """Swap in the new entry, then retire versions that are gone (after their calls finish)."""
        with self._lock:
            if entry is None:
                self._models.pop(name, None)
            else:
                self._models[name] = entry
        kept = entry.versions if entry else {}
        gone = [e for v, e in previous.versions.items() if v not in kept]
        for state in gone:
            log.info("unloading model %s version %s", name, state.version)
            if state.loaded:
                self.metrics.loaded.remove(name, str(state.version), state.loaded.provider)
                state.loaded.retire()
        return bool(gone)

    def _load_entry(self, name: str, version: int) -> VersionEntry:
        manifest_path = self.repository.version_dir(name, version) / "manifest.json"
        text = manifest_path.read_text() if manifest_path.exists() else ""
        try:
            loaded = load_version(self.repository, name, version, self.config, self.metrics)
        except (RepositoryError, OSError, RuntimeError) as exc:  # onnxruntime raises RuntimeError subclasses
            log.error("model %s version %s failed to load, not served: %s", name, version, exc)
            self.metrics.load_failures.labels(name).inc()
            return VersionEntry(version, FAILED, error=str(exc), manifest_json=text)
        self.metrics.loaded.labels(name, str(version), loaded.provider).set(1)
        return VersionEntry(version, READY, loaded, manifest_json=text)

    def models(self) -> dict[str, ModelEntry]:
        with self._lock:
            return dict(self._models)

    def entry(self, name: str) -> ModelEntry:
        name = name or self.default_model
        models = self.models()
        if name not in models:
            raise NotFound(f"model {name!r} not found; models: {', '.join(sorted(models)) or 'none'}")
        return models[name]

    def _resolve(self, name: str, version: int) -> LoadedVersion:
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
            if state and state.error:
                why = f"failed to load: {state.error}"
            elif version in self.repository.versions(entry.name):
                why = f"is not loaded (version policy {self.policy(entry.name)})"
            else:
                why = "does not exist"
            raise NotFound(f"model {entry.name!r} version {version} {why}; "
                           f"ready versions: {', '.join(map(str, ready)) or 'none'}")
        return state.loaded

    @contextlib.contextmanager
    def use(self, name: str, version: int) -> Iterator[LoadedVersion]:
        """The ready version asked for (0: latest), held for the duration of one call."""
        for _ in range(3):  # a version retired between resolve and acquire: resolve again
            loaded = self._resolve(name, version)
            if loaded.acquire():
                break
        else:
            raise NotFound(f"model {name!r} version {version} was just unloaded; retry")
        try:
            yield loaded
        finally:
            loaded.release()

    def close(self) -> None:
        for entry in self.models().values():
            for state in entry.versions.values():
                if state.loaded:
                    state.loaded.retire()


class RepositoryWatcher:
    """Polls the repository and rescans when it changed (new, removed or rewritten versions)."""

    def __init__(self, store: ModelStore, interval_s: float, on_change=lambda: None):
        self.store, self.interval_s, self.on_change = store, interval_s, on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="repository-watcher", daemon=True)

    def start(self) -> "RepositoryWatcher":
        self._thread.start()
        return self

    def _snapshot(self) -> tuple:
        root = self.store.repository.root
        return tuple(sorted((str(p.relative_to(root)), p.stat().st_mtime_ns)
                            for p in root.glob("*/*") if p.is_dir() and p.name.isdigit())
                     + [("repository.json", (root / "repository.json").stat().st_mtime_ns
                         if (root / "repository.json").exists() else 0)])

    def _loop(self) -> None:
        seen = self._snapshot()
        while not self._stop.wait(self.interval_s):
            try:
                now = self._snapshot()
                if now != seen:
                    seen = now
                    self.store.rescan()
                    self.on_change()
            except Exception:  # a half-written repository must not end the watcher
                log.exception("repository scan failed; will retry")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
