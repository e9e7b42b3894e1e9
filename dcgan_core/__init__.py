"""Contracts shared by training, export and serving: image convention, latents, model repository.

This package depends on numpy and Pillow only, so the inference service never imports torch.
"""

__version__ = "0.1.0"
