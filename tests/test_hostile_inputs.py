"""Hostile input: property-based tests of every request validator and decoder, and a fuzz test
that throws random and mutated request bytes and image files at a real server.

Whatever arrives, the answer is OK or one of the documented statuses with a message that names
the problem, and the server stays up. Examples are bounded (CI runs this on 2 cores)."""

from __future__ import annotations

import io
import urllib.request

import grpc
import numpy as np
import pytest
from dcgan.v1 import inference_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dcgan_core import images
from dcgan_core.repository import Repository
from serving.client.library import InferenceClient, InvalidArgumentError, NotFoundError
from serving.server import codec, plans
from serving.server import inputs as score_inputs
from serving.server.errors import MAX_DETAILS, InvalidArgument
from serving.server.plans import SampleSpec
from serving.server.service import resolve_encoding
from tests.conftest import start_server

#: What a request may legitimately get besides OK (the .proto's list, less INTERNAL and UNKNOWN).
DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROPERTIES = settings(max_examples=300, deadline=None)


@pytest.fixture(scope="module")
def manifests(serving_repo):
    repository = Repository(serving_repo)
    return {name: repository.manifest(name, 1) for name in ("tiny", "toy")}


def _png(array_hw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_hw).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_PNG = _png(np.arange(784, dtype=np.uint8).reshape(28, 28))
shapes = st.lists(st.one_of(st.integers(-3, 40), st.integers(-2**63, 2**63 - 1)), max_size=70)
dtypes = st.integers(-5, 2**31 - 1) | st.sampled_from([pb.DTYPE_UINT8, pb.DTYPE_FLOAT32])


def mutated(blob: bytes):
    """Bytes of ``blob`` with flips, cuts and insertions: near-valid input finds more paths than noise."""
    @st.composite
    def build(draw):
        data = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            op, at = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "cut":
                del data[at:]
            else:
                data[at:at] = draw(st.binary(max_size=16))
        return bytes(data)
    return build()


# ---------------------------------------------------------------- validators and decoders


@PROPERTIES
@given(shape=shapes, dtype=dtypes, size=st.integers(0, 4096))
def test_tensor_headers_give_an_array_or_invalid_argument(shape, dtype, size):
    tensor = pb.Tensor(shape=shape, dtype=dtype, data=bytes(size))
    try:
        array = codec.tensor_to_array(tensor, "tensor")
    except InvalidArgument as exc:
        assert str(exc).startswith("tensor: ")
        return
    assert list(array.shape) == shape and array.nbytes == size


@PROPERTIES
@given(blob=st.binary(max_size=2048) | mutated(GOOD_PNG), channels=st.sampled_from([0, 1, 3]))
def test_image_decoding_gives_pixels_or_value_error(blob, channels):
    try:
        pixels = images.decode_image(blob, channels, 28)
    except ValueError as exc:
        assert str(exc)
        return
    assert pixels.dtype == np.uint8 and pixels.shape[1:] == (28, 28) and pixels.shape[0] in (1, 3)


@PROPERTIES
@given(count=st.integers(-2**31, 2**31 - 1), seed=st.none() | st.integers(0, 2**64 - 1),
       latents=st.none() | st.lists(st.floats(width=32), min_size=1, max_size=24))
def test_latent_validation(manifests, count, seed, latents):
    explicit = None if latents is None else np.array(latents, np.float32).reshape(-1, 1 if len(latents) % 8 else 8)
    try:
        plan = plans.plan(manifests["tiny"], SampleSpec(count, seed, explicit), plans.Limits(max_count=64))
        z, used = plan.latents, plan.seed
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert z.dtype == np.float32 and z.shape[1] == 8 and 1 <= len(z) <= 64
    assert np.all(np.abs(z) <= 1000)
    if explicit is not None:
        assert used == 0 and np.array_equal(z, explicit)
    elif seed is not None:
        assert used == seed


@PROPERTIES
@given(images_=st.lists(st.binary(max_size=64) | st.just(GOOD_PNG), max_size=3),
       tensor=st.none() | st.builds(lambda shape, dtype, n: pb.Tensor(shape=shape, dtype=dtype, data=bytes(n)),
                                    shapes, dtypes, st.integers(0, 3200)),
       model=st.sampled_from(["tiny", "toy"]))
def test_score_inputs_and_checks(manifests, images_, tensor, model):
    request = pb.ScoreRequest(images=images_)
    if tensor is not None:
        request.tensor.CopyFrom(tensor)
    try:
        inputs = score_inputs.model_inputs(codec.score_spec(request), manifests[model], 2)
        score_inputs.check(manifests[model], inputs, 2)
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert inputs.dtype == np.float32 and list(inputs.shape[1:]) == manifests[model].sample_shape


@PROPERTIES
@given(encoding=st.integers(-2**31, 2**31 - 1), model=st.sampled_from(["tiny", "toy"]))
def test_encodings(manifests, encoding, model):
    try:
        resolved = resolve_encoding(codec.encoding(encoding), manifests[model])
    except InvalidArgument:
        return
    assert resolved in ("png", "uint8", "float32")


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(serving_repo):
    server = start_server(serving_repo, poll_s=0, max_count=64, max_score_images=16, max_message_mb=4)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


