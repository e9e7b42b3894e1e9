"""Serving replicas behind Envoy: the Envoy configuration for this API, and ``dcgan-cluster``,
which starts the same topology on one host without containers.

    dcgan-cluster --replicas 3 --port 50051 --repository exported     # (make serve-cluster)

The replicas are ordinary ``dcgan-serve`` processes on free ports; Envoy listens on ``--port``
and balances each call (round robin), checks every replica through ``grpc.health.v1`` and
ejects failing ones, retries calls that a replica refused (UNAVAILABLE while draining) or lost
(a reset connection) on another replica within a retry budget, and passes the client's deadline
(``grpc-timeout``) through. Every RPC of the API is idempotent, which is what makes retries safe.
The committed ``deploy/envoy.yaml`` (docker-compose and Kubernetes) is rendered by the same
function with DNS discovery; a test keeps the two identical.
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


@dataclass(frozen=True)
class Upstreams:
    """Where the replicas are: fixed addresses (one host), or a DNS name resolving to all of them."""

    addresses: tuple[tuple[str, int], ...] = ()
    dns_name: str = ""
    dns_port: int = 50051

    def cluster_fields(self) -> dict:
        if self.dns_name:
            endpoints = [(self.dns_name, self.dns_port)]
            fields = {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY", "dns_refresh_rate": "5s"}
        else:
            endpoints, fields = list(self.addresses), {"type": "STATIC"}
        lb_endpoints = [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in endpoints]
        return {**fields, "load_assignment": {"cluster_name": "dcgan", "endpoints": [{"lb_endpoints": lb_endpoints}]}}


def envoy_config(upstreams: Upstreams, port: int, admin_port: int, host: str = "0.0.0.0",
                 admin_host: str = "127.0.0.1", health_interval_s: float = 1.0) -> dict:
    """Envoy's bootstrap for the API: one gRPC route to the replica cluster."""
    route = {
        "cluster": "dcgan",
        "timeout": "0s",  # no route timeout of Envoy's own: the client's deadline rules
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},  # honour grpc-timeout, uncapped
        "retry_policy": {
            "retry_on": RETRY_ON,
            "num_retries": 3,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                      "typed_config": {"@type": PREVIOUS_HOSTS}}],
            "host_selection_retry_max_attempts": 5,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        },
    }
    manager = {
        "@type": HCM, "stat_prefix": "dcgan", "codec_type": "AUTO",
        "route_config": {"name": "dcgan", "virtual_hosts": [
            {"name": "dcgan", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    interval = f"{health_interval_s:g}s"
    cluster = {
        "name": "dcgan",
        "connect_timeout": "1s",
        # Round robin, not least request: a replica that has just died fails calls at once, so it
        # has the fewest active requests and least request keeps choosing it, retries included
        # (the score-job test lost calls that way); round robin moves each retry on.
        "lb_policy": "ROUND_ROBIN",
        # never route to a replica known to be down, even when most are (Envoy's default "panic"
        # below 50% healthy would spread calls over the dead ones too)
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP2, "explicit_http_config": {"http2_protocol_options": {}}}},
        "health_checks": [{"timeout": "1s", "interval": interval, "unhealthy_threshold": 1,
                           "healthy_threshold": 1, "no_traffic_interval": interval,
                           "grpc_health_check": {"service_name": SERVICE_NAME}}],
        "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_failure": 2,
                              "consecutive_local_origin_failure": 2, "split_external_local_origin_errors": True,
                              "interval": interval, "base_ejection_time": "10s", "max_ejection_percent": 50},
        "circuit_breakers": {"thresholds": [{"max_requests": 4096, "max_pending_requests": 4096,
                                             "retry_budget": {"budget_percent": {"value": 25.0},
                                                              "min_retry_concurrency": 8}}]},
        **upstreams.cluster_fields(),
    }
    return {
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{"name": "grpc", "address": {"socket_address": {"address": host, "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": manager}]}]}],
            "clusters": [cluster],
        },
    }


def compose_config() -> str:
    """deploy/envoy.yaml: Envoy in docker-compose or Kubernetes, finding the replicas by DNS
    (the compose service ``server``; in Kubernetes the headless Service of the same name)."""
    config = envoy_config(Upstreams(dns_name="server", dns_port=50051), port=50051, admin_port=9901,
                          admin_host="0.0.0.0")
    header = "# Rendered by serving.cluster.compose_config(); tests/test_cluster.py keeps it in step.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


# ---------------------------------------------------------------------------- the local cluster


