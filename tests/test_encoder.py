"""The f-AnoGAN encoder stage: trained against a frozen GAN under the run loop; its score's direction."""

import pytest
import torch

from tests.conftest import tiny_config
from training.config import ConfigError


def _encoder_config(source, run_dir, **run):
    return tiny_config(run_dir, encoder={"source": str(source), "nef": 4, "lr": 1e-3},
                       run={"eval_every": 1, "eval_samples": 100, **run})


def test_the_encoder_trains_against_a_frozen_gan_and_resumes_exactly(tiny_run, tmp_path):
    from training.encoder import encoder_run

    config = _encoder_config(tiny_run, tmp_path / "enc", max_steps=8)
    run = encoder_run(config)
    frozen = {k: v.clone() for k, v in run.model.scorer.generator.state_dict().items()}
    run.train()
    assert all(torch.equal(v, run.model.scorer.generator.state_dict()[k]) for k, v in frozen.items())
    assert (tmp_path / "enc" / "best.pt").exists() and (tmp_path / "enc" / "samples" / "latest.png").exists()
    straight = encoder_run(_encoder_config(tiny_run, tmp_path / "straight", max_steps=16))
    straight.train()
    resumed = encoder_run(_encoder_config(tiny_run, tmp_path / "enc", max_steps=16))
    assert resumed.step == 8
    resumed.train()
    for key, value in straight.model.E.state_dict().items():
        assert torch.equal(value, resumed.model.E.state_dict()[key]), key


def test_an_encoder_needs_an_image_gan(tiny_toy_run, tmp_path):
    from training.encoder import encoder_run

    with pytest.raises(ConfigError, match="encoder.source is empty"):
        encoder_run(tiny_config(tmp_path / "a"))
    with pytest.raises(ConfigError, match="is a toy2d run; encoders are for image models"):
        encoder_run(_encoder_config(tiny_toy_run, tmp_path / "b"))


@pytest.fixture(scope="module")
def encoder_version(encoder_repo):
    """The tiny encoder run's published version: generator, discriminator and encoder.onnx."""
    return encoder_repo, encoder_repo.manifest("enc", 1)


