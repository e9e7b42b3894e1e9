"""DCGAN training toolkit: data, models, losses, trainer, checkpoints, CLI."""

from dcgan_core import __version__

__all__ = ["__version__"]
