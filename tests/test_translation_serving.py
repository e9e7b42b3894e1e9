"""Translate on a real server: a tiny mnist-sr4 model exported to ONNX, 7x7 PNG and tensor sources
to 28x28 translations equal to onnxruntime's, the discriminator's pair scores, precise errors for
wrong sizes and wrong kinds, and ``dcgan-client translate``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from dcgan.v1 import inference_pb2 as pb
from PIL import Image

from dcgan_core import images
from dcgan_core.repository import Repository
from serving.client.cli import main as client_main
from serving.client.library import FailedPreconditionError, InvalidArgumentError
from tests.conftest import start_server

pytestmark = pytest.mark.slow  # a real server


@pytest.fixture(scope="module")
def server(translation_repo):
    server = start_server(translation_repo, poll_s=0)
    yield server
    server.stop(grace=1)


def _sources(count: int = 5) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (count, 1, 7, 7), dtype=np.uint8)


def _onnx(translation_repo: Path, network: str, feeds: dict) -> np.ndarray:
    path = Repository(translation_repo).version_dir("sr4", 1) / f"{network}.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_png_sources_come_back_translated_as_onnxruntime_translates_them(client, translation_repo):
    sources = _sources()
    result = client.translate([images.encode_png(s) for s in sources], model="sr4", scores=True)
    expected = _onnx(translation_repo, "generator", {"source": images.uint8_to_model(sources)})
    assert result.images.shape == (5, 1, 28, 28) and result.images.dtype == np.uint8
    np.testing.assert_array_equal(result.images, images.model_to_uint8(expected))
    logits = _onnx(translation_repo, "discriminator", {"samples": expected, "source": images.uint8_to_model(sources)})
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.scores, 1 / (1 + np.exp(-logits)), rtol=1e-4)
    assert result.model == "sr4" and result.version == 1 and result.provider == "CPUExecutionProvider"


def test_uint8_and_float32_tensors_translate_alike(client):
    sources = _sources(3)
    raw = client.translate(sources, model="sr4", encoding="float32")
    floats = client.translate(images.uint8_to_model(sources), model="sr4", encoding="float32")
    assert raw.images.dtype == np.float32 and raw.scores is None
    np.testing.assert_array_equal(raw.images, floats.images)


def test_a_source_of_the_wrong_size_is_invalid_and_named(client):
    digit = np.zeros((1, 28, 28), np.uint8)
    with pytest.raises(InvalidArgumentError, match="image 1.*7"):
        client.translate([images.encode_png(_sources(1)[0]), images.encode_png(digit)], model="sr4")
    with pytest.raises(InvalidArgumentError, match=r"\[N, 1, 7, 7\]"):
        client.translate(np.zeros((2, 1, 28, 28), np.uint8), model="sr4")


def test_each_kind_of_model_takes_only_its_own_calls(client):
    with pytest.raises(FailedPreconditionError, match="not a translation model"):
        client.translate(_sources(1), model="tiny")
    with pytest.raises(FailedPreconditionError, match="translates images"):
        client.sample(2, model="sr4")
    with pytest.raises(FailedPreconditionError, match="translates images"):
        client.score(np.zeros((1, 1, 28, 28), np.uint8), model="sr4")
    info = client.get_model("sr4")
    assert info.kind == "translation" and list(info.source_shape) == [1, 7, 7]
    assert list(info.sample_shape) == [1, 28, 28] and list(client.get_model("tiny").source_shape) == []


def test_translate_calls_are_counted(client, server):
    client.translate(_sources(1), model="sr4")
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'dcgan_requests_total{code="OK",method="Translate",model="sr4"}' in text
    assert 'dcgan_requests_total{code="FAILED_PRECONDITION",method="Translate",model="tiny"}' in text


def test_the_cli_writes_one_translation_enlarged_and_a_grid_for_several(server, tmp_path, capsys):
    paths = []
    for i, source in enumerate(_sources(2)):
        paths.append(tmp_path / f"small{i}.png")
        paths[-1].write_bytes(images.encode_png(source))
    target = ["--target", f"127.0.0.1:{server.port}"]
    assert client_main([*target, "translate", "--model", "sr4", str(paths[0]), "--out", str(tmp_path / "big.png"),
                        "--scale", "8", "--scores"]) == 0
    with Image.open(tmp_path / "big.png") as big:
        assert big.size == (224, 224)
    assert "p(real)" in capsys.readouterr().out
    assert client_main([*target, "translate", "--model", "sr4", *map(str, paths), "--out",
                        str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as grid:  # 2 columns, sources over translations, 28-px cells x 4
        assert grid.width == grid.height
    assert client_main([*target, "translate", "--model", "tiny", str(paths[0])]) == 1
    assert "not a translation model" in capsys.readouterr().err


def test_translate_is_in_the_proto_and_the_generated_stub():
    assert "Translate" in pb.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name


def test_http_translate_and_oip_give_the_same_pixels_as_dcgan_v1(client, server):
    import base64
    import urllib.error

    import grpc
    from dcgan.oip import grpc_predict_v2_pb2 as oip
    from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    from tests.test_oip import _infer

    source = _sources(1)
    expected = client.translate(source, model="sr4", scores=True)
    url = f"http://127.0.0.1:{server.http_port}/v1/models"
    post = urllib.request.Request(f"{url}/sr4/translate?scores=true&scale=2", data=images.encode_png(source[0]),
                                  headers={"Content-Type": "image/png"})
    answer = json.loads(urllib.request.urlopen(post, timeout=30).read())
    decoded = images.decode_image(base64.b64decode(answer["images"][0]["png"]))
    np.testing.assert_array_equal(decoded[:, ::2, ::2], expected.images[0])  # enlarged twice, nearest
    assert answer["version"] == 1 and answer["images"][0]["score"] == pytest.approx(expected.scores[0], rel=1e-5)
    wrong = urllib.request.Request(f"{url}/tiny/translate", data=images.encode_png(source[0]))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    assert refused.value.code == 400 and "not a translation model" in json.loads(refused.value.read())["error"]

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        outputs = _infer(stub, "sr4", {"source": source})
        np.testing.assert_array_equal(outputs["images"], expected.images)
        scored = _infer(stub, "sr4-discriminator", {"samples": outputs["samples"], "source": source})
        np.testing.assert_allclose(scored["logits"], expected.logits, rtol=1e-4, atol=1e-5)
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="sr4"))
        assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("source", [-1, 1, 7, 7])]
        with pytest.raises(grpc.RpcError) as failed:
            _infer(stub, "sr4", {"z": np.zeros((1, 8), np.float32)})
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_translate_job_writes_a_png_per_input_skips_done_ones_and_lists_refused_files(server, tmp_path, capsys):
    inputs = tmp_path / "small"
    (inputs / "sub").mkdir(parents=True)
    for i, source in enumerate(_sources(3)):
        (inputs / ("sub" if i == 2 else "") / f"d{i}.png").write_bytes(images.encode_png(source))
    (inputs / "big.png").write_bytes(images.encode_png(np.zeros((1, 28, 28), np.uint8)))  # not a 7x7 source
    out = tmp_path / "big"
    command = ["--target", f"127.0.0.1:{server.port}", "translate-job", "--model", "sr4", "--input", str(inputs),
               "--out-dir", str(out), "--batch", "2", "--no-progress"]
    assert client_main(command) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["d0.png", "d1.png", "sub/d2.png"]
    with Image.open(out / "sub" / "d2.png") as picture:
        assert picture.size == (28, 28)
    refused = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in refused] == ["big.png"] and "7" in refused[0]["error"]
    assert "(1 errors)" in capsys.readouterr().out
    (out / "d1.png").unlink()
    assert client_main(command) == 0  # a rerun translates only what is missing (and the refused file again)
    assert "4 inputs: 2 already done, 2 processed now (1 errors)" in capsys.readouterr().out
    assert (out / "d1.png").exists() and len((out / "errors.jsonl").read_text().splitlines()) == 1
