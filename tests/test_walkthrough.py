"""The newcomer's first steps (issue 25's walk-through): each test names a stumble it removed."""

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serving.client.cli import main as client_main
from tests.conftest import ROOT, start_server


@pytest.fixture(scope="module")
def server(serving_repo):
    server = start_server(serving_repo, poll_s=0)
    yield server
    server.stop(grace=1)


@pytest.fixture()
def target(server) -> list[str]:
    return ["--target", f"127.0.0.1:{server.port}"]


def test_toy_samples_are_written_as_npy_and_csv(target, tmp_path, client):
    assert client_main([*target, "sample", "--model", "toy", "--count", "5", "--seed", "2",
                        "--out", str(tmp_path / "points.npy")]) == 0
    points = np.load(tmp_path / "points.npy")
    assert points.shape == (5, 2) and points.dtype == np.float32
    np.testing.assert_array_equal(points, client.sample(5, model="toy", seed=2).images)
    assert client_main([*target, "sample", "--model", "toy", "--count", "5", "--seed", "2",
                        "--out", str(tmp_path / "points.csv")]) == 0
    lines = (tmp_path / "points.csv").read_text().splitlines()
    assert lines[0] == "x,y" and len(lines) == 6
    np.testing.assert_allclose(np.array([[float(v) for v in line.split(",")] for line in lines[1:]]), points,
                               rtol=1e-5)


