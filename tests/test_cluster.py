"""Serving replicas behind a real Envoy, and gRPC's round_robin over replicas: real processes.

A score job through Envoy over 3 replicas keeps going while a new model version is published,
one replica is drained by SIGTERM and another is killed with calls in flight; the job itself
does not retry (patience 0), so every call it saw succeed was Envoy's doing.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from dcgan_core.repository import Repository
from serving.client import jobs
from serving.client.library import InferenceClient
from serving.cluster import (
    Upstreams,
    compose_config,
    envoy_config,
    healthy_upstreams,
    local_cluster,
    upstream_health,
)
from serving.processes import Ports, ports_of, spawn_server
from tests.conftest import ROOT, wait_for
from tests.repo_faults import add_version

pytestmark = pytest.mark.slow  # real processes (servers, torchrun, Envoy) or long training runs


def envoy_binary() -> str:
    import shutil
    import sys

    found = Path(sys.executable).with_name("envoy")
    return str(found) if found.exists() else (shutil.which("envoy") or pytest.skip("no envoy binary"))


def test_the_committed_envoy_config_is_the_rendered_one_and_envoy_accepts_both(tmp_path):
    committed = ROOT / "deploy" / "envoy.yaml"
    assert committed.read_text() == compose_config()
    static = tmp_path / "static.yaml"
    upstreams = Upstreams(addresses=(("127.0.0.1", Ports(1, 3)), ("127.0.0.1", Ports(2, 4))))
    static.write_text(yaml.safe_dump(envoy_config(upstreams, port=0, admin_port=0, http_port=0)))
    for config in (committed, static):
        checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True,
                                 text=True, timeout=60)
        assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr


@pytest.fixture()
def repository(tmp_path, tiny_run) -> Repository:
    from training.export import export_run

    repository = Repository(tmp_path / "repo")
    export_run(tiny_run, repository, "tiny")
    return repository


@pytest.fixture()
def cluster(repository, tmp_path):
    serve = ["--repository", str(repository.root), "--poll-s", "0.1", "--grace-s", "5"]
    with local_cluster(3, tmp_path, serve) as started:  # Envoy on ports it picks: no port race
        assert healthy_upstreams(started.admin_port) == 3
        yield started


def _inputs(folder: Path, count: int) -> list[str]:
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    paths = []
    for index, image in enumerate(pixels):
        path = folder / f"{index:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def _out_of_rotation(admin_port: int, replica_port: int) -> bool:
    """Whether Envoy stopped routing to this replica. Counting the healthy ones instead would flake:
    outlier detection may also eject a live replica for a moment."""
    return upstream_health(admin_port).get(replica_port, "healthy") != "healthy"


class Paced:
    """The job's client, which runs an operator action before given calls: the action happens
    while the job's other calls are in flight, at a known point of the job. Actions run one after
    another in call order (the job's threads would otherwise start the drain while the publish
    still checks every replica)."""

    def __init__(self, client: InferenceClient, actions: dict):
        self.client, self.calls, self.lock = client, 0, threading.Lock()
        self.actions = dict(sorted(actions.items()))
        self.done = {call: threading.Event() for call in self.actions}

    def score(self, *args, **kwargs):
        with self.lock:
            call, self.calls = self.calls, self.calls + 1
        if call in self.actions:
            earlier = [c for c in self.actions if c < call]
            if earlier:
                self.done[earlier[-1]].wait()
            try:
                self.actions[call]()
            finally:
                self.done[call].set()
        return self.client.score(*args, **kwargs)


def test_a_score_job_through_envoy_survives_a_new_version_a_drain_and_a_kill(cluster, repository, tmp_path):
    envoy_port, admin_port, replicas = cluster.port, cluster.admin_port, cluster.replicas
    inputs = _inputs(tmp_path / "images", 2000)
    direct = [InferenceClient(f"127.0.0.1:{ports.grpc}") for _, ports in replicas]

    def publish() -> None:
        add_version(repository, "tiny")
        assert wait_for(lambda: all(c.get_model("tiny").latest_version == 2 for c in direct))

    def drain() -> None:  # SIGTERM: health NOT_SERVING, new calls refused (Envoy retries them), exit 0
        replicas[0][0].send_signal(signal.SIGTERM)
        assert replicas[0][0].wait(timeout=30) == 0
        assert wait_for(lambda: _out_of_rotation(admin_port, replicas[0][1].grpc))

    def kill() -> None:
        replicas[1][0].send_signal(signal.SIGKILL)
        replicas[1][0].wait(timeout=30)
        assert wait_for(lambda: _out_of_rotation(admin_port, replicas[1][1].grpc))

    output = tmp_path / "scores.csv"
    with InferenceClient(f"127.0.0.1:{envoy_port}", timeout=30) as client:
        paced = Paced(client, {30: publish, 60: drain, 90: kill})
        summary = jobs.score_job(paced, inputs, output, "tiny", batch=16, concurrency=4, patience_s=0,
                                 progress=False)
    assert paced.calls == 125 and summary.errors == 0
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(inputs)  # every input exactly once
    assert all(row["error"] == "" and 0.0 <= float(row["probability"]) <= 1.0 for row in rows)
    versions = [int(row["version"]) for row in rows]
    assert set(versions) == {1, 2} and versions[-1] == 2
    assert replicas[2][0].poll() is None  # the survivor served the end of the job
    for client in direct:
        client.close()


def test_the_open_inference_protocol_goes_through_envoy_too(cluster):
    """Envoy routes every gRPC service on the port: OIP calls reach the replicas like dcgan.v1's."""
    from dcgan.oip import grpc_predict_v2_pb2 as oip
    from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    envoy_port = cluster.port
    request = oip.ModelInferRequest(model_name="tiny", outputs=[{"name": "images"}])
    request.parameters["seed"].int64_param, request.parameters["count"].int64_param = 4, 3
    with grpc.insecure_channel(f"127.0.0.1:{envoy_port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(oip.ModelReadyRequest(name="tiny")).ready
        reply = stub.ModelInfer(request)
    with InferenceClient(f"127.0.0.1:{envoy_port}", timeout=30) as client:
        expected = client.sample(3, seed=4, model="tiny").images
    assert reply.raw_output_contents[0] == expected.tobytes()


def test_http_goes_through_envoy_to_the_replicas_and_a_stopped_one_leaves_its_rotation(cluster):
    """Envoy's HTTP listener: OIP REST and the plain API reach the replicas (same bytes as gRPC);
    a replica that stops fails its HTTP health check and the others answer every call."""
    started = cluster
    body = json.dumps({"parameters": {"seed": 4, "count": 3},
                       "outputs": [{"name": "images", "parameters": {"binary_data": True}}]}).encode()
    url = f"http://127.0.0.1:{started.ports.http}"
    request = urllib.request.Request(f"{url}/v2/models/tiny/infer", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        header_length = int(answer.headers["Inference-Header-Content-Length"])
        pixels = answer.read()[header_length:]
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as answer:
        assert [m["name"] for m in json.loads(answer.read())["models"]] == ["tiny"]
    with urllib.request.urlopen(f"{url}/", timeout=30) as answer:  # the playground, and what it calls
        assert b"dcgan playground" in answer.read()
    with urllib.request.urlopen(f"{url}/v1/models/tiny/samples?count=2&seed=4", timeout=30) as answer:
        assert len(json.loads(answer.read())["samples"]) == 2
    with InferenceClient(f"127.0.0.1:{started.port}", timeout=30) as client:
        assert pixels == client.sample(3, seed=4, model="tiny").images.tobytes()
    process, ports = started.replicas[0]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert wait_for(lambda: upstream_health(started.admin_port, "dcgan-http").get(ports.http) != "healthy")
    for _ in range(6):  # round robin over the other two: every call answered
        with urllib.request.urlopen(f"{url}/v2/models/tiny/ready", timeout=30) as answer:
            assert answer.status == 200


def test_every_replica_gives_the_same_bytes_and_round_robin_reaches_them_all(repository, tmp_path):
    started, metrics_ports = [], []
    try:  # replicas started before one that fails are stopped too
        for _ in range(3):
            replica, metrics_port = _replica_with_metrics(repository)
            started.append(replica)
            metrics_ports.append(metrics_port)
        addresses = [f"127.0.0.1:{port}" for _, port in started]
        samples = []
        for address in addresses:
            with InferenceClient(address) as client:
                samples.append(client.sample(8, model="tiny", seed=12, encoding="png").png)
        assert samples[0] == samples[1] == samples[2]
        with InferenceClient(",".join(addresses)) as balanced:
            for _ in range(30):
                assert balanced.sample(2, model="tiny", seed=12, encoding="png").png == samples[0][:2]
        for port in metrics_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            counted = [line for line in text.splitlines()
                       if line.startswith('dcgan_requests_total{code="OK",method="Sample",model="tiny"}')]
            assert counted and float(counted[0].split()[-1]) >= 5, counted  # each got about 10 of 30
    finally:
        for process, _ in started:
            process.send_signal(signal.SIGTERM)
        for process, _ in started:
            process.wait(timeout=30)


def _replica_with_metrics(repository: Repository) -> tuple[tuple[subprocess.Popen, int], int]:
    """A replica on free gRPC and metrics ports, both read back from the server."""
    process = spawn_server(["--repository", str(repository.root), "--poll-s", "0", "--metrics-port", "0"],
                           stderr=subprocess.DEVNULL)
    ports = ports_of(process)
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep it drained
    return (process, ports.grpc), ports.metrics


def _cluster_process(repository: Repository, work_dir: Path) -> tuple[subprocess.Popen, int]:
    """``dcgan-cluster --replicas 1`` as an operator starts it (on ports Envoy picks); returns once
    Envoy routes to it, with Envoy's port."""
    proc = subprocess.Popen([sys.executable, "-m", "serving.cluster", "--replicas", "1", "--port", "0",
                             "--http-port", "0", "--admin-port", "0", "--work-dir", str(work_dir), "--",
                             "--repository", str(repository.root), "--poll-s", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "dcgan-cluster: Envoy on port" not in line:
        proc.kill()
        pytest.fail(f"dcgan-cluster did not start: {line!r}")
    return proc, int(line.split("Envoy on port ", 1)[1].split()[0])


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's zombie may wait for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sighup_makes_every_replica_rescan_and_the_cluster_keeps_running(repository, tmp_path):
    proc, port = _cluster_process(repository, tmp_path / "cluster")
    try:
        with InferenceClient(f"127.0.0.1:{port}") as client:
            assert client.sample(1, model="tiny", seed=1).version == 1
            add_version(repository, "tiny")
            proc.send_signal(signal.SIGHUP)  # what a closed terminal sends; it killed the cluster, not its children
            assert wait_for(lambda: client.get_model("tiny").latest_version == 2)
            assert client.sample(1, model="tiny", seed=1).version == 2
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_a_killed_cluster_takes_its_replicas_and_envoy_with_it(repository, tmp_path):
    proc, port = _cluster_process(repository, tmp_path / "cluster")
    children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    assert len(children) == 2  # the replica and Envoy
    proc.kill()
    proc.wait(timeout=30)
    assert wait_for(lambda: not any(_running(pid) for pid in children))


def test_several_targets_must_be_addresses():
    from serving.client.library import resolve_target

    assert resolve_target("127.0.0.1:1,127.0.0.1:2")[0] == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert resolve_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    assert resolve_target("dns:///server:50051")[1]  # round_robin over what the name resolves to
    assert resolve_target("localhost:50051") == ("localhost:50051", [])
    with pytest.raises(ValueError, match="use one dns:///NAME:PORT"):
        resolve_target("a:1,b:2")