def test_the_encoder_is_published_in_the_version_with_its_calibration(encoder_version):
    import numpy as np
    import onnxruntime as ort

    repository, manifest = encoder_version
    assert repository.manifest("enc", 1) == manifest  # sha256 of encoder.onnx verified too
    assert manifest.encoder.file == "encoder.onnx" and manifest.encoder.input_shape == [None, 1, 28, 28]
    assert set(manifest.training["parity"]) >= {"generator", "discriminator", "encoder"}
    assert manifest.training["parity"]["encoder"]["atol"] == 1e-4  # the scorer's own tolerance, recorded
    quantiles = manifest.anomaly["quantiles"]
    assert len(quantiles) == 1001 and quantiles == sorted(quantiles)
    folder = repository.version_dir("enc", 1)
    scorer = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    generator = ort.InferenceSession(str(folder / "generator.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32)
    discriminator = ort.InferenceSession(str(folder / "discriminator.onnx"), providers=["CPUExecutionProvider"])
    z, reconstruction, score, logits = scorer.run(None, {"samples": x})
    assert z.shape == (5, 8) and score.shape == (5,)
    np.testing.assert_allclose(generator.run(None, {"z": z})[0], reconstruction, rtol=1e-4, atol=1e-5)
    # one run gives D's logit too: Score with anomaly needs no discriminator run
    np.testing.assert_allclose(discriminator.run(None, {"samples": x})[0], logits, rtol=1e-4, atol=1e-5)


def test_the_calibration_holds_on_other_held_out_images(encoder_version):
    import numpy as np
    import onnxruntime as ort

    from dcgan_core.images import uint8_to_model
    from training.data import synthetic_images

    repository, manifest = encoder_version
    scorer = ort.InferenceSession(str(repository.version_dir("enc", 1) / "encoder.onnx"),
                                  providers=["CPUExecutionProvider"])
    unseen = uint8_to_model(synthetic_images(2000, 1, 28, 7))  # the same kind of data, other images
    scores = np.concatenate([scorer.run(None, {"samples": unseen[i : i + 500]})[2] for i in range(0, 2000, 500)])
    percentiles = np.interp(scores, manifest.anomaly["quantiles"], np.linspace(0, 1, 1001))
    for share in (0.1, 0.5, 0.9):
        assert abs((percentiles <= share).mean() - share) < 0.05


def test_dcgan_train_runs_the_encoder_preset(tiny_run, tmp_path):
    from training.cli import main as train

    assert train(["--preset", "encoder", "--set", f"encoder.source={tiny_run}", "--run-dir", str(tmp_path / "e"),
                  "--no-progress", "--set", "run.max_steps=2", "--set", "encoder.nef=4"]) == 0
    assert (tmp_path / "e" / "checkpoint.pt").exists()


def test_score_returns_the_anomaly_of_a_version_with_an_encoder(encoder_version, serving_repo):
    """Through a real server: the scorer's score and its percentile; a version without an encoder
    answers FAILED_PRECONDITION and scores as before."""
    import numpy as np
    import onnxruntime as ort

    from dcgan_core.images import uint8_to_model
    from serving.client.library import ClientError, InferenceClient
    from tests.conftest import start_server

    repository, manifest = encoder_version
    server = start_server(repository.root, poll_s=0)
    plain = start_server(serving_repo, poll_s=0)
    images = np.random.default_rng(5).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            scores = client.score(images, anomaly=True)
            without = client.score(images)
        with InferenceClient(f"127.0.0.1:{plain.port}") as client:
            with pytest.raises(ClientError, match="FAILED_PRECONDITION.*version 1 has no encoder"):
                client.score(images, model="tiny", anomaly=True)
            assert client.score(images, model="tiny").anomaly is None
    finally:
        server.stop(grace=1)
        plain.stop(grace=1)
    scorer = ort.InferenceSession(str(repository.version_dir("enc", 1) / "encoder.onnx"),
                                  providers=["CPUExecutionProvider"])
    expected = scorer.run(None, {"samples": uint8_to_model(images)})[2]
    np.testing.assert_allclose(scores.anomaly, expected, rtol=1e-4, atol=1e-6)
    quantiles = manifest.anomaly["quantiles"]
    np.testing.assert_allclose(scores.anomaly_percentile, np.interp(expected, quantiles, np.linspace(0, 1, 1001)),
                               atol=1e-5)
    np.testing.assert_allclose(scores.logits, without.logits, rtol=1e-5, atol=1e-6)  # the scorer's own logit
    assert without.anomaly is None and without.anomaly_percentile is None


def test_project_returns_latents_whose_generation_is_the_reconstruction(encoder_version, serving_repo):
    """Project's round trip: Sample with the returned latents gives the returned reconstructions;
    bad inputs get Score's errors; a version without an encoder is FAILED_PRECONDITION."""
    import numpy as np

    from serving.client.library import ClientError, InferenceClient, InvalidArgumentError
    from tests.conftest import start_server

    repository, _ = encoder_version
    server = start_server(repository.root, poll_s=0)
    images = np.random.default_rng(6).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            projection = client.project(images, encoding="float32")
            again = client.sample(latents=projection.latents, encoding="float32")
            png = client.project([client.sample(2, seed=1, encoding="png").png[0]])
            scores = client.score(images, anomaly=True)
            with pytest.raises(InvalidArgumentError, match="give either images"):
                client.project([])
            with pytest.raises(InvalidArgumentError):
                client.project(np.zeros((2, 1, 8, 8), np.uint8))
    finally:
        server.stop(grace=1)
    assert projection.latents.shape == (4, 8) and projection.reconstructions.shape == (4, 1, 28, 28)
    np.testing.assert_allclose(again.images, projection.reconstructions, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(projection.anomaly, scores.anomaly, rtol=1e-5)
    assert png.reconstructions.dtype == np.uint8 and png.reconstructions.shape == (1, 1, 28, 28)
    plain = start_server(serving_repo, poll_s=0)
    try:
        with InferenceClient(f"127.0.0.1:{plain.port}") as client, pytest.raises(ClientError, match="no encoder"):
            client.project(images, model="tiny")
    finally:
        plain.stop(grace=1)


def test_the_cli_projects_files_and_walks_from_an_image(encoder_version, tmp_path, capsys):
    from PIL import Image

    from serving.client.cli import main
    from serving.client.library import InferenceClient
    from tests.conftest import start_server

    repository, _ = encoder_version
    server = start_server(repository.root, poll_s=0)
    target = ["--target", f"127.0.0.1:{server.port}"]
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            for index, blob in enumerate(client.sample(2, seed=3, encoding="png").png):
                (tmp_path / f"d{index}.png").write_bytes(blob)
        files = [str(tmp_path / "d0.png"), str(tmp_path / "d1.png")]
        assert main([*target, "project", *files, "--out", str(tmp_path / "recon.png"), "--scale", "1"]) == 0
        assert main([*target, "walk", "--from-image", files[0], "--to-seed", "3", "--steps", "4",
                     "--out", str(tmp_path / "walk.gif")]) == 0
        assert main([*target, "score", "--anomaly", *files]) == 0
    finally:
        server.stop(grace=1)
    out = capsys.readouterr().out
    assert "anomaly  percentile  (enc v1)" in out and f"{files[0]} -> seed 3[0]" in out
    assert "anomaly (percentile)" in out and out.rstrip().endswith("%)")
    with Image.open(tmp_path / "recon.png") as recon:
        assert recon.size == (2 + 2 * 30, 2 + 2 * 30)  # two images over their two reconstructions


@pytest.fixture(scope="module")
def conditional_encoder_repo(tmp_path_factory):
    """``cond-enc`` version 1: a tiny 3-class GAN with an encoder trained against it."""
    from dcgan_core.repository import Repository
    from training.encoder import encoder_run
    from training.export import export_run
    from training.gan_step import gan_run

    gan = tmp_path_factory.mktemp("cond-gan")
    gan_run(tiny_config(gan, model={"num_classes": 3}, run={"max_steps": 3})).train()
    run_dir = tmp_path_factory.mktemp("cond-encoder")
    encoder_run(_encoder_config(gan, run_dir, max_steps=4)).train()
    repository = Repository(tmp_path_factory.mktemp("cond-encoder-repo"))
    export_run(run_dir, repository, "cond-enc")
    return repository


def test_a_conditional_version_scores_unlabelled_images_under_the_class_that_reconstructs_them_best(
        conditional_encoder_repo):
    """Without labels, the anomaly of an image for a conditional model is its lowest score over the
    classes, and its logit and reconstruction are the ones under that class; with labels, theirs."""
    import numpy as np
    import onnxruntime as ort

    from dcgan_core.images import uint8_to_model
    from serving.client.library import InferenceClient
    from tests.conftest import start_server

    images = np.random.default_rng(8).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    server = start_server(conditional_encoder_repo.root, poll_s=0)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            unlabelled = client.score(images, anomaly=True)
            projection = client.project(images, encoding="float32")
            labelled = client.score(images, labels=[2] * 5, anomaly=True)
    finally:
        server.stop(grace=1)
    scorer = ort.InferenceSession(str(conditional_encoder_repo.version_dir("cond-enc", 1) / "encoder.onnx"),
                                  providers=["CPUExecutionProvider"])
    x = uint8_to_model(images)
    runs = [scorer.run(None, {"samples": x, "labels": np.full(5, c, np.int64)}) for c in range(3)]
    table = np.stack([run[2] for run in runs])
    best = table.argmin(axis=0)
    assert unlabelled.labels is None  # a tiny model's class choice is not accurate enough to name
    np.testing.assert_array_equal(projection.labels, best)
    np.testing.assert_allclose(unlabelled.anomaly, table.min(axis=0), rtol=1e-5)
    np.testing.assert_allclose(unlabelled.logits, [runs[c][3][i] for i, c in enumerate(best)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(projection.reconstructions, [runs[c][1][i] for i, c in enumerate(best)],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labelled.labels, [2] * 5)
    np.testing.assert_allclose(labelled.anomaly, runs[2][2], rtol=1e-5)


def test_a_conditional_version_names_unlabelled_classes_only_with_a_measured_accuracy(
        conditional_encoder_repo, tmp_path):
    """The export measures how often the best-reconstructing class is right; a version whose
    manifest records at least REPORTED_CLASS_ACCURACY names it in ScoreResponse.labels."""
    import json
    import shutil

    import numpy as np

    from serving.client.library import InferenceClient
    from serving.server.service import REPORTED_CLASS_ACCURACY
    from tests.conftest import start_server

    accuracy = conditional_encoder_repo.manifest("cond-enc", 1).anomaly["class_accuracy"]
    assert 0.0 <= accuracy < REPORTED_CLASS_ACCURACY  # 4 steps: nowhere near a classifier
    root = shutil.copytree(conditional_encoder_repo.root, tmp_path / "repo")
    manifest_file = root / "cond-enc" / "1" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["anomaly"]["class_accuracy"] = REPORTED_CLASS_ACCURACY
    manifest_file.write_text(json.dumps(manifest))
    images = np.random.default_rng(8).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    server = start_server(root, poll_s=0)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            named = client.score(images, anomaly=True)
            projection = client.project(images)
            plain = client.score(images)
    finally:
        server.stop(grace=1)
    np.testing.assert_array_equal(named.labels, projection.labels)
    assert plain.labels is None