VALID = {
    "Sample": pb.SampleRequest(count=2, seed=3).SerializeToString(),
    "SampleStream": pb.SampleStreamRequest(sample=pb.SampleRequest(count=3, seed=3), chunk_size=2).SerializeToString(),
    "Score": pb.ScoreRequest(images=[GOOD_PNG]).SerializeToString(),
    "GetModel": pb.GetModelRequest(model="toy").SerializeToString(),
    "ListModels": b"",
}


def _call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/dcgan.v1.InferenceService/{method}"
    try:
        if method == "SampleStream":
            list(channel.unary_stream(path)(payload, timeout=30))
        else:
            channel.unary_unary(path)(payload, timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_documented(code: grpc.StatusCode, details: str) -> None:
    assert code == grpc.StatusCode.OK or code in DOCUMENTED, (code, details)
    if code != grpc.StatusCode.OK:
        assert len(details) > 10, (code, details)


@FUZZ
@given(method=st.sampled_from(sorted(VALID)), data=st.data())
def test_fuzzed_request_bytes(channel, method, data):
    payload = data.draw(st.binary(max_size=256) | mutated(VALID[method]))
    _assert_documented(*_call(channel, method, payload))


@FUZZ
@given(blobs=st.lists(mutated(GOOD_PNG) | st.binary(max_size=512), min_size=1, max_size=4))
def test_fuzzed_image_files(channel, blobs):
    code, details = _call(channel, "Score", pb.ScoreRequest(images=blobs).SerializeToString())
    _assert_documented(code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.startswith("image ") or "do not parse" in details


def test_undecodable_request_is_invalid_argument(channel):
    code, details = _call(channel, "Sample", b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request bytes of /dcgan.v1.InferenceService/Sample do not parse" in details


@pytest.mark.parametrize("field, shape", [("latents", [1] * 65), ("latents", [2**62, 2**62, 0]),
                                          ("tensor", [1] * 65), ("tensor", [0, 2**40, 2**40, 1])])
def test_absurd_tensor_shapes_are_invalid_argument(channel, field, shape):
    tensor = pb.Tensor(shape=shape, dtype=pb.DTYPE_FLOAT32)
    if field == "latents":
        method, request = "Sample", pb.SampleRequest(latents=tensor)
    else:
        method, request = "Score", pb.ScoreRequest(tensor=tensor)
    code, details = _call(channel, method, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}: shape") and ("dimensions" in details)


def test_the_server_is_still_up_after_the_fuzzing(channel, server):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        assert client.sample(2, seed=1).images.shape == (2, 1, 28, 28)


# ---------------------------------------------------------------- wrong answers and unbounded growth


def test_a_16_bit_png_scores_as_its_8_bit_twin(server):
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    wide = pixels.astype(np.uint16) * 257  # the same picture at 16 bits
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        narrow_score = client.score([_png(pixels)]).logits
        wide_score = client.score([_png(wide)]).logits
    np.testing.assert_array_equal(wide_score, narrow_score)


def test_huge_inputs_are_refused_not_answered_with_nan(server):
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(InvalidArgumentError, match=r"latents\[0, 3\] = 3\.0000000054977558e\+38"):
            client.sample(latents=np.array([[0, 0, 0, 3e38, 0, 0, 0, 0]], np.float32))
        points = np.array([[0.5, 0.5], [3e38, -3e38]], np.float32)
        try:
            scored = client.score(points, model="toy")
        except InvalidArgumentError as exc:
            assert "input 1 gives a NaN or infinite logit" in exc.details
        else:
            assert np.all(np.isfinite(scored.logits))


def test_a_20_kb_model_name_gets_a_short_not_found(server):
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(NotFoundError) as error:
            client.sample(1, model="m" * 20000)
    assert len(error.value.details) <= MAX_DETAILS and "(20000 characters) not found" in error.value.details


def test_unknown_model_names_never_become_metric_labels(server):
    metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        client.models()
        with pytest.raises(NotFoundError):
            client.sample(1, model="warm-up-name")
        before = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        for i in range(300):
            with pytest.raises(NotFoundError):
                client.sample(1, model=f"random-name-{i}")
        after = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert len(after.splitlines()) == len(before.splitlines())  # no new time series
    assert "random-name" not in after and "warm-up-name" not in after
    assert 'dcgan_requests_total{code="NOT_FOUND",method="Sample",model="unknown"}' in after
    assert 'method="ListModels"' in after


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ModelMetadata",
                                    "/grpc.health.v1.Health/Check"])
def test_undecodable_requests_of_every_service_are_invalid_argument(channel, method):
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as failed:
        call(b"\xff\xff\xff", timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request bytes of {method} do not parse" in failed.value.details()



def test_made_up_method_names_are_not_remembered():
    """The guarded generic handler keeps one entry per method it serves; a client sending made-up
    method names must not grow it."""
    from types import SimpleNamespace

    from serving.server.decoding import _GuardedGeneric

    inner = grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_unary_rpc_method_handler(lambda r, c: r, request_deserializer=bytes)})
    generic = _GuardedGeneric(inner)
    assert generic.service(SimpleNamespace(method="/t.S/M")) is generic.service(SimpleNamespace(method="/t.S/M"))
    for i in range(100):
        assert generic.service(SimpleNamespace(method=f"/made/up{i}")) is None
    assert list(generic._handlers) == ["/t.S/M"]
