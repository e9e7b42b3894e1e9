"""Contracts shared by training, export and serving: image convention, latents, model repository.

This package depends on numpy and Pillow only, so the inference service never imports torch.
"""

__version__ = "0.1.0"
#: Where a run trains or a server runs its models: ``auto`` takes CUDA when it is there.
DEVICES = ("auto", "cpu", "cuda")
