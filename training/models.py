"""DCGAN generator/discriminator for 28, 32 and 64 pixel images, and the dense toy 2-D GAN.

The layout follows pytorch/examples' dcgan: transposed convolutions + BatchNorm + ReLU + tanh in
G; strided convolutions + LeakyReLU(0.2) + BatchNorm (not on the first layer) in D, which
returns a logit. Weights start from N(0, 0.02) (BatchNorm scale from N(1, 0.02)). Optional
"extra layers" (3x3 stride-1 convolutions, as in the WGAN authors' DCGAN and SN-GAN's CNN
discriminator) deepen a network at each resolution without changing its input or output.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from training.config import TrainConfig

#: image size -> (spatial size of G's first feature map, number of 2x up/down-sampling layers)
LAYOUTS = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift are looked up per class (de Vries et al. 2017; BigGAN)."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(features, affine=False)
        self.gain = nn.Embedding(num_classes, features)
        self.bias = nn.Embedding(num_classes, features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1, 1, 1)
        return self.norm(x) * self.gain(labels).reshape(shape) + self.bias(labels).reshape(shape)


class Generator(nn.Module):
    """z (N, latent) [and class labels (N,)] -> images (N, C, S, S) in [-1, 1].

    Conditional (``num_classes`` > 0): ``conditioning`` "embed" joins a learned embedding of the
    label to z (CGAN); "cbn" makes every BatchNorm class-conditional instead.
    """

    def __init__(self, latent_size: int, channels: int, image_size: int, ngf: int, extra_layers: int = 0,
                 num_classes: int = 0, conditioning: str = "embed"):
        super().__init__()
        start, ups = LAYOUTS[image_size]
        width = ngf * 2 ** (ups - 1)
        self.num_classes = num_classes
        joins = num_classes and conditioning == "embed"
        self.embed = nn.Embedding(num_classes, latent_size) if joins else None
        norm = (lambda n: ConditionalBatchNorm2d(n, num_classes)) if num_classes and not joins else nn.BatchNorm2d
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_size * (2 if joins else 1), width, start, 1, 0, bias=False),
            norm(width),
            nn.ReLU(True),
        ]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), norm(width // 2), nn.ReLU(True)]
            width //= 2
            for _ in range(extra_layers):
                layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), norm(width), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.latent_size = latent_size
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x, layers = self._first_layer(z), self.main[1:]
        if not self.num_classes or self.embed is not None:
            return layers(x)
        for layer in layers:
            x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x

    def _first_layer(self, z: torch.Tensor) -> torch.Tensor:
        """The first layer, a transposed convolution of z as a 1x1 image, is a matrix product;
        computed as one (the same numbers) it exports as a MatMul, which onnxruntime runs far
        faster than a ConvTranspose: the mnist preset's G at batch 64 on one thread 22.4 -> 17.4 ms."""
        first = self.main[0]
        return (z @ first.weight.flatten(1)).reshape(z.shape[0], first.out_channels, *first.kernel_size)


