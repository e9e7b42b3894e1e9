"""Loaded model versions, kept in step with the repository on disk.

``rescan()`` compares the repository with what is loaded: a new version is validated (manifest,
sha256), loaded and warmed up beside the old ones and only then becomes visible; a version that
fails is recorded with its error and never served; a version that left the disk or the version
policy stops taking new calls and is unloaded once its in-flight calls finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dcgan_core.repository import MANIFEST_NAME, Fingerprint, Manifest, Repository, RepositoryError
from serving.server.batcher import BatchStats, DynamicBatcher
from serving.server.config import ServeConfig, VersionPolicy
from serving.server.errors import InvalidArgument, NotFound, quoted
from serving.server.metrics import ServingMetrics
from serving.server.runtime import OnnxNetwork, execution_plan

log = logging.getLogger(__name__)
READY, FAILED = "READY", "FAILED"
MAX_REASON = 500  # characters of a load failure kept for ListModels (one line)
MAX_MANIFEST_BYTES = 256 * 1024  # larger manifests are not echoed in ListModels


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
    encoder: DynamicBatcher | None = None  # versions with an encoder: the anomaly scorer
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
        """Stop every batcher: returns once no batch of this version runs (its sessions may go)."""
        for batcher in (self.generator, self.discriminator, self.encoder):
            if batcher is not None:
                batcher.stop()


@dataclass
class VersionEntry:
    version: int
    state: str
    loaded: LoadedVersion | None = None
    error: str = ""
    manifest_json: str = ""
    fingerprint: Fingerprint = ()  # the files as they were when this entry was made


@dataclass
class ModelEntry:
    name: str
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    policy: str = ""  # the version policy that chose them: a pin in the repository, else the server's

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
    workers, threads = execution_plan(config.device, config.batch_workers, config.ort_threads)
    networks = {}
    for net in ("generator", "discriminator", "encoder"):
        spec = getattr(manifest, net)
        if spec is None:  # a version without an encoder
            continue
        network = OnnxNetwork(folder / spec.file, config.device, threads)
        network.check_signature(net, spec, scorer_outputs(manifest) if net == "encoder" else None,
                                manifest.source_shape)
        network.warm_up((1, config.max_batch_size))
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
    return LoadedVersion(manifest, provider, batchers["generator"], batchers["discriminator"], batchers.get("encoder"))


def scorer_outputs(manifest: Manifest) -> list[tuple[str, list[int | None]]]:
    """The anomaly scorer's outputs, by the names its manifest gives them: latents, reconstruction,
    score and D's logit."""
    names = manifest.anomaly.get("outputs", {})
    shapes = {"latents": [manifest.latent_size], "reconstruction": list(manifest.sample_shape), "score": [],
              "logits": []}
    return [(names.get(role, ""), shape) for role, shape in shapes.items()]


