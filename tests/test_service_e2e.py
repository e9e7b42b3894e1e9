"""The inference service over real gRPC on a free localhost port, with real ONNX files."""

import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from dcgan.v1 import inference_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dcgan_core import images
from dcgan_core.latents import latents
from serving.client.library import (
    DeadlineExceededError,
    InferenceClient,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tests.conftest import ROOT, start_server, wait_for


@pytest.fixture(scope="module")
def server(serving_repo):
    server = start_server(serving_repo, max_count=512, max_message_mb=1, max_queue_delay_ms=2)
    yield server
    server.stop(grace=1)


def test_seeded_sampling_is_reproducible(client):
    a = client.sample(16, seed=7)
    b = client.sample(16, seed=7)
    c = client.sample(16, seed=8)
    assert (a.model, a.version, a.seed) == ("tiny", 1, 7)
    assert a.images.dtype == np.uint8 and a.images.shape == (16, 1, 28, 28)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.images.tobytes() != c.images.tobytes()
    drawn = client.sample(2)
    assert drawn.seed != 0 and client.sample(2, seed=drawn.seed).images.tobytes() == drawn.images.tobytes()


def test_calls_without_deadline(server):
    with InferenceClient(f"127.0.0.1:{server.port}", timeout=None) as patient:
        assert patient.sample(2, seed=1).images.shape == (2, 1, 28, 28)
        assert patient.score(np.zeros((1, 1, 28, 28), np.uint8)).logits.shape == (1,)


def test_explicit_latents_match_onnxruntime_on_the_manifest_file(client, serving_repo):
    z = latents(99, 5, 8)
    served = client.sample(latents=z, encoding="float32")
    session = ort.InferenceSession(str(serving_repo / "tiny" / "1" / "generator.onnx"),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(served.images, session.run(None, {"z": z})[0])
    seeded = client.sample(5, seed=99, encoding="float32")
    np.testing.assert_array_equal(seeded.images, served.images)  # the documented seed algorithm


def test_encodings_agree(client):
    raw = client.sample(4, seed=1, encoding="uint8").images
    png = client.sample(4, seed=1, encoding="png")
    floats = client.sample(4, seed=1, encoding="float32").images
    assert len(png.png) == 4 and np.array_equal(png.images, raw)
    assert np.array_equal(images.model_to_uint8(floats), raw)


def test_stream_chunks_equal_one_sample_call(client):
    whole = client.sample(50, seed=3).images
    chunks = list(client.sample_stream(50, seed=3, chunk_size=16))
    assert [c.offset for c in chunks] == [0, 16, 32, 48]
    assert np.array_equal(np.concatenate([c.images for c in chunks]), whole)


def test_include_scores_equals_scoring_the_samples(client):
    sampled = client.sample(6, seed=5, encoding="float32", include_scores=True)
    scored = client.score(sampled.images)
    np.testing.assert_allclose(sampled.logits, scored.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sampled.probabilities, 1 / (1 + np.exp(-sampled.logits)), rtol=1e-5)


def test_score_png_and_raw_agree(client):
    pixels = client.sample(3, seed=2).images
    blobs = [images.encode_png(p) for p in pixels]
    from_png = client.score(blobs)
    from_raw = client.score(pixels)
    np.testing.assert_allclose(from_png.logits, from_raw.logits, rtol=1e-6)
    assert from_png.probabilities.shape == (3,) and np.all((from_png.probabilities > 0) & (from_png.probabilities < 1))


def test_toy_model_samples_points(client):
    points = client.sample(10, model="toy", seed=1)
    assert points.images.dtype == np.float32 and points.images.shape == (10, 2)
    assert client.score(points.images, model="toy").logits.shape == (10,)


def test_real_mnist_digits_score_above_noise(client, mnist_dir):
    if not (ROOT / "exported" / "mnist-dcgan").is_dir():
        pytest.fail("the committed default model exported/mnist-dcgan is missing")
    from training.data import load_mnist

    digits = load_mnist(mnist_dir, "test")[0][:64]
    noise = np.random.default_rng(0).integers(0, 256, digits.shape, dtype=np.uint8)
    real = client.score(digits, model="mnist-dcgan").probabilities
    fake = client.score(noise, model="mnist-dcgan").probabilities
    assert np.median(real) > np.median(fake)
    assert (real[:, None] > fake[None, :]).mean() > 0.9


def test_the_default_models_anomaly_score_puts_real_digits_below_far_images(client, mnist_dir):
    """The committed default model's encoder: unseen test digits spread over the calibrated
    percentiles (the first 5000 set them), while noise, blank white and inverted digits, which the
    discriminator alone rates as real or near it, all score past every real digit."""
    from training.data import load_mnist

    digits = load_mnist(mnist_dir, "test")[0][5000:5200]
    far = {"noise": np.random.default_rng(0).integers(0, 256, digits.shape, dtype=np.uint8),
           "blank white": np.full_like(digits, 255), "inverted": 255 - digits}
    real = client.score(digits, model="mnist-dcgan", anomaly=True)
    assert 0.35 < real.anomaly_percentile.mean() < 0.65
    for kind, pixels in far.items():
        other = client.score(pixels, model="mnist-dcgan", anomaly=True)
        assert other.anomaly.min() > real.anomaly.max(), kind
        assert other.anomaly_percentile.min() == 1.0, kind


@pytest.mark.parametrize("call, message", [
    (lambda c: c.sample(0, seed=1), "count must be in 1..512, got 0"),
    (lambda c: c.sample(513, seed=1), "count must be in 1..512, got 513"),
    (lambda c: c.sample(latents=np.zeros((2, 5), np.float32)), "latents have shape [2, 5]; model 'tiny' expects [count, 8]"),
    (lambda c: c.sample(latents=np.full((2, 8), np.nan, np.float32)), "latents[0, 0] = nan: entries must be finite (no NaN or infinite values)"),
    (lambda c: c.sample(latents=np.full((1, 8), 3e38, np.float32)), "latents[0, 0] = 3.0000000054977558e+38: entries must"),
    (lambda c: c.sample(3, latents=np.zeros((2, 8), np.float32)), "count is 3 but latents have 2 rows"),
    (lambda c: c.sample(2, seed=1, latents=np.zeros((2, 8), np.float32)), "either seed or latents"),
    (lambda c: c.sample(2, model="toy", encoding="png"), "generates 2-D points: use ENCODING_RAW_FLOAT32"),
    (lambda c: c.score([images.encode_png(np.zeros((1, 28, 28), np.uint8)), b"garbage"]), "image 1: cannot decode image"),
    (lambda c: c.score([images.encode_png(np.zeros((1, 32, 32), np.uint8))]), "image 0: image is 32x32, expected 28x28"),
    (lambda c: c.score(np.zeros((2, 1, 32, 32), np.uint8)), "inputs have shape [2, 1, 32, 32]; model 'tiny' expects [N, 1, 28, 28]"),
    (lambda c: c.score(np.full((2, 1, 28, 28), 3.0, np.float32)), "image 0 has float32 values outside the model range"),
    (lambda c: c.score(np.zeros((0, 1, 28, 28), np.uint8)), "number of images must be in 1..1024, got 0"),
    (lambda c: c.sample(2, seed=1, version=-1), "version must be >= 0 (0 = latest), got -1"),
    (lambda c: c.score(np.zeros((1, 1, 28, 28), np.uint8), version=-3), "version must be >= 0 (0 = latest), got -3"),
])
def test_invalid_argument(client, call, message):
    with pytest.raises(InvalidArgumentError) as error:
        call(client)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details


def test_inconsistent_tensor_message(client):
    request = pb.ScoreRequest(tensor=pb.Tensor(shape=[1, 1, 28, 28], dtype=pb.DTYPE_UINT8, data=b"\0" * 10))
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Score(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 784 bytes, got 10" in error.value.details()


def test_not_found(client):
    with pytest.raises(NotFoundError, match="model 'nope' not found; models: mnist-dcgan, tiny, toy|model 'nope' not found"):
        client.sample(1, model="nope")
    with pytest.raises(NotFoundError, match="model 'tiny' version 9 does not exist; ready versions: 1"):
        client.sample(1, version=9)


def test_response_too_large_is_resource_exhausted(client):
    with pytest.raises(ResourceExhaustedError, match="over the 1 MiB message limit; use SampleStream"):
        client.sample(512, seed=1, encoding="float32")
    assert sum(len(c.images) for c in client.sample_stream(512, seed=1, encoding="float32", chunk_size=128)) == 512


def _compute_runs(server, network: str = "generator") -> float:
    value = server.metrics.registry.get_sample_value("dcgan_compute_seconds_count",
                                                     {"model": "tiny", "network": network})
    return value or 0.0


def test_the_server_drops_a_request_whose_deadline_passes_in_its_queue(serving_repo):
    """A 2 s batching window holds the request in the server's queue past its 0.3 s deadline: the
    server must answer DEADLINE_EXCEEDED and never run the model for it (checked after stop(),
    which finishes everything queued)."""
    server = start_server(serving_repo, poll_s=0, max_queue_delay_ms=2000, max_batch_size=1024)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}", timeout=0.3) as hurried:
            with pytest.raises(DeadlineExceededError):
                hurried.sample(1, seed=1)
    finally:
        server.stop(grace=5)
    assert _compute_runs(server) == 0  # the expired request cost no compute
    codes = {s.labels["code"] for s in server.metrics.requests.collect()[0].samples if s.value}
    assert codes <= {"DEADLINE_EXCEEDED", "CANCELLED"} and codes


def test_full_queue_is_resource_exhausted(serving_repo):
    """max_queue=1 and a long batching window: the second concurrent request finds the queue full."""
    server = start_server(serving_repo, max_queue=1, max_queue_delay_ms=1500, max_batch_size=1024)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            first = client.stub.Sample.future(pb.SampleRequest(count=1, seed=1))
            generator = server.store.models()["tiny"].versions[1].loaded.generator
            assert wait_for(lambda: generator.depth() == 1)  # the first request sits in the queue
            with pytest.raises(ResourceExhaustedError, match=r"queue full \(1 requests waiting\)"):
                client.sample(1)
            assert len(first.result(timeout=30).samples.data) == 784  # and the first is answered
    finally:
        server.stop(grace=1)


def test_many_concurrent_clients_get_their_own_results(client, server):
    expected = {seed: client.sample(1 + seed % 3, seed=seed).images for seed in range(40)}
    results = {}

    def worker(seed: int) -> None:
        with InferenceClient(f"127.0.0.1:{server.port}") as own:
            results[seed] = own.sample(1 + seed % 3, seed=seed).images

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(results[s], expected[s]) for s in expected)


def test_list_and_get_model(client):
    listing = client.models()
    assert listing.default_model == "tiny"
    names = [m.name for m in listing.models]
    assert {"tiny", "toy"} <= set(names)
    tiny = client.get_model("tiny")
    assert (tiny.kind, tiny.latent_size, list(tiny.sample_shape), tiny.latest_version) == ("dcgan", 8, [1, 28, 28], 1)
    assert tiny.versions[0].state == pb.VERSION_STATE_READY
    assert tiny.versions[0].provider == "CPUExecutionProvider" and '"sha256"' in tiny.versions[0].manifest_json
    with pytest.raises(NotFoundError):
        client.get_model("ghost")


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dcgan.v1.InferenceService", "tiny", "toy"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="ghost"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in answer.list_services_response.service}
        assert {"dcgan.v1.InferenceService", "grpc.health.v1.Health"} <= services


def test_prometheus_metrics_during_traffic(server, client):
    import urllib.request

    for seed in range(5):
        client.sample(3, seed=seed)
    with pytest.raises(NotFoundError):
        client.sample(1, model="ghost")
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'dcgan_requests_total{code="OK",method="Sample",model="tiny"}' in text
    assert 'dcgan_requests_total{code="NOT_FOUND",method="Sample",model="unknown"}' in text
    assert "ghost" not in text  # names sent by clients never become label values
    for name in ("dcgan_request_latency_seconds_bucket", "dcgan_queue_wait_seconds_bucket",
                 "dcgan_compute_seconds_bucket", "dcgan_batch_size_bucket", "dcgan_queue_depth"):
        assert name in text, name
    assert 'dcgan_model_version_loaded{model="tiny",provider="CPUExecutionProvider",version="1"} 1.0' in text


def test_garbage_collections_are_timed_into_metrics_until_the_server_stops(serving_repo):
    import gc
    import urllib.request

    def full_collections(port: int) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('dcgan_gc_pause_seconds_count{generation="2"}'))

    callbacks = len(gc.callbacks)
    server = start_server(serving_repo, poll_s=0)
    try:
        before = full_collections(server.metrics_port)
        gc.collect()  # a full collection in the server's process (the test's own)
        assert full_collections(server.metrics_port) >= before + 1
    finally:
        server.stop(grace=1)
    assert len(gc.callbacks) == callbacks  # a stopped server no longer times this process's collections
