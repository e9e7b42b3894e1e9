"""Data-parallel training under torchrun with real processes (CPU, gloo, 2 ranks, tiny models):
a 2-process run completes and resumes in 1 process, its first step is the 1-process step on the
same global batch, SIGTERM on the job leaves one complete checkpoint, a killed rank ends the job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config, wait_for
from training import checkpoint
from training.gan_step import gan_run

pytestmark = pytest.mark.slow  # real processes (servers, torchrun, Envoy) or long training runs

TINY = {"data.dataset": "synthetic", "data.synthetic_samples": 64, "model.ngf": 4, "model.ndf": 4,
        "model.latent_size": 8, "optim.batch_size": 8, "run.progress": False, "run.sample_count": 4}
TOY = {"data.dataset": "ring", "data.toy_epoch_samples": 64, "model.toy_hidden": 16, "model.toy_layers": 2,
       "model.latent_size": 8, "optim.batch_size": 16, "run.progress": False, "run.ema_decay": 0.0}


def torchrun(run_dir: Path, settings: dict, processes: int = 2, **popen) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node N -m training.cli`` on ``run_dir``."""
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "training.cli", "--run-dir", str(run_dir), *sets]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finished(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_two_process_run_completes_and_resumes_in_one_process(tmp_path):
    code, output = finished(torchrun(tmp_path, {**TINY, "run.epochs": 2, "run.max_steps": 6}))
    assert code == 0, output
    assert checkpoint.load(tmp_path / "checkpoint.pt", "cpu").step == 6
    assert steps_logged(tmp_path) == 6  # one writer: rank 0
    config = tiny_config(tmp_path, run={"epochs": 2})
    result = gan_run(config).train()
    assert result.step == 16 and steps_logged(tmp_path) == 16


@pytest.mark.parametrize("loss, spectral_norm", [("nonsaturating", False), ("wgan-gp", False), ("hinge", True)])
def test_the_first_step_of_two_processes_is_the_one_process_step_on_the_global_batch(tmp_path, loss, spectral_norm):
    """Dense toy networks have no BatchNorm, so two half batches with averaged gradients make the
    same update as one whole batch, up to float rounding of the all-reduce (stated: 1e-5)."""
    settings = {**TOY, "loss.name": loss, "model.spectral_norm": spectral_norm, "run.epochs": 1,
                "run.max_steps": 1}
    code, output = finished(torchrun(tmp_path / "two", settings))
    assert code == 0, output
    single = subprocess.run([sys.executable, "-m", "training.cli", "--run-dir", str(tmp_path / "one"),
                             *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]],
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    two = checkpoint.load(tmp_path / "two" / "checkpoint.pt", "cpu")
    one = checkpoint.load(tmp_path / "one" / "checkpoint.pt", "cpu")
    for network in ("generator", "discriminator"):
        for name, tensor in one.network(network).items():
            torch.testing.assert_close(two.network(network)[name], tensor, rtol=0, atol=1e-5, msg=f"{network}.{name}")
    # the noise stream does not depend on the world size
    assert torch.equal(two.model["noise_rng"], one.model["noise_rng"])


def test_sigterm_on_the_job_leaves_one_complete_checkpoint(tmp_path):
    job = torchrun(tmp_path, {**TINY, "run.epochs": 10000, "run.checkpoint_every": 10**6})
    assert wait_for(lambda: steps_logged(tmp_path) >= 12, timeout=180)
    job.send_signal(signal.SIGTERM)  # torchrun passes it to every rank; they stop at one step
    code, output = finished(job)
    assert code != 0 and output.count("stopped by signal at step") == 1, output
    state = checkpoint.load(tmp_path / "checkpoint.pt", "cpu")
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert state.step == last["step"]  # saved at the step where both ranks stopped
    assert not list(tmp_path.glob(".*.tmp"))
    resumed = gan_run(tiny_config(tmp_path, run={"epochs": 10000, "checkpoint_every": 10**6,
                                                 "max_steps": state.step + 2})).train()
    assert resumed.step == state.step + 2


def test_a_killed_rank_ends_the_job_with_its_error_and_no_corrupt_checkpoint(tmp_path):
    job = torchrun(tmp_path, {**TINY, "run.epochs": 10000, "run.checkpoint_every": 5})
    assert wait_for(lambda: steps_logged(tmp_path) >= 12, timeout=180)
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    subprocess.run(["kill", "-9", ranks[-1]], check=True)
    code, output = finished(job, timeout=120)
    assert code != 0
    assert "FAILED" in output and "Signal 9 (SIGKILL)" in output, output
    state = checkpoint.load(tmp_path / "checkpoint.pt", "cpu")  # the last complete one
    assert state.step % 5 == 0 or state.step % 8 == 0


def test_a_two_process_run_resumed_at_two_processes_continues_bit_for_bit(tmp_path):
    settings = {**TINY, "run.epochs": 2, "run.checkpoint_every": 3}
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for run_dir, steps in ((straight, 10), (interrupted, 5), (interrupted, 10)):
        code, output = finished(torchrun(run_dir, {**settings, "run.max_steps": steps}))
        assert code == 0, output
    a = checkpoint.load(straight / "checkpoint.pt", "cpu")
    b = checkpoint.load(interrupted / "checkpoint.pt", "cpu")
    assert a.step == b.step == 10
    for network in ("generator", "discriminator", "ema"):
        for name, tensor in a.network(network).items():
            assert torch.equal(b.network(network)[name], tensor), f"{network}.{name}"
