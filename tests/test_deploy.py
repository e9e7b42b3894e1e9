"""No container engine runs here: check that docker-compose.yml and the Dockerfiles name only
files, modules, flags and ports that exist and agree with the code."""

import importlib
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _dockerfile(service: str) -> tuple[Path, str]:
    build = SERVICES[service]["build"]
    context = (ROOT / build["context"]).resolve()
    return context, (context / build["dockerfile"]).read_text()


def test_services_and_profiles():
    assert set(SERVICES) == {"server", "envoy", "trainer", "prometheus"}
    assert SERVICES["server"]["deploy"]["replicas"] >= 2
    assert SERVICES["trainer"]["profiles"] == ["train"]
    devices = SERVICES["server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("service", ["server", "trainer"])
def test_dockerfiles_use_official_bases_and_copy_existing_paths(service):
    context, text = _dockerfile(service)
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases and all(b.startswith("python:3.11") for b in bases)
    for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE):
        sources = shlex.split(line)[:-1]
        for source in sources:
            assert (context / source).exists(), f"{service}: COPY {source} does not exist"
    for requirement in re.findall(r"-r\s+(\S+)", text):
        assert (context / requirement).exists()


def test_server_command_is_accepted_by_the_server_cli():
    from serving.server.app import build_parser

    _, text = _dockerfile("server")
    assert 'ENTRYPOINT ["python", "-m", "serving.server"]' in text
    importlib.import_module("serving.server.app")
    command = SERVICES["server"]["command"]
    args = build_parser().parse_args(command)
    assert args.repository == "/models"
    cmd_default = re.search(r"^CMD\s+(\[.*\])$", text, re.MULTILINE).group(1)
    build_parser().parse_args(yaml.safe_load(cmd_default))


def _envoy_routes() -> dict[int, int]:
    """deploy/envoy.yaml: each listener's port -> the replica port its cluster sends to."""
    envoy = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())["static_resources"]
    upstreams = {}
    for cluster in envoy["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert endpoint["socket_address"]["address"] == "server"
        upstreams[cluster["name"]] = endpoint["socket_address"]["port_value"]
    routes = {}
    for listener in envoy["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        cluster = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"]
        routes[listener["address"]["socket_address"]["port_value"]] = upstreams[cluster]
    return routes


def test_ports_agree_between_server_envoy_healthcheck_and_prometheus():
    server = SERVICES["server"]
    command = server["command"]
    grpc_port, metrics_port = _flag(command, "--port"), _flag(command, "--metrics-port")
    http_port = _flag(command, "--http-port")
    assert "ports" not in server  # replicas share no host port
    assert {grpc_port, http_port, metrics_port} <= set(server["expose"])
    assert _envoy_routes() == {int(grpc_port): int(grpc_port), int(http_port): int(http_port)}
    assert {f"{grpc_port}:{grpc_port}", f"{http_port}:{http_port}"} <= set(SERVICES["envoy"]["ports"])
    assert "./deploy/envoy.yaml:/etc/envoy/envoy.yaml:ro" in SERVICES["envoy"]["volumes"]
    probe = server["healthcheck"]["test"]
    assert probe[:4] == ["CMD", "python", "-m", "serving.client.healthcheck"]
    from serving.client.healthcheck import main  # noqa: F401  (the probe's module exists)

    assert _flag(probe, "--target").endswith(f":{grpc_port}")
    scrape = yaml.safe_load((ROOT / "serving" / "prometheus.yml").read_text())
    discovery = scrape["scrape_configs"][0]["dns_sd_configs"][0]
    assert discovery["names"] == ["server"] and discovery["port"] == int(metrics_port)


def test_volumes_point_at_existing_paths():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (ROOT / host).exists(), f"{name}: volume {host} does not exist"
            else:
                assert host in COMPOSE["volumes"], f"{name}: named volume {host} is not declared"
    models = [v for v in SERVICES["server"]["volumes"] if v.endswith(":/models:ro")]
    assert models == ["./exported:/models:ro"], "the server mounts the repository read-only"


def test_trainer_script_runs_existing_commands():
    _, text = _dockerfile("trainer")
    script = ROOT / re.search(r'ENTRYPOINT \["/app/(\S+)"\]', text).group(1)
    assert script.exists() and os.access(script, os.X_OK)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    used = set(re.findall(r"^(dcgan-[a-z]+)", script.read_text(), re.MULTILINE))
    assert used == {"dcgan-train", "dcgan-eval", "dcgan-export"} and used <= set(scripts)
    from training.cli import build_parser as train
    from training.evaluate import build_parser as evaluate
    from training.export_cli import parser as export

    parsers = {"dcgan-train": train(), "dcgan-eval": evaluate(), "dcgan-export": export()}
    for line in re.findall(r"^(dcgan-[a-z]+ .*)$", script.read_text(), re.MULTILINE):
        command, *args = shlex.split(re.sub(r'"\$@"', "", line))
        parsers[command].parse_args(args)  # every flag the script passes exists (argparse exits otherwise)
    env = SERVICES["trainer"]["environment"]
    mounts = [v.split(":")[1] for v in SERVICES["trainer"]["volumes"]]
    assert env["DATA"] in mounts and env["REPOSITORY"] in mounts and env["RUN"].startswith("/runs")


K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def _resources() -> list[dict]:
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_pass_the_strict_schema_check():
    import kubernetes_validate

    resources = _resources()
    for resource in resources:
        kubernetes_validate.validate(resource, "1.37.0", strict=True)
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "Service"]
    broken = next(r for r in resources if r["kind"] == "Deployment")
    broken = {**broken, "spec": {**broken["spec"], "replica": 3}}  # a typo strict mode must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def test_kubernetes_manifests_agree_with_the_server_and_envoy():
    from serving.server.app import build_parser
    from serving.wire import SERVICE_NAME

    by_name = {(r["kind"], r["metadata"]["name"]): r for r in _resources()}
    pod = by_name[("Deployment", "dcgan-server")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert pod["terminationGracePeriodSeconds"] > args.grace_s
    assert container["readinessProbe"]["grpc"] == {"port": args.port, "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"]["port"] == args.port
    headless = by_name[("Service", "server")]["spec"]
    assert headless["clusterIP"] == "None"  # Envoy's DNS name, one record per pod
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == {"grpc": args.port, "http": args.http_port, "metrics": args.metrics_port}
    assert {p["name"]: p["port"] for p in headless["ports"]} == container_ports
    assert set(_envoy_routes().values()) == {args.port, args.http_port}
    front = by_name[("Service", "dcgan")]["spec"]["ports"]
    assert {p["port"] for p in front} == set(_envoy_routes())  # what clients call is what Envoy listens on
    hpa = by_name[("HorizontalPodAutoscaler", "dcgan-server")]["spec"]
    from serving.server.metrics import ServingMetrics

    gauge = hpa["metrics"][0]["pods"]["metric"]["name"]
    assert any(m.name == gauge for m in ServingMetrics().registry.collect())
    kustomization = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f"k8s/{p.name}" for p in K8S)
    assert kustomization["configMapGenerator"][0]["files"] == ["envoy.yaml"]
    envoy_pod = by_name[("Deployment", "dcgan-envoy")]["spec"]["template"]["spec"]
    assert envoy_pod["volumes"][0]["configMap"]["name"] == kustomization["configMapGenerator"][0]["name"]
