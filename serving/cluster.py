"""Serving replicas behind Envoy: the Envoy configuration for this API, and ``dcgan-cluster``,
which starts the same topology on one host without containers.

    dcgan-cluster --replicas 3 --port 50051 --repository exported     # (make serve-cluster)

The replicas are ordinary ``dcgan-serve`` processes on free ports; Envoy listens on ``--port``
(gRPC: dcgan.v1 and the Open Inference Protocol) and ``--http-port`` (OIP REST, /v1 for people),
balances each call (round robin), checks every replica (``grpc.health.v1`` on the gRPC side,
OIP's ``/v2/health/ready`` on the HTTP side) and ejects failing ones, retries calls that a
replica refused (UNAVAILABLE or 503 while draining) or lost (a reset connection) on another
replica within a retry budget, and passes the client's deadline through (``grpc-timeout``; over
HTTP, ``Request-Timeout-Ms`` reaches the replica as sent). Every call of the API is idempotent,
which is what makes retries safe. The committed ``deploy/envoy.yaml`` (docker-compose and
Kubernetes) is rendered by the same function with DNS discovery; a test keeps the two identical.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from dcgan_core import helptext
from serving import processes
from serving.processes import Ports
from serving.wire import SERVICE_NAME

log = logging.getLogger(__name__)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP2 = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
#: Failures Envoy retries on another replica: a draining replica's UNAVAILABLE, the CANCELLED that
#: gRPC gives calls arriving while a drained replica closes its server (6 of 2,468 calls failed over
#: 8 drains without it, 0 with it: bench/drain_through_envoy.py), and a replica that vanished
#: (kill -9, crash) before or while answering.
RETRY_ON = "unavailable,cancelled,reset,connect-failure,refused-stream"
#: The same over HTTP: a draining replica answers 503 (UNAVAILABLE), or is gone.
HTTP_RETRY_ON = "retriable-status-codes,reset,connect-failure,refused-stream"
READY_PATH = "/v2/health/ready"  # OIP's readiness: 200 while every model is ready and not draining


@dataclass(frozen=True)
class Upstreams:
    """Where the replicas are: fixed addresses (one host), or a DNS name resolving to all of them.
    Each replica serves gRPC on one port and HTTP on another: two clusters in Envoy."""

    addresses: tuple[tuple[str, Ports], ...] = ()
    dns_name: str = ""
    dns_ports: Ports = Ports(grpc=50051, http=8080)

    def cluster_fields(self, name: str, protocol: str) -> dict:
        """Discovery and endpoints of cluster ``name`` for ``protocol`` ("grpc" or "http")."""
        if self.dns_name:
            endpoints = [(self.dns_name, getattr(self.dns_ports, protocol))]
            fields = {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY", "dns_refresh_rate": "5s"}
        else:
            endpoints, fields = [(host, getattr(ports, protocol)) for host, ports in self.addresses], {"type": "STATIC"}
        lb_endpoints = [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in endpoints]
        return {**fields, "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}}


def _route(cluster: str, retry: dict) -> dict:
    return {
        "cluster": cluster,
        "timeout": "0s",  # no route timeout of Envoy's own: the client's deadline rules
        "retry_policy": {
            **retry,
            "num_retries": 3,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                      "typed_config": {"@type": PREVIOUS_HOSTS}}],
            "host_selection_retry_max_attempts": 5,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        },
    }


def _listener(name: str, host: str, port: int, route: dict) -> dict:
    manager = {
        "@type": HCM, "stat_prefix": f"dcgan_{name}", "codec_type": "AUTO",
        "route_config": {"name": name, "virtual_hosts": [
            {"name": name, "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    return {"name": name, "address": {"socket_address": {"address": host, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}]}


def _cluster(name: str, protocol: str, health_check: dict, upstreams: Upstreams, interval: str) -> dict:
    cluster = {
        "name": name,
        "connect_timeout": "1s",
        # Round robin, not least request: a replica that has just died fails calls at once, so it
        # has the fewest active requests and least request keeps choosing it, retries included
        # (the score-job test lost calls that way); round robin moves each retry on.
        "lb_policy": "ROUND_ROBIN",
        # never route to a replica known to be down, even when most are (Envoy's default "panic"
        # below 50% healthy would spread calls over the dead ones too)
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "health_checks": [{"timeout": "1s", "interval": interval, "unhealthy_threshold": 1,
                           "healthy_threshold": 1, "no_traffic_interval": interval, **health_check}],
        "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_failure": 2,
                              "consecutive_local_origin_failure": 2, "split_external_local_origin_errors": True,
                              "interval": interval, "base_ejection_time": "10s", "max_ejection_percent": 50},
        "circuit_breakers": {"thresholds": [{"max_requests": 4096, "max_pending_requests": 4096,
                                             "retry_budget": {"budget_percent": {"value": 25.0},
                                                              "min_retry_concurrency": 8}}]},
        **upstreams.cluster_fields(name, protocol),
    }
    if protocol == "grpc":  # HTTP/2 to the replicas; the HTTP cluster speaks HTTP/1.1, as aiohttp does
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP2, "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def envoy_config(upstreams: Upstreams, port: int, admin_port: int, host: str = "0.0.0.0",
                 admin_host: str = "127.0.0.1", health_interval_s: float = 1.0, http_port: int | None = None) -> dict:
    """Envoy's bootstrap for the API: a gRPC listener (dcgan.v1 and OIP) routing to the replicas'
    gRPC ports and, with ``http_port``, an HTTP listener (OIP REST, /v1, the playground) routing to
    their HTTP ports; each cluster health-checks the replicas in its own protocol."""
    grpc_route = _route("dcgan", {"retry_on": RETRY_ON})
    grpc_route["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}  # honour grpc-timeout, uncapped
    interval = f"{health_interval_s:g}s"
    listeners = [_listener("grpc", host, port, grpc_route)]
    clusters = [_cluster("dcgan", "grpc", {"grpc_health_check": {"service_name": SERVICE_NAME}}, upstreams, interval)]
    if http_port is not None:
        http_route = _route("dcgan-http", {"retry_on": HTTP_RETRY_ON, "retriable_status_codes": [503]})
        listeners.append(_listener("http", host, http_port, http_route))
        clusters.append(_cluster("dcgan-http", "http", {"http_health_check": {"path": READY_PATH}}, upstreams,
                                 interval))
    return {
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def compose_config() -> str:
    """deploy/envoy.yaml: Envoy in docker-compose or Kubernetes, finding the replicas by DNS
    (the compose service ``server``; in Kubernetes the headless Service of the same name)."""
    config = envoy_config(Upstreams(dns_name="server"), port=50051, admin_port=9901, admin_host="0.0.0.0",
                          http_port=8080)
    header = "# Rendered by serving.cluster.compose_config(); tests/test_cluster.py keeps it in step.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


# ---------------------------------------------------------------------------- the local cluster


def upstream_health(admin_port: int, cluster: str = "dcgan") -> dict[int, str]:
    """Envoy's health flags of each replica of ``cluster`` ("dcgan": gRPC, "dcgan-http") by port:
    "healthy", or why not (e.g. /failed_active_hc); empty while Envoy itself is still starting."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as answer:
            lines = answer.read().decode().splitlines()
    except OSError:
        return {}
    flags = [line.split("::") for line in lines if line.startswith(f"{cluster}::") and "::health_flags::" in line]
    return {int(parts[1].rsplit(":", 1)[1]): parts[-1] for parts in flags}