class Discriminator(nn.Module):
    """images (N, C, S, S) [and class labels (N,)] -> logits (N,). Spectral norm, when asked,
    replaces BatchNorm.

    Conditional (``num_classes`` > 0): a projection discriminator (Miyato & Koyama 2018), logit =
    head(phi(x)) + <embed(y), sum over space of phi(x)>, phi being every layer but the head.
    """

    def __init__(self, channels: int, image_size: int, ndf: int, use_spectral_norm: bool = False,
                 extra_layers: int = 0, num_classes: int = 0):
        super().__init__()
        start, downs = LAYOUTS[image_size]
        self._spectral_norm = use_spectral_norm
        layers = self._block(channels, ndf, 4, 2, normalise=False)
        for _ in range(extra_layers):
            layers += self._block(ndf, ndf, 3, 1)
        width = ndf
        for _ in range(downs - 1):
            layers += self._block(width, width * 2, 4, 2)
            width *= 2
            for _ in range(extra_layers):
                layers += self._block(width, width, 3, 1)
        head = nn.Conv2d(width, 1, start, 1, 0, bias=False)
        layers.append(spectral_norm(head) if use_spectral_norm else head)
        self.main = nn.Sequential(*layers)  # one flat Sequential: plain-DCGAN checkpoint names
        self.num_classes = num_classes
        self.embed = None
        if num_classes:
            embed = nn.Embedding(num_classes, width)
            self.embed = spectral_norm(embed) if use_spectral_norm else embed

    def _block(self, fan_in: int, fan_out: int, kernel: int, stride: int, normalise: bool = True) -> list[nn.Module]:
        """conv + LeakyReLU(0.2): spectral norm on the weights, or else BatchNorm (if ``normalise``).
        A flat list, so that checkpoints keep the layer names of the plain DCGAN."""
        conv = nn.Conv2d(fan_in, fan_out, kernel, stride, (kernel - 1) // 2, bias=False)
        if self._spectral_norm:
            return [spectral_norm(conv), nn.LeakyReLU(0.2, inplace=True)]
        norm = [nn.BatchNorm2d(fan_out)] if normalise else []
        return [conv, *norm, nn.LeakyReLU(0.2, inplace=True)]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.features(images), labels)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """phi(x): every layer but the head (the anomaly scorer compares images by these)."""
        return self.main[:-1](images)

    def logits(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The head [and the class projection] on phi(x): one trunk pass serves both the logit
        and the anomaly scorer's feature residual."""
        logits = self.main[-1](features).reshape(-1)
        if self.embed is None:
            return logits
        return logits + (self.embed(labels) * features.sum(dim=(2, 3))).sum(dim=1)


def _mlp(sizes: list[int], activation: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), activation]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class ToyGenerator(nn.Module):
    """The classic dense GAN generator: z (N, latent) -> points (N, 2)."""

    def __init__(self, latent_size: int, hidden: int, layers: int):
        super().__init__()
        self.latent_size = latent_size
        self.main = _mlp([latent_size] + [hidden] * layers + [2], nn.ReLU(True))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` is accepted for the one model signature and must be None (toys are unconditional)."""
        return self.main(z)


class ToyDiscriminator(nn.Module):
    """points (N, 2) -> logits (N,)."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.main = _mlp([2] + [hidden] * layers + [1], nn.LeakyReLU(0.2, inplace=True))

    def forward(self, points: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels`` is accepted for the one model signature and must be None (toys are unconditional)."""
        return self.main(points).reshape(-1)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv/linear weights N(0, 0.02), BatchNorm N(1, 0.02) and bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        weight = getattr(module, "parametrizations", None)
        target = weight.weight.original if weight is not None else module.weight
        nn.init.normal_(target, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, ConditionalBatchNorm2d):  # after its embeddings' N(0, 0.02): scale 1 + noise
        with torch.no_grad():
            module.gain.weight.add_(1.0)


def build_models(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for a config, DCGAN-initialised."""
    m, d = config.model, config.data
    if config.kind == "toy2d":
        generator: nn.Module = ToyGenerator(m.latent_size, m.toy_hidden, m.toy_layers)
        discriminator: nn.Module = ToyDiscriminator(m.toy_hidden, m.toy_layers)
    else:
        generator = Generator(m.latent_size, d.channels, d.image_size, m.ngf, m.g_extra_layers, m.num_classes,
                              m.g_conditioning)
        discriminator = Discriminator(d.channels, d.image_size, m.ndf, m.spectral_norm, m.d_extra_layers,
                                      m.num_classes)
    if config.kind == "dcgan":  # dense toys keep PyTorch's default (Kaiming-uniform) init
        generator.apply(dcgan_init)
        discriminator.apply(dcgan_init)
    return generator, discriminator


@torch.no_grad()
def recalibrate_batchnorm(generator: nn.Module, latent_size: int, seed: int,
                          batches: int = 32, batch_size: int = 256) -> nn.Module:
    """A copy of ``generator`` whose BatchNorm statistics are measured on its own outputs.

    An EMA generator's averaged weights do not match the running statistics it copied from the
    raw G; re-estimating them (cumulative average over random latents) gives clean eval-mode
    samples. Deterministic for a given seed. Returns the copy in eval mode.
    """
    import copy

    model = copy.deepcopy(generator)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    device = next(model.parameters()).device
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
    model.train()
    gen = torch.Generator(device).manual_seed(seed)
    classes = getattr(model, "num_classes", 0)
    for _ in range(batches):
        z = torch.randn(batch_size, latent_size, generator=gen, device=device)
        model(z, torch.randint(classes, (batch_size,), generator=gen, device=device) if classes else None)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()
