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
    assert set(SERVICES) == {"server", "trainer", "prometheus"}
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
    from serving.server import build_parser

    _, text = _dockerfile("server")
    assert 'ENTRYPOINT ["python", "-m", "serving.server"]' in text
    importlib.import_module("serving.server")
    command = SERVICES["server"]["command"]
    args = build_parser().parse_args(command)
    assert args.repository == "/models"
    cmd_default = re.search(r"^CMD\s+(\[.*\])$", text, re.MULTILINE).group(1)
    build_parser().parse_args(yaml.safe_load(cmd_default))


def test_ports_agree_between_server_healthcheck_and_prometheus():
    server = SERVICES["server"]
    command = server["command"]
    grpc_port, metrics_port = _flag(command, "--port"), _flag(command, "--metrics-port")
    assert f"{grpc_port}:{grpc_port}" in server["ports"] and f"{metrics_port}:{metrics_port}" in server["ports"]
    probe = server["healthcheck"]["test"]
    assert probe[:4] == ["CMD", "python", "-m", "serving.healthcheck"]
    from serving.healthcheck import main  # noqa: F401  (the probe's module exists)

    assert _flag(probe, "--target").endswith(f":{grpc_port}")
    scrape = yaml.safe_load((ROOT / "serving" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"server:{metrics_port}"]


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
    env = SERVICES["trainer"]["environment"]
    mounts = [v.split(":")[1] for v in SERVICES["trainer"]["volumes"]]
    assert env["DATA"] in mounts and env["REPOSITORY"] in mounts and env["RUN"].startswith("/runs")