def failure_reason(exc: Exception) -> str:
    """One line for an operator: repository errors speak for themselves, others get their type."""
    text = str(exc) if isinstance(exc, RepositoryError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


class ModelStore:
    """Every model of a repository and the state of each of its versions.

    One boundary (``_load_entry``) turns any failure of one version into FAILED with its reason;
    models are refreshed in parallel, each under its own lock, so a slow or broken model delays
    and stops no other. A FAILED version is retried when its files change (its fingerprint).
    """

    def __init__(self, repository: Repository, config: ServeConfig, metrics: ServingMetrics | None = None):
        self.repository, self.config = repository, config
        self.metrics = metrics or ServingMetrics()
        self._lock = threading.Lock()  # guards _models and _model_locks (readers take snapshots)
        self._model_locks: dict[str, threading.Lock] = {}
        self._models: dict[str, ModelEntry] = {}
        self._closed = False  # after close(), a rescan still running publishes nothing
        self.default_model = ""
        self.pins: dict[str, int] = {}  # repository.json's pins, as of the last rescan
        self._scanned = threading.Condition()  # notified after every rescan, for wait_until

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Block until ``condition()`` holds, checking after each rescan; False on timeout."""
        with self._scanned:
            return self._scanned.wait_for(condition, timeout)

    def load(self) -> None:
        self.rescan()

    def rescan(self) -> bool:
        """Bring the loaded versions in line with the disk; True if anything changed.

        Whatever can be applied is applied; then a repository-level problem (the root missing or
        unreadable: RepositoryUnavailable, nothing changed; a bad repository.json or model
        folder: RepositoryError, the rest refreshed) is raised for the caller to report.
        """
        try:
            return self._rescan()
        finally:
            with self._scanned:
                self._scanned.notify_all()

    def _rescan(self) -> bool:
        if self._closed:  # shutting down: loading models now would be work for nothing
            return False
        names = self.repository.models()
        problems: list[RepositoryError] = []
        try:
            self.default_model, self.pins = self.repository.default_model(), self.repository.pins()
        except RepositoryError as exc:
            problems.append(exc)
            log.error("%s; keeping default model %r and pins %s", exc, self.default_model, self.pins)
        with ThreadPoolExecutor(max(1, min(8, len(names))), thread_name_prefix="model-load") as pool:
            results = list(pool.map(self._refresh, names))
        changed = any(changed for changed, _ in results)
        problems += [problem for _, problem in results if problem]
        for name in set(self.models()) - set(names):
            changed |= self._publish(name, None, self.models()[name])
        if problems:
            raise problems[0]
        return changed

    def _model_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(name, threading.Lock())

    def _refresh(self, name: str) -> tuple[bool, RepositoryError | None]:
        """Reconcile one model with its folder; a folder that cannot be read keeps what is loaded."""
        with self._model_lock(name):
            current = self.models().get(name, ModelEntry(name))
            try:
                entry = self._wanted(name, current)
            except RepositoryError as exc:
                log.error("%s; keeping the loaded versions of %r", exc, name)
                return False, exc
            return self._publish(name, entry, current), None

    def _wanted(self, name: str, current: ModelEntry) -> ModelEntry:
        """The versions the policy selects, loading new or changed ones (the rest reused as is).

        ``latest:N`` counts only versions that loaded, newest first: a broken new version is
        reported as FAILED but never pushes out a working older one.
        """
        text = self.policy_text(name)
        policy, entry, ready = VersionPolicy.parse(text), ModelEntry(name, policy=text), 0
        for version in reversed(self.repository.versions(name)):
            if not policy.selects(version):
                continue
            state = self._current_or_reloaded(name, version, current.versions.get(version))
            entry.versions[version] = state
            ready += state.state == READY
            if policy.enough(ready):
                break
        return entry

    def _current_or_reloaded(self, name: str, version: int, known: VersionEntry | None) -> VersionEntry:
        """``known`` while its files are unchanged; else a fresh load. A ready version whose new
        files fail keeps serving what it loaded before (and says so)."""
        fingerprint = self.repository.fingerprint(name, version)
        if known is not None and known.fingerprint == fingerprint:
            return known
        fresh = self._load_entry(name, version, fingerprint)
        if known is None or known.state != READY or fresh.state == READY:
            return fresh
        log.error("model %s version %s: changed files failed to load; still serving the loaded ones", name, version)
        return dataclasses.replace(known, fingerprint=fingerprint, error=(
            f"files changed on disk and failed to load ({fresh.error}); still serving the files loaded before"))

    def _publish(self, name: str, entry: ModelEntry | None, previous: ModelEntry) -> bool:
        """Swap in the new entry, then retire loaded versions it no longer holds (each closes once
        its in-flight calls finish); True if anything changed."""
        loaded = lambda model: {id(e.loaded): e for e in model.versions.values() if e.loaded}  # noqa: E731
        now, before = loaded(entry) if entry else {}, loaded(previous)
        with self._lock:
            closed = self._closed
            if not closed and entry is None:
                self._models.pop(name, None)
            elif not closed:
                self._models[name] = entry
        if closed:  # shutting down: what a scan still running loaded is stopped, never served
            for key in now.keys() - before.keys():
                now[key].loaded.retire()
            return False
        for key in before.keys() - now.keys():
            state = before[key]
            log.info("unloading model %s version %s", name, state.version)
            self.metrics.loaded.remove(name, str(state.version), state.loaded.provider)
            state.loaded.retire()
        for key in now.keys() - before.keys():
            state = now[key]
            self.metrics.loaded.labels(name, str(state.version), state.loaded.provider).set(1)
        versions = entry.versions if entry else {}
        return now.keys() != before.keys() or versions.keys() != previous.versions.keys()

    def _load_entry(self, name: str, version: int, fingerprint: Fingerprint) -> VersionEntry:
        """The one loader boundary: whatever goes wrong (a bad manifest, unreadable files, an ONNX
        file onnxruntime refuses, the wrong network in a file) makes this version FAILED, never
        the scan or the server."""
        text = self._manifest_text(name, version)
        try:
            loaded = load_version(self.repository, name, version, self.config, self.metrics)
        except Exception as exc:  # noqa: BLE001 - the boundary: onnxruntime raises plain Exceptions
            reason = failure_reason(exc)
            log.error("model %s version %s failed to load, not served: %s", name, version, reason)
            self.metrics.load_failures.labels(name).inc()
            return VersionEntry(version, FAILED, error=reason, manifest_json=text, fingerprint=fingerprint)
        return VersionEntry(version, READY, loaded, manifest_json=text, fingerprint=fingerprint)

    def _manifest_text(self, name: str, version: int) -> str:
        """The manifest as text for ListModels ("" when unreadable or too large to report)."""
        path = self.repository.version_dir(name, version) / MANIFEST_NAME
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError:
            return ""
        return data.decode("utf-8", errors="replace") if len(data) <= MAX_MANIFEST_BYTES else ""

    def models(self) -> dict[str, ModelEntry]:
        with self._lock:
            return dict(self._models)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a model of the repository (no copy of the table: called per call)."""
        with self._lock:
            return name in self._models

    def entry(self, name: str) -> ModelEntry:
        name = name or self.default_model
        models = self.models()
        if name not in models:
            raise NotFound(f"model {quoted(name)} not found; models: {', '.join(sorted(models)) or 'none'}")
        return models[name]

    def _resolve(self, name: str, version: int) -> LoadedVersion:
        if version < 0:  # a malformed request, whatever the repository holds
            raise InvalidArgument(f"version must be >= 0 (0 = latest), got {version}")
        entry = self.entry(name)
        ready = entry.ready()
        if version == 0:
            if not ready:
                raise NotFound(f"model {entry.name!r} has no ready version")
            version = ready[-1]
        state = entry.versions.get(version)
        if state is None or state.loaded is None:
            failed = state is not None and state.error
            why = f"failed to load: {state.error}" if failed else self._why_not_loaded(entry.name, version)
            raise NotFound(f"model {entry.name!r} version {version} {why}; "
                           f"ready versions: {', '.join(map(str, ready)) or 'none'}")
        return state.loaded

    def _why_not_loaded(self, name: str, version: int) -> str:
        try:
            on_disk = version in self.repository.versions(name)
        except RepositoryError as exc:  # unreadable meanwhile: say so, the loaded versions still serve
            return f"is not loaded ({exc})"
        return f"is not loaded (version policy {self.policy_text(name)})" if on_disk else "does not exist"

    def policy_text(self, name: str) -> str:
        """A pin (``dcgan-repo pin``) overrides the server's policy: the operator's rollback."""
        pinned = self.pins.get(name)
        return f"specific:{pinned}" if pinned else self.config.policy_text(name)

    @contextlib.contextmanager
    def use(self, name: str, version: int) -> Iterator[LoadedVersion]:
        """The ready version asked for (0: latest), held for the duration of one call."""
        for _ in range(3):  # a version retired between resolve and acquire: resolve again
            loaded = self._resolve(name, version)
            if loaded.acquire():
                break
        else:
            raise NotFound(f"model {quoted(name)} version {version} was just unloaded; retry")
        try:
            yield loaded
        finally:
            loaded.release()

    def close(self) -> None:
        """Shutdown: stop every loaded version now, even one a call still holds (the calls were
        drained or aborted), and return only once no batch runs. A batch left running inside
        onnxruntime while the interpreter exits aborts the process (SIGABRT instead of exit 0)."""
        with self._lock:
            self._closed = True
        for entry in self.models().values():
            for state in entry.versions.values():
                if state.loaded:
                    state.loaded.retire()
                    state.loaded.close()


class RepositoryWatcher:
    """Polls the repository and rescans when it changed: versions added, removed, or their files
    changed (a FAILED version caught half-copied is retried once the copy completes)."""

    def __init__(self, store: ModelStore, interval_s: float, on_change=lambda: None):
        self.store, self.interval_s, self.on_change = store, interval_s, on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="repository-watcher", daemon=True)

    def start(self) -> "RepositoryWatcher":
        self._thread.start()
        return self

    def _loop(self) -> None:
        seen = self.store.repository.snapshot()
        while not self._stop.wait(self.interval_s):
            now = self.store.repository.snapshot()
            if now == seen:
                continue
            seen = now
            try:
                self.store.rescan()
            except Exception as exc:  # noqa: BLE001 - nothing may end the watcher
                log.error("repository scan: %s; rescanning when the repository changes", failure_reason(exc))
            try:
                self.on_change()
            except Exception:  # noqa: BLE001
                log.exception("after a repository scan")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
