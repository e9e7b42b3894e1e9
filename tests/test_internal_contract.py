"""The .proto's promise that INTERNAL is never caused by the request, checked by property: random
values for every field of every request (built from the message descriptors, so a field added to
the .proto is covered without touching this file) go to a real server, and no answer may be
INTERNAL or UNKNOWN. Floats span the whole float32 range with subnormals, NaN and infinities;
integers hit their type's edges; tensors are inconsistent or consistent; strings name real
models or not. Requests are fully random, or valid ones with a few fields (at any depth) changed,
which reach the paths behind the first check; the sampling controls, where a float becomes an
amount of work, get a test of their own (it found keep_top = 1e-7 answering INTERNAL).
"""

from __future__ import annotations

import io
import shutil

import grpc
import numpy as np
import pytest
from dcgan.v1 import inference_pb2 as pb
from dcgan.v1 import inference_pb2_grpc as pb_grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import start_server

MODELS = ["", "tiny", "toy", "cond", "enc", "no-such-model"]
SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
RPCS = {  # method: (request type, server streaming)
    method.name: (getattr(pb, method.input_type.name), method.server_streaming)
    for method in pb.DESCRIPTOR.services_by_name["InferenceService"].methods
}

T = FieldDescriptor
INT_BITS = {T.TYPE_INT32: (32, True), T.TYPE_SINT32: (32, True), T.TYPE_SFIXED32: (32, True),
            T.TYPE_INT64: (64, True), T.TYPE_SINT64: (64, True), T.TYPE_SFIXED64: (64, True),
            T.TYPE_UINT32: (32, False), T.TYPE_FIXED32: (32, False),
            T.TYPE_UINT64: (64, False), T.TYPE_FIXED64: (64, False)}


def integers(bits: int, signed: bool) -> st.SearchStrategy[int]:
    """Mostly small values (they reach the deep paths), and the type's edges."""
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted(v for v in {low, high, -1, 0, 1, 2**31 - 1, 2**31} if low <= v <= high)
    return st.integers(max(low, -2), min(high, 20)) | st.sampled_from(edges) | st.integers(low, high)


