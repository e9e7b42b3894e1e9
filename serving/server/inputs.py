"""What a Score request's images become: a model-range float32 batch checked against the model.

Images arrive encoded (PNG, JPEG, ..., each exactly the model's size) or as one raw uint8/float32
tensor; either way the batch the discriminator sees is float32 in the model range
(dcgan_core.images), and anything else is INVALID_ARGUMENT naming the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dcgan_core import images
from dcgan_core.repository import Manifest
from serving.server.errors import InvalidArgument

IMAGE_RANGE_SLACK = 1e-3  # float32 images may exceed [-1, 1] by rounding, not more


@dataclass(frozen=True)
class ScoreSpec:
    """What a Score request asks for: encoded images or one array (not both), and labels."""

    images: list[bytes] = field(default_factory=list)
    array: np.ndarray | None = None  # uint8 or float32 [N, C, H, W] (toy2d: float32 [N, 2])
    labels: tuple[int, ...] = ()  # conditional models: N values, or one for all
    model: str = ""
    version: int = 0
    anomaly: bool = False  # also the encoder's anomaly score and its percentile (versions with an encoder)


def input_shape(manifest: Manifest) -> list[int]:
    """The shape of one input image: a translation model's source, else a sample."""
    return manifest.source_shape or list(manifest.sample_shape)


def model_inputs(spec: ScoreSpec, manifest: Manifest, max_images: int, shape: list[int] | None = None) -> np.ndarray:
    """The model-range float32 batch of a Score, Project or Translate request (decoding takes
    milliseconds per image); ``shape``: one image's (C, H, W), if not the model's input_shape."""
    if (spec.array is not None) == bool(spec.images):
        raise InvalidArgument("give either images (encoded) or tensor (raw), exactly one of them")
    if spec.images:
        if manifest.kind == "toy2d":
            raise InvalidArgument(f"model {manifest.name!r} scores 2-D points: send a float32 [N, 2] tensor")
        if len(spec.images) > max_images:
            raise InvalidArgument(f"number of images must be in 1..{max_images}, got {len(spec.images)}")
        return to_model_range(decode_images(spec.images, shape or input_shape(manifest)))
    if manifest.kind == "toy2d" and spec.array.dtype == np.uint8:
        raise InvalidArgument(f"model {manifest.name!r} scores 2-D points: the tensor must be float32")
    return to_model_range(spec.array)


def to_model_range(array: np.ndarray) -> np.ndarray:
    """uint8 images to [-1, 1] floats; float32 passes through."""
    return images.uint8_to_model(array) if array.dtype == np.uint8 else array.astype(np.float32, copy=False)


def decode_images(blobs: list[bytes], shape: list[int]) -> np.ndarray:
    """Encoded images -> uint8 NCHW, each checked against ``shape`` (C, H, W); errors name the index."""
    decoded = []
    for index, blob in enumerate(blobs):
        try:
            decoded.append(images.decode_image(blob, shape[0], shape[-1]))
        except ValueError as exc:
            raise InvalidArgument(f"image {index}: {exc}") from None
    return np.stack(decoded)


def check(manifest: Manifest, inputs: np.ndarray, max_images: int, shape: list[int] | None = None) -> None:
    """The batch's shape, size, finiteness and (images) value range fit the model (``shape``: one
    image's, if not the model's input_shape)."""
    expected = shape or input_shape(manifest)
    if inputs.ndim != len(expected) + 1 or list(inputs.shape[1:]) != expected:
        raise InvalidArgument(f"inputs have shape {list(inputs.shape)}; model {manifest.name!r} "
                              f"expects [N, {', '.join(map(str, expected))}]")
    if not 1 <= len(inputs) <= max_images:
        raise InvalidArgument(f"number of images must be in 1..{max_images}, got {len(inputs)}")
    if not np.all(np.isfinite(inputs)):
        bad = int(np.argmax(~np.isfinite(inputs.reshape(len(inputs), -1)).any(1)))
        raise InvalidArgument(f"image {bad} contains NaN or infinite values")
    if manifest.kind != "toy2d":
        low, high = manifest.value_range
        flat = inputs.reshape(len(inputs), -1)
        outside = (flat.min(1) < low - IMAGE_RANGE_SLACK) | (flat.max(1) > high + IMAGE_RANGE_SLACK)
        if outside.any():
            bad = int(np.argmax(outside))
            raise InvalidArgument(f"image {bad} has float32 values outside the model range "
                                  f"[{low}, {high}] (send uint8 0..255, or scale to [-1, 1])")
