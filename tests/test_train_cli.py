import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from training.cli import main

pytestmark = pytest.mark.slow  # real processes (servers, torchrun, Envoy) or long training runs

TINY = ["--set", "model.ngf=4", "--set", "model.ndf=4", "--set", "optim.batch_size=16", "--no-progress"]


def test_cli_trains_mnist_subset_end_to_end(mnist_dir, tmp_path):
    """Real MNIST files, a few steps: checkpoint, grid PNG and metrics log are written."""
    code = main(["--preset", "mnist", "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path),
                 "--set", "run.max_steps=3", *TINY])
    assert code == 0
    assert (tmp_path / "checkpoint.pt").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_cli_folder_preset_with_config_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (40 + i, 40), (i * 10, 100, 200)).save(folder / f"{i}.png")
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{folder}"\nimage_size = 32\n[run]\nepochs = 1\n'
                      f'run_dir = "{tmp_path / "run"}"\n[optim]\nbatch_size = 8\n')
    assert main(["--preset", "folder", "--config", str(config), *TINY[:4], "--no-progress"]) == 0
    grid = Image.open(tmp_path / "run" / "samples" / "epoch_001.png")
    assert grid.mode == "RGB" and grid.width > 32 * 8
    assert (tmp_path / "run" / "curves.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr=1"], "unknown key optim.lr; keys of [optim] are"),
    (["--set", "optim.batch_size=big"], "optim.batch_size = 'big' is not a valid int"),
    (["--set", "nonsense"], "expected section.key=value"),
    (["--set", "loss.name=l2"], "loss.name = 'l2' is invalid: expected one of minimax"),
    (["--preset", "mnist", "--data-dir", "/nonexistent"], "train-images-idx3-ubyte.gz is missing"),
    (["--set", "data.image_size=48"], "data.image_size = 48 is invalid"),
])
def test_cli_bad_input_exits_2_with_message(args, message, capsys, tmp_path):
    assert main([*args, "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nngf = 1.5\n")
    assert main(["--config", str(bad)]) == 2
    assert "model.ngf = 1.5 must be int" in capsys.readouterr().err
    bad.write_text("[model\n")
    assert main(["--config", str(bad)]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    bad.write_text("[modle]\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown section [modle]" in capsys.readouterr().err


def test_dry_run_console_script(tmp_path):
    script = Path(sys.executable).with_name("dcgan-train")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([*command, "--dry-run", "--no-progress"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "done: step 4" in done.stderr and str(tmp_path) in done.stderr  # it ran in TMPDIR ...
    assert list(tmp_path.glob("dcgan-dry-run-*")) == []  # ... and removed its run directory


def test_sigterm_writes_checkpoint_and_resumes(tmp_path):
    """A real process killed with SIGTERM mid-run leaves a checkpoint; a restart resumes it."""
    import signal

    from tests.conftest import wait_for

    args = [sys.executable, "-m", "training.cli", "--preset", "ring", "--run-dir", str(tmp_path),
            "--no-progress", "--set", "run.checkpoint_every=100000", "--set", "run.epochs=50"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    assert wait_for(lambda: metrics.exists() and metrics.stat().st_size >= 20000, 120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    from training import checkpoint

    saved = checkpoint.load(tmp_path / "checkpoint.pt").step
    assert saved > 0
    done = subprocess.run(args[:-2] + ["--set", f"run.max_steps={saved + 5}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"step {saved} of {saved + 5}" in done.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 6))
