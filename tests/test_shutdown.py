"""SIGTERM on a real dcgan-serve process: NOT_SERVING, UNAVAILABLE for new calls, drain, exit 0."""

import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import InferenceClient, UnavailableError


def _start(serving_repo, *flags) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--repository", str(serving_repo),
                             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on port" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line}{proc.stderr.read()}")
    return proc, int(line.rsplit(" ", 1)[1])


def test_sigterm_drains_in_flight_calls(serving_repo):
    # A 1.5 s batching window keeps the first call in flight while we send SIGTERM.
    proc, port = _start(serving_repo, "--max-queue-delay-ms", "1500", "--max-batch-size", "1024", "--grace-s", "10")
    target = f"127.0.0.1:{port}"
    try:
        with InferenceClient(target) as client:
            expected = client.sample(3, seed=4).images  # (also waits out one batching window)
            result = {}
            in_flight = threading.Thread(target=lambda: result.update(r=client.sample(3, seed=4)))
            in_flight.start()
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(target) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError, match="shutting down"):
                client.sample(1, seed=1)
            in_flight.join(10)
            assert np.array_equal(result["r"].images, expected)
        assert proc.wait(20) == 0
    finally:
        proc.kill()


def test_bad_startup_flags_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(tmp_path / "none"),
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "model repository" in done.stderr and "does not exist" in done.stderr
    done = subprocess.run([sys.executable, "-m", "serving.server", "--max-batch-size", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "max_batch_size = 0 must be >= 1" in done.stderr


def test_sighup_rescans_the_repository(tiny_run, tmp_path):
    from dcgan_core.repository import Repository
    from training.export import export_run

    repository = Repository(tmp_path / "repo")
    export_run(tiny_run, repository, "tiny")
    proc, port = _start(repository.root, "--poll-s", "0")
    try:
        with InferenceClient(f"127.0.0.1:{port}") as client:
            assert client.sample(1, seed=1).version == 1
            export_run(tiny_run, repository, "tiny")
            time.sleep(0.5)
            assert client.sample(1, seed=1).version == 1  # no polling: nothing changes by itself
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while client.sample(1, seed=1).version != 2:
                assert time.monotonic() < deadline, "SIGHUP did not load version 2"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
