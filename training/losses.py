"""GAN losses computed from discriminator logits, in a registry keyed by config name.

Working from logits (softplus/BCE-with-logits) instead of probabilities keeps every loss finite
where sigmoid would saturate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GanLoss:
    """``d_loss(real_logits, fake_logits, real_target)`` and ``g_loss(fake_logits)``.

    ``real_target`` < 1 is one-sided label smoothing (used by the BCE-based losses only).
    ``gradient_penalty`` tells the trainer to add the WGAN-GP term to the D loss.
    """

    d_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    gradient_penalty: bool = False


def _bce_d(real: torch.Tensor, fake: torch.Tensor, real_target: float) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def _wasserstein_d(real: torch.Tensor, fake: torch.Tensor, real_target: float) -> torch.Tensor:
    return fake.mean() - real.mean()


def _hinge_d(real: torch.Tensor, fake: torch.Tensor, real_target: float) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


LOSSES: dict[str, GanLoss] = {
    # Goodfellow et al. 2014: G minimises log(1 - D(G(z))) = -softplus(logit).
    "minimax": GanLoss(_bce_d, lambda fake: -F.softplus(fake).mean()),
    # G maximises log D(G(z)): -log sigmoid(logit) = softplus(-logit).
    "nonsaturating": GanLoss(_bce_d, lambda fake: F.softplus(-fake).mean()),
    "hinge": GanLoss(_hinge_d, lambda fake: -fake.mean()),
    "wgan-gp": GanLoss(_wasserstein_d, lambda fake: -fake.mean(), gradient_penalty=True),
}


def interpolation_shape(batch: torch.Tensor, rows: int | None = None) -> tuple[int, ...]:
    """Shape of the gradient penalty's mixing weights: one per row, broadcast over the rest."""
    return (batch.shape[0] if rows is None else rows,) + (1,) * (batch.dim() - 1)


def gradient_penalty(discriminator: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Gulrajani et al. 2017: E[(||grad D(x_hat)|| - 1)^2] on random interpolates x_hat
    (``alpha``: the mixing weights, [N, 1, ...]; the trainer draws them from its own stream,
    otherwise torch's global one)."""
    if alpha is None:
        alpha = torch.rand(interpolation_shape(real), device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
