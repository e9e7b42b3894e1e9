"""The server's side of the wire: requests to the service's domain values, results to responses."""

from __future__ import annotations

import numpy as np

from dcgan.v1 import inference_pb2 as pb
from dcgan_core import images
from dcgan_core.repository import Manifest
from serving import wire
from serving.errors import InvalidArgument
from serving.service import Endpoint, SampleSpec


def tensor_to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """A Tensor message as a numpy array; an inconsistent message is INVALID_ARGUMENT."""
    try:
        return wire.tensor_to_array(tensor, what)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def to_model_range(array: np.ndarray) -> np.ndarray:
    """uint8 images to [-1, 1] floats; float32 passes through."""
    return images.uint8_to_model(array) if array.dtype == np.uint8 else array.astype(np.float32, copy=False)


def decode_images(blobs: list[bytes], manifest: Manifest) -> np.ndarray:
    """Encoded images -> uint8 NCHW, each checked against the model's size; errors name the index."""
    decoded = []
    for index, blob in enumerate(blobs):
        try:
            decoded.append(images.decode_image(blob, manifest.channels, manifest.image_size))
        except ValueError as exc:
            raise InvalidArgument(f"image {index}: {exc}") from None
    return np.stack(decoded)


def score_inputs(request: pb.ScoreRequest, manifest: Manifest, max_images: int) -> np.ndarray:
    """The model-range float32 batch of a Score request."""
    has_tensor = request.HasField("tensor")
    if has_tensor == bool(request.images):
        raise InvalidArgument("give either images (encoded) or tensor (raw), exactly one of them")
    if request.images:
        if manifest.kind != "dcgan":
            raise InvalidArgument(f"model {manifest.name!r} scores 2-D points: send a float32 [N, 2] tensor")
        if len(request.images) > max_images:
            raise InvalidArgument(f"number of images must be in 1..{max_images}, got {len(request.images)}")
        return to_model_range(decode_images(list(request.images), manifest))
    array = tensor_to_array(request.tensor, "tensor")
    if manifest.kind != "dcgan" and array.dtype == np.uint8:
        raise InvalidArgument(f"model {manifest.name!r} scores 2-D points: the tensor must be float32")
    return to_model_range(array)


def resolve_encoding(encoding: int, manifest: Manifest) -> int:
    if encoding == pb.ENCODING_UNSPECIFIED:
        return pb.ENCODING_RAW_UINT8 if manifest.kind == "dcgan" else pb.ENCODING_RAW_FLOAT32
    if encoding not in (pb.ENCODING_PNG, pb.ENCODING_RAW_UINT8, pb.ENCODING_RAW_FLOAT32):
        raise InvalidArgument(f"unknown encoding {encoding}")
    if manifest.kind != "dcgan" and encoding != pb.ENCODING_RAW_FLOAT32:
        raise InvalidArgument(f"model {manifest.name!r} generates 2-D points: use ENCODING_RAW_FLOAT32")
    return encoding


def encode_samples(response: pb.SampleResponse, samples: np.ndarray, encoding: int) -> None:
    """Fill ``response`` with model-range samples in the requested encoding."""
    if encoding == pb.ENCODING_RAW_FLOAT32:
        response.samples.CopyFrom(wire.array_to_tensor(samples))
        return
    pixels = images.model_to_uint8(samples)
    if encoding == pb.ENCODING_PNG:
        response.png.extend(images.encode_png(image) for image in pixels)
    else:
        response.samples.CopyFrom(wire.array_to_tensor(pixels))


def optional(message, name: str) -> float | None:
    """An optional proto3 field's value, None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def sample_spec(request: pb.SampleRequest) -> SampleSpec:
    """The domain form of a SampleRequest."""
    explicit = None
    if request.HasField("latents"):
        explicit = tensor_to_array(request.latents, "latents")
        if explicit.dtype != np.float32:
            raise InvalidArgument("latents must be DTYPE_FLOAT32")
    return SampleSpec(request.count, optional(request, "seed"), explicit, tuple(request.labels),
                      optional(request, "truncation"), optional(request, "min_score"),
                      optional(request, "keep_top"), request.include_scores)


def endpoint(point: pb.LatentPoint, what: str) -> Endpoint:
    """One end of a walk; an explicit latent is a float32 vector."""
    label = optional(point, "label")
    kind = point.WhichOneof("point")
    if kind == "latent":
        latent = tensor_to_array(point.latent, f"{what}.latent")
        if latent.dtype != np.float32 or latent.ndim != 1:
            raise InvalidArgument(f"{what}.latent must be a DTYPE_FLOAT32 vector [latent_size], "
                                  f"got {latent.dtype.name} {list(latent.shape)}")
        return Endpoint(latent=latent, label=label)
    if kind == "seeded":
        return Endpoint(point.seeded.seed, point.seeded.index, label=label)
    return Endpoint(label=label)


def interpolation(value: int) -> str:
    if value not in wire.INTERPOLATION_NAMES:
        raise InvalidArgument(f"unknown interpolation {value}")
    return wire.INTERPOLATION_NAMES[value]
