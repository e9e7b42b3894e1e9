"""The model repository (Triton-like): ``<root>/<model>/<version>/{manifest.json, *.onnx}``.

Export publishes into it, serving reads from it; this module is the contract between the two.
A version appears atomically (built in a hidden temporary folder, then renamed to the next
number) and is never modified afterwards. Every problem is a RepositoryError naming the model,
version and file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dcgan_core import locking, publishing
from dcgan_core.atomic import atomic_write_text, fsync_dir

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPOSITORY_CONFIG = "repository.json"
CONFIG_SHAPE = '{"default_model": NAME, "pins": {NAME: VERSION}}'  # repository.json; both keys optional
CONFIG_LOCK = ".repository.lock"  # held while repository.json is read, changed and replaced
ENVIRONMENT = "DCGAN_REPOSITORY"  # names the repository when no flag does
KINDS = ("dcgan", "toy2d", "translation")


STAGING_PREFIX = ".staging-"
STAGING_LOCK = ".owner.lock"  # held (flock) by the exporter building the folder; stale when free
MAX_NAME_LENGTH = 255  # a model name is a folder name

#: What a version looked like on disk: (relative path, size, mtime_ns) of each file, or the error
#: that prevented looking. A FAILED version whose fingerprint changed is worth loading again.
Fingerprint = tuple


class RepositoryError(RuntimeError):
    """A repository, model, version or file that cannot be used, and why."""


class RepositoryUnavailable(RepositoryError):
    """The repository root itself is missing or cannot be listed (a vanished mount, permissions)."""


@dataclass(frozen=True)
class NetworkSpec:
    """One ONNX file: its tensor names and shapes (None = dynamic batch) and its sha256."""

    file: str
    input_name: str
    input_shape: list[int | None]
    output_name: str
    output_shape: list[int | None]
    sha256: str
    label_input: str = ""  # class-conditional networks: the name of their int64 [N] class input
    source_input: str = ""  # translation discriminators: the name of their source-image input (G's input shape)


@dataclass(frozen=True)
class Manifest:
    """Everything a server or client needs without opening the ONNX files."""

    name: str
    version: int
    kind: str  # dcgan | toy2d | translation
    latent_size: int
    sample_shape: list[int]  # (C, H, W) for dcgan, (2,) for toy2d
    value_range: list[float]
    opset: int
    generator: NetworkSpec
    discriminator: NetworkSpec
    created: str
    source_run: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # resolved training config + step
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation results at export
    format_version: int = FORMAT_VERSION
    num_classes: int = 0  # > 0: class-conditional (both networks take labels too)
    class_names: list[str] = field(default_factory=list)  # label i is class_names[i]
    #: Versions with an encoder (f-AnoGAN): images [labels] -> z, reconstruction and anomaly score.
    encoder: NetworkSpec | None = None
    #: With an encoder: its outputs' names, kappa, and the held-out real images' score quantiles.
    anomaly: dict[str, Any] = field(default_factory=dict)

    def networks(self) -> list[NetworkSpec]:
        return [self.generator, self.discriminator, *([self.encoder] if self.encoder else [])]

    @property
    def channels(self) -> int:
        return self.sample_shape[0] if self.kind != "toy2d" else 0

    @property
    def source_shape(self) -> list[int]:
        """A translation model's source image (C, h, w): its generator's input; [] for other kinds."""
        return list(self.generator.input_shape[1:]) if self.kind == "translation" else []

    @property
    def image_size(self) -> int:
        return self.sample_shape[-1] if self.kind != "toy2d" else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where(name: str, version: int | str) -> str:
    return f"model {name!r} version {version}"


def parse_manifest(data: dict[str, Any], where: str) -> Manifest:
    """Validate a manifest's schema; errors say which field is wrong."""
    def need(key: str, kind: type | tuple[type, ...], source: dict = data, prefix: str = "") -> Any:
        if key not in source:
            raise RepositoryError(f"{where}: manifest is missing field '{prefix}{key}'")
        if not isinstance(source[key], kind) or isinstance(source[key], bool) and kind is not bool:
            raise RepositoryError(f"{where}: manifest field '{prefix}{key}' has the wrong type")
        return source[key]

    if need("format_version", int) != FORMAT_VERSION:
        raise RepositoryError(f"{where}: manifest format_version {data['format_version']} "
                              f"is not supported (expected {FORMAT_VERSION})")
    if need("kind", str) not in KINDS:
        raise RepositoryError(f"{where}: manifest kind {data['kind']!r} is not one of {KINDS}")
    networks = {}
    for net in ("generator", "discriminator", "encoder"):
        if net == "encoder" and data.get("encoder") is None:  # optional: versions without an encoder
            networks[net] = None
            continue
        spec = need(net, dict)
        networks[net] = NetworkSpec(**{key: need(key, kind, spec, f"{net}.") for key, kind in [
            ("file", str), ("input_name", str), ("input_shape", list), ("output_name", str),
            ("output_shape", list), ("sha256", str)]}, label_input=str(spec.get("label_input", "")),
            source_input=str(spec.get("source_input", "")))
    classes, names = data.get("num_classes", 0), data.get("class_names", [])  # absent in older manifests
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise RepositoryError(f"{where}: manifest field 'num_classes' must be an integer >= 0")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) not in (0, classes):
        raise RepositoryError(f"{where}: manifest field 'class_names' must list {classes} names")
    return Manifest(
        name=need("name", str), version=need("version", int), kind=data["kind"],
        latent_size=need("latent_size", int), sample_shape=need("sample_shape", list),
        value_range=need("value_range", list), opset=need("opset", int), created=need("created", str),
        source_run=data.get("source_run", ""), training=data.get("training", {}),
        metrics=data.get("metrics", {}), generator=networks["generator"],
        discriminator=networks["discriminator"], num_classes=classes, class_names=names,
        encoder=networks["encoder"], anomaly=data.get("anomaly") or {})


