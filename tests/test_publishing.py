"""The publishing gate: a new version keeps the model's interface and its quality; pins roll back."""

import json
import shutil
from pathlib import Path

import pytest

from dcgan_core import publishing
from dcgan_core.repository import Repository, RepositoryError
from dcgan_core.repository_cli import main as repo_main
from tests.conftest import ROOT, tiny_config
from training.export import export_run
from training.export_cli import main as export_main

COMMITTED_RING = ROOT / "exported" / "toy-ring"


@pytest.fixture(scope="module")
def weak_ring_run(tmp_path_factory) -> Path:
    """Two steps of a ring GAN with the committed toy-ring's interface (latent size 100): far
    worse than toy-ring version 1 (8 of 8 modes, about 95% high quality)."""
    from training.gan_step import gan_run

    run_dir = tmp_path_factory.mktemp("weak-ring")
    gan_run(tiny_config(run_dir, data={"dataset": "ring", "toy_epoch_samples": 64},
                        model={"toy_hidden": 16, "toy_layers": 2, "latent_size": 100}, run={"max_steps": 2})).train()
    return run_dir


@pytest.fixture()
def ring_repository(tmp_path) -> Path:
    """A repository holding a copy of the committed toy-ring model (figures without a protocol)."""
    shutil.copytree(COMMITTED_RING, tmp_path / "repo" / "toy-ring")
    (tmp_path / "repo" / "repository.json").write_text("{}")
    return tmp_path / "repo"


def test_a_worse_version_is_refused_with_both_figures_then_published_when_allowed(weak_ring_run, ring_repository,
                                                                                 capsys):
    args = [str(weak_ring_run), "--repository", str(ring_repository), "--name", "toy-ring"]
    assert export_main(args) == 1
    err = capsys.readouterr().err
    assert "refused to publish: the candidate is worse than model 'toy-ring' version 1 in modes_covered" in err
    assert "high_quality" in err and "version 1" in err and "candidate" in err
    assert Repository(ring_repository).versions("toy-ring") == [1]
    assert export_main([*args, "--allow-worse"]) == 0
    manifest = Repository(ring_repository).manifest("toy-ring", 2)
    assert manifest.metrics[publishing.PROTOCOL] == publishing.DEFAULT_PROTOCOL
    assert manifest.metrics["modes_covered"] < 8  # measured, not copied


def test_a_version_as_good_as_the_latest_is_published(ring_repository, capsys):
    """The committed model's own figures, measured again under the default protocol, pass."""
    from training import quality

    repository = Repository(ring_repository)
    latest = repository.latest("toy-ring")
    measured = quality.evaluate_version(repository, latest, publishing.DEFAULT_PROTOCOL)
    assert measured["modes_covered"] == 8 and measured["high_quality"] > 0.9
    publishing.check_quality(latest, measured, measured)
    worse = {**measured, "high_quality": measured["high_quality"] - 0.05}
    with pytest.raises(publishing.Worse, match=r"worse than model 'toy-ring' version 1 in high_quality"):
        publishing.check_quality(latest, measured, worse)


def test_an_incompatible_version_is_refused_naming_the_difference(tiny_toy_run, weak_ring_run, ring_repository,
                                                                  capsys):
    args = ["--repository", str(ring_repository), "--name", "toy-ring"]
    assert export_main([str(tiny_toy_run), *args]) == 2
    assert ("error: model 'toy-ring' cannot take this version (latent size: version 1 has 100, the candidate 8"
            in capsys.readouterr().err)
    shutil.copytree(ROOT / "exported" / "mnist-dcgan" / "3", ring_repository / "mnist-dcgan" / "1")
    manifest = ring_repository / "mnist-dcgan" / "1" / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text(manifest.read_text().replace('"version": 3', '"version": 1'))
    assert export_main([str(weak_ring_run), "--repository", str(ring_repository), "--name", "mnist-dcgan"]) == 2
    assert "kind: version 1 has dcgan, the candidate toy2d" in capsys.readouterr().err
    assert Repository(ring_repository).versions("mnist-dcgan") == [1]


def test_the_library_path_is_gated_too(tiny_run, tiny_toy_run, weak_ring_run, ring_repository, tmp_path):
    repository = Repository(tmp_path)
    export_run(tiny_run, repository, "m")
    with pytest.raises(publishing.Incompatible, match="kind: version 1 has dcgan, the candidate toy2d"):
        export_run(tiny_toy_run, repository, "m")
    assert repository.versions("m") == [1]
    with pytest.raises(publishing.Worse, match="the candidate has no figures to compare with model 'toy-ring' "
                                               "version 1's \\(modes_covered, high_quality\\)"):
        export_run(weak_ring_run, Repository(ring_repository), "toy-ring")  # not measured: not comparable


def test_export_needs_a_repository_or_init(tiny_toy_run, tmp_path, monkeypatch, capsys):
    target = tmp_path / "nowhere"
    assert export_main([str(tiny_toy_run), "--repository", str(target), "--name", "toy"]) == 2
    assert f"no model repository at {target}" in capsys.readouterr().err and not target.exists()
    monkeypatch.setenv("DCGAN_REPOSITORY", str(target))
    from training.export_cli import parser

    assert parser().parse_args([".", "--name", "x"]).repository == target
    assert export_main([str(tiny_toy_run), "--repository", str(target), "--name", "toy", "--init"]) == 0
    assert Repository(target).versions("toy") == [1] and (target / "repository.json").exists()


def test_pin_and_unpin(tiny_toy_run, tmp_path, capsys):
    repository = Repository(tmp_path)
    for _ in range(2):
        export_run(tiny_toy_run, repository, "toy")
    root = ["--repository", str(tmp_path)]
    assert repo_main([*root, "pin", "toy", "1"]) == 0
    assert repository.pins() == {"toy": 1}
    assert repo_main([*root, "list"]) == 0
    assert [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("toy")] == [
        ["toy", "(default)", "1,2"]]
    assert repo_main([*root, "pin", "toy", "7"]) == 2
    assert "model 'toy' version 7 not found" in capsys.readouterr().err
    assert repo_main([*root, "unpin", "toy"]) == 0 and repository.pins() == {}
    assert repo_main([*root, "unpin", "toy"]) == 2
    assert "model 'toy' is not pinned" in capsys.readouterr().err


def test_a_bad_pins_table_is_a_clear_error(tmp_path):
    (tmp_path / "repository.json").write_text(json.dumps({"pins": {"toy": "two"}}))
    with pytest.raises(RepositoryError, match="pins must map model names to version numbers"):
        Repository(tmp_path).pins()


def test_the_gates_noise_covers_the_measured_spread_over_seeds():
    """Each gate's noise is at least the spread bench/fd_over_seeds.py measured for its figure."""
    report = json.loads((ROOT / "bench" / "results" / "fd_over_seeds.json").read_text())
    for figure, per_source in report["figures"].items():
        gate = publishing.GATES[figure]
        for source, values in per_source.items():
            spread = max(values) - min(values)
            allowed = gate.noise * sorted(values)[len(values) // 2] if gate.relative else gate.noise
            assert spread <= allowed + 1e-9, (figure, source, spread, allowed)
