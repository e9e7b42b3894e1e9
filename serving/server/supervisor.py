"""``dcgan-serve --processes N``: N server processes behind one set of ports.

One process answers as many calls as its one event-loop thread can run (grpc.aio and every handler
share it: bench/results/loop_cost.json); N processes share the gRPC and HTTP ports instead
(SO_REUSEPORT: the kernel spreads connections over them), each with its own models and batcher.
This supervisor starts them, serves their metrics on one port (each sample labelled with its
``worker``), passes SIGTERM/SIGINT (drain and exit) and SIGHUP (rescan) on to every worker, and
restarts a worker that dies. A ReloadModels call reloads the worker that answers it and signals
the supervisor, which passes a SIGHUP on to them all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from serving.processes import Ports, ServerDidNotStart, ports_of, spawn_server
from serving.server.config import ServeConfig
from serving.server.metrics import serve_registry

log = logging.getLogger("dcgan-serve")
SUPERVISOR_PID = "DCGAN_SERVE_SUPERVISOR"  # set in each worker's environment: whom to tell about a reload


class WorkerMetrics:
    """A Prometheus collector of the workers' metrics: each worker's /metrics (on a loopback port
    of its own) read at scrape time, its samples labelled ``worker``, families merged by name."""

    def __init__(self, ports: dict[int, int]):
        self.ports = ports  # worker index -> its metrics port (replaced when a worker restarts)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, port in sorted(self.ports.items()):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue  # restarting: its counts start again with the new process
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                into.samples += [s._replace(labels={**s.labels, "worker": str(worker)}) for s in family.samples]
        yield from merged.values()


class Supervisor:
    """N ``dcgan-serve`` workers on the same ports; ``ports`` once started."""

    def __init__(self, config: ServeConfig, argv: Sequence[str]):
        self.config, self.argv = config, list(argv)
        self.workers: dict[int, subprocess.Popen] = {}
        self.metrics = WorkerMetrics({})
        self.wake = threading.Event()  # a signal arrived: SIGTERM/SIGINT, SIGHUP or SIGCHLD
        self.stopping = self.reload = False
        self.ports: Ports | None = None
        self._http_flag = config.http_port  # the port every worker after the first binds: the first's

    def _spawn(self, index: int, grpc_port: int, http_port: int) -> Ports:
        """Worker ``index``: the command line given, then what makes it one worker of this group."""
        worker_flags = ["--processes", "1", "--reuse-port", "--host", self.config.host, "--port", str(grpc_port),
                        "--http-port", str(http_port), "--metrics-port", "0", "--metrics-host", "127.0.0.1"]
        env = {**os.environ, SUPERVISOR_PID: str(os.getpid())}
        process = spawn_server([*self.argv, *worker_flags], env=env)
        self.workers[index] = process
        ports = ports_of(process)  # raises ServerDidNotStart
        self.metrics.ports[index] = ports.metrics
        log.info("worker %d (pid %d) listening", index, process.pid)
        return ports

    def start(self) -> Ports:
        """Worker 0 binds the ports asked for (0: free ones); the others join it on the ones it got."""
        first = self._spawn(0, self.config.port, self.config.http_port)
        self._http_flag = first.http if first.http is not None else -1
        for index in range(1, self.config.processes):
            self._spawn(index, first.grpc, self._http_flag)
        metrics = None
        if self.config.metrics_port >= 0:
            registry = CollectorRegistry()
            registry.register(self.metrics)
            metrics = serve_registry(registry, self.config.metrics_port, self.config.metrics_bind_host)
        self.ports = Ports(first.grpc, first.http, metrics)
        return self.ports

    def serve(self) -> int:
        """Until SIGTERM/SIGINT: pass SIGHUP on, restart workers that die; then stop them all. A
        worker that cannot start again ends the group (exit 1): the orchestrator restarts it whole."""
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stopping:
                return self.stop()
            if self.reload:
                self.reload = False
                self._signal_all(signal.SIGHUP)
            try:
                self._restart_dead()
            except ServerDidNotStart as exc:
                log.error("%s; stopping every worker", exc)
                self.stop()
                return 1

    def _restart_dead(self) -> None:
        for index, process in list(self.workers.items()):
            if process.poll() is not None:
                log.error("worker %d (pid %d) exited with status %s: restarting it", index, process.pid,
                          process.returncode)
                self._spawn(index, self.ports.grpc, self._http_flag)

    def _signal_all(self, sig: signal.Signals) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM to every worker (each drains its calls), then wait for them all."""
        self._signal_all(signal.SIGTERM)
        statuses = [process.wait() for process in self.workers.values()]
        log.info("all %d workers stopped", len(statuses))
        return 0 if all(status == 0 for status in statuses) else 1

    def install_signals(self) -> None:
        def stop(*_) -> None:
            self.stopping = True
            self.wake.set()

        def hangup(*_) -> None:
            self.reload = True
            self.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hangup)
        signal.signal(signal.SIGCHLD, lambda *_: self.wake.set())


def tell_supervisor_to_reload() -> None:
    """In a worker: ask the supervisor to pass a SIGHUP on to every worker (after a ReloadModels)."""
    pid = os.environ.get(SUPERVISOR_PID)
    if pid:
        os.kill(int(pid), signal.SIGHUP)


def run(config: ServeConfig, argv: Sequence[str]) -> int:
    """``dcgan-serve --processes N`` (N > 1): the supervisor's life."""
    supervisor = Supervisor(config, argv)
    supervisor.install_signals()
    try:
        ports = supervisor.start()
    except Exception as exc:  # a worker did not start (its reason is on stderr), or the metrics port
        print(f"dcgan-serve: error: {exc}", file=sys.stderr)
        supervisor.stop()
        return 2
    print(ports.line(), flush=True)
    return supervisor.serve()
