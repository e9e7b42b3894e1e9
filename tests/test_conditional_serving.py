"""A class-conditional model through a real server: labels in and out, drawn labels, validation,
merged batches with different labels, scoring with and without labels."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from dcgan_core.latents import latents
from dcgan_core.repository import Repository
from serving.client.library import InferenceClient, InvalidArgumentError
from tests.conftest import start_server


@pytest.fixture(scope="module")
def server(conditional_repo):
    server = start_server(conditional_repo.root, poll_s=0, max_queue_delay_ms=20)
    yield server
    server.stop(grace=1)


def _session(repository: Repository, net: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(repository.version_dir("cond", 1) / f"{net}.onnx"),
                                providers=["CPUExecutionProvider"])


def test_labels_per_sample_one_for_all_and_drawn_from_the_seed(client, conditional_repo):
    generator = _session(conditional_repo, "generator")
    z = latents(4, 6, 8)
    asked = client.sample(6, model="cond", seed=4, labels=[0, 1, 2, 2, 1, 0], encoding="float32")
    assert asked.labels.tolist() == [0, 1, 2, 2, 1, 0]
    np.testing.assert_array_equal(asked.images, generator.run(None, {"z": z, "labels": asked.labels})[0])
    one = client.sample(6, model="cond", seed=4, labels=2, encoding="float32")
    assert one.labels.tolist() == [2] * 6
    drawn = client.sample(6, model="cond", seed=4, encoding="float32")
    expected = np.random.default_rng([4, 1]).integers(0, 3, 6)  # the algorithm the .proto documents
    assert drawn.labels.tolist() == expected.tolist()
    np.testing.assert_array_equal(drawn.images, generator.run(None, {"z": z, "labels": expected})[0])
    stream = list(client.sample_stream(6, model="cond", seed=4, chunk_size=4, encoding="float32"))
    np.testing.assert_array_equal(np.concatenate([c.images for c in stream]), drawn.images)
    assert np.concatenate([c.labels for c in stream]).tolist() == expected.tolist()


@pytest.mark.parametrize("call, message", [
    (lambda c: c.sample(3, model="cond", seed=1, labels=[0, 3, 1]),
     "labels[1] = 3 is out of range for model 'cond': classes are 0..2"),
    (lambda c: c.sample(3, model="cond", seed=1, labels=[-1]), "labels[0] = -1 is out of range"),
    (lambda c: c.sample(3, model="cond", seed=1, labels=[0, 1]),
     "labels has 2 values; model 'cond' needs 3 (one per sample) or 1"),
    (lambda c: c.sample(model="cond", latents=np.zeros((2, 8), np.float32)), "explicit latents need labels"),
    (lambda c: c.sample(2, model="plain", seed=1, labels=[1]), "model 'plain' is not class-conditional"),
    (lambda c: c.score(np.zeros((2, 1, 28, 28), np.uint8), model="cond", labels=[5]),
     "labels[0] = 5 is out of range for model 'cond'"),
])
def test_bad_labels_are_invalid_argument(client, call, message):
    with pytest.raises(InvalidArgumentError) as error:
        call(client)
    assert message in error.value.details


def test_concurrent_requests_with_different_labels_get_their_own_results(client, server):
    expected = {i: client.sample(2, model="cond", seed=i, labels=i % 3).images for i in range(24)}
    results = {}

    def worker(i: int) -> None:
        with InferenceClient(f"127.0.0.1:{server.port}") as own:
            results[i] = own.sample(2, model="cond", seed=i, labels=i % 3).images

    threads = [threading.Thread(target=worker, args=(i,)) for i in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(results[i], expected[i]) for i in expected)
    sizes = server.metrics.registry.get_sample_value("dcgan_batch_size_count",
                                                     {"model": "cond", "network": "generator"})
    total = server.metrics.registry.get_sample_value("dcgan_batch_size_sum", {"model": "cond", "network": "generator"})
    assert total / sizes > 2  # some batches merged requests (with different labels)


def test_scoring_with_and_without_labels(client, conditional_repo):
    discriminator = _session(conditional_repo, "discriminator")
    pixels = client.sample(4, model="cond", seed=9, labels=[0, 1, 2, 0]).images
    x = pixels.astype(np.float32) * (2 / 255) - 1
    labelled = client.score(pixels, model="cond", labels=[2, 1, 0, 0])
    expected = discriminator.run(None, {"samples": x, "labels": np.array([2, 1, 0, 0])})[0]
    np.testing.assert_allclose(labelled.logits, expected, rtol=1e-5, atol=1e-6)
    assert labelled.labels.tolist() == [2, 1, 0, 0]
    table = np.stack([discriminator.run(None, {"samples": x, "labels": np.full(4, c)})[0] for c in range(3)])
    best = client.score(pixels, model="cond")
    assert best.labels is None  # the discriminator's most likely class is not a classification
    np.testing.assert_allclose(best.logits, table.max(0), rtol=1e-5, atol=1e-6)
    scored = client.sample(4, model="cond", seed=9, labels=[0, 1, 2, 0], encoding="float32", include_scores=True)
    np.testing.assert_allclose(scored.logits, client.score(scored.images, model="cond", labels=[0, 1, 2, 0]).logits,
                               rtol=1e-5, atol=1e-6)


def test_model_info_reports_the_classes(client):
    info = client.get_model("cond")
    assert (info.num_classes, list(info.class_names)) == (3, ["0", "1", "2"])
    assert client.get_model("plain").num_classes == 0


def test_the_cli_samples_a_class_a_per_class_grid_and_scores_a_class(server, client, tmp_path, capsys):
    from PIL import Image

    from dcgan_core import images
    from serving.client.cli import main

    target = ["--target", f"127.0.0.1:{server.port}"]
    assert main([*target, "sample", "--model", "cond", "--per-class", "4", "--seed", "1", "--scale", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.height == 2 + 3 * (28 + 2) and grid.width > 2 + 4 * (28 + 2)  # 3 rows + the label margin
        small = np.asarray(grid)
    assert main([*target, "sample", "--model", "cond", "--per-class", "4", "--seed", "1",
                 "--out", str(tmp_path / "grid.webp")]) == 0
    with Image.open(tmp_path / "grid.webp") as enlarged:  # the default for pictures people look at: 4x
        assert enlarged.format == "WEBP" and enlarged.size == (4 * small.shape[1], 4 * small.shape[0])
    assert main([*target, "sample", "--model", "cond", "--label", "2", "--count", "5", "--seed", "1",
                 "--out-dir", str(tmp_path / "twos")]) == 0
    made = sorted((tmp_path / "twos").glob("*.png"))
    expected = client.sample(5, model="cond", seed=1, labels=2).images
    assert np.array_equal(np.stack([images.decode_image(p.read_bytes()) for p in made]), expected)
    capsys.readouterr()
    assert main([*target, "score", "--model", "cond", "--label", "1", *map(str, made[:2])]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].endswith("cond v1 class 1")
    assert main([*target, "sample-job", "--model", "cond", "--label", "0", "--count", "6", "--chunk", "3",
                 "--out-dir", str(tmp_path / "job"), "--no-progress"]) == 0
    reference = client.sample(3, model="cond", seed=0, labels=0, encoding="png").png
    assert (tmp_path / "job" / "seed0_0000.png").read_bytes() == reference[0]
    with pytest.raises(SystemExit, match="--per-class needs a class-conditional model; plain has no classes"):
        main([*target, "sample", "--model", "plain", "--per-class", "2", "--out", str(tmp_path / "x.png")])