def test_pictures_follow_their_suffix_and_scale(target, tmp_path, capsys):
    for suffix, pillow_format in [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP"), (".gif", "GIF")]:
        path = tmp_path / f"grid{suffix}"
        assert client_main([*target, "sample", "--count", "4", "--seed", "1", "--out", str(path)]) == 0
        with Image.open(path) as grid:
            assert grid.format == pillow_format and grid.size == (4 * (2 + 2 * 30), 4 * (2 + 2 * 30))
    assert client_main([*target, "sample", "--count", "4", "--seed", "1", "--scale", "1",
                        "--out", str(tmp_path / "small.png")]) == 0
    with Image.open(tmp_path / "small.png") as grid:
        assert grid.size == (2 + 2 * 30, 2 + 2 * 30)
    with pytest.raises(SystemExit) as usage:
        client_main([*target, "sample", "--count", "4", "--scale", "0", "--out", str(tmp_path / "grid.png")])
    assert usage.value.code == 2 and "--scale: must be a whole number >= 1, got '0'" in capsys.readouterr().err
    assert client_main([*target, "sample", "--count", "4", "--out", str(tmp_path / "grid.bmp")]) == 2
    assert "grid.bmp: cannot write .bmp; pictures are .png, .jpg, .jpeg, .webp, .gif" in capsys.readouterr().err
    assert client_main([*target, "walk", "--from-seed", "1", "--to-seed", "2", "--steps", "3",
                        "--out", str(tmp_path / "strip.webp")]) == 0
    with Image.open(tmp_path / "strip.webp") as strip:
        assert strip.size == (4 * (2 + 3 * 30), 4 * 30 + 8)


def test_score_takes_folders_names_bad_files_and_says_some_failed(target, tmp_path, client, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, image in enumerate(client.sample(3, seed=4, encoding="png").png):
        (folder / f"img{index}.png").write_bytes(image)
    (folder / "broken.png").write_bytes(b"not a picture")
    extra = tmp_path / "extra.png"
    extra.write_bytes(client.sample(1, seed=5, encoding="png").png[0])
    assert client_main([*target, "score", str(folder), str(extra), "--batch", "2"]) == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line for line in captured.out.splitlines()[1:]}
    assert len(rows) == 5 and "skipped: " in rows[str(folder / "broken.png")]
    assert "cannot decode image: 13 bytes in no image format Pillow reads" in rows[str(folder / "broken.png")]
    assert "_io.BytesIO" not in captured.out
    assert all("skipped" not in line for path, line in rows.items() if "broken" not in path)
    assert "1 of 5 files could not be scored" in captured.err


def test_models_show_classes_figures_and_policy(conditional_repo, tmp_path, capsys):
    import shutil

    shutil.copytree(conditional_repo.root / "cond", tmp_path / "cond")
    shutil.copytree(ROOT / "exported" / "toy-ring", tmp_path / "toy-ring")
    server = start_server(tmp_path, poll_s=0)
    try:
        assert client_main(["--target", f"127.0.0.1:{server.port}", "models"]) == 0
    finally:
        server.stop(grace=1)
    out = capsys.readouterr().out
    assert "cond (default): dcgan 1x28x28, latent 8, classes 0, 1, 2; policy latest:1" in out
    assert "v1 READY on CPUExecutionProvider  modes_covered=8 high_quality=0.9454" in out


def test_the_target_comes_from_the_environment(server, tmp_path, monkeypatch):
    from serving.client.cli import build_parser

    monkeypatch.setenv("DCGAN_TARGET", f"127.0.0.1:{server.port}")
    assert build_parser().parse_args(["models"]).target == f"127.0.0.1:{server.port}"


def test_local_sampling_needs_no_server_and_matches_one(client, tmp_path, serving_repo):
    assert client_main(["--target", "127.0.0.1:1", "--local", str(serving_repo / "tiny" / "1"), "sample",
                        "--count", "4", "--seed", "9", "--scale", "1", "--out", str(tmp_path / "local.png")]) == 0
    with Image.open(tmp_path / "local.png") as local:
        from dcgan_core import images

        served = images.make_grid(client.sample(4, model="tiny", seed=9).images)
        np.testing.assert_array_equal(np.asarray(local), served[0])
    assert client_main(["--local", str(tmp_path), "models"]) == 2


def test_local_sampling_of_a_training_run(tiny_run, tmp_path):
    assert client_main(["--local", str(tiny_run), "sample", "--count", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(ROOT / "exported"),
                           "--host", "127.0.0.1", "--poll-s", "0", "--http-port", "0", *flags], capture_output=True,
                          text=True, timeout=120)


def test_a_port_out_of_range_is_a_usage_error():
    done = _serve("--port", "99999", "--metrics-port", "-1")
    assert done.returncode == 2 and "port = 99999 must be between 0 and 65535" in done.stderr
    done = _serve("--port", "0", "--metrics-port", "70000")
    assert done.returncode == 2 and "metrics_port = 70000 must be between -1 and 65535" in done.stderr


@pytest.mark.slow
def test_a_metrics_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve("--port", "0", "--metrics-port", str(port))
    assert done.returncode == 2 and f"cannot serve metrics on 127.0.0.1 port {port}" in done.stderr


def test_an_http_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve("--port", "0", "--metrics-port", "-1", "--http-port", str(port))
    assert done.returncode == 2 and f"cannot serve HTTP on port {port}" in done.stderr, done.stderr
    assert "http_port = 70000 must be between -1 and 65535" in _serve("--http-port", "70000").stderr


def _parsers():
    """Each command's parser, as its main builds it (caught at parse_args), with its subcommands."""
    from dcgan_core.repository_cli import main as repo
    from serving.client.healthcheck import main as healthcheck
    from serving.cluster import main as cluster
    from serving.server.app import main as serve
    from training.cli import main as train
    from training.evaluate import main as evaluate
    from training.export_cli import main as export

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    for main in (train, export, evaluate, repo, serve, client_main, cluster, healthcheck):
        original, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, catch
        try:
            main([])
        except Caught as caught:
            parser = caught.args[0]
        finally:
            argparse.ArgumentParser.parse_args = original
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from action.choices.values()


def test_every_help_shows_the_defaults():
    missing = []
    for parser in _parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            unset = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default == []
            if action.option_strings and not unset and "default" not in formatter._format_action(action):
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing


def test_export_prints_no_third_party_warnings(tiny_toy_run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "training.export_cli", str(tiny_toy_run), "--repository",
                           str(tmp_path / "repo"), "--init", "--name", "toy"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "default"}, timeout=300)
    assert done.returncode == 0, done.stderr
    foreign = [line for line in done.stderr.splitlines() if " INFO training." not in line]
    assert not foreign, foreign


def test_the_training_summary_names_best_pt(tmp_path, caplog):
    import logging

    from training.cli import main as train

    run_dir = tmp_path / "ring"
    with caplog.at_level(logging.INFO):
        assert train(["--preset", "ring", "--run-dir", str(run_dir), "--no-progress", "--set", "run.max_steps=4",
                      "--set", "data.toy_epoch_samples=512", "--set", "model.toy_hidden=16"]) == 0
    assert f"best evaluation kept in {run_dir / 'best.pt'}; publish it with: dcgan-export {run_dir} --best" in \
        caplog.text
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[0])["epoch"] == 1  # evaluated every epoch
