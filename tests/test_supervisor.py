"""``dcgan-serve --processes N``: real worker processes behind one set of ports, one metrics port,
signals passed on, a killed worker replaced (serving/server/supervisor.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest
from dcgan.v1 import inference_pb2 as pb

from serving.client.library import InferenceClient
from serving.processes import Ports, ports_of, spawn_server
from tests.repo_faults import add_version
from tests.test_operator_faults import _repository

pytestmark = pytest.mark.slow  # real processes

WORKER = re.compile(r"worker (\d+) \(pid (\d+)\) listening")
RELOADED = re.compile(r"\[(\d+)\]: reload done")  # a worker's log line, by its pid


class Group:
    """A started ``--processes 2`` supervisor, its ports and its log read line by line."""

    def __init__(self, repository: Path, *flags: str):
        self.process = spawn_server(["--repository", str(repository), "--metrics-port", "0", "--poll-s", "0",
                                     "--processes", "2", *flags], stderr=subprocess.PIPE)
        self.log: list[str] = []
        self.ports: Ports = ports_of(self.process)
        self.workers = {int(i): int(pid) for i, pid in (WORKER.search(line).groups() for line in self.log_until(
            lambda: sum(bool(WORKER.search(line)) for line in self.log) == 2))}

    def log_until(self, done) -> list[str]:
        """Read the group's log until ``done()`` holds; the lines matching WORKER read so far."""
        for line in self.process.stderr:
            self.log.append(line)
            if done():
                return [line for line in self.log if WORKER.search(line)]
        pytest.fail("the supervisor exited; its log:\n" + "".join(self.log[-30:]))

    def metric(self, name: str, **labels: str) -> dict[str, float]:
        """Samples of ``name`` with ``labels``, by worker, from the supervisor's one metrics port."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=10).read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                worker = re.search(r'worker="(\d+)"', line).group(1)
                found[worker] = found.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    def stop(self) -> int:
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            self.process.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_two_workers_share_the_ports_and_report_metrics_on_one_port(serving_repo):
    group = Group(serving_repo)
    try:
        assert group.ports.http is not None and len(set(group.workers.values())) == 2
        for _ in range(40):  # a new connection each time: the kernel spreads them over both workers
            urllib.request.urlopen(f"http://127.0.0.1:{group.ports.http}/v1/models", timeout=30).close()
        counted = group.metric("dcgan_requests_total", method="http.ListModels")
        assert sum(counted.values()) == 40 and set(counted) == {"0", "1"} and min(counted.values()) > 0, counted
        with InferenceClient(f"127.0.0.1:{group.ports.grpc}") as client:
            assert client.sample(2, seed=1).images.shape[0] == 2
    finally:
        assert group.stop() == 0
    assert not any(_alive(pid) for pid in group.workers.values())  # SIGTERM reached, and ended, both


def test_reload_models_on_one_worker_reloads_every_worker(serving_repo, tmp_path):
    repository = _repository(serving_repo, tmp_path)
    group = Group(repository.root)
    try:
        new = add_version(repository, "tiny")
        with InferenceClient(f"127.0.0.1:{group.ports.grpc}") as client:
            client.stub.ReloadModels(pb.ReloadModelsRequest())  # reaches one worker
        reloaded = lambda: {m.group(1) for line in group.log if (m := RELOADED.search(line))}  # noqa: E731
        group.log_until(lambda: len(reloaded()) == 2)  # the supervisor passed a SIGHUP on to both
        loaded = group.metric("dcgan_model_version_loaded", model="tiny", version=str(new))
        assert loaded == {"0": 1.0, "1": 1.0}
    finally:
        assert group.stop() == 0


def test_a_killed_worker_is_replaced_and_the_ports_keep_answering(serving_repo):
    group = Group(serving_repo)
    try:
        os.kill(group.workers[1], signal.SIGKILL)
        group.log_until(lambda: "worker 1 (pid" in group.log[-1] and "listening" in group.log[-1]
                        and str(group.workers[1]) not in group.log[-1])
        assert any("worker 1 (pid %d) exited with status -9: restarting it" % group.workers[1] in line
                   for line in group.log)
        assert set(group.metric("dcgan_model_version_loaded", model="tiny")) == {"0", "1"}
        with InferenceClient(f"127.0.0.1:{group.ports.grpc}") as client:
            assert client.sample(1, seed=1).images.shape[0] == 1
    finally:
        assert group.stop() == 0


def test_a_worker_that_cannot_start_ends_the_group_with_its_reason(serving_repo, tmp_path):
    process = spawn_server(["--repository", str(tmp_path / "missing"), "--metrics-port", "0", "--processes", "2"],
                           stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "dcgan-serve: error: dcgan-serve did not start" in err
    assert "missing" in err  # the worker's own reason, on the same stderr
