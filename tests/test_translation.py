"""Image-to-image translation (training/translation.py): the MNIST tasks' sources, paired folders in
pix2pix's aligned format (real PNGs), the step under the run loop (resume, grids, evaluation, the
L1-only baseline) and the export of G and D to ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from dcgan_core.repository import Repository
from tests.conftest import tiny_config
from training import translation
from training.cli import main as train_main
from training.data import DataError
from training.export import export_run


def test_sr4_source_is_the_mean_of_each_4x4_block():
    target = np.full((1, 1, 28, 28), -1.0, np.float32)
    target[0, 0, 4:8, 8:12] = 1.0  # one block white
    target[0, 0, 0:4, 0:2] = 1.0  # half a block white
    source = translation.block_mean(target)
    assert source.shape == (1, 1, 7, 7)
    assert source[0, 0, 1, 2] == 1.0 and source[0, 0, 0, 0] == 0.0 and source[0, 0, 3, 3] == -1.0


def test_edges_mark_both_sides_of_a_stroke_and_nothing_inside_or_outside():
    target = np.full((1, 1, 28, 28), -1.0, np.float32)
    target[0, 0, 8:20, 8:20] = 1.0  # a filled square
    edges = translation.edge_map(target)[0, 0]
    assert edges[14, 14] == -1.0 and edges[2, 2] == -1.0  # deep inside, far outside: no edge
    assert edges[8, 14] == 1.0 and edges[7, 14] == 1.0  # the last pixel in and the first out
    assert edges[6, 14] == -1.0 and edges[9, 14] == -1.0


def _paired_folder(root: Path, count: int = 24) -> Path:
    """A | B pairs as real PNGs: A a bright square on black, B the same square inverted."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 8)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            a = np.zeros((28, 28), np.uint8)
            y, x = rng.integers(0, 18, 2)
            a[y:y + 10, x:x + 10] = 255
            Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(root / split / f"{i}.png")
    return root


def _config(tmp_path: Path, data: Path, **run):
    return tiny_config(tmp_path / "run", data={"dataset": "paired", "path": str(data)},
                       model={"ngf": 4, "ndf": 4}, run={"eval_every": 1, "eval_samples": 100, **run},
                       loss={"name": "hinge"})


def test_paired_folders_split_each_image_into_source_and_target_in_either_direction(tmp_path):
    data = _paired_folder(tmp_path / "pairs")
    config = _config(tmp_path, data)
    sources, targets = translation.paired_folder(config)
    assert sources.shape == targets.shape == (24, 1, 28, 28)
    np.testing.assert_allclose(sources, -targets, atol=1e-6)  # B is A inverted
    config.data.direction = "BtoA"
    swapped, _ = translation.paired_folder(config)
    np.testing.assert_array_equal(swapped, targets)


def test_a_translation_run_trains_evaluates_resumes_exactly_and_exports(tmp_path):
    data = _paired_folder(tmp_path / "pairs")
    straight = translation.translation_run(_config(tmp_path / "a", data, max_steps=6))
    straight.train()
    first = translation.translation_run(_config(tmp_path / "b", data, max_steps=4))
    first.train()
    resumed = translation.translation_run(_config(tmp_path / "b", data, max_steps=6))
    assert resumed.step == 4
    resumed.train()
    for name in ("G", "D"):
        a, b = getattr(straight.model, name).state_dict(), getattr(resumed.model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    run_dir = tmp_path / "a" / "run"
    evaluations = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert {"l1", "psnr", "objective"} <= evaluations[0].keys() and len(evaluations) == 2  # 3 steps per epoch
    with Image.open(run_dir / "samples" / "epoch_001.png") as grid:  # source | output | target rows
        assert abs(grid.height / grid.width - 3 / 8) < 0.05  # 3 rows of the 8 validation pairs

    manifest = export_run(run_dir, Repository(tmp_path / "repo"), "squares")
    assert manifest.kind == "translation" and manifest.latent_size == 0
    assert (manifest.generator.input_name, manifest.generator.input_shape) == ("source", [None, 1, 28, 28])
    assert manifest.discriminator.source_input == "source"
    folder = Repository(tmp_path / "repo").version_dir("squares", 1)
    sources, _ = translation.paired_folder(_config(tmp_path, data), "val")
    g = ort.InferenceSession(str(folder / "generator.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = straight.model.G.eval()(torch.from_numpy(sources)).numpy()
    np.testing.assert_allclose(g.run(None, {"source": sources})[0], expected, atol=1e-5)
    d = ort.InferenceSession(str(folder / "discriminator.onnx"), providers=["CPUExecutionProvider"])
    assert d.run(None, {"samples": expected, "source": sources})[0].shape == (8,)


def test_the_l1_baseline_never_touches_its_discriminator(tmp_path):
    data = _paired_folder(tmp_path / "pairs")
    run = translation.translation_run(tiny_config(
        tmp_path / "run", data={"dataset": "paired", "path": str(data)}, model={"ngf": 4, "ndf": 4},
        loss={"adversarial": False}, run={"max_steps": 3}))
    before = {k: v.clone() for k, v in run.model.D.state_dict().items()}
    g_before = {k: v.clone() for k, v in run.model.G.state_dict().items()}
    run.train()
    assert all(torch.equal(before[k], v) for k, v in run.model.D.state_dict().items())
    assert not all(torch.equal(g_before[k], v) for k, v in run.model.G.state_dict().items())


def test_an_mnist_task_trains_from_the_digits(tmp_path, mnist_dir):
    config = tiny_config(tmp_path / "run", data={"dataset": "mnist-sr4", "path": str(mnist_dir)},
                         model={"ngf": 4, "ndf": 4}, optim={"batch_size": 16}, run={"max_steps": 2})
    run = translation.translation_run(config)
    source, target = run.batch_at(0)[::-1]
    assert source.shape == (16, 1, 7, 7) and target.shape == (16, 1, 28, 28)
    torch.testing.assert_close(source, torch.from_numpy(translation.block_mean(target.numpy())))
    assert np.isfinite(run.train().last_metrics["loss_g"])


def test_bad_paired_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="train does not exist"):
        translation.translation_run(_config(tmp_path, tmp_path / "nowhere"))
    (tmp_path / "bad" / "train").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "x.png").write_bytes(b"not a png")
    code = train_main(["--run-dir", str(tmp_path / "run"), "--set", "data.dataset=paired", "--set",
                       f"data.path={tmp_path / 'bad'}", "--no-progress"])
    assert code == 2
    assert "x.png" in capsys.readouterr().err
