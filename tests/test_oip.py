"""The Open Inference Protocol front end on a real server: the same answers as dcgan.v1 and the
ONNX files, the spec's messages, precise errors."""

import re

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from dcgan.oip import grpc_predict_v2_pb2 as oip
from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

from dcgan_core.images import model_to_uint8
from dcgan_core.latents import latents
from serving.client.library import Controls, InferenceClient
from tests.conftest import start_server


@pytest.fixture(scope="module")
def server(encoder_repo):
    server = start_server(encoder_repo.root, poll_s=0)
    yield server
    server.stop(grace=1)


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def _session(repository, network: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(repository.version_dir("enc", 1) / f"{network}.onnx"),
                                providers=["CPUExecutionProvider"])


def _infer(stub, model: str, inputs: dict[str, np.ndarray] | None = None, **parameters) -> dict[str, np.ndarray]:
    request = oip.ModelInferRequest(model_name=model)
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8", np.dtype(np.int64): "INT64"}
    for name, array in (inputs or {}).items():
        request.inputs.add(name=name, datatype=datatypes[array.dtype], shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    for name, value in parameters.items():
        if isinstance(value, float):
            request.parameters[name].double_param = value
        else:
            request.parameters[name].int64_param = value
    reply = stub.ModelInfer(request)
    kinds = {"FP32": np.float32, "UINT8": np.uint8}
    return {o.name: np.frombuffer(raw, kinds[o.datatype]).reshape(o.shape)
            for o, raw in zip(reply.outputs, reply.raw_output_contents)}


def test_health_and_metadata_follow_the_repository(stub):
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ServerMetadata(oip.ServerMetadataRequest()).name == "dcgan-serve"
    for name in ("enc", "enc-discriminator", "enc-encoder"):
        assert stub.ModelReady(oip.ModelReadyRequest(name=name)).ready, name
    assert not stub.ModelReady(oip.ModelReadyRequest(name="enc", version="7")).ready
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="enc"))
    assert (meta.versions, meta.platform) == (["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("z", "FP32", [-1, 8])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("samples", "FP32"), ("images", "UINT8")]
    encoder = stub.ModelMetadata(oip.ModelMetadataRequest(name="enc-encoder"))
    assert [t.name for t in encoder.outputs] == ["z", "reconstruction", "anomaly", "anomaly_percentile"]
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version, m.state) for m in index.models} == {
        ("enc", "1", "READY"), ("enc-discriminator", "1", "READY"), ("enc-encoder", "1", "READY")}


def test_generation_by_seed_and_by_latents_matches_dcgan_v1_and_the_onnx_file(stub, server, encoder_repo):
    by_seed = _infer(stub, "enc", seed=5, count=3)
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        expected = client.sample(3, seed=5, model="enc", encoding="float32").images
        truncated = client.sample(3, seed=5, model="enc", encoding="uint8", controls=Controls(truncation=0.5)).images
    np.testing.assert_array_equal(by_seed["samples"], expected)
    np.testing.assert_array_equal(by_seed["images"], model_to_uint8(expected))
    np.testing.assert_array_equal(_infer(stub, "enc", seed=5, count=3, truncation=0.5)["images"], truncated)
    z = latents(11, 4, 8)
    by_latents = _infer(stub, "enc", {"z": z})
    np.testing.assert_allclose(by_latents["samples"], _session(encoder_repo, "generator").run(None, {"z": z})[0],
                               rtol=1e-5, atol=1e-6)


def test_the_discriminator_and_the_encoder_answer_as_score_and_project(stub, server):
    pixels = np.random.default_rng(2).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        scores = client.score(pixels, model="enc", anomaly=True)
        projection = client.project(pixels, model="enc", encoding="float32")
    judged = _infer(stub, "enc-discriminator", {"samples": pixels})
    np.testing.assert_allclose(judged["logits"], scores.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(judged["probabilities"], scores.probabilities, rtol=1e-5, atol=1e-6)
    encoded = _infer(stub, "enc-encoder", {"samples": pixels})
    np.testing.assert_allclose(encoded["z"], projection.latents, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoded["reconstruction"], projection.reconstructions, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encoded["anomaly_percentile"], scores.anomaly_percentile, rtol=1e-5)


@pytest.mark.parametrize("request_, code, message", [
    (oip.ModelInferRequest(model_name="nope"), "NOT_FOUND", "model 'nope' not found; models: enc, enc-disc"),
    (oip.ModelInferRequest(model_name="enc", model_version="x"), "INVALID_ARGUMENT", "not a positive integer"),
    (oip.ModelInferRequest(model_name="enc", model_version="9"), "NOT_FOUND", "version 9"),
    (oip.ModelInferRequest(model_name="enc", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="z", datatype="FP32", shape=[1, 8])], raw_input_contents=[b"\0" * 31]),
     "INVALID_ARGUMENT", "31 bytes for shape \\[1, 8\\] of FP32"),
    (oip.ModelInferRequest(model_name="enc", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="z", datatype="BF16", shape=[1, 8])]), "INVALID_ARGUMENT", "datatype 'BF16' is not one of"),
    (oip.ModelInferRequest(model_name="enc", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1, 8], contents=oip.InferTensorContents(fp32_contents=[0] * 8))]),
     "INVALID_ARGUMENT", "unknown input 'x'"),
    (oip.ModelInferRequest(model_name="enc", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="z", datatype="FP32", shape=[1, 3], contents=oip.InferTensorContents(fp32_contents=[0] * 3))]),
     "INVALID_ARGUMENT", "latent"),
    (oip.ModelInferRequest(model_name="enc", outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(
        name="logits")]), "INVALID_ARGUMENT", "unknown output 'logits'; outputs: samples, images"),
    (oip.ModelInferRequest(model_name="enc-discriminator"), "INVALID_ARGUMENT", "input 'samples' is required"),
])
def test_bad_requests_get_precise_statuses(stub, request_, code, message):
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request_)
    assert error.value.code().name == code
    assert re.search(message, error.value.details()), error.value.details()


def test_bad_parameters_and_counted_calls(stub, server):
    request = oip.ModelInferRequest(model_name="enc")
    request.parameters["seed"].string_param = "five"
    with pytest.raises(grpc.RpcError, match="parameter 'seed' must be an integer"):
        stub.ModelInfer(request)
    calls = server.metrics.registry.get_sample_value(
        "dcgan_requests_total", {"method": "oip.ModelInfer", "model": "enc", "code": "INVALID_ARGUMENT"})
    assert calls >= 1  # the OIP front end's calls are counted, named by protocol
