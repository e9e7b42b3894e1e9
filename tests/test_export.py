import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dcgan_core.latents import latents
from dcgan_core.repository import Repository, RepositoryError
from training import export
from training.export import ExportError, export_run, load_run
from training.export_cli import main as export_main


def _session(repository: Repository, name: str, version: int, net: str) -> ort.InferenceSession:
    manifest = repository.manifest(name, version)
    spec = getattr(manifest, net)
    return ort.InferenceSession(str(repository.version_dir(name, version) / spec.file),
                                providers=["CPUExecutionProvider"])


def test_export_round_trip_matches_torch(tiny_run, tmp_path):
    repository = Repository(tmp_path)
    manifest = export_run(tiny_run, repository, "tiny")
    assert (manifest.name, manifest.version, manifest.kind) == ("tiny", 1, "dcgan")
    assert manifest.sample_shape == [1, 28, 28] and manifest.latent_size == 8
    assert manifest.generator.input_shape == [None, 8] and manifest.metrics == {}
    assert manifest.training["config"]["model"]["ngf"] == 4 and manifest.training["step"] == 2
    run = load_run(tiny_run)
    z = latents(5, 13, 8)
    images = _session(repository, "tiny", 1, "generator").run(None, {"z": z})[0]
    np.testing.assert_allclose(images, run.generator(torch.from_numpy(z)).detach().numpy(), rtol=1e-3, atol=1e-5)
    logits = _session(repository, "tiny", 1, "discriminator").run(None, {"samples": images})[0]
    assert logits.shape == (13,)
    np.testing.assert_allclose(logits, run.discriminator(torch.from_numpy(images)).detach().numpy(),
                               rtol=1e-3, atol=1e-5)
    assert repository.manifest("tiny", 1) == manifest
    graph = onnx.load(str(repository.version_dir("tiny", 1) / "generator.onnx")).graph
    first = next(node.op_type for node in graph.node if node.op_type in ("MatMul", "Gemm", "ConvTranspose"))
    assert first in ("MatMul", "Gemm")  # G's first layer as the matrix product it is (onnxruntime runs it fast)


def test_toy_export(tiny_toy_run, tmp_path):
    manifest = export_run(tiny_toy_run, Repository(tmp_path), "ring")
    assert manifest.kind == "toy2d" and manifest.sample_shape == [2]
    points = _session(Repository(tmp_path), "ring", 1, "generator").run(None, {"z": latents(0, 4, 8)})[0]
    assert points.shape == (4, 2)


def test_two_exports_make_versions_1_and_2(tiny_run, tmp_path):
    repository = Repository(tmp_path)
    assert [export_run(tiny_run, repository, "m").version for _ in range(2)] == [1, 2]
    assert repository.versions("m") == [1, 2]


def test_broken_export_is_refused_with_figures(tiny_run, tmp_path, monkeypatch):
    original = export._export

    def export_then_damage(model, example, path, input_name, output_name):
        original(model, example, path, input_name, output_name)
        graph = onnx.load(str(path))
        weight = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
        array = onnx.numpy_helper.to_array(weight).copy()
        array.flat[0] += 1.0
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(export, "_export", export_then_damage)
    with pytest.raises(ExportError, match=r"generator.onnx \(samples\): onnxruntime differs from torch at batch 1: "
                                          r"max abs error"):
        export_run(tiny_run, Repository(tmp_path), "m")
    assert Repository(tmp_path).versions("m") == []
    assert list((tmp_path / "m").iterdir()) == []  # the staging folder is gone too


def test_interrupted_export_leaves_no_visible_version(tiny_run, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise SystemExit("killed midway")

    monkeypatch.setattr(export, "check_parity", interrupted)
    with pytest.raises(SystemExit):
        export_run(tiny_run, Repository(tmp_path), "m")
    assert Repository(tmp_path).versions("m") == []
    monkeypatch.undo()
    # a hard kill (no cleanup) leaves a hidden staging folder that nothing reads
    (tmp_path / "m" / ".staging-abc").mkdir()
    (tmp_path / "m" / ".staging-abc" / "generator.onnx").write_bytes(b"partial")
    assert Repository(tmp_path).versions("m") == []
    assert export_run(tiny_run, Repository(tmp_path), "m").version == 1


@pytest.fixture()
def published(tiny_run, tmp_path) -> Repository:
    repository = Repository(tmp_path / "repo")
    export_run(tiny_run, repository, "m")
    return repository


def _rewrite(path, change):
    path.chmod(0o644)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_published_files_are_read_only_and_tamper_is_detected(published):
    folder = published.version_dir("m", 1)
    assert all(not (p.stat().st_mode & 0o222) for p in folder.iterdir())
    target = folder / "discriminator.onnx"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(RepositoryError, match=r"model 'm' version 1: discriminator.onnx sha256 is .* manifest says"):
        published.manifest("m", 1)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("latent_size"), "manifest is missing field 'latent_size'"),
    (lambda d: d.update(kind="vae"), "manifest kind 'vae' is not one of"),
    (lambda d: d.update(format_version=9), "format_version 9 is not supported"),
    (lambda d: d["generator"].update(sha256=3), "field 'generator.sha256' has the wrong type"),
    (lambda d: d.update(version=7), "manifest says model 'm' version 7"),
])
def test_manifest_validation_errors(published, change, message):
    _rewrite(published.version_dir("m", 1) / "manifest.json", change)
    with pytest.raises(RepositoryError, match=f"model 'm' version 1: .*{message}" if "'m'" not in message else message):
        published.manifest("m", 1)


def test_missing_files_and_unknown_models(published):
    folder = published.version_dir("m", 1)
    folder.chmod(0o755)
    (folder / "generator.onnx").unlink()
    with pytest.raises(RepositoryError, match="model 'm' version 1: generator.onnx is missing"):
        published.manifest("m", 1)
    (folder / "manifest.json").unlink()
    with pytest.raises(RepositoryError, match="manifest.json is missing"):
        published.manifest("m", 1)
    with pytest.raises(RepositoryError, match="model 'nope' not found"):
        published.versions("nope")
    with pytest.raises(RepositoryError, match="model 'm' version 5 not found"):
        published.manifest("m", 5)


def test_export_and_repo_cli(tiny_run, tmp_path, capsys, classifier_cache, mnist_dir, monkeypatch):
    from dcgan_core.repository_cli import main as repo_main

    monkeypatch.setenv("DCGAN_CACHE", str(classifier_cache))
    assert export_main([str(tiny_run), "--repository", str(tmp_path), "--name", "cli", "--data-dir",
                        str(mnist_dir)]) == 0
    out = capsys.readouterr().out
    assert "published cli version 1" in out and "  fd " in out and "  is " in out
    assert Repository(tmp_path).manifest("cli", 1).metrics["protocol"] == {"samples": 10000, "seed": 0}
    assert repo_main(["--repository", str(tmp_path), "list"]) == 0
    assert "cli (default)" in capsys.readouterr().out
    assert repo_main(["--repository", str(tmp_path), "show", "cli"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert export_main([str(tmp_path / "nope"), "--repository", str(tmp_path), "--name", "x"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert repo_main(["--repository", str(tmp_path), "show", "ghost"]) == 2
    shutil.rmtree(tmp_path / "cli")
