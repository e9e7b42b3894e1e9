"""The baseline the benchmarks measure against: pytorch/examples/dcgan's training loop.

Networks from training.models (the caller's config picks them), Adam 2e-4 / beta1 0.5, BCE
with the non-saturating G loss, no EMA; logits + BCEWithLogits instead of sigmoid + BCE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.models import build_models


class ReferenceDCGAN:
    def __init__(self, config: TrainConfig, seed: int = 0):
        torch.manual_seed(seed)
        self.latent_size = config.model.latent_size
        self.net_g, self.net_d = build_models(config)
        self.opt_d = torch.optim.Adam(self.net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_g = torch.optim.Adam(self.net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def step(self, real: torch.Tensor) -> tuple[float, float]:
        """One D and one G update, as in the example (which prints both losses every step)."""
        ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
        self.net_d.zero_grad()
        err_real = F.binary_cross_entropy_with_logits(self.net_d(real), ones)
        err_real.backward()
        fake = self.net_g(torch.randn(len(real), self.latent_size))
        err_fake = F.binary_cross_entropy_with_logits(self.net_d(fake.detach()), zeros)
        err_fake.backward()
        self.opt_d.step()
        self.net_g.zero_grad()
        err_g = F.binary_cross_entropy_with_logits(self.net_d(fake), ones)
        err_g.backward()
        self.opt_g.step()
        return (err_real + err_fake).item(), err_g.item()
