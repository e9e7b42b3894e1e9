import json

import pytest
import torch

from tests.conftest import tiny_config
from training import checkpoint
from training.checkpoint import CheckpointError
from training.gan_step import gan_run
from training.run_loop import RunLoop, TrainingDiverged


def _weights(trainer: RunLoop) -> dict[str, torch.Tensor]:
    state = {f"G.{k}": v for k, v in trainer.model.G.state_dict().items()}
    state.update({f"D.{k}": v for k, v in trainer.model.D.state_dict().items()})
    state.update({f"EMA.{k}": v for k, v in trainer.model.ema.state_dict().items()})
    return state


@pytest.mark.parametrize("loss, d_steps, decay, precision", [
    ("nonsaturating", 1, "none", "fp32"), ("wgan-gp", 2, "none", "fp32"), ("hinge", 1, "linear", "bf16")])
def test_resume_equals_straight_run(tmp_path, loss, d_steps, decay, precision):
    """N steps, a new process-like run on the same directory, M steps == N+M straight."""
    sections = {"loss": {"name": loss}, "optim": {"d_steps": d_steps, "lr_decay": decay}}

    def trainer(run_dir, max_steps):
        return gan_run(tiny_config(run_dir, run={"precision": precision, "max_steps": max_steps}, **sections))

    straight = trainer(tmp_path / "straight", 11)
    straight.train()
    assert straight.model.bf16 == (precision == "bf16")
    first = trainer(tmp_path / "resumed", 5)
    first.train()
    second = trainer(tmp_path / "resumed", 11)
    assert second.step == 5
    second.train()
    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 12))


def test_linear_decay_reaches_zero_at_the_last_step(tmp_path):
    trainer = gan_run(tiny_config(tmp_path, optim={"lr_decay": "linear", "lr_g": 1e-3, "lr_d": 4e-3}))
    total = trainer.total_steps
    trainer.train()
    # the last update used 1/total of each base rate
    assert trainer.model.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 / total)
    assert trainer.model.opt_d.param_groups[0]["lr"] == pytest.approx(4e-3 / total)


def test_run_directory_outputs(tmp_path):
    trainer = gan_run(tiny_config(tmp_path))
    result = trainer.train()
    assert result.step == 2 * trainer.steps_per_epoch
    for name in ("checkpoint.pt", "metrics.jsonl", "curves.png", "samples/epoch_001.png",
                 "samples/epoch_002.png", "samples/latest.png"):
        assert (tmp_path / name).exists(), name
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) == {"step", "epoch", "loss_d", "loss_g", "d_real", "d_fake", "d_acc"}
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state.config == trainer.config.to_dict() and state.package_version
    assert {"generator", "discriminator", "ema", "opt_g", "opt_d", "noise_rng"} <= set(state.model)
    assert state.torch_rng is not None