def png(size: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = (st.sampled_from([png(28, "L"), png(28, "RGB"), png(27, "L"), b"", b"\x89PNG\r\n\x1a\n"])
          | st.binary(max_size=64))
FLOAT32_EDGES = [0.0, -0.0, 1.0, float(np.finfo(np.float32).smallest_subnormal), float(np.finfo(np.float32).tiny),
                 float(np.finfo(np.float32).max), float("inf"), float("-inf"), float("nan")]
#: The whole float32 range (subnormals, NaN and infinities included), its edges, and tiny positive
#: values, where shares and thresholds in (0, 1) turn into huge counts.
FLOAT32 = st.floats(width=32) | st.sampled_from(FLOAT32_EDGES) | st.floats(0, 2**-17, width=32, exclude_min=True)


@st.composite
def consistent_tensors(draw) -> pb.Tensor:
    """A tensor whose data fits its shape: it passes the header checks and reaches the model."""
    shape = draw(st.sampled_from([[1, 8], [2, 8], [3, 2], [1, 1, 28, 28], [2, 1, 28, 28], [8], [2], [0, 8]]))
    if draw(st.booleans()):
        values = draw(st.lists(FLOAT32, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        return pb.Tensor(shape=shape, dtype=pb.DTYPE_FLOAT32, data=np.asarray(values, "<f4").tobytes())
    values = draw(st.binary(min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return pb.Tensor(shape=shape, dtype=pb.DTYPE_UINT8, data=values)


def value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == T.TYPE_MESSAGE:
        generic = message(field.message_type, depth + 1)
        return consistent_tensors() | generic if field.message_type.name == "Tensor" else generic
    if field.type == T.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 9)
    if field.type in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        return FLOAT32 if field.type == T.TYPE_FLOAT else st.floats()
    if field.type == T.TYPE_BOOL:
        return st.booleans()
    if field.type == T.TYPE_STRING:
        return st.sampled_from(MODELS) | st.text(max_size=12)
    if field.type == T.TYPE_BYTES:
        return IMAGES
    return integers(*INT_BITS[field.type])


def message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of ``descriptor`` with each field unset or set to a random value."""
    if depth > 3:
        return st.just(getattr(pb, descriptor.name)())
    fields = {}
    for field in descriptor.fields:
        single = value(field, depth)
        fields[field.name] = st.none() | (st.lists(single, max_size=4) if field.is_repeated else single)

    def build(values: dict) -> object:
        built = getattr(pb, descriptor.name)()
        for name, chosen in values.items():
            target = descriptor.fields_by_name[name]
            if chosen is None:
                continue
            if target.type == T.TYPE_MESSAGE and target.is_repeated:
                getattr(built, name).extend(chosen)
            elif target.type == T.TYPE_MESSAGE:
                getattr(built, name).CopyFrom(chosen)
            elif target.is_repeated:
                getattr(built, name).extend(chosen)
            else:
                setattr(built, name, chosen)
        return built

    return st.fixed_dictionaries(fields).map(build)


def _tensor(array: np.ndarray) -> pb.Tensor:
    dtype = pb.DTYPE_UINT8 if array.dtype == np.uint8 else pb.DTYPE_FLOAT32
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=np.ascontiguousarray(array).tobytes())


def _point(seed: int | None = None, index: int = 0, latent: np.ndarray | None = None, **label) -> pb.LatentPoint:
    if latent is not None:
        return pb.LatentPoint(latent=_tensor(latent), **label)
    return pb.LatentPoint(seeded=pb.SeededLatent(seed=seed, index=index), **label)


Z = np.random.default_rng(0).standard_normal((2, 8), dtype=np.float32)
GRAY = np.full((2, 1, 28, 28), 100, np.uint8)
SAMPLES = [
    pb.SampleRequest(model="tiny", count=4, seed=1),
    pb.SampleRequest(model="cond", count=3, seed=2, labels=[1], include_scores=True, encoding=pb.ENCODING_PNG),
    pb.SampleRequest(model="tiny", count=2, seed=3, truncation=0.5, include_scores=True),
    pb.SampleRequest(model="tiny", count=2, seed=4, min_score=0.3),
    pb.SampleRequest(model="cond", count=2, seed=5, keep_top=0.5, labels=[2]),
    pb.SampleRequest(model="toy", count=3, seed=6, encoding=pb.ENCODING_RAW_FLOAT32),
    pb.SampleRequest(model="tiny", latents=_tensor(Z), encoding=pb.ENCODING_RAW_FLOAT32),
]
#: Requests that succeed: a few random fields changed in one of them reach the deep paths, which
#: fully random requests rarely pass the first check to see.
VALID = {
    "Sample": SAMPLES,
    "SampleStream": [pb.SampleStreamRequest(sample=sample, chunk_size=2) for sample in SAMPLES],
    "Walk": [pb.WalkRequest(model="tiny", start=_point(1), end=_point(2, 3), steps=4),
             pb.WalkRequest(model="cond", start=_point(latent=Z[0], label=1), end=_point(5, label=1), steps=3,
                            include_scores=True, truncation=1.0, encoding=pb.ENCODING_PNG)],
    "Score": [pb.ScoreRequest(model="tiny", images=[png(28, "L")]),
              pb.ScoreRequest(model="cond", tensor=_tensor(GRAY)),
              pb.ScoreRequest(model="cond", tensor=_tensor(GRAY), labels=[0, 2]),
              pb.ScoreRequest(model="toy", tensor=_tensor(Z[:, :2].copy()))],
    "Project": [pb.ProjectRequest(model="enc", images=[png(28, "L")]),
                pb.ProjectRequest(model="enc", tensor=_tensor(GRAY), encoding=pb.ENCODING_RAW_FLOAT32),
                pb.ProjectRequest(model="tiny", tensor=_tensor(GRAY))],
    "Translate": [pb.TranslateRequest(model="sr4", images=[png(7, "L")], include_scores=True),
                  pb.TranslateRequest(model="sr4", tensor=_tensor(GRAY[:, :, :7, :7].copy()),
                                      encoding=pb.ENCODING_RAW_FLOAT32),
                  pb.TranslateRequest(model="tiny", tensor=_tensor(GRAY))],
    "GetModel": [pb.GetModelRequest(model="tiny")],
    "ListModels": [pb.ListModelsRequest()],
    "ReloadModels": [pb.ReloadModelsRequest()],
}


def field_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field of a message, nested ones included, as paths from the top."""
    paths = []
    for field in descriptor.fields:
        paths.append((field,))
        if field.type == T.TYPE_MESSAGE and not field.is_repeated and depth < 3:
            paths += [(field, *rest) for rest in field_paths(field.message_type, depth + 1)]
    return paths


def assign(message_: object, path: tuple[FieldDescriptor, ...], chosen: object) -> None:
    for field in path[:-1]:
        message_ = getattr(message_, field.name)
    field = path[-1]
    if field.is_repeated:
        message_.ClearField(field.name)
        getattr(message_, field.name).extend(chosen)
    elif field.type == T.TYPE_MESSAGE:
        getattr(message_, field.name).CopyFrom(chosen)
    else:
        setattr(message_, field.name, chosen)


@st.composite
def mutated(draw, method: str) -> object:
    """A valid request of ``method`` with up to three of its fields (at any depth) set at random."""
    request = type(base := draw(st.sampled_from(VALID[method])))()
    request.CopyFrom(base)
    paths = field_paths(request.DESCRIPTOR)
    for path in draw(st.lists(st.sampled_from(paths), max_size=3, unique=True)) if paths else []:
        single = value(path[-1], len(path))
        assign(request, path, draw(st.lists(single, max_size=4) if path[-1].is_repeated else single))
    return request


@pytest.fixture(scope="module")
def stub(tmp_path_factory, serving_repo, conditional_repo, encoder_repo, translation_repo):
    root = tmp_path_factory.mktemp("contract-repo")
    shutil.copytree(translation_repo / "sr4", root / "sr4")
    for source in (serving_repo / "tiny", serving_repo / "toy", conditional_repo.root / "cond"):
        shutil.copytree(source, root / source.name)
    shutil.copytree(encoder_repo.root / "enc", root / "enc")
    server = start_server(root, poll_s=0, max_count=16, max_score_images=16, max_candidates=64)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.InferenceServiceStub(channel)
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("method", sorted(RPCS))
def test_no_request_gets_internal_or_unknown(stub, method):
    request_type, streaming = RPCS[method]
    call = getattr(stub, method)

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=st.one_of(mutated(method), mutated(method), message(request_type.DESCRIPTOR)))
    def check(request) -> None:
        try:
            answer = call(request, timeout=60)
            if streaming:
                list(answer)
        except grpc.RpcError as error:
            assert error.code() not in SERVER_FAULTS, f"{method}({request}) -> {error.code()}: {error.details()}"

    check()


@st.composite
def controlled_samples(draw) -> pb.SampleRequest:
    """Seeded Sample requests with random sampling controls: the fields whose values the server
    turns into work (candidate counts, redraw rounds), where a float becomes a count."""
    request = pb.SampleRequest(model=draw(st.sampled_from(["tiny", "cond", "toy"])), seed=draw(integers(64, False)),
                               count=draw(st.integers(1, 16) | integers(32, True)), include_scores=draw(st.booleans()))
    guided = draw(st.sampled_from([(), ("min_score",), ("keep_top",), ("min_score", "keep_top")]))
    for name in (*guided, *draw(st.sampled_from([(), ("truncation",)]))):
        setattr(request, name, draw(FLOAT32))
    if draw(st.integers(0, 2)) == 0:
        request.labels.extend(draw(st.lists(integers(64, True), min_size=1, max_size=2)))
    return request


def test_no_sampling_control_gets_internal_or_unknown(stub):
    @settings(max_examples=600, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=controlled_samples())
    def check(request: pb.SampleRequest) -> None:
        try:
            stub.Sample(request, timeout=60)
        except grpc.RpcError as error:
            assert error.code() not in SERVER_FAULTS, f"Sample({request}) -> {error.code()}: {error.details()}"

    check()