def default_root() -> Path:
    """$DCGAN_REPOSITORY, else ``exported`` (relative to the working directory)."""
    return Path(os.environ.get(ENVIRONMENT) or "exported")


class Repository:
    """A model repository on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def initialise(self) -> None:
        """Create an empty repository (its folder and repository.json); an existing one is kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / REPOSITORY_CONFIG).exists():
            atomic_write_text(self.root / REPOSITORY_CONFIG, "{}\n")

    def models(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            raise RepositoryUnavailable(f"model repository {self.root} does not exist") from None
        except OSError as exc:
            raise RepositoryUnavailable(f"model repository {self.root} cannot be read: {exc.strerror}") from None

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending (temporary and odd folders are ignored)."""
        folder = self.root / name
        try:
            return sorted(int(p.name) for p in list(folder.iterdir()) if p.name.isdigit() and p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            raise RepositoryError(f"model {name!r} not found in {self.root}") from None
        except OSError as exc:  # EACCES and friends: Path.is_dir() raises them, it answers False only for ENOENT
            raise RepositoryError(f"model {name!r}: folder {folder} cannot be read: {exc.strerror}") from None

    def fingerprint(self, name: str, version: int) -> Fingerprint:
        """The version folder's files as (path, size, mtime_ns); never raises."""
        folder = self.version_dir(name, version)
        try:
            return tuple(sorted((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns)
                                for p in folder.rglob("*") for st in [p.stat()]))
        except OSError as exc:
            return (("unreadable", exc.errno, str(exc)),)

    def snapshot(self) -> Fingerprint:
        """Everything a rescan looks at: every version's fingerprint and repository.json's stat."""
        config = self.root / REPOSITORY_CONFIG
        try:
            stat = config.stat() if config.exists() else None
            config_stat = (stat.st_mtime_ns, stat.st_size) if stat else None
            return (config_stat, *((name, version, self.fingerprint(name, version))
                                   for name in self.models() for version in self.versions(name)))
        except (OSError, RepositoryError) as exc:
            return (("unreadable", str(exc)),)

    def _config(self) -> dict[str, Any]:
        """repository.json, validated ({} when there is none)."""
        path = self.root / REPOSITORY_CONFIG
        try:
            config = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RepositoryError(f"{path} cannot be read: {exc.strerror}") from None
        except ValueError as exc:
            raise RepositoryError(f"{path} is not valid JSON ({exc}); expected {CONFIG_SHAPE}") from None
        if not isinstance(config, dict):
            raise RepositoryError(f"{path}: expected {CONFIG_SHAPE}")
        name, pins = config.get("default_model"), config.get("pins", {})
        if name is not None and (not isinstance(name, str) or not name):
            raise RepositoryError(f"{path}: default_model must be a model name, got {name!r}")
        if not isinstance(pins, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in pins.values()):
            raise RepositoryError(f"{path}: pins must map model names to version numbers, got {pins!r}")
        return config

    def default_model(self) -> str:
        """``default_model`` from repository.json, else the only/first model by name."""
        name = self._config().get("default_model")
        if name is not None:
            return name
        models = self.models()
        if not models:
            raise RepositoryError(f"model repository {self.root} holds no models")
        return models[0]

    def pins(self) -> dict[str, int]:
        """Models pinned to one version (served alone, whatever is published after it)."""
        return dict(self._config().get("pins", {}))

    def pin(self, name: str, version: int | None) -> None:
        """Pin ``name`` to ``version`` (which must be a valid published version), or unpin with None."""
        if version is not None:
            self.manifest(name, version)
        with locking.exclusive(self.root / CONFIG_LOCK, f"repository {self.root}"):
            config = self._config()
            pins = {k: v for k, v in config.get("pins", {}).items() if k != name}
            if version is not None:
                pins[name] = version
            atomic_write_text(self.root / REPOSITORY_CONFIG,
                              json.dumps({**config, "pins": dict(sorted(pins.items()))}, indent=2) + "\n")

    def latest(self, name: str) -> Manifest | None:
        """The newest version whose manifest reads (files unverified), None for a new model."""
        if not _exists(self.root / name):
            return None
        for version in reversed(self.versions(name)):
            try:
                return self.manifest(name, version, verify_files=False)
            except RepositoryError:
                continue
        return None

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def manifest(self, name: str, version: int, verify_files: bool = True) -> Manifest:
        """Read and validate one version's manifest; with ``verify_files`` check each sha256."""
        where = _where(name, version)
        folder = self.version_dir(name, version)
        try:
            data = json.loads((folder / MANIFEST_NAME).read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RepositoryError(f"{where}: {MANIFEST_NAME} is not UTF-8 text ({exc.reason} at byte "
                                  f"{exc.start})") from None
        except (FileNotFoundError, NotADirectoryError):
            raise RepositoryError(f"{where}: {MANIFEST_NAME} is missing" if _exists(folder)
                                  else f"{where} not found in {self.root}") from None
        except OSError as exc:
            raise RepositoryError(f"{where}: {MANIFEST_NAME} cannot be read: {exc.strerror}") from None
        except ValueError as exc:
            raise RepositoryError(f"{where}: {MANIFEST_NAME} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise RepositoryError(f"{where}: {MANIFEST_NAME} is not a JSON object")
        manifest = parse_manifest(data, where)
        if (manifest.name, manifest.version) != (name, version):
            raise RepositoryError(f"{where}: manifest says model {manifest.name!r} version "
                                  f"{manifest.version}; it was moved or copied by hand")
        if verify_files:
            for spec in manifest.networks():
                self._verify(folder / spec.file, spec.sha256, where)
        return manifest

    @staticmethod
    def _verify(path: Path, expected: str, where: str) -> None:
        try:
            actual = sha256_file(path)
        except (FileNotFoundError, IsADirectoryError):
            raise RepositoryError(f"{where}: {path.name} is missing") from None
        except OSError as exc:
            raise RepositoryError(f"{where}: {path.name} cannot be read: {exc.strerror}") from None
        if actual != expected:
            raise RepositoryError(f"{where}: {path.name} sha256 is {actual[:12]}..., manifest says "
                                  f"{expected[:12]}... (file changed after publishing)")

    def publish(self, name: str, build: Callable[[Path], Manifest], allow_worse: bool = False,
                incumbent: dict[str, Any] | None = None) -> Manifest:
        """Build a version in a temporary folder and rename it to the next version number.

        ``build(folder)`` writes the files and returns the manifest with ``version=0``; the
        final number is filled in here. A crash before the rename leaves only a hidden folder,
        which the next publish removes once no live process holds its lock. The draft must keep
        the latest version's interface (else Incompatible) and, unless ``allow_worse``, its
        figures (else Worse); ``incumbent`` are the latest's figures measured under the draft's
        protocol when its manifest's were measured otherwise.
        """
        if (not name or name.startswith(".") or os.sep in name or name != name.strip()
                or len(name) > MAX_NAME_LENGTH):
            raise RepositoryError(f"invalid model name {name[:MAX_NAME_LENGTH]!r}")
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(model_dir)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
        try:
            with locking.exclusive(staging / STAGING_LOCK, f"staging folder {staging}"):
                staging.chmod(0o755)
                manifest = self._build_and_rename(name, staging, build, allow_worse, incumbent)
            fsync_dir(model_dir)
            return manifest
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _build_and_rename(self, name: str, staging: Path, build: Callable[[Path], Manifest], allow_worse: bool,
                          incumbent: dict[str, Any] | None) -> Manifest:
        draft = build(staging)
        latest = self.latest(name)
        if latest is not None:
            publishing.check_compatible(latest, draft)
            if not allow_worse:
                publishing.check_quality(latest, latest.metrics if incumbent is None else incumbent, draft.metrics)
        (staging / STAGING_LOCK).unlink()  # the lock stays held through its open descriptor
        for _ in range(100):
            version = max(self.versions(name), default=0) + 1
            target = self.version_dir(name, version)
            if os.path.lexists(target) and not target.is_dir():
                raise RepositoryError(f"{target} exists and is not a version folder; move it away")
            manifest = Manifest(**{**draft.__dict__, "name": name, "version": version})
            atomic_write_text(staging / MANIFEST_NAME, manifest.to_json())
            for path in staging.iterdir():
                path.chmod(0o444)  # published versions are immutable
            try:
                os.rename(staging, target)
                return manifest
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                    raise RepositoryError(f"cannot publish {target}: {exc.strerror}") from None
                (staging / MANIFEST_NAME).unlink()  # another exporter took this number first
        raise RepositoryError(f"could not publish model {name!r}: 100 version numbers were taken meanwhile")


def _exists(path: Path) -> bool:
    """Path.exists() that answers True when it cannot tell (EACCES): only a missing path is False."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def remove_stale_staging(model_dir: Path, min_age_s: float = 60.0) -> list[Path]:
    """Remove staging folders left by killed exporters: their lock is free (or, for a folder
    without one, it is older than ``min_age_s``, past the instant between mkdtemp and lock)."""
    removed = []
    for folder in model_dir.glob(f"{STAGING_PREFIX}*"):
        if _owned_by_live_process(folder, min_age_s):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _owned_by_live_process(folder: Path, min_age_s: float) -> bool:
    lock = folder / STAGING_LOCK
    try:
        if not lock.exists():
            return time.time() - folder.stat().st_mtime < min_age_s
        with locking.exclusive(lock, f"staging folder {folder}"):
            return False
    except locking.Locked:
        return True
    except OSError:  # vanished or unreadable meanwhile: leave it alone
        return True
