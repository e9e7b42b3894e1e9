"""The dcgan.v1 front end's translations: request messages to the service's domain values, and
its results back to response messages. Tensors and enum names are serving.wire's."""

from __future__ import annotations

import logging

import numpy as np
from dcgan.v1 import inference_pb2 as pb

from dcgan_core import images
from serving import wire
from serving.server.errors import InvalidArgument, ServiceError, bounded
from serving.server.inputs import ScoreSpec
from serving.server.plans import Endpoint, SampleSpec, WalkSpec
from serving.server.service import (
    ModelCard,
    ProjectResult,
    SampleResult,
    ScoreResult,
    TranslateResult,
    probabilities,
)

log = logging.getLogger(__name__)
VERSION_STATES = {"READY": pb.VERSION_STATE_READY, "FAILED": pb.VERSION_STATE_FAILED,
                  "UNLOADED": pb.VERSION_STATE_UNLOADED}


def status(error: Exception, method: str) -> tuple[str, str]:
    """The status code name and message of a failed call: a ServiceError's own, anything else
    INTERNAL (logged with its traceback: a server fault, never the request's)."""
    if isinstance(error, ServiceError):
        return error.code, bounded(str(error))
    log.error("%s failed unexpectedly", method, exc_info=error)
    return "INTERNAL", f"internal error in {method} ({type(error).__name__}); the server logged the details"


def tensor_to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """A Tensor message as a numpy array; an inconsistent message is INVALID_ARGUMENT."""
    try:
        return wire.tensor_to_array(tensor, what)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def optional(message, name: str) -> float | None:
    """An optional proto3 field's value, None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def encoding(value: int) -> str:
    if value not in wire.ENCODING_NAMES:
        raise InvalidArgument(f"unknown encoding {value}")
    return wire.ENCODING_NAMES[value]


def interpolation(value: int) -> str:
    if value not in wire.INTERPOLATION_NAMES:
        raise InvalidArgument(f"unknown interpolation {value}")
    return wire.INTERPOLATION_NAMES[value]


# ---------------------------------------------------------------------------- requests


def sample_spec(request: pb.SampleRequest) -> SampleSpec:
    """The domain form of a SampleRequest."""
    explicit = None
    if request.HasField("latents"):
        explicit = tensor_to_array(request.latents, "latents")
        if explicit.dtype != np.float32:
            raise InvalidArgument("latents must be DTYPE_FLOAT32")
    return SampleSpec(request.count, optional(request, "seed"), explicit, tuple(request.labels),
                      optional(request, "truncation"), optional(request, "min_score"),
                      optional(request, "keep_top"), request.include_scores, request.model, request.version,
                      encoding(request.encoding))


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


def walk_spec(request: pb.WalkRequest) -> WalkSpec:
    return WalkSpec(endpoint(request.start, "start"), endpoint(request.end, "end"), request.steps,
                    interpolation(request.interpolation), optional(request, "truncation"), request.include_scores,
                    request.model, request.version, encoding(request.encoding))


def _images_spec(request: pb.ScoreRequest | pb.ProjectRequest | pb.TranslateRequest,
                 labels: tuple[int, ...] = (), anomaly: bool = False) -> ScoreSpec:
    """The images of a Score, Project or Translate request: encoded files or one tensor."""
    array = tensor_to_array(request.tensor, "tensor") if request.HasField("tensor") else None
    return ScoreSpec(list(request.images), array, labels, request.model, request.version, anomaly)


def _reply_encoding(request: pb.ProjectRequest | pb.TranslateRequest) -> str:
    """The images' encoding in a Project or Translate response (UNSPECIFIED: PNG)."""
    return "png" if request.encoding == pb.ENCODING_UNSPECIFIED else encoding(request.encoding)


def score_spec(request: pb.ScoreRequest) -> ScoreSpec:
    return _images_spec(request, tuple(request.labels), request.include_anomaly)


# ---------------------------------------------------------------------------- responses


def sample_response(result: SampleResult) -> pb.SampleResponse:
    """Samples in the result's encoding (PNG takes milliseconds per image: not on the event loop)."""
    response = pb.SampleResponse(model=result.manifest.name, version=result.manifest.version, seed=result.seed,
                                 offset=result.offset, provider=result.provider)
    encode_samples(response, result.samples, result.encoding)
    if result.labels is not None:
        response.labels.extend(result.labels.tolist())
    if result.candidate_indices is not None:
        response.candidates = result.candidates
        response.candidate_indices.extend(result.candidate_indices.tolist())
    if result.logits is not None:
        response.logits.extend(result.logits.tolist())
        response.scores.extend(probabilities(result.logits).tolist())
    return response


def encode_samples(response: pb.SampleResponse, samples: np.ndarray, encoding_name: str) -> None:
    """Fill ``response`` with model-range samples in the named encoding."""
    if encoding_name == "float32":
        response.samples.CopyFrom(wire.array_to_tensor(samples))
        return
    pixels = images.model_to_uint8(samples)
    if encoding_name == "png":
        response.png.extend(images.encode_png(image) for image in pixels)
    else:
        response.samples.CopyFrom(wire.array_to_tensor(pixels))


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    listed = lambda values: [] if values is None else values.tolist()  # noqa: E731
    return pb.ScoreResponse(model=result.manifest.name, version=result.manifest.version,
                            probabilities=result.probabilities.tolist(), logits=result.logits.tolist(),
                            provider=result.provider, labels=listed(result.labels), anomaly=listed(result.anomaly),
                            anomaly_percentile=listed(result.anomaly_percentile))


def project_spec(request: pb.ProjectRequest) -> tuple[ScoreSpec, str]:
    """The images of a Project request (as a Score's) and the reconstructions' encoding."""
    return _images_spec(request, tuple(request.labels)), _reply_encoding(request)


def translate_spec(request: pb.TranslateRequest) -> tuple[ScoreSpec, str]:
    """The source images of a Translate request (as a Score's) and the translations' encoding."""
    return _images_spec(request), _reply_encoding(request)


def translate_response(result: TranslateResult) -> pb.TranslateResponse:
    """PNG encoding takes milliseconds per image: called off the event loop for PNG."""
    response = pb.TranslateResponse(model=result.manifest.name, version=result.manifest.version,
                                    provider=result.provider)
    encode_samples(response, result.samples, result.encoding)
    if result.logits is not None:
        response.scores.extend(result.probabilities.tolist())
        response.logits.extend(result.logits.tolist())
    return response


def project_response(result: ProjectResult) -> pb.ProjectResponse:
    """PNG encoding takes milliseconds per image: called off the event loop for PNG."""
    response = pb.ProjectResponse(model=result.manifest.name, version=result.manifest.version,
                                  latents=wire.array_to_tensor(result.latents), anomaly=result.anomaly.tolist(),
                                  anomaly_percentile=result.anomaly_percentile.tolist(), provider=result.provider)
    encode_samples(response, result.reconstructions, result.encoding)
    if result.labels is not None:
        response.labels.extend(result.labels.tolist())
    return response


def model_info(card: ModelCard) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=card.name, kind=card.kind, latent_size=card.latent_size, sample_shape=card.sample_shape,
        latest_version=card.latest_version, num_classes=card.num_classes, class_names=card.class_names,
        version_policy=card.version_policy, source_shape=card.source_shape,
        versions=[pb.VersionInfo(version=v.version, state=VERSION_STATES.get(v.state, pb.VERSION_STATE_UNLOADED),
                                 provider=v.provider,
                                 error=v.error, manifest_json=v.manifest_json) for v in card.versions])
