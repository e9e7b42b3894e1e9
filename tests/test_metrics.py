import json

import numpy as np
import pytest
import torch

from training import classifier, metrics
from training.data import toy_mixture
from training.evaluate import EvalError, load_samples
from training.evaluate import main as eval_main


def test_frechet_distance_identical_sets_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 8))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.standard_normal((4000, 8))
    near = metrics.frechet_distance(a, b)
    assert near < 0.05
    shifted = metrics.frechet_distance(a, b + 1.0)
    assert shifted == pytest.approx(8.0, rel=0.05)  # ||mu shift||^2 = 8 * 1^2
    assert metrics.frechet_distance(a, b * 2.0) > near  # a wider set is further away


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200000, 2)) * [1.0, 2.0]
    b = rng.standard_normal((200000, 2)) * [3.0, 1.0]
    # diagonal: sum (s_a - s_b)^2 = (1-3)^2 + (2-1)^2 = 5
    assert metrics.frechet_distance(a, b) == pytest.approx(5.0, rel=0.02)


def test_inception_score_and_coverage_on_constructed_predictions():
    confident_all_classes = np.eye(10)[np.arange(1000) % 10]
    assert metrics.inception_score(confident_all_classes) == pytest.approx(10.0, rel=1e-6)
    one_class = np.eye(10)[np.zeros(1000, int)]
    assert metrics.inception_score(one_class) == pytest.approx(1.0, rel=1e-6)
    coverage = metrics.class_coverage(one_class)
    assert coverage["min"] == 0.0 and coverage["max"] == 1.0
    uniform = metrics.class_coverage(confident_all_classes)
    assert uniform["min"] == uniform["max"] == pytest.approx(0.1)


def test_toy_metrics_count_modes_of_a_known_mixture():
    ring = toy_mixture("ring")
    gen = torch.Generator().manual_seed(0)
    perfect = metrics.toy_metrics(ring.sample(8000, gen).numpy(), ring)
    assert perfect["modes_covered"] == 8 and perfect["high_quality"] > 0.98 and perfect["reverse_kl"] < 0.01
    # five of eight modes, plus 20% junk far from every mode
    rng = np.random.default_rng(0)
    five = ring.means[rng.integers(0, 5, 4000)] + rng.normal(0, ring.sigma, (4000, 2))
    junk = rng.uniform(-0.3, 0.3, (1000, 2))
    partial = metrics.toy_metrics(np.concatenate([five, junk]), ring)
    assert partial["modes_covered"] == 5
    assert partial["high_quality"] == pytest.approx(0.8, abs=0.01)
    assert partial["reverse_kl"] == pytest.approx(np.log(8 / 5), abs=0.02)


@pytest.fixture(scope="module")
def quick_classifier_cache(mnist_dir, tmp_path_factory, monkeypatch_module):
    """A classifier trained for 60 steps, placed where load_classifier looks (tests only)."""
    cache = tmp_path_factory.mktemp("cache")
    model = classifier.train_classifier(mnist_dir, epochs=1, max_steps=60, progress=False)
    torch.save(model.state_dict(), classifier.classifier_path(cache))
    monkeypatch_module.setenv("DCGAN_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
def test_eval_cli_on_tiny_generator_and_its_samples(tiny_run, mnist_dir, quick_classifier_cache, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert eval_main([str(tiny_run), "--count", "500", "--data-dir", str(mnist_dir), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fd" in table and "real floor" in table
    result = json.loads(out.read_text())
    assert result["samples"] == 500 and result["fd"] > result["real_floor"]["fd"]
    assert 1.0 <= result["is"] <= 10.0 and result["real_floor"]["is"] > result["is"]
    # the same samples as a .npy give the same numbers
    samples = load_samples(tiny_run, 500, 0).values
    np.save(tmp_path / "s.npy", samples)
    assert eval_main([str(tmp_path / "s.npy"), "--data-dir", str(mnist_dir), "--no-floor",
                      "--json", str(tmp_path / "npy.json")]) == 0
    assert json.loads((tmp_path / "npy.json").read_text())["fd"] == pytest.approx(result["fd"], rel=1e-6)


def test_eval_cli_toy_and_errors(tiny_toy_run, tmp_path, capsys):
    assert eval_main([str(tiny_toy_run), "--count", "300"]) == 0
    assert "modes_covered" in capsys.readouterr().out
    np.save(tmp_path / "points.npy", np.zeros((10, 2), np.float32))
    assert eval_main([str(tmp_path / "points.npy")]) == 2
    assert "need --toy ring|grid" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "nothing")]) == 2
    assert eval_main([str(tmp_path / "points.npy"), "--metrics", "fid"]) == 2
    assert "unknown metric 'fid'" in capsys.readouterr().err
    with pytest.raises(EvalError, match="no checkpoint.pt and no PNG files"):
        load_samples(tmp_path, 10, 0)


@pytest.mark.slow
def test_training_evaluates_each_epoch_and_keeps_the_best(tmp_path, mnist_dir, quick_classifier_cache):
    from dcgan_core.repository import Repository
    from tests.conftest import tiny_config
    from training import checkpoint
    from training.export import ExportOptions, export_run
    from training.gan_step import gan_run

    evaluated = gan_run(tiny_config(tmp_path / "eval", data={"path": str(mnist_dir)},
                                    run={"eval_every": 1, "eval_samples": 200}))
    evaluated.train()
    plain = gan_run(tiny_config(tmp_path / "plain"))
    plain.train()
    for key, value in plain.model.G.state_dict().items():  # evaluating takes no training randomness
        assert torch.equal(value, evaluated.model.G.state_dict()[key]), key
    records = [json.loads(line) for line in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["best"]
    best = min(records, key=lambda r: r["fd"])
    state = checkpoint.load(tmp_path / "eval" / checkpoint.BEST_NAME)
    assert state.step == best["step"] and state.best_objective == pytest.approx(best["fd"])
    manifest = export_run(tmp_path / "eval", Repository(tmp_path / "repo"), "tiny",
                          options=ExportOptions(checkpoint_name=checkpoint.BEST_NAME))
    assert manifest.training["checkpoint"] == "best.pt" and manifest.training["step"] == best["step"]


def test_in_training_evaluation_needs_mnist_shaped_images():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"run.eval_every = 1 is invalid: expected 0 unless the data is a toy, "
                                          r"pairs to translate, or 1x28x28 images"):
        load_config("folder", overrides=[{"data": {"path": "photos"}, "run": {"eval_every": 1}}])


def test_toy_training_keeps_the_epoch_with_all_modes_and_most_high_quality(tmp_path):
    from training import checkpoint
    from training.config import load_config
    from training.gan_step import gan_run

    config = load_config("ring", overrides=[{
        "data": {"toy_epoch_samples": 2048},
        "run": {"run_dir": str(tmp_path), "epochs": 3, "eval_every": 1, "eval_samples": 500, "progress": False}}])
    gan_run(config).train()
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:  # objective: missing modes, then the share of low-quality samples
        assert r["objective"] == pytest.approx(8 - r["modes_covered"] + 1 - r["high_quality"])
    best = min(records, key=lambda r: r["objective"])
    assert best["best"]
    assert checkpoint.load(tmp_path / checkpoint.BEST_NAME).step == best["step"]
    assert load_samples(tmp_path, 100, 0, best=True).values.shape == (100, 2)
    with pytest.raises(EvalError, match=r"no best.pt \(a run keeps one only with run.eval_every\)"):
        load_samples(tmp_path / "elsewhere", 100, 0, best=True)
