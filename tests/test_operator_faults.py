"""Operator mistakes on a real server: broken versions, a vanished or unreadable repository, a port
in use, a SIGHUP during start-up. The server must keep serving what is good, say what is wrong
(a FAILED version with its reason, or a precise status), and load what gets repaired."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from dcgan.v1 import inference_pb2 as pb

from dcgan_core.repository import Repository
from serving.client.library import InferenceClient, NotFoundError
from serving.processes import port_of, ports_of, spawn_server
from tests.conftest import start_server
from tests.repo_faults import BROKEN, add_version, finish_copy, missing_networks, repair

pytestmark = pytest.mark.slow  # real processes (servers, torchrun, Envoy) or long training runs

FAILED, READY = pb.VERSION_STATE_FAILED, pb.VERSION_STATE_READY


def _repository(serving_repo: Path, parent: Path, models=("tiny", "toy")) -> Repository:
    root = parent / "repo"
    root.mkdir(mode=0o755)
    for name in models:
        shutil.copytree(serving_repo / name, root / name)
    (root / "repository.json").write_text(json.dumps({"default_model": "tiny"}))
    return Repository(root)


def _states(client: InferenceClient, model: str) -> dict[int, tuple[int, str]]:
    return {v.version: (v.state, v.error) for v in client.get_model(model).versions}


def _start_process(repository: Path, *flags: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return spawn_server(["--repository", str(repository), "--metrics-port", "-1", "--http-port", "0", *flags], prefix,
                        stderr=subprocess.PIPE)


def _stderr_until(proc: subprocess.Popen, fragment: str) -> str:
    """Read the server's log until a line holding ``fragment`` (the process's own event)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if fragment in line:
            return line
    pytest.fail(f"the server exited without logging {fragment!r}:\n{''.join(seen[-20:])}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.stderr is not None:  # keep the pipe drained: a server blocked writing its log never exits
        threading.Thread(target=proc.stderr.read, daemon=True).start()
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0
    finally:
        proc.kill()


def test_broken_versions_at_start_up_are_failed_and_the_good_one_serves(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path)
    broken = {add_version(repository, "tiny", mutate): (kind, reason) for kind, (mutate, reason) in BROKEN.items()}
    proc = _start_process(repository.root, "--poll-s", "0")
    try:
        with InferenceClient(f"127.0.0.1:{port_of(proc)}") as client:
            assert client.sample(2, seed=1).version == 1
            assert client.sample(2, model="toy", seed=1).images.shape == (2, 2)
            states = _states(client, "tiny")
            for version, (kind, reason) in broken.items():
                assert states[version][0] == FAILED, kind
                assert reason in states[version][1], (kind, states[version][1])
            assert states[1][0] == READY
    finally:
        _stop(proc)


def test_broken_versions_at_run_time_fail_alone_and_a_repaired_one_loads(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path)
    server = start_server(repository.root, poll_s=0)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            for kind, (mutate, reason) in BROKEN.items():
                version = add_version(repository, "tiny", mutate)
                toy = add_version(repository, "toy")  # another model changes in the same scan
                listing = client.stub.ReloadModels(pb.ReloadModelsRequest())
                assert {m.name for m in listing.models} == {"tiny", "toy"}
                state, error = _states(client, "tiny")[version]
                assert state == FAILED and reason in error, (kind, error)
                assert client.sample(1, seed=1).version == 1, kind
                assert client.sample(1, model="toy", seed=1).version == toy, kind
            repair(repository, "tiny", version, source=1)
            client.stub.ReloadModels(pb.ReloadModelsRequest())
            assert _states(client, "tiny")[version][0] == READY
            assert client.sample(1, seed=1).version == version
    finally:
        server.stop(grace=1)


def test_a_half_copied_version_is_retried_by_polling_once_complete(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path, models=("tiny",))
    server = start_server(repository.root, poll_s=0.05)
    store = server.store
    try:
        version = add_version(repository, "tiny", missing_networks)
        assert store.wait_until(lambda: version in store.models()["tiny"].versions, 30)
        entry = store.models()["tiny"].versions[version]
        assert entry.state == "FAILED" and "generator.onnx is missing" in entry.error
        finish_copy(repository, "tiny", version)
        assert store.wait_until(lambda: store.models()["tiny"].versions[version].state == "READY", 30)
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            assert client.sample(1, seed=1).version == version
    finally:
        server.stop(grace=1)


def test_a_half_copied_version_is_retried_on_sighup(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path, models=("tiny",))
    proc = _start_process(repository.root, "--poll-s", "0")
    try:
        with InferenceClient(f"127.0.0.1:{port_of(proc)}") as client:
            version = add_version(repository, "tiny", missing_networks)
            proc.send_signal(signal.SIGHUP)
            _stderr_until(proc, "reload done")
            assert _states(client, "tiny")[version][0] == FAILED
            finish_copy(repository, "tiny", version)
            proc.send_signal(signal.SIGHUP)
            _stderr_until(proc, "reload done")
            assert _states(client, "tiny")[version][0] == READY
            assert client.sample(1, seed=1).version == version
    finally:
        _stop(proc)


def test_vanished_repository_and_bad_repository_json_get_precise_statuses(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path)
    server = start_server(repository.root, poll_s=0)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            moved = tmp_path / "moved"
            repository.root.rename(moved)
            with pytest.raises(grpc.RpcError) as error:
                client.stub.ReloadModels(pb.ReloadModelsRequest())
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "does not exist; still serving the versions loaded before" in error.value.details()
            assert client.sample(1, seed=1).version == 1  # what is loaded keeps serving
            moved.rename(repository.root)

            (repository.root / "repository.json").write_text("{not json")
            add_version(repository, "toy")
            with pytest.raises(grpc.RpcError) as error:
                client.stub.ReloadModels(pb.ReloadModelsRequest())
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "repository.json" in error.value.details() and "default_model" in error.value.details()
            assert client.sample(1, seed=1).model == "tiny"  # the previous default stays
            assert client.get_model("toy").latest_version == 2  # the rest was reloaded
            (repository.root / "repository.json").write_text(json.dumps({"default_model": "toy"}))
            assert client.stub.ReloadModels(pb.ReloadModelsRequest()).default_model == "toy"
    finally:
        server.stop(grace=1)


def _without_permission_override() -> list[str]:
    """A command prefix under which file permissions bind: root keeps its uid (so it can still run
    the interpreter) but loses the capabilities that let it read any folder."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a folder unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_unreadable_version_and_repository_folders(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path, models=("tiny",))
    version = add_version(repository, "tiny")
    repository.version_dir("tiny", version).chmod(0o000)
    proc = _start_process(repository.root, "--poll-s", "0", prefix=tuple(_without_permission_override()))
    try:
        with InferenceClient(f"127.0.0.1:{port_of(proc)}") as client:
            state, error = _states(client, "tiny")[version]
            assert state == FAILED and "Permission denied" in error
            assert client.sample(1, seed=1).version == 1
            repository.root.chmod(0o000)
            with pytest.raises(grpc.RpcError) as failure:
                client.stub.ReloadModels(pb.ReloadModelsRequest())
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot be read: Permission denied" in failure.value.details()
            assert client.sample(1, seed=1).version == 1
            assert client.sample(1, seed=1, version=1).version == 1
            with pytest.raises(NotFoundError, match="version 999 is not loaded .*Permission denied"):
                client.sample(1, seed=1, version=999)  # was INTERNAL: Path.is_dir() raised EACCES
            repository.root.chmod(0o755)
            repository.version_dir("tiny", version).chmod(0o755)
            client.stub.ReloadModels(pb.ReloadModelsRequest())
            assert client.sample(1, seed=1).version == version
    finally:
        repository.root.chmod(0o755)
        repository.version_dir("tiny", version).chmod(0o755)
        _stop(proc)


def test_a_port_already_in_use_is_refused(serving_repo, tmp_path):
    server = start_server(serving_repo, poll_s=0)
    try:
        done = subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(serving_repo),
                               "--host", "127.0.0.1", "--port", str(server.port), "--metrics-port", "-1",
                               "--http-port", "0"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert f"cannot listen on 127.0.0.1:{server.port}: the port is in use" in done.stderr
    finally:
        server.stop(grace=1)


def test_with_reuse_port_processes_share_the_grpc_and_http_ports_and_each_serves(serving_repo):
    """--reuse-port: a second process binds the same ports (SO_REUSEPORT) instead of failing; the
    kernel spreads connections over both (each counts calls in its own metrics), and the port keeps
    answering when one stops."""
    flags = ["--repository", str(serving_repo), "--metrics-port", "0", "--poll-s", "0", "--reuse-port"]
    first = spawn_server(flags, stderr=subprocess.DEVNULL)
    ports = ports_of(first)
    second = spawn_server([*flags, "--port", str(ports.grpc), "--http-port", str(ports.http)],
                          stderr=subprocess.DEVNULL)
    try:
        seconds = ports_of(second)
        assert (seconds.grpc, seconds.http) == (ports.grpc, ports.http)
        for process in (first, second):
            threading.Thread(target=process.stdout.read, daemon=True).start()
        for _ in range(40):  # a new connection each time
            urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v1/models", timeout=30).close()
        counted = [_calls(metrics, "http.ListModels") for metrics in (ports.metrics, seconds.metrics)]
        assert sum(counted) == 40 and min(counted) > 0, counted
        _stop(first)
        with InferenceClient(f"127.0.0.1:{ports.grpc}") as client:
            assert client.sample(2, seed=1).images.shape[0] == 2
    finally:
        for process in (first, second):
            if process.poll() is None:
                _stop(process)


def _calls(metrics_port: int, method: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dcgan_requests_total{") and f'method="{method}"' in line)


def test_metrics_listen_on_the_grpc_host_only(serving_repo):
    server = start_server(serving_repo, poll_s=0)  # host 127.0.0.1
    try:
        socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):  # another loopback address: bound to 0.0.0.0 it would answer
            socket.create_connection(("127.0.0.2", server.metrics_port), timeout=5)
    finally:
        server.stop(grace=1)


def test_sighup_during_start_up_does_not_kill_the_server(serving_repo):
    proc = _start_process(serving_repo, "--poll-s", "0")
    try:
        _stderr_until(proc, "starting: loading models")
        proc.send_signal(signal.SIGHUP)  # the models are still loading
        port = port_of(proc)
        _stderr_until(proc, "reload done")  # the remembered reload ran once the server was up
        with InferenceClient(f"127.0.0.1:{port}") as client:
            assert client.sample(1, seed=1).version == 1
    finally:
        _stop(proc)