def test_resume_under_a_different_config_is_refused(tmp_path):
    gan_run(tiny_config(tmp_path, run={"max_steps": 2})).train()
    with pytest.raises(CheckpointError, match=r"optim.lr_g: 0.0002 -> 0.001"):
        gan_run(tiny_config(tmp_path, optim={"lr_g": 1e-3}))
    forced = gan_run(tiny_config(tmp_path, optim={"lr_g": 1e-3}), force=True)
    assert forced.step == 2
    # epochs and max_steps may change: that is how a run is extended
    assert gan_run(tiny_config(tmp_path, run={"epochs": 5})).step == 2


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    trainer = gan_run(tiny_config(tmp_path, run={"max_steps": 3}))
    trainer.train()
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def torn_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert checkpoint.load(tmp_path / "checkpoint.pt").step == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_signal_mid_step_finishes_the_step_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM while a step runs: the step completes, the checkpoint holds it, and the resumed run
    ends bit for bit where an uninterrupted one does (it used to save mid-step, after the step's
    latents were drawn, so the rerun drew other noise)."""
    import os
    import signal

    config = tiny_config(tmp_path / "interrupted", run={"checkpoint_every": 1000})
    trainer = gan_run(config)
    original = trainer.train_step

    def signal_during_step_5():
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # handled while this step runs
        return original()

    monkeypatch.setattr(trainer, "train_step", signal_during_step_5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert checkpoint.load(tmp_path / "interrupted" / "checkpoint.pt").step == 5
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored after train()
    gan_run(config).train()
    gan_run(tiny_config(tmp_path / "straight", run={"checkpoint_every": 1000})).train()
    resumed, straight = (checkpoint.load(tmp_path / d / "checkpoint.pt") for d in ("interrupted", "straight"))
    assert resumed.step == straight.step == 16
    for key, tensor in straight.model["generator"].items():
        assert torch.equal(resumed.model["generator"][key], tensor), key


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = gan_run(tiny_config(tmp_path, run={"checkpoint_every": 2}))
    original = trainer.train_step

    def poison_at_5():
        stats = original()
        return {**stats, "loss_d": float("nan")} if trainer.step == 5 else stats

    monkeypatch.setattr(trainer, "train_step", poison_at_5)
    with pytest.raises(TrainingDiverged, match="loss_d became nan at step 6"):
        trainer.train()
    assert checkpoint.load(tmp_path / "checkpoint.pt").step == 4
    assert gan_run(tiny_config(tmp_path)).step == 4


def test_toy_training_runs(tmp_path):
    config = tiny_config(tmp_path, data={"dataset": "ring", "toy_epoch_samples": 64},
                         model={"toy_hidden": 16, "toy_layers": 2})
    gan_run(config).train()
    assert (tmp_path / "samples" / "epoch_002.png").exists()


def test_top_k_keeps_the_fakes_d_rates_most_real_and_shrinks_over_the_run(tmp_path):
    trainer = gan_run(tiny_config(tmp_path, loss={"top_k": 0.5}))
    logits = torch.tensor([0.3, -2.0, 1.5, 0.0, -0.7, 2.2, -1.1, 0.9])
    top_k = lambda: sorted(trainer.model._top_k(logits, trainer.progress()).tolist())  # noqa: E731
    assert top_k() == sorted(logits.tolist())  # step 0: every sample
    trainer.step = trainer.total_steps // 2
    assert top_k() == pytest.approx([-0.7, 0.0, 0.3, 0.9, 1.5, 2.2])  # 8 * 0.75
    trainer.step = trainer.total_steps
    assert top_k() == pytest.approx([0.3, 0.9, 1.5, 2.2])  # 8 * 0.5


def test_auto_precision_keeps_toys_in_fp32(tmp_path):
    toy = tiny_config(tmp_path, data={"dataset": "ring", "toy_epoch_samples": 64},
                      model={"toy_hidden": 16, "toy_layers": 2})
    assert toy.run.precision == "auto" and not gan_run(toy).model.bf16


def test_a_format_1_checkpoint_is_read_and_resumes(tmp_path):
    """Runs saved before the checkpoint had a schema of its own (flat keys, ``best_fd``) resume."""
    trainer = gan_run(tiny_config(tmp_path, run={"max_steps": 3}))
    trainer.train()
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    flat = {"format": 1, "package_version": "0.1.0", "config": saved.config, "step": saved.step,
            "steps_per_epoch": saved.steps_per_epoch, "best_fd": 7.5, "torch_rng": saved.torch_rng, **saved.model}
    torch.save(flat, tmp_path / "checkpoint.pt")
    upgraded = checkpoint.load(tmp_path / "checkpoint.pt")
    assert (upgraded.step, upgraded.best_objective, upgraded.model.keys()) == (3, 7.5, saved.model.keys())
    resumed = gan_run(tiny_config(tmp_path, run={"max_steps": 4}))
    assert resumed.step == 3 and resumed.best_objective == 7.5
    resumed.train()
    assert checkpoint.load(tmp_path / "checkpoint.pt").step == 4
