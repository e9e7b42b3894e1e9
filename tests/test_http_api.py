"""The HTTP front end (the Open Inference Protocol's REST binding) on a real server, driven by curl."""

import json
import subprocess

import numpy as np
import pytest

from serving.client.library import Controls, InferenceClient
from tests.conftest import start_server


@pytest.fixture(scope="module")
def server(encoder_repo):
    server = start_server(encoder_repo.root, poll_s=0)
    yield server
    server.stop(grace=1)


def curl(url: str, *args: str) -> tuple[int, bytes]:
    """(HTTP status, body) of one curl call."""
    done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args, url], capture_output=True,
                          check=True, timeout=60)
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def test_health_metadata_and_seeded_generation_match_dcgan_v1(server):
    base = f"http://127.0.0.1:{server.http_port}"
    assert curl(f"{base}/v2/health/live") == (200, b'{"live": true}')
    assert curl(f"{base}/v2/health/ready")[0] == 200
    assert curl(f"{base}/v2/models/enc-encoder/ready")[0] == 200
    assert json.loads(curl(f"{base}/v2/models/enc/versions/1")[1])["inputs"] == [
        {"name": "z", "datatype": "FP32", "shape": [-1, 8]}]
    status, body = curl(f"{base}/v2/models/enc/infer", "-d",
                        '{"id": "a", "parameters": {"seed": 5, "count": 3}, "outputs": [{"name": "images"}]}')
    answer = json.loads(body)
    assert status == 200 and (answer["id"], answer["parameters"], answer["model_version"]) == ("a", {"seed": 5}, "1")
    [images] = answer["outputs"]
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        expected = client.sample(3, seed=5, model="enc").images
    np.testing.assert_array_equal(np.array(images["data"], np.uint8).reshape(images["shape"]), expected)


