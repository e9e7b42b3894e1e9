"""``dcgan-serve``: the gRPC inference server.

Serves dcgan.v1.InferenceService, grpc.health.v1.Health (overall "" and one entry per model name) and
server reflection. SIGTERM/SIGINT: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight
calls get ``grace_s`` to finish, then the process exits 0.

The gRPC server is grpc.aio on an event loop in its own thread; ``InferenceServer`` keeps a
plain blocking start/stop interface, so the CLI, tests and embedding code need no asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from dcgan.v1 import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dcgan_core import helptext, settings
from dcgan_core.repository import Repository, RepositoryError, RepositoryUnavailable
from serving import security
from serving.processes import Ports
from serving.server import http_api, supervisor
from serving.server.config import ServeConfig, ServeConfigError, load_serve_config
from serving.server.decoding import GuardedRegistry
from serving.server.errors import FailedPrecondition, ServiceError, Unavailable
from serving.server.metrics import ServingMetrics
from serving.server.oip import OIP_SERVICE_NAME, OipServicer
from serving.server.runtime import RuntimeUnavailable, providers_for
from serving.server.service import InferenceService
from serving.server.servicer import InferenceServicer
from serving.server.store import ModelStore, RepositoryWatcher
from serving.wire import SERVICE_NAME

log = logging.getLogger("dcgan-serve")
LOOP_THREAD = "grpc-aio"  # the thread running the event loop: every handler, grpc.aio, HTTP
PR_SET_NAME = 15  # <linux/prctl.h>


class InferenceServer:
    """A started gRPC server over a loaded ModelStore; ``port`` is the bound port."""

    def __init__(self, config: ServeConfig):
        self.config = config
        providers_for(config.device)  # fail fast on an impossible --device
        self._token = security.read_token(config.auth_token_file) if config.auth_token_file else None
        self.metrics = ServingMetrics()
        self.store = ModelStore(Repository(config.repository), config, self.metrics)
        self.store.load()
        self.service = InferenceService(self.store, config, reload=self.reload_everywhere)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name=LOOP_THREAD, daemon=True)
        self._loop_thread.start()
        try:
            self.port = self._on_loop(self._build())
        except BaseException:
            self._close_loop()
            raise
        self._stopped = threading.Event()
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http = None  # the HTTP front end's aiohttp runner, once started
        self._unwatch_gc = self.metrics.watch_gc()
        self.watcher = RepositoryWatcher(self.store, config.poll_s, self.update_health) if config.poll_s else None

    def _run_loop(self) -> None:
        name_os_thread(LOOP_THREAD)  # `top -H` and /proc show which thread is the loop
        self._loop.run_forever()

    def _on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` on the server's loop and wait for it (never call from the loop)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build(self) -> int:
        """Create the aio server on its loop, register the services, bind; returns the port."""
        config = self.config
        options = [("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", int(config.reuse_port))]  # unless asked: a used port is an error
        interceptors = [] if self._token is None else [security.BearerTokenInterceptor(self._token)]
        self.server = grpc.aio.server(options=options, interceptors=interceptors,
                                      maximum_concurrent_rpcs=config.max_concurrent_rpcs or None)
        registry = GuardedRegistry(self.server)  # undecodable requests: INVALID_ARGUMENT (serving/server/decoding.py)
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.service), registry)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(self.service), registry)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registry)
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert:
                credentials = security.server_credentials(config.tls_cert, config.tls_key)
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: the port is in use by another process "
                          f"or the address is not available on this host")
        return port

    def _tls_context(self) -> ssl.SSLContext | None:
        """The HTTP front end's TLS: the same certificate and key as gRPC's."""
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()

    def reload(self) -> None:
        """Rescan the repository now (ReloadModels RPC, SIGHUP); a repository-level problem is
        raised as the status it means, after everything else was reloaded."""
        try:
            self.store.rescan()
        except RepositoryUnavailable as exc:
            raise Unavailable(f"{exc}; still serving the versions loaded before") from None
        except RepositoryError as exc:
            raise FailedPrecondition(f"{exc}; everything else was reloaded") from None
        finally:
            self.update_health()

    def reload_everywhere(self) -> None:
        """``reload`` for the ReloadModels RPC: this process now, and under ``--processes`` every
        other worker too (the supervisor passes a SIGHUP on to them all)."""
        try:
            self.reload()
        finally:
            supervisor.tell_supervisor_to_reload()

    def reload_logged(self) -> None:
        """``reload`` for SIGHUP, where nobody receives a status: problems go to the log."""
        try:
            self.reload()
        except ServiceError as exc:
            log.error("reload: %s", exc)
        log.info("reload done: %s", self.describe())

    def describe(self) -> str:
        return "; ".join(f"{name} {entry.ready() or 'no ready version'}"
                         for name, entry in sorted(self.store.models().items())) or "no models"

    def start(self) -> "InferenceServer":
        self._on_loop(self.server.start())
        if self.config.http_port >= 0:
            try:
                self._http, self.http_port = self._on_loop(http_api.start(
                    self.service, self._token, self.config.host, self.config.http_port, self._tls_context(),
                    self.config.reuse_port))
            except OSError as exc:
                self.stop(grace=0)
                raise OSError(f"cannot serve HTTP on port {self.config.http_port}: {exc.strerror or exc}") from None
            log.info("HTTP (Open Inference Protocol REST, /v1 for people, /openapi.json) on port %d", self.http_port)
        self.update_health()
        if self.watcher:
            self.watcher.start()
        if self.config.metrics_port >= 0:
            host = self.config.metrics_bind_host
            try:
                self.metrics_port = self.metrics.serve(self.config.metrics_port, host)
            except OSError:
                self.stop(grace=0)
                raise
            log.info("Prometheus metrics on %s port %d", host, self.metrics_port)
        log.info("serving %s on port %d", self.describe(), self.port)
        return self

    def update_health(self) -> None:
        """Health per model and overall, from the store (called from threads, never the loop)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        statuses = {name: serving if entry.ready() else not_serving for name, entry in self.store.models().items()}
        overall = serving if serving in statuses.values() else not_serving
        statuses.update({"": overall, SERVICE_NAME: overall})

        async def publish() -> None:
            for name, status in statuses.items():
                await self.health.set(name, status)

        self._on_loop(publish())

    def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, let in-flight ones finish, release models."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("shutting down: draining in-flight calls for up to %.1fs", self.config.grace_s)
        if self.watcher:
            self.watcher.stop()
        self._on_loop(self.health.enter_graceful_shutdown())  # probes see NOT_SERVING while we drain
        if not self.service.drain(self.config.grace_s if grace is None else grace):
            log.warning("grace period over: aborting calls still in flight")
        if self._http is not None:
            self._on_loop(self._http.cleanup())
        self._on_loop(self.server.stop(0))
        self._close_loop()
        self.store.close()
        self._unwatch_gc()
        log.info("stopped")


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the OS too (Linux: 15 bytes, PR_SET_NAME); Python's
    thread names stay inside Python."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def build_parser() -> argparse.ArgumentParser:
    parser = helptext.parser("dcgan-serve", __doc__)
    parser.add_argument("--config", type=Path, help="TOML file with any of the settings below (flags win)")
    settings.add_flags(parser, ServeConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    signals = _SignalState.install()  # before loading: a SIGHUP or SIGTERM during start-up must not kill
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        config = load_serve_config(config_file, args)
        if config.processes > 1:
            return supervisor.run(config, sys.argv[1:] if argv is None else argv)
        log.info("starting: loading models from %s", config.repository)
        server = InferenceServer(config).start()
    except (ServeConfigError, RepositoryError, RuntimeUnavailable, OSError) as exc:
        print(f"dcgan-serve: error: {exc}", file=sys.stderr)
        return 2
    if config.gc_freeze:
        gc.freeze()  # modules, models and servicers live as long as the process: no collection need scan them
    print(Ports(server.port, server.http_port, server.metrics_port).line(), flush=True)
    signals.serve(server)
    server.stop()
    return 0


class _SignalState:
    """SIGTERM/SIGINT end the server, SIGHUP rescans the repository. Installed first thing, so a
    signal during start-up is remembered (a reload runs once the server is up) instead of killing."""

    def __init__(self) -> None:
        self.done, self.reload_pending = threading.Event(), threading.Event()
        self.server: InferenceServer | None = None

    @classmethod
    def install(cls) -> "_SignalState":
        state = cls()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: state.done.set())
        signal.signal(signal.SIGHUP, lambda *_: state.hangup())
        return state

    def hangup(self) -> None:
        if self.server is None:
            self.reload_pending.set()
        else:
            threading.Thread(target=self.server.reload_logged, name="sighup").start()

    def serve(self, server: InferenceServer) -> None:
        self.server = server
        if self.reload_pending.is_set():
            self.hangup()
        self.done.wait()


if __name__ == "__main__":
    sys.exit(main())
