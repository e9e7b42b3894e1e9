"""The server's one configuration object: defaults <- TOML file (--config) <- command-line flags."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcgan_core import DEVICES


class ServeConfigError(ValueError):
    pass


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve (Triton's policies): ``all``, ``latest:N``, ``specific:V1,V2``.

    ``latest`` counts only versions that loaded, newest first, so a broken new version never pushes
    out a working older one.
    """

    kind: str  # all | latest | specific
    latest: int = 0
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        kind, _, arg = str(text).partition(":")
        try:
            if kind == "all" and not arg:
                return cls("all")
            if kind == "latest" and int(arg) >= 1:
                return cls("latest", latest=int(arg))
            if kind == "specific" and arg:
                return cls("specific", versions=frozenset(int(v) for v in arg.split(",")))
        except ValueError:
            pass
        raise ServeConfigError(f"version policy {text!r}: expected all, latest:N or specific:V1,V2")

    def selects(self, version: int) -> bool:
        return self.kind != "specific" or version in self.versions

    def enough(self, ready: int) -> bool:
        """True once ``ready`` loaded versions satisfy the policy (newest first)."""
        return self.kind == "latest" and ready >= self.latest


@dataclass
class ServeConfig:
    repository: str = "exported"
    host: str = "[::]"
    port: int = 50051
    device: str = "auto"  # auto | cuda | cpu
    max_batch_size: int = 64  # items merged into one run by the dynamic batcher
    max_queue_delay_ms: float = 2.0  # how long the oldest queued request may wait for company
    max_queue: int = 256  # queued requests per network before RESOURCE_EXHAUSTED
    batching: bool = True  # false: every request runs alone
    max_count: int = 1024  # samples per Sample request (SampleStream: per request too)
    max_score_images: int = 1024  # images per Score request
    max_candidates: int = 8192  # candidates one discriminator-guided Sample request may draw
    max_message_mb: int = 64  # gRPC send/receive limit
    stream_chunk_size: int = 256  # SampleStream default chunk
    grace_s: float = 10.0  # in-flight calls get this long to finish on SIGTERM
    max_concurrent_rpcs: int = 0  # calls in progress at once; more get RESOURCE_EXHAUSTED (0: no limit)
    batch_workers: int = 0  # threads running batches per network (0: one per CPU core; 1 on CUDA)
    ort_threads: int = 0  # onnxruntime intra-op threads per session (0: 1 with several workers, else its default)
    metrics_port: int = 8000  # Prometheus /metrics over HTTP (0: a free port, -1: off)
    metrics_host: str = ""  # its bind address ("": the gRPC host's, so --host 127.0.0.1 keeps it local)
    version_policy: str = "latest:1"  # all | latest:N | specific:V1,V2 (Triton's policies)
    version_policies: dict = field(default_factory=dict)  # per model name, overrides version_policy
    poll_s: float = 2.0  # repository rescan interval (0: only on SIGHUP / ReloadModels)
    tls_cert: str = ""  # PEM certificate chain; with tls_key, the server speaks TLS only
    tls_key: str = ""
    auth_token_file: str = ""  # file holding the bearer token clients must send (needs TLS)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def validate(self) -> "ServeConfig":
        for key in ("port", "max_batch_size", "max_queue", "max_count", "max_score_images",
                    "max_candidates", "max_message_mb", "stream_chunk_size"):
            if getattr(self, key) < 1 and not (key == "port" and self.port == 0):
                raise ServeConfigError(f"{key} = {getattr(self, key)} must be >= 1")
        if self.device not in DEVICES:
            raise ServeConfigError(f"device = {self.device!r} must be {' or '.join(DEVICES)}")
        non_negative = ("max_queue_delay_ms", "grace_s", "poll_s", "max_concurrent_rpcs", "ort_threads",
                        "batch_workers")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ServeConfigError(f"{key} = {getattr(self, key)} must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServeConfigError("tls_cert and tls_key go together")
        if self.auth_token_file and not self.tls_cert:
            raise ServeConfigError("auth_token_file needs TLS (tls_cert and tls_key): tokens must not travel in clear")
        for policy in [self.version_policy, *self.version_policies.values()]:
            VersionPolicy.parse(policy)
        return self

    def policy_text(self, model: str) -> str:
        """The version policy of ``model`` as configured (per model, else the default)."""
        return self.version_policies.get(model, self.version_policy)

    def policy(self, model: str) -> VersionPolicy:
        return VersionPolicy.parse(self.policy_text(model))


def load_serve_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """Defaults, then the TOML file's top-level keys, then non-None overrides."""
    config = ServeConfig()
    names = {f.name: f for f in dataclasses.fields(ServeConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ServeConfigError(f"cannot read config file {path}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in values.items():
        if key not in names:
            raise ServeConfigError(f"unknown setting {key!r}; settings are {', '.join(names)}")
        kind = type(getattr(config, key))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ServeConfigError(f"{key} = {value!r} must be {kind.__name__}")
        setattr(config, key, value)
    return config.validate()