def test_binary_inputs_and_outputs(server, tmp_path):
    """Triton's binary tensor extension: the JSON header's length in a header, raw bytes after it."""
    pixels = np.random.default_rng(4).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    header = json.dumps({"inputs": [{"name": "samples", "datatype": "UINT8", "shape": [2, 1, 28, 28],
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    (tmp_path / "body").write_bytes(header + pixels.tobytes())
    done = subprocess.run(["curl", "-s", "-D", str(tmp_path / "headers"), "--data-binary", f"@{tmp_path / 'body'}",
                           "-H", f"Inference-Header-Content-Length: {len(header)}",
                           f"http://127.0.0.1:{server.http_port}/v2/models/enc-discriminator/infer"],
                          capture_output=True, check=True, timeout=60)
    length = int(next(line.split(":")[1] for line in (tmp_path / "headers").read_text().splitlines()
                      if line.lower().startswith("inference-header-content-length")))
    answer = json.loads(done.stdout[:length])
    logits = np.frombuffer(done.stdout[length:], "<f4")
    assert answer["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [2],
                                  "parameters": {"binary_data_size": 8}}]
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        np.testing.assert_allclose(logits, client.score(pixels, model="enc").logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path, body, headers, status, message", [
    ("/v2/models/nope/infer", "{}", [], 404, "model 'nope' not found; models: enc, enc-discriminator"),
    ("/v2/models/enc/infer", "{not json", [], 400, "the inference request is not JSON"),
    ("/v2/models/enc/infer", '{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 8], "data": [1, 2]}]}',
     [], 400, "input 'z': 2 values for shape \\[1, 8\\]"),
    ("/v2/models/enc/infer", '{"inputs": [{"name": "z", "datatype": "BF16", "shape": [1, 8]}]}', [], 400,
     "datatype 'BF16' is not one of"),
    ("/v2/models/enc/infer", '{"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 8], '
     '"parameters": {"binary_data_size": 32}}]}', [], 400, "binary_data_size 32 for shape \\[1, 8\\] of FP32"),
    ("/v2/models/enc/infer", "{}", ["-H", "Inference-Header-Content-Length: 99"], 400, "not a length within"),
    ("/v2/models/enc/versions/x/infer", "{}", [], 400, "not a positive integer"),
    ("/v2/models/enc/infer", '{"parameters": {"count": 100000}}', [], 400, "count"),
    ("/v2/models/enc/infer", '{"parameters": [1]}', [], 400, "parameters must be a JSON object"),
    ("/v2/models/enc/infer", '{"outputs": {"name": "x"}}', [], 400, "outputs must be a JSON list"),
])
def test_bad_requests_get_an_http_status_and_a_json_error(server, path, body, headers, status, message):
    import re

    got, answer = curl(f"http://127.0.0.1:{server.http_port}{path}", "-d", body, *headers)
    assert got == status, answer
    assert re.search(message, json.loads(answer)["error"]), answer


def test_plain_api_models_pictures_and_scores(server, tmp_path):
    """For people: cards as JSON, a seeded grid as PNG (the pixels of dcgan.v1's samples, enlarged),
    a walk as GIF, uploaded PNGs scored as JSON; the OpenAPI description lists the routes."""
    import io

    from PIL import Image

    from dcgan_core import images

    base = f"http://127.0.0.1:{server.http_port}"
    models = json.loads(curl(f"{base}/v1/models")[1])
    [card] = [m for m in models["models"] if m["name"] == "enc"]
    assert card["versions"][0]["encoder"] and card["latent_size"] == 8
    status, png = curl(f"{base}/v1/models/enc/sample.png?count=4&seed=3&scale=2")
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        samples = client.sample(4, seed=3, model="enc").images
        scores = client.score([images.encode_png(s) for s in samples[:2]], model="enc", anomaly=True)
    expected = images.enlarge(images.to_pil(images.make_grid(samples)), 2)
    assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(expected))
    status, gif = curl(f"{base}/v1/models/enc/walk.gif?from_seed=1&to_seed=2&steps=5&scale=1")
    assert status == 200 and Image.open(io.BytesIO(gif)).n_frames == 5
    for i, sample in enumerate(samples[:2]):
        (tmp_path / f"{i}.png").write_bytes(images.encode_png(sample))
    status, body = curl(f"{base}/v1/models/enc/score?anomaly=true", "-F", f"a=@{tmp_path / '0.png'}",
                        "-F", f"b=@{tmp_path / '1.png'}")
    answer = json.loads(body)
    assert status == 200 and answer["version"] == 1
    np.testing.assert_allclose(answer["probabilities"], scores.probabilities, rtol=1e-5)
    np.testing.assert_allclose(answer["anomaly"], scores.anomaly, rtol=1e-5)
    status, body = curl(f"{base}/v1/models/enc/score", "--data-binary", f"@{tmp_path / '0.png'}",
                        "-H", "Content-Type: image/png")
    np.testing.assert_allclose(json.loads(body)["probabilities"], scores.probabilities[:1], rtol=1e-5)
    assert set(json.loads(curl(f"{base}/openapi.json")[1])["paths"]) >= {"/v1/models", "/v1/models/{model}/score"}


@pytest.mark.parametrize("path, args, status, message", [
    ("/v1/models/enc/sample.png?count=x", [], 400, "count='x' must be an integer"),
    ("/v1/models/enc/sample.png?scale=99", [], 400, "scale = 99 must be between 1 and 16"),
    ("/v1/models/nope/sample.png", [], 404, "model 'nope' not found"),
    ("/v1/models/enc/walk.gif?from_seed=1", [], 400, "needs from_seed and to_seed"),
    ("/v1/models/enc/score", ["-d", "not an image"], 400, "upload 0 is not an image"),
    ("/v1/models/enc/score?anomaly=maybe", ["-d", "x"], 400, "anomaly='maybe' must be true or false"),
])
def test_plain_api_errors_are_json_with_a_status(server, path, args, status, message):
    got, body = curl(f"http://127.0.0.1:{server.http_port}{path}", *args)
    assert got == status and message in json.loads(body)["error"], body


def test_timeouts_over_http_and_the_oip_timeout_parameter_end_calls_at_their_deadline(serving_repo):
    """A 2 s batching window holds each request past its deadline: Request-Timeout-Ms (any HTTP
    route) and OIP's ``timeout`` parameter (microseconds, any transport) give 504 / DEADLINE_EXCEEDED;
    a bad header is a 400."""
    import grpc
    from dcgan.oip import grpc_predict_v2_pb2 as oip
    from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    server = start_server(serving_repo, poll_s=0, max_queue_delay_ms=2000, max_batch_size=1024)
    base, infer = f"http://127.0.0.1:{server.http_port}", '{"parameters": {"seed": 1}}'
    try:
        status, body = curl(f"{base}/v2/models/tiny/infer", "-H", "Request-Timeout-Ms: 200", "-d", infer)
        assert status == 504 and "deadline" in json.loads(body)["error"]
        assert curl(f"{base}/v1/models/tiny/sample.png?count=2", "-H", "Request-Timeout-Ms: 200")[0] == 504
        assert curl(f"{base}/v2/models/tiny/infer", "-d", '{"parameters": {"seed": 1, "timeout": 200000}}')[0] == 504
        status, body = curl(f"{base}/v1/models/tiny/sample.png", "-H", "Request-Timeout-Ms: soon")
        assert status == 400 and "Request-Timeout-Ms" in json.loads(body)["error"]
        request = oip.ModelInferRequest(model_name="tiny")
        request.parameters["timeout"].int64_param = 200000
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as failed:
                oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.stop(grace=5)


def test_a_draining_server_is_not_ready_over_http_or_grpc(serving_repo):
    """A load balancer's HTTP health check must take a replica out as soon as it starts to drain."""
    import grpc
    from dcgan.oip import grpc_predict_v2_pb2 as oip
    from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    server = start_server(serving_repo, poll_s=0)
    base = f"http://127.0.0.1:{server.http_port}"
    try:
        assert curl(f"{base}/v2/health/ready")[0] == 200
        assert server.service.drain(timeout=5)
        assert curl(f"{base}/v2/health/ready")[0] == 400
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert not oip_grpc.GRPCInferenceServiceStub(channel).ServerReady(oip.ServerReadyRequest()).ready
    finally:
        server.stop(grace=1)


def test_the_default_wildcard_address_serves_http_over_ipv4_and_ipv6_on_one_port(serving_repo):
    """``--host [::]`` (the default) binds gRPC dual-stack; HTTP must answer 127.0.0.1 on the same
    port too (asyncio alone binds "::" IPv6 only: Envoy and curl on 127.0.0.1 were refused)."""
    server = start_server(serving_repo, poll_s=0, host="[::]")
    try:
        assert curl(f"http://127.0.0.1:{server.http_port}/v2/health/live")[0] == 200
        assert curl(f"http://[::1]:{server.http_port}/v2/health/live")[0] == 200
    finally:
        server.stop(grace=1)


def _png(base64_text: str, scale: int = 4) -> np.ndarray:
    """A JSON answer's enlarged PNG, back at its model size."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(base64_text))) as image:
        return np.asarray(image)[::scale, ::scale]


def test_the_json_endpoints_the_playground_uses_match_dcgan_v1(server, tmp_path):
    from PIL import Image

    base = f"http://127.0.0.1:{server.http_port}/v1/models/enc"
    status, body = curl(f"{base}/samples?count=3&seed=5")
    answer = json.loads(body)
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        expected = client.sample(3, seed=5, model="enc", include_scores=True)
        guided = client.sample(2, seed=5, model="enc", controls=Controls(keep_top=0.5))
        digit = np.random.default_rng(2).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
        projected = client.project(digit, model="enc")
    assert status == 200 and answer["seed"] == 5 and [s["index"] for s in answer["samples"]] == [0, 1, 2]
    for item, pixels, score in zip(answer["samples"], expected.images, expected.probabilities):
        np.testing.assert_array_equal(_png(item["png"]), pixels[0])
        assert abs(item["score"] - score) < 1e-6
    answer = json.loads(curl(f"{base}/samples?count=2&seed=5&keep_top=0.5")[1])
    assert answer["candidates"] == 4 and [s["index"] for s in answer["samples"]] == list(guided.candidate_indices)
    frames = json.loads(curl(f"{base}/walk?from_seed=1&to_seed=2&steps=4")[1])["frames"]
    assert len(frames) == 4
    Image.fromarray(digit[0, 0]).save(tmp_path / "digit.png")
    status, body = curl(f"{base}/project", "-F", f"a=@{tmp_path / 'digit.png'}")
    [image] = json.loads(body)["images"]
    assert status == 200 and abs(image["anomaly"] - float(projected.anomaly[0])) < 1e-6
    status, body = curl(f"{base}/walk?to_seed=3&steps=5", "--data-binary", f"@{tmp_path / 'digit.png'}")
    answer = json.loads(body)
    assert status == 200 and len(answer["frames"]) == 5 and abs(answer["anomaly"] - image["anomaly"]) < 1e-6
    np.testing.assert_array_equal(_png(answer["frames"][0]["png"]), _png(image["reconstruction"]))  # starts at E(x)


@pytest.mark.parametrize(("path", "args", "status", "fragment"), [
    ("walk?from_seed=1", [], 400, "to_seed"),
    ("walk?steps=4", ["--data-binary", "not an image"], 400, "to_seed"),
    ("walk?to_seed=1", ["--data-binary", "not an image"], 400, "not an image"),
    ("manifest?version=9", [], 404, "no version 9"),
    ("samples?count=2&min_score=2", [], 400, "min_score"),
    ("samples?count=two", [], 400, "count"),
])
def test_the_json_endpoints_give_precise_errors(server, path, args, status, fragment):
    got, body = curl(f"http://127.0.0.1:{server.http_port}/v1/models/enc/{path}", *args)
    assert got == status and fragment in json.loads(body)["error"], body


def test_the_playground_page_is_served_at_the_root(server):
    status, body = curl(f"http://127.0.0.1:{server.http_port}/")
    assert status == 200 and b"<title>dcgan playground</title>" in body
    assert curl(f"http://127.0.0.1:{server.http_port}/playground/playground.js")[0] == 200


def test_every_plain_route_is_in_the_openapi_description():
    from serving.server.plain_http import OPENAPI, PlainRoutes

    routes = {(route.path, route.method.lower()) for route in PlainRoutes(None, None).routes()}
    described = {(path, method) for path, operations in OPENAPI["paths"].items() for method in operations}
    assert routes - {("/openapi.json", "get")} <= described
