"""Class-conditional training (model.num_classes > 0): CGAN generator, projection discriminator,
labelled data, fake labels from the class frequencies, per-class grids, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_core import images
from tests.conftest import tiny_config
from training import checkpoint
from training.config import ConfigError, load_config
from training.data import DataError, build_batches
from training.gan_step import gan_run
from training.metrics import class_consistency
from training.models import Discriminator, Generator


def conditional(run_dir, classes: int = 3, **sections):
    model = {"num_classes": classes, **sections.pop("model", {})}
    return tiny_config(run_dir, model=model, **sections)


def test_the_label_changes_what_g_makes_and_how_d_scores():
    torch.manual_seed(0)
    g, d = Generator(8, 1, 28, 4, num_classes=3), Discriminator(1, 28, 4, True, num_classes=3)
    z = torch.randn(4, 8)
    a, b = g(z, torch.zeros(4, dtype=torch.long)), g(z, torch.ones(4, dtype=torch.long))
    assert a.shape == (4, 1, 28, 28) and not torch.allclose(a, b)
    assert not torch.allclose(d(a, torch.zeros(4, dtype=torch.long)), d(a, torch.full((4,), 2)))


@pytest.mark.parametrize("loss, spectral", [("nonsaturating", False), ("hinge", True), ("wgan-gp", False)])
def test_conditional_training_steps_with_every_loss(tmp_path, loss, spectral):
    config = conditional(tmp_path, loss={"name": loss}, model={"spectral_norm": spectral},
                         run={"max_steps": 3})
    result = gan_run(config).train()
    assert result.step == 3 and all(np.isfinite(v) for k, v in result.last_metrics.items() if k != "loss_g")
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved.config["model"]["class_names"] == ["0", "1", "2"]


def test_a_conditional_run_resumes_exactly(tmp_path):
    gan_run(conditional(tmp_path / "a", run={"max_steps": 5})).train()
    gan_run(conditional(tmp_path / "a")).train()
    gan_run(conditional(tmp_path / "b")).train()
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("a", "b"))
    assert a.step == b.step == 16
    for key, tensor in b.model["generator"].items():
        assert torch.equal(a.model["generator"][key], tensor), key


def test_fake_labels_follow_the_class_frequencies(tmp_path):
    trainer = gan_run(conditional(tmp_path, classes=4))
    trainer.batches.class_labels = torch.full_like(trainer.batches.class_labels, 2)
    trainer.model.fake_label_weights = trainer.batches.class_frequencies()
    assert torch.equal(trainer.model._fake_labels(50), torch.full((50,), 2))


def test_the_fixed_grid_has_one_labelled_row_per_class(tmp_path):
    gan_run(conditional(tmp_path, classes=3, run={"max_steps": 8, "sample_count": 12})).train()
    with Image.open(tmp_path / "samples" / "latest.png") as grid:
        height, width = grid.height, grid.width
    assert height == 2 + 3 * (28 + 2)  # three rows of 28-pixel images
    assert width > 2 + 4 * (28 + 2)  # four columns plus the caption margin


def _class_folder(root, classes=("cat", "ant", "bee"), per_class=6):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(images.encode_png(rng.integers(0, 256, (3, 40, 40), np.uint8)))
    return root


def test_a_folder_of_class_folders_gives_sorted_class_names(tmp_path):
    folder = _class_folder(tmp_path / "data")
    config = load_config("folder", overrides=[{"data": {"path": str(folder), "image_size": 32},
                                               "model": {"num_classes": 3}, "optim": {"batch_size": 4},
                                               "run": {"run_dir": str(tmp_path / "run")}}])
    batches = build_batches(config)
    assert batches.class_names == ["ant", "bee", "cat"]
    assert sorted(np.bincount(batches.class_labels.numpy()).tolist()) == [6, 6, 6]


def test_folder_class_errors(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(images.encode_png(np.zeros((3, 32, 32), np.uint8)))
    base = {"data": {"path": str(flat), "image_size": 32}, "optim": {"batch_size": 1}}
    with pytest.raises(DataError, match="has no class sub-folders; model.num_classes > 0 needs one sub-folder"):
        build_batches(load_config("folder", overrides=[base, {"model": {"num_classes": 2}}]))
    folder = _class_folder(tmp_path / "two", classes=("x", "y"))
    with pytest.raises(DataError, match="has 2 classes \\(x, y\\), model.num_classes is 3"):
        build_batches(load_config("folder", overrides=[{**base, "data": {"path": str(folder), "image_size": 32}},
                                                       {"model": {"num_classes": 3}}]))


def test_toys_stay_unconditional_and_mnist_has_ten_classes():
    with pytest.raises(ConfigError, match="model.num_classes = 3 is invalid: expected 0 for the 2-D toys"):
        load_config("ring", overrides=[{"model": {"num_classes": 3}}])
    with pytest.raises(ConfigError, match="10 for MNIST"):
        load_config("mnist", overrides=[{"model": {"num_classes": 4}}])


def test_class_consistency():
    probabilities = np.eye(3)[[0, 1, 2, 2, 1, 0]]
    result = class_consistency(probabilities, np.array([0, 1, 2, 1, 1, 0]), classes=3)
    assert result["consistency"] == pytest.approx(5 / 6)
    assert result["consistency_per_class"] == [1.0, pytest.approx(2 / 3, abs=1e-4), 1.0]
    assert result["consistency_min"] == pytest.approx(2 / 3)


def test_a_conditional_run_exports_with_labels_and_loads_in_the_server(tmp_path):
    import onnxruntime as ort

    from dcgan_core.latents import latents
    from dcgan_core.repository import Repository
    from tests.conftest import start_server
    from training.export import export_run, load_run

    gan_run(conditional(tmp_path / "run", run={"max_steps": 3})).train()
    repository = Repository(tmp_path / "repo")
    manifest = export_run(tmp_path / "run", repository, "cond")
    assert (manifest.num_classes, manifest.class_names) == (3, ["0", "1", "2"])
    assert manifest.generator.label_input == manifest.discriminator.label_input == "labels"
    assert repository.manifest("cond", 1) == manifest  # the written manifest reads back the same
    session = ort.InferenceSession(str(repository.version_dir("cond", 1) / "generator.onnx"))
    z, labels = latents(5, 6, 8), np.array([0, 1, 2, 2, 1, 0], np.int64)
    with torch.no_grad():
        expected = load_run(tmp_path / "run").generator(torch.from_numpy(z), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(session.run(None, {"z": z, "labels": labels})[0], expected, rtol=1e-3, atol=1e-5)
    server = start_server(repository.root, poll_s=0)
    try:
        entry = server.store.models()["cond"].versions[1]
        assert entry.state == "READY", entry.error
    finally:
        server.stop(grace=1)


@pytest.mark.slow  # trains the evaluation classifier
def test_dcgan_eval_scores_class_consistency_of_a_conditional_run(tmp_path, mnist_dir, classifier_cache,
                                                                  monkeypatch):
    from training.evaluate import evaluate, load_samples

    monkeypatch.setenv("DCGAN_CACHE", str(classifier_cache))

    gan_run(conditional(tmp_path / "run", classes=10, run={"max_steps": 2})).train()
    samples = load_samples(tmp_path / "run", 200, seed=0)
    assert samples.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    result = evaluate(samples, mnist_dir, ["consistency", "fd"], floor=True, progress=False)
    assert 0.0 <= result["consistency"] <= 1.0 and len(result["consistency_per_class"]) == 10
    assert len(result["fd_per_class"]) == 10
    assert result["real_floor"]["consistency"] > 0.98  # real digits are what the classifier was trained on


def test_conditional_batchnorm_generator_trains_resumes_and_exports(tmp_path):
    from dcgan_core.repository import Repository
    from training.export import export_run

    config = lambda d, **run: conditional(tmp_path / d, model={"g_conditioning": "cbn"}, run=run)  # noqa: E731
    gan_run(config("a", max_steps=5)).train()
    gan_run(config("a")).train()
    gan_run(config("b")).train()
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("a", "b"))
    assert any("gain" in key for key in a.model["generator"])
    for key, tensor in b.model["generator"].items():
        assert torch.equal(a.model["generator"][key], tensor), key
    manifest = export_run(tmp_path / "a", Repository(tmp_path / "repo"), "cbn")  # parity checked inside
    assert manifest.num_classes == 3


def test_the_run_records_the_data_class_names_without_changing_the_callers_config(tmp_path):
    given = conditional(tmp_path, run={"max_steps": 1})
    run = gan_run(given)
    assert run.config.model.class_names == ["0", "1", "2"]
    assert given.model.class_names == []  # the config travels unchanged