def healthy_upstreams(admin_port: int, cluster: str = "dcgan") -> int:
    """How many replicas Envoy routes to in ``cluster`` (0 while Envoy itself is still starting)."""
    return sum(flags == "healthy" for flags in upstream_health(admin_port, cluster).values())


def wait_healthy(admin_port: int, replicas: int, envoy: subprocess.Popen, timeout_s: float = 60.0,
                 clusters: tuple[str, ...] = ("dcgan",)) -> None:
    """Block until Envoy routes to every replica in each of ``clusters``: its first health checks
    take up to an interval."""
    deadline = time.monotonic() + timeout_s
    while min(healthy_upstreams(admin_port, cluster) for cluster in clusters) < replicas:
        if envoy.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Envoy did not see {replicas} healthy replicas (exit status {envoy.poll()})")
        time.sleep(0.05)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _terminated_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` under which the child gets SIGTERM when this process dies, however it dies
    (kill -9 included; Linux's PR_SET_PDEATHSIG), so replicas and Envoy never outlive the process
    that started them, holding its ports. None elsewhere. The signal follows the *thread* that
    started the child: start children from a thread that lives as long as they should (the main one).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return in_child


def start_replica(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Ports]:
    """A ``dcgan-serve`` process on free ports; returns it once it listens, with its ports."""
    process, ports = processes.start_server(args, env=env, preexec_fn=_terminated_with_parent())
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
    return process, ports


def start_envoy(config: dict, work_dir: Path) -> tuple[subprocess.Popen, Ports, int]:
    """Envoy with ``config`` (written to work_dir/envoy.yaml, its log beside it); returns it once it
    listens, with its listeners' ports (gRPC, and HTTP when configured) and its admin port: a port 0
    in the config is the port Envoy chose, read back from Envoy itself (a port picked free
    beforehand may be taken before Envoy binds it)."""
    config_path, admin_path = work_dir / "envoy.yaml", work_dir / "envoy.admin"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path.unlink(missing_ok=True)
    envoy = Path(sys.executable).with_name("envoy")
    with (work_dir / "envoy.log").open("ab") as log_file:
        process = subprocess.Popen([str(envoy), "-c", str(config_path), "--log-level", "warn", "--disable-hot-restart",
                                    "--admin-address-path", str(admin_path)],
                                   stdout=log_file, stderr=log_file, preexec_fn=_terminated_with_parent())
    admin_port = int(_when_ready(lambda: admin_path.exists() and admin_path.read_text().rsplit(":", 1)[1], process))
    expected = len(config["static_resources"]["listeners"])
    ports = _when_ready(lambda: len(found := _listener_ports(admin_port)) == expected and found, process)
    return process, Ports(ports["grpc"], ports.get("http")), admin_port


def _listener_ports(admin_port: int) -> dict[str, int]:
    """The port of each listener Envoy has bound, by listener name."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/listeners?format=json", timeout=5) as answer:
            statuses = json.loads(answer.read())["listener_statuses"]
    except (OSError, ValueError, KeyError):
        return {}
    return {status["name"]: status["local_address"]["socket_address"]["port_value"] for status in statuses}


def _when_ready(probe: Callable[[], object], envoy: subprocess.Popen, timeout_s: float = 60.0):
    """``probe()`` once it gives a value, while Envoy runs; Envoy that exits or hangs is an error."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        if envoy.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Envoy did not start (exit status {envoy.poll()}); see its envoy.log")
        time.sleep(0.05)
    return value


@dataclass
class LocalCluster:
    envoy: subprocess.Popen
    replicas: list[tuple[subprocess.Popen, Ports]]
    ports: Ports  # Envoy's listeners: gRPC, HTTP
    admin_port: int

    @property
    def port(self) -> int:
        """Envoy's gRPC port."""
        return self.ports.grpc


@contextlib.contextmanager
def local_cluster(replicas: int, work_dir: Path, serve_args: list[str], port: int = 0,
                  admin_port: int = 0, http_port: int = 0) -> Iterator[LocalCluster]:
    """N replicas and Envoy in front of them, gRPC on ``port`` and HTTP on ``http_port`` (0: a port
    Envoy picks), ready to route to all; stopped (SIGTERM: replicas drain) on exit."""
    started: list[tuple[subprocess.Popen, Ports]] = []
    envoy = None
    try:
        for _ in range(replicas):
            started.append(start_replica([*serve_args, "--metrics-port", "0", "--http-port", "0"]))
        upstreams = Upstreams(addresses=tuple(("127.0.0.1", p) for _, p in started))
        config = envoy_config(upstreams, port, admin_port, host="127.0.0.1", http_port=http_port)
        envoy, ports, admin_port = start_envoy(config, work_dir)
        wait_healthy(admin_port, replicas, envoy, clusters=("dcgan", "dcgan-http"))
        yield LocalCluster(envoy, started, ports, admin_port)
    finally:
        children = [p for p in (envoy, *(p for p, _ in started)) if p is not None]
        for process in children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("dcgan-cluster", __doc__)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=50051, help="Envoy's gRPC port (default: 50051; 0: a free one)")
    parser.add_argument("--http-port", type=int, default=8080,
                        help="Envoy's HTTP port (OIP REST, /v1, the playground; default: 8080; 0: a free one)")
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port, on 127.0.0.1 (0: a free one)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/cluster"), help="Envoy's config and log")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER,
                        help="after --: flags for every dcgan-serve replica (e.g. -- --repository exported)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    stop, hangup = threading.Event(), threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hangup.set())  # (also what a closed terminal sends)
    serve_args = [a for a in args.serve_args if a != "--"]
    with local_cluster(args.replicas, args.work_dir, serve_args, args.port, args.admin_port,
                       args.http_port) as cluster:
        envoy, replicas = cluster.envoy, cluster.replicas
        ports = ", ".join(f"{p.grpc}/{p.http}" for _, p in replicas)
        print(f"dcgan-cluster: Envoy on port {cluster.ports.grpc} (gRPC), {cluster.ports.http} (HTTP) in front of "
              f"{args.replicas} replicas (gRPC/HTTP ports {ports}); Ctrl-C stops them all, SIGHUP makes every "
              f"replica rescan its repository", flush=True)
        while not stop.wait(0.5):
            if hangup.is_set():
                hangup.clear()
                _reload(replicas)
            if envoy.poll() is not None:
                print(f"dcgan-cluster: envoy exited with status {envoy.returncode}; see "
                      f"{args.work_dir / 'envoy.log'}", file=sys.stderr)
                return 1
    return 0


def _reload(replicas: list[tuple[subprocess.Popen, Ports]]) -> None:
    """SIGHUP to every replica still running: each rescans its repository (dcgan-serve's SIGHUP)."""
    for process, _ in replicas:
        if process.poll() is None:
            process.send_signal(signal.SIGHUP)
    print(f"dcgan-cluster: SIGHUP: {len(replicas)} replicas rescan their repository", flush=True)


if __name__ == "__main__":
    sys.exit(main())