def upstream_health(admin_port: int) -> dict[int, str]:
    """Envoy's health flags of each replica by port: "healthy", or why not (e.g. /failed_active_hc);
    empty while Envoy itself is still starting."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as answer:
            lines = answer.read().decode().splitlines()
    except OSError:
        return {}
    flags = [line.split("::") for line in lines if "::health_flags::" in line]
    return {int(parts[1].rsplit(":", 1)[1]): parts[-1] for parts in flags}


def healthy_upstreams(admin_port: int) -> int:
    """How many replicas Envoy routes to (0 while Envoy itself is still starting)."""
    return sum(flags == "healthy" for flags in upstream_health(admin_port).values())


def wait_healthy(admin_port: int, replicas: int, envoy: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Block until Envoy routes to every replica: its first health checks take up to an interval."""
    deadline = time.monotonic() + timeout_s
    while healthy_upstreams(admin_port) < replicas:
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


def start_replica(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """A ``dcgan-serve`` process on a free port; returns it once it listens, with the port."""
    process, port = processes.start_server(args, env=env, preexec_fn=_terminated_with_parent())
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
    return process, port


def start_envoy(config: dict, work_dir: Path) -> tuple[subprocess.Popen, int, int]:
    """Envoy with ``config`` (written to work_dir/envoy.yaml, its log beside it); returns it once it
    listens, with its listener and admin ports: a port 0 in the config is the port Envoy chose,
    read back from Envoy itself (a port picked free beforehand may be taken before Envoy binds it)."""
    config_path, admin_path = work_dir / "envoy.yaml", work_dir / "envoy.admin"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path.unlink(missing_ok=True)
    envoy = Path(sys.executable).with_name("envoy")
    with (work_dir / "envoy.log").open("ab") as log_file:
        process = subprocess.Popen([str(envoy), "-c", str(config_path), "--log-level", "warn", "--disable-hot-restart",
                                    "--admin-address-path", str(admin_path)],
                                   stdout=log_file, stderr=log_file, preexec_fn=_terminated_with_parent())
    admin_port = int(_when_ready(lambda: admin_path.exists() and admin_path.read_text().rsplit(":", 1)[1], process))
    return process, _when_ready(lambda: _listener_port(admin_port), process), admin_port


def _listener_port(admin_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/listeners?format=json", timeout=5) as answer:
            statuses = json.loads(answer.read())["listener_statuses"]
    except (OSError, ValueError, KeyError):
        return None
    return statuses[0]["local_address"]["socket_address"]["port_value"] if statuses else None


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
    replicas: list[tuple[subprocess.Popen, int]]  # (process, gRPC port)
    port: int  # Envoy's gRPC port
    admin_port: int


@contextlib.contextmanager
def local_cluster(replicas: int, work_dir: Path, serve_args: list[str], port: int = 0,
                  admin_port: int = 0) -> Iterator[LocalCluster]:
    """N replicas and Envoy in front of them (port 0: a port Envoy picks), ready to route to all;
    stopped (SIGTERM: replicas drain) on exit."""
    started: list[tuple[subprocess.Popen, int]] = []
    envoy = None
    try:
        for _ in range(replicas):
            started.append(start_replica([*serve_args, "--metrics-port", "0", "--http-port", "0"]))
        upstreams = Upstreams(addresses=tuple(("127.0.0.1", p) for _, p in started))
        envoy, port, admin_port = start_envoy(envoy_config(upstreams, port, admin_port, host="127.0.0.1"), work_dir)
        wait_healthy(admin_port, replicas, envoy)
        yield LocalCluster(envoy, started, port, admin_port)
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
    with local_cluster(args.replicas, args.work_dir, serve_args, args.port, args.admin_port) as cluster:
        envoy, replicas = cluster.envoy, cluster.replicas
        ports = ", ".join(str(p) for _, p in replicas)
        print(f"dcgan-cluster: Envoy on port {cluster.port} in front of {args.replicas} replicas (ports {ports}); "
              f"Ctrl-C stops them all, SIGHUP makes every replica rescan its repository", flush=True)
        while not stop.wait(0.5):
            if hangup.is_set():
                hangup.clear()
                _reload(replicas)
            if envoy.poll() is not None:
                print(f"dcgan-cluster: envoy exited with status {envoy.returncode}; see "
                      f"{args.work_dir / 'envoy.log'}", file=sys.stderr)
                return 1
    return 0


def _reload(replicas: list[tuple[subprocess.Popen, int]]) -> None:
    """SIGHUP to every replica still running: each rescans its repository (dcgan-serve's SIGHUP)."""
    for process, _ in replicas:
        if process.poll() is None:
            process.send_signal(signal.SIGHUP)
    print(f"dcgan-cluster: SIGHUP: {len(replicas)} replicas rescan their repository", flush=True)


if __name__ == "__main__":
    sys.exit(main())
