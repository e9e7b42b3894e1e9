"""The f-AnoGAN encoder stage: trained against a frozen GAN under the run loop; its score's direction."""

import pytest
import torch

from tests.conftest import tiny_config
from training.config import ConfigError


def _encoder_config(source, run_dir, **run):
    return tiny_config(run_dir, encoder={"source": str(source), "nef": 4, "lr": 1e-3},
                       run={"eval_every": 1, "eval_samples": 100, **run})


def test_the_encoder_trains_against_a_frozen_gan_and_resumes_exactly(tiny_run, tmp_path):
    from training.encoder import encoder_run

    config = _encoder_config(tiny_run, tmp_path / "enc", max_steps=8)
    run = encoder_run(config)
    frozen = {k: v.clone() for k, v in run.model.scorer.generator.state_dict().items()}
    run.train()
    assert all(torch.equal(v, run.model.scorer.generator.state_dict()[k]) for k, v in frozen.items())
    assert (tmp_path / "enc" / "best.pt").exists() and (tmp_path / "enc" / "samples" / "latest.png").exists()
    straight = encoder_run(_encoder_config(tiny_run, tmp_path / "straight", max_steps=16))
    straight.train()
    resumed = encoder_run(_encoder_config(tiny_run, tmp_path / "enc", max_steps=16))
    assert resumed.step == 8
    resumed.train()
    for key, value in straight.model.E.state_dict().items():
        assert torch.equal(value, resumed.model.E.state_dict()[key]), key


def test_an_encoder_needs_an_image_gan(tiny_toy_run, tmp_path):
    from training.encoder import encoder_run

    with pytest.raises(ConfigError, match="encoder.source is empty"):
        encoder_run(tiny_config(tmp_path / "a"))
    with pytest.raises(ConfigError, match="is a toy2d run; encoders are for image models"):
        encoder_run(_encoder_config(tiny_toy_run, tmp_path / "b"))
