"""SIGTERM on a real dcgan-serve process: NOT_SERVING, UNAVAILABLE for new calls, drain, exit 0."""

import concurrent.futures
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from dcgan.v1 import inference_pb2 as pb
from dcgan.v1 import inference_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client.library import InferenceClient, UnavailableError
from serving.processes import start_server
from tests.conftest import wait_for

pytestmark = pytest.mark.slow  # real processes (servers, torchrun, Envoy) or long training runs

ABORTED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)  # calls the end of a grace period cuts off


def _start(serving_repo, *flags) -> tuple[subprocess.Popen, int]:
    process, ports = start_server(["--repository", str(serving_repo), "--metrics-port", "0", *flags],
                                  stderr=subprocess.PIPE)
    return process, ports.grpc


def _log_line(proc: subprocess.Popen, fragment: str) -> str:
    for line in proc.stderr:
        if fragment in line:
            return line
    pytest.fail(f"the server never logged {fragment!r}")


def _drained(proc: subprocess.Popen) -> concurrent.futures.Future:
    """The rest of the server's stderr, read from now on in a thread (its text once it closes)."""
    rest: concurrent.futures.Future = concurrent.futures.Future()
    threading.Thread(target=lambda: rest.set_result(proc.stderr.read()), daemon=True).start()
    return rest


def _queued(metrics_port: int, model: str = "tiny") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    line = next(row for row in text.splitlines()
                if row.startswith(f'dcgan_queue_depth{{model="{model}",network="generator"}}'))
    return float(line.rsplit(" ", 1)[1])


def test_sigterm_drains_in_flight_calls(serving_repo):
    # A 1.5 s batching window keeps the first call in the server's queue while we send SIGTERM.
    proc, port = _start(serving_repo, "--max-queue-delay-ms", "1500", "--max-batch-size", "1024", "--grace-s", "10")
    metrics_port = int(_log_line(proc, "Prometheus metrics on").rsplit(" ", 1)[1])
    target = f"127.0.0.1:{port}"
    try:
        with InferenceClient(target) as client, grpc.insecure_channel(target) as channel:
            expected = client.sample(3, seed=4).images  # (also waits out one batching window)
            in_flight = client.stub.Sample.future(pb.SampleRequest(count=3, seed=4))
            assert wait_for(lambda: _queued(metrics_port) == 1)
            statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(UnavailableError, match="shutting down"):
                client.sample(1, seed=1)
            answer = in_flight.result(timeout=10)
            assert np.frombuffer(answer.samples.data, np.uint8).tobytes() == expected.tobytes()
        assert proc.wait(20) == 0
    finally:
        proc.kill()


def test_sigterm_with_long_calls_in_flight_exits_0(serving_repo):
    """The grace period ends while batches still run: the calls are aborted, the process waits
    for the batches inside onnxruntime, then exits 0 (it aborted with SIGABRT in 3 of 38 tries)."""
    proc, port = _start(serving_repo, "--grace-s", "0.1", "--poll-s", "0", "--max-batch-size", "256")
    metrics_port = int(_log_line(proc, "Prometheus metrics on").rsplit(" ", 1)[1])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.SampleRequest(model="mnist-dcgan", count=1024, seed=1, include_scores=True)
            calls = [stub.Sample.future(request) for _ in range(8)]
            assert wait_for(lambda: _queued(metrics_port, "mnist-dcgan") > 0)
            rest = _drained(proc)  # a server blocked on a full stderr pipe would never exit
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            for call in calls:
                assert call.exception(10) is None or call.code() in ABORTED
        assert "terminate called" not in rest.result(10)
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
            assert client.sample(1, seed=1).version == 1  # no polling: nothing changes by itself
            proc.send_signal(signal.SIGHUP)
            _log_line(proc, "reload done")
            assert client.sample(1, seed=1).version == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()


def test_closing_the_store_leaves_no_batch_running_even_for_a_held_version(serving_repo):
    """At shutdown a call may still hold its version (aborted after the grace period): closing
    must still stop its batchers and wait for the batch inside onnxruntime, or the interpreter
    exits under it and the process aborts."""
    from dcgan_core.repository import Repository
    from serving.server.batcher import Stopped
    from serving.server.config import ServeConfig
    from serving.server.store import ModelStore

    config = ServeConfig(repository=str(serving_repo), max_batch_size=1024).validate()
    store = ModelStore(Repository(serving_repo), config)
    store.load()
    with store.use("mnist-dcgan", 0) as loaded:
        z = np.random.default_rng(0).standard_normal((1024, loaded.manifest.latent_size), dtype=np.float32)
        futures = [loaded.generator.submit(z) for _ in range(4)]  # seconds of work for two workers
        store.close()
        assert all(future.done() for future in futures)  # none running
    for future in futures:  # run to the end, or failed as Stopped before it ran
        assert isinstance(future.exception(), Stopped) or future.result().shape == (1024, *loaded.manifest.sample_shape)
