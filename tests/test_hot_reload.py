"""Publishing while clients call: new versions swap in with zero failed calls, broken ones never do."""

import json
import shutil
import threading
import urllib.request

import pytest
from dcgan.v1 import inference_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dcgan_core.repository import Repository
from serving.client.library import ClientError, InferenceClient
from tests.conftest import start_server
from training.export import export_run


def _publish_broken(repository: Repository, name: str) -> int:
    """A new version whose generator file no longer matches its manifest's sha256."""
    latest = max(repository.versions(name))
    version = latest + 1
    staging = repository.root / name / ".staging-broken"
    shutil.copytree(repository.version_dir(name, latest), staging)
    for path in staging.iterdir():
        path.chmod(0o644)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["version"] = version
    (staging / "manifest.json").write_text(json.dumps(manifest))
    (staging / "generator.onnx").write_bytes(b"not an onnx file")
    staging.rename(repository.version_dir(name, version))
    return version


class Calls:
    """Versions seen by the callers, with a condition to wait for more of them (no sleeps)."""

    def __init__(self):
        self.seen: list[int] = []
        self._cond = threading.Condition()

    def add(self, version: int) -> None:
        with self._cond:
            self.seen.append(version)
            self._cond.notify_all()

    def wait_more(self, count: int, timeout: float = 60) -> None:
        target = len(self.seen) + count
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.seen) >= target, timeout), "callers stalled"


@pytest.fixture()
def live(tiny_run, tmp_path):
    repository = Repository(tmp_path / "repo")
    export_run(tiny_run, repository, "tiny")
    server = start_server(repository.root, poll_s=0.2, version_policy="latest:1")
    yield repository, server
    server.stop(grace=1)


def test_publish_new_then_broken_version_under_traffic(live, tiny_run):
    repository, server = live
    store, target = server.store, f"127.0.0.1:{server.port}"
    calls, errors, stop = Calls(), [], threading.Event()

    def caller() -> None:
        with InferenceClient(target, timeout=30) as client:
            while not stop.is_set():
                try:
                    calls.add(client.sample(2, seed=1).version)
                except ClientError as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        calls.wait_more(20)
        assert export_run(tiny_run, repository, "tiny").version == 2
        assert store.wait_until(lambda: store.models()["tiny"].ready() == [2], 60)
        calls.wait_more(20)
        broken = _publish_broken(repository, "tiny")
        assert store.wait_until(lambda: broken in store.models()["tiny"].versions, 60)
        with InferenceClient(target) as client:
            info = client.get_model("tiny")
            states = {v.version: (v.state, v.error) for v in info.versions}
            assert states[2][0] == pb.VERSION_STATE_READY and info.latest_version == 2
            assert states[broken][0] == pb.VERSION_STATE_FAILED and "sha256" in states[broken][1]
            assert 1 not in states  # latest:1 unloaded it once version 2 was ready
        switched = len(calls.seen)
        calls.wait_more(20)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    seen = calls.seen
    assert seen[0] == 1 and set(seen) == {1, 2}
    assert set(seen[switched + 8 :]) == {2}  # after the switch (and 4 callers' stragglers) only version 2
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'dcgan_model_load_failures_total{model="tiny"} 1.0' in metrics


def test_reload_rpc_and_removed_versions(live, tiny_run):
    repository, server = live
    server.watcher.stop()  # only explicit reloads from here on
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        export_run(tiny_run, repository, "tiny")
        assert client.sample(1, seed=1).version == 1  # not rescanned yet
        listing = client.stub.ReloadModels(pb.ReloadModelsRequest())
        assert [v.version for v in listing.models[0].versions] == [2]
        assert client.sample(1, seed=1).version == 2
        shutil.rmtree(repository.version_dir("tiny", 2))
        client.stub.ReloadModels(pb.ReloadModelsRequest())
        assert client.sample(1, seed=1).version == 1  # back to what is on disk
        health = health_pb2_grpc.HealthStub(client.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="tiny")).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_rescan_that_ends_after_shutdown_serves_nothing_new(tiny_run, tmp_path):
    """A SIGHUP or ReloadModels rescan still loading when the server closes its store must not
    publish what it loaded: its batchers would outlive the shutdown."""
    from serving.server.config import ServeConfig
    from serving.server.store import ModelStore

    repository = Repository(tmp_path / "repo")
    export_run(tiny_run, repository, "tiny")
    store = ModelStore(repository, ServeConfig(repository=str(repository.root), version_policy="all").validate())
    store.load()
    store.close()
    export_run(tiny_run, repository, "tiny")
    assert store.rescan() is False
    assert store.models()["tiny"].ready() == [1]


def test_a_pin_rolls_back_running_servers_and_an_unpin_returns(live, tiny_run):
    """dcgan-repo pin: the server serves the pinned version alone after its next rescan, and
    says so in GetModel; unpin returns to the server's policy. No files move."""
    from dcgan_core.repository_cli import main as repo_main

    repository, server = live
    store = server.store
    assert export_run(tiny_run, repository, "tiny").version == 2
    assert store.wait_until(lambda: store.models()["tiny"].ready() == [2], 60)
    assert repo_main(["--repository", str(repository.root), "pin", "tiny", "1"]) == 0
    assert store.wait_until(lambda: store.models()["tiny"].ready() == [1], 60)
    with InferenceClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        info = client.stub.GetModel(pb.GetModelRequest(model="tiny")).model
        assert (info.version_policy, info.latest_version) == ("specific:1", 1)
        assert client.sample(1, seed=0).version == 1
        assert repo_main(["--repository", str(repository.root), "unpin", "tiny"]) == 0
        assert store.wait_until(lambda: store.models()["tiny"].ready() == [2], 60)
        listed = {m.name: m for m in client.stub.ListModels(pb.ListModelsRequest()).models}
        assert (listed["tiny"].version_policy, listed["tiny"].latest_version) == ("latest:1", 2)
    assert repository.versions("tiny") == [1, 2]
