"""Prometheus metrics of the inference service (prometheus-client), served on their own HTTP port.

Kept in a private registry so that several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dcgan_requests_total", "RPCs by method, model and status code",
                                ["method", "model", "code"], registry=self.registry)
        self.request_latency = Histogram("dcgan_request_latency_seconds", "RPC latency by method",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("dcgan_queue_wait_seconds", "time the oldest request of a batch waited",
                                    ["model", "network"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute = Histogram("dcgan_compute_seconds", "onnxruntime time per batch",
                                 ["model", "network"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("dcgan_batch_size", "items per executed batch", ["model", "network"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("dcgan_queue_depth", "requests waiting per network", ["model", "network"],
                                 registry=self.registry)
        self.loaded = Gauge("dcgan_model_version_loaded", "1 for each ready version, by execution provider",
                            ["model", "version", "provider"], registry=self.registry)
        self.load_failures = Counter("dcgan_model_load_failures_total", "versions that failed to load",
                                     ["model"], registry=self.registry)
        self.gc_pause = Histogram("dcgan_gc_pause_seconds", "garbage collections of this process by generation: "
                                  "every call in flight waits them out", ["generation"], buckets=GC_BUCKETS,
                                  registry=self.registry)

    def watch_gc(self) -> Callable[[], None]:
        """Time every garbage collection into ``gc_pause`` (until the returned function is called):
        a collection stops the event loop, so its pauses show in tail latencies."""
        started = [0.0]

        def timed(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

        gc.callbacks.append(timed)
        return lambda: gc.callbacks.remove(timed)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (0 picks a free one)."""
        return serve_registry(self.registry, port, host)


def serve_registry(registry: CollectorRegistry, port: int, host: str) -> int:
    """Serve ``registry`` at /metrics on ``host``:``port``; returns the bound port (0: a free one)."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # its message names no address: say which one
        raise OSError(exc.errno, f"cannot serve metrics on {host or '*'} port {port}: {exc.strerror}") from None
    return server.server_port
