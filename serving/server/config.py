"""The server's one configuration object: defaults <- TOML file (--config) <- command-line flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgan_core import DEVICES, settings
from dcgan_core.repository import ENVIRONMENT, default_root
from dcgan_core.settings import SettingsError, setting

MAX_PORT = 65535


class ServeConfigError(SettingsError):
    """A server setting that cannot be used."""


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
    """Every setting of dcgan-serve: flags, the TOML file (--config) and their defaults, declared once."""

    repository: str = setting(str(default_root()), f"model repository root (${ENVIRONMENT}, else exported)")
    host: str = setting("[::]", "bind address")
    port: int = setting(50051, "port (0 picks a free one)")
    device: str = setting("auto", "execution device", choices=DEVICES)
    max_batch_size: int = setting(64, "rows merged into one run by the dynamic batcher; larger requests run "
                                      "a batch at a time")
    max_queue_delay_ms: float = setting(2.0, "batching window: how long the oldest queued request waits for company")
    max_queue: int = setting(256, "queued requests per network before RESOURCE_EXHAUSTED")
    batching: bool = setting(True, "run every request alone")
    max_count: int = setting(1024, "samples per Sample request (SampleStream: per request too)")
    max_score_images: int = setting(1024, "images per Score request")
    max_candidates: int = setting(8192, "candidates one discriminator-guided Sample request may draw")
    max_message_mb: int = setting(64, "gRPC message size limit")
    stream_chunk_size: int = setting(256, "SampleStream's default chunk", flag=False)
    grace_s: float = setting(10.0, "shutdown grace period: in-flight calls get this long to finish on SIGTERM")
    max_concurrent_rpcs: int = setting(0, "calls in progress at once, more get RESOURCE_EXHAUSTED (0: no limit)")
    batch_workers: int = setting(0, "threads running batches per network (0: one per CPU core, 1 on CUDA)")
    ort_threads: int = setting(0, "onnxruntime intra-op threads per session (0: 1 with several workers, "
                                  "else onnxruntime's choice)")
    processes: int = setting(1, "server processes sharing the ports, each with its own event loop and batcher, "
                                "under one supervisor: one metrics port, signals passed on, dead workers "
                                "restarted (each takes --batch-workers; see README, per-call cost)")
    gc_freeze: bool = setting(True, "after start-up, keep the objects alive then out of the garbage collector's "
                                    "scans (gc.freeze): its full collections then pause calls ~5 ms, not ~40 "
                                    "(bench/results/gc_pauses.json)")
    reuse_port: bool = setting(False, "share the gRPC port with other dcgan-serve processes (SO_REUSEPORT: the "
                                      "kernel spreads connections over them); off, a port in use is an error")
    http_port: int = setting(8080, "HTTP port: the Open Inference Protocol's REST API (0: a free port, -1: off)")
    metrics_port: int = setting(8000, "Prometheus metrics port (0: a free port, -1: off)")
    metrics_host: str = setting("", "metrics bind address (default: the --host address, so a local server "
                                    "keeps its metrics local)")
    version_policy: str = setting("latest:1", "all | latest:N | specific:V1,V2 (Triton's policies)")
    version_policies: dict = setting({}, "per model name, overrides version_policy", flag=False)
    poll_s: float = setting(2.0, "repository rescan interval (0: only on SIGHUP and ReloadModels)")
    tls_cert: str = setting("", "PEM certificate (chain) for TLS; with --tls-key the server speaks TLS only")
    tls_key: str = setting("", "PEM private key for TLS")
    auth_token_file: str = setting("", "require 'authorization: Bearer <token>' (token in this file; needs TLS)")

    @property
    def metrics_bind_host(self) -> str:
        """Where /metrics listens: --metrics-host, else the --host address (without brackets)."""
        return self.metrics_host or self.host.strip("[]")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def validate(self) -> "ServeConfig":
        for key in ("port", "processes", "max_batch_size", "max_queue", "max_count", "max_score_images",
                    "max_candidates", "max_message_mb", "stream_chunk_size"):
            if getattr(self, key) < 1 and not (key == "port" and self.port == 0):
                raise ServeConfigError(f"{key} = {getattr(self, key)} must be >= 1")
        for key, lowest in (("port", 0), ("http_port", -1), ("metrics_port", -1)):
            if not lowest <= getattr(self, key) <= MAX_PORT:
                raise ServeConfigError(f"{key} = {getattr(self, key)} must be between {lowest} and {MAX_PORT}")
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
    """Defaults, then the TOML file's top-level keys, then non-None overrides (flags)."""
    config = ServeConfig()
    if path is not None:
        settings.apply(config, settings.read_toml(path, ServeConfigError), str(path), error=ServeConfigError)
    flags = {k: v for k, v in overrides.items() if v is not None}
    settings.apply(config, flags, "command line", error=ServeConfigError)
    return config.validate()
