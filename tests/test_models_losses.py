import math

import pytest
import torch

from tests.conftest import tiny_config
from training import losses
from training.config import load_config
from training.models import Discriminator, Generator, build_models


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes(size, channels):
    g, d = Generator(16, channels, size, ngf=8), Discriminator(channels, size, ndf=8)
    images = g(torch.randn(5, 16))
    assert images.shape == (5, channels, size, size)
    assert images.abs().max() <= 1.0
    assert d(images).shape == (5,)
    assert Discriminator(channels, size, 8, use_spectral_norm=True)(images).shape == (5,)


@pytest.mark.parametrize("size", [28, 64])
def test_extra_layers_deepen_without_changing_shapes_or_plain_names(size):
    g, d = Generator(16, 1, size, ngf=8, extra_layers=2), Discriminator(1, size, 8, True, extra_layers=1)
    images = g(torch.randn(3, 16))
    assert images.shape == (3, 1, size, size) and d(images).shape == (3,)
    downs = {28: 2, 64: 4}[size]
    stride_one = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1)]
    assert len(stride_one) == downs + 1  # one extra per resolution, and the head
    assert all(hasattr(m, "parametrizations") for m in stride_one)  # spectral norm on the extras too
    g_extras = [m for m in g.modules() if type(m) is torch.nn.Conv2d]
    assert len(g_extras) == 2 * (downs - 1)  # after each hidden upsampling layer, not the output
    # extra_layers=0 keeps the plain DCGAN's parameter names, so older checkpoints still load
    plain = Discriminator(1, 28, 8, use_spectral_norm=True).state_dict()
    assert [k for k in plain if k.endswith("original")] == [
        f"main.{i}.parametrizations.weight.original" for i in (0, 2, 4)]


def test_dcgan_init_statistics(tmp_path):
    g, _ = build_models(tiny_config(tmp_path, model={"ngf": 64, "latent_size": 100}))
    conv = g.main[0].weight
    assert abs(conv.mean().item()) < 0.002 and abs(conv.std().item() - 0.02) < 0.002
    assert abs(g.main[1].weight.mean().item() - 1.0) < 0.01


def test_toy_models_shapes():
    config = load_config("ring")
    g, d = build_models(config)
    points = g(torch.randn(7, 100))
    assert points.shape == (7, 2) and d(points).shape == (7,)


def _known_logits():
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0])
    return real, fake


def test_bce_losses_on_known_logits():
    real, fake = _known_logits()
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus
    expected_d = (sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0)) / 2
    for name in ("minimax", "nonsaturating"):
        assert losses.LOSSES[name].d_loss(real, fake, 1.0).item() == pytest.approx(expected_d, rel=1e-6)
    assert losses.LOSSES["nonsaturating"].g_loss(fake).item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)
    assert losses.LOSSES["minimax"].g_loss(fake).item() == pytest.approx(-(sp(0.5) + sp(-3.0)) / 2, rel=1e-6)


def test_label_smoothing_changes_real_target_only():
    real, fake = _known_logits()
    smoothed = losses.LOSSES["nonsaturating"].d_loss(real, fake, 0.9).item()
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    real_term = sum(0.9 * sp(-x) + 0.1 * sp(x) for x in (2.0, -1.0)) / 2
    assert smoothed == pytest.approx(real_term + (sp(0.5) + sp(-3.0)) / 2, rel=1e-6)


def test_hinge_and_wasserstein_on_known_logits():
    real, fake = _known_logits()
    # hinge: mean(relu(1 - real)) + mean(relu(1 + fake)) = (0 + 2)/2 + (1.5 + 0)/2
    assert losses.LOSSES["hinge"].d_loss(real, fake, 1.0).item() == pytest.approx(1.75)
    assert losses.LOSSES["hinge"].g_loss(fake).item() == pytest.approx(1.25)
    assert losses.LOSSES["wgan-gp"].d_loss(real, fake, 1.0).item() == pytest.approx(-1.25 - 0.5)
    assert losses.LOSSES["wgan-gp"].gradient_penalty


def test_gradient_penalty_of_unit_gradient_critic_is_zero():
    critic = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[0.6, 0.8]]))  # |grad| = 1 everywhere
    penalty = losses.gradient_penalty(critic, torch.randn(16, 2), torch.randn(16, 2))
    assert penalty.item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        critic.weight.mul_(3.0)
    assert losses.gradient_penalty(critic, torch.randn(16, 2), torch.randn(16, 2)).item() == pytest.approx(4.0)
