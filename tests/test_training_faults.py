"""Training, checkpoints and export under faults: real processes stopped by SIGTERM and kill -9 at
random points, a full disk, corrupt or foreign inputs, two processes on one run directory."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from dcgan_core.repository import Manifest, NetworkSpec, Repository, RepositoryError, remove_stale_staging
from tests.conftest import tiny_config, wait_for
from training import checkpoint
from training.cli import main as train_main

pytestmark = pytest.mark.slow  # real processes (servers, torchrun, Envoy) or long training runs

RING = ["--preset", "ring", "--no-progress", "--set", "run.epochs=4", "--set", "data.toy_epoch_samples=16384",
        "--set", "run.eval_every=2", "--set", "run.checkpoint_every=16"]


def _train(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.cli", *RING, "--run-dir", str(run_dir), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _generator(run_dir: Path, name: str = "checkpoint.pt") -> dict:
    return checkpoint.load(run_dir / name).model["generator"]


def test_stopped_and_killed_at_random_points_a_run_ends_as_an_uninterrupted_one(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    reference = _train(straight)
    assert reference.wait(300) == 0, reference.stderr.read()
    rng = random.Random(1234)
    for how in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        proc = _train(interrupted)
        metrics = interrupted / "metrics.jsonl"
        size = metrics.stat().st_size if metrics.exists() else 0
        target = size + rng.randint(500, 12000)  # some steps into this attempt
        wait_for(lambda: proc.poll() is not None or (metrics.exists() and metrics.stat().st_size >= target), 120)
        proc.send_signal(how)
        code = proc.wait(120)
        assert code in (0, 130, -signal.SIGKILL), proc.stderr.read()
        if code == 0:
            break  # it finished before the signal landed
    finish = _train(interrupted)
    assert finish.wait(300) == 0, finish.stderr.read()
    for key, tensor in _generator(straight).items():
        assert torch.equal(_generator(interrupted)[key], tensor), key
    evaluations = [json.loads(line) for line in (interrupted / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evaluations] == [2, 4]  # each evaluation once, none lost
    assert evaluations == [json.loads(line) for line in (straight / "eval.jsonl").read_text().splitlines()]
    for key, tensor in _generator(straight, "best.pt").items():
        assert torch.equal(_generator(interrupted, "best.pt")[key], tensor), key
    assert not list(interrupted.rglob(".*.tmp"))


def test_a_crash_while_saving_the_epoch_end_checkpoint_loses_no_evaluation(tmp_path, monkeypatch):
    """The evaluation is durable (best.pt, eval.jsonl) before checkpoint.pt moves past its epoch."""
    config = tiny_config(tmp_path, data={"dataset": "ring", "toy_epoch_samples": 64},
                         model={"toy_hidden": 16, "toy_layers": 2}, run={"eval_every": 1, "checkpoint_every": 1000})
    from training.gan_step import gan_run

    save = checkpoint.save

    def crash_at_first_epoch_end(path, state):
        if path.name == checkpoint.CHECKPOINT_NAME and state.step == 8:
            raise KeyboardInterrupt("killed while writing checkpoint.pt")
        save(path, state)

    monkeypatch.setattr(checkpoint, "save", crash_at_first_epoch_end)
    with pytest.raises(KeyboardInterrupt):
        gan_run(config).train()
    assert (tmp_path / "best.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
    monkeypatch.setattr(checkpoint, "save", save)
    gan_run(config).train()
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_leftover_temporaries_are_removed_and_a_second_trainer_is_refused(tmp_path, capsys):
    config = tiny_config(tmp_path, run={"max_steps": 2})
    from dcgan_core import locking
    from training.gan_step import gan_run
    from training.run_loop import RUN_LOCK

    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".latest.png.abc.tmp").write_bytes(b"half a png")
    gan_run(config).train()
    assert not list(tmp_path.rglob(".*.tmp"))
    with locking.exclusive(tmp_path / RUN_LOCK, "held by this test"):  # as another live trainer would
        args = ["--run-dir", str(tmp_path), "--set", "data.dataset=synthetic", "--set", "run.max_steps=3"]
        assert train_main(args + ["--no-progress"]) == 2
    assert f"is in use by another process (pid {os.getpid()})" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_foreign_checkpoint_is_refused_without_running_its_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "foreign"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as handle:
        pickle.dump({"format": 1, "payload": _Payload()}, handle)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint"):
        checkpoint.load(run / "checkpoint.pt")
    from training.export_cli import main as export_main

    assert export_main([str(run), "--repository", str(tmp_path / "repo"), "--name", "x"]) == 2
    assert not (tmp_path / "pwned").exists()


def _fake_build(folder: Path) -> Manifest:
    (folder / "generator.onnx").write_bytes(b"g")
    spec = NetworkSpec("generator.onnx", "z", [None, 2], "samples", [None, 2], "0" * 64)
    return Manifest(name="m", version=0, kind="toy2d", latent_size=2, sample_shape=[2], value_range=[-1.0, 1.0],
                    opset=20, generator=spec, discriminator=spec, created="now")


def test_publish_refuses_a_stray_file_named_like_the_next_version(tmp_path):
    repository = Repository(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "1").write_text("not a version")
    with pytest.raises(RepositoryError, match="m/1 exists and is not a version folder"):
        repository.publish("m", _fake_build)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # the staging folder is gone too


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    model = tmp_path / "m"
    dead, live, old_unlocked = model / ".staging-dead", model / ".staging-live", model / ".staging-old"
    for folder in (dead, live, old_unlocked):
        folder.mkdir(parents=True)
    (dead / ".owner.lock").touch()
    os.utime(old_unlocked, (0, 0))  # no lock file and older than a minute: an exporter killed long ago
    held = os.open(live / ".owner.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert sorted(p.name for p in remove_stale_staging(model)) == [".staging-dead", ".staging-old"]
        assert live.exists() and not dead.exists()
    finally:
        os.close(held)


# ---------------------------------------------------------------- one-line failures


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", "--no-progress", *args],
                          capture_output=True, text=True, timeout=300)


def _one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode not in (0, 1), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dcgan-train: error")]
    assert len(errors) == 1 and fragment in errors[0], done.stderr


def test_a_flipped_byte_in_an_mnist_gz_without_checksums(mnist_dir, tmp_path):
    for path in mnist_dir.glob("*.gz"):
        shutil.copy(path, tmp_path / path.name)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    original = target.read_bytes()
    for at in range(len(original)):  # the first flip that zlib itself rejects (not gzip's CRC check)
        data = bytearray(original)
        data[at] ^= 0x10
        try:
            gzip.decompress(bytes(data))
        except zlib.error:
            break
        except (OSError, EOFError):
            continue
    target.write_bytes(bytes(data))
    done = _run_cli("--preset", "mnist", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    _one_line_error(done, f"{target}")


@pytest.mark.parametrize("args, fragment", [
    (["--config", "BINARY"], "is not UTF-8 text"),
    (["--seed", "-1"], "run.seed = -1 is invalid"),
    (["--run-dir", "FILE"], "run.run_dir = "),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, fragment):
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    (tmp_path / "a-file").write_text("x")
    args = [{"BINARY": str(tmp_path / "binary.toml"), "FILE": str(tmp_path / "a-file")}.get(a, a) for a in args]
    done = _run_cli("--dry-run", *args)
    _one_line_error(done, fragment)


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real full disk (needs root and mount; skipped where not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the disk's free space (in a new filler file each time)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / f"filler-{len(list(disk.glob('filler-*')))}", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_full_disk_during_training_and_at_restart(small_disk, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text('[data]\ndataset = "synthetic"\nsynthetic_samples = 64\n[model]\nngf = 4\nndf = 4\n'
                      'latent_size = 8\n[optim]\nbatch_size = 8\n[run]\nepochs = 3\ncheckpoint_every = 2\n')
    run = small_disk / "run"
    assert _run_cli("--config", str(config), "--run-dir", str(run), "--set", "run.max_steps=4").returncode == 0
    size = (run / "checkpoint.pt").stat().st_size
    _fill(small_disk, leave=size // 2)  # the next checkpoint cannot be written
    done = _run_cli("--config", str(config), "--run-dir", str(run))
    _one_line_error(done, "No space left on device")
    assert checkpoint.load(run / "checkpoint.pt").step == 4  # the last good state, loadable
    assert not list(run.rglob(".*.tmp"))
    _fill(small_disk, leave=0)  # nothing free at all: the restart itself cannot write
    done = _run_cli("--config", str(config), "--run-dir", str(run))
    _one_line_error(done, "No space left on device")
    assert checkpoint.load(run / "checkpoint.pt").step == 4
    for filler in small_disk.glob("filler-*"):
        filler.unlink()
    assert _run_cli("--config", str(config), "--run-dir", str(run)).returncode == 0
    assert checkpoint.load(run / "checkpoint.pt").step == 24
