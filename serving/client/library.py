"""Python client for the dcgan inference service: numpy in, numpy out, typed errors.

    with InferenceClient("localhost:50051") as client:
        batch = client.sample(64, seed=1)          # batch.images: uint8 [64, 1, 28, 28]
        scores = client.score(batch.images)        # scores.probabilities: float32 [64]
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from dcgan.v1 import inference_pb2 as pb
from dcgan.v1 import inference_pb2_grpc as pb_grpc

from dcgan_core import images as imaging
from serving import security, wire

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def resolve_target(target: str) -> tuple[str, list[tuple[str, str]]]:
    """A gRPC target and channel options for ``target``: one address (Envoy, or one server), a
    comma-separated list of IP:port replicas, or a ``dns:///name:port`` naming all of them; the
    last two balance each call over every address with gRPC's round_robin policy."""
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    if len(addresses) > 1:
        try:
            families = {ipaddress.ip_address(a.rsplit(":", 1)[0].strip("[]")).version for a in addresses}
        except ValueError:
            raise ValueError(f"target {target!r}: several targets must be IP:port addresses; for host names "
                             f"use one dns:///NAME:PORT that resolves to every replica") from None
        if len(families) > 1:
            raise ValueError(f"target {target!r}: mixes IPv4 and IPv6 addresses")
        return f"ipv{families.pop()}:{','.join(addresses)}", [("grpc.service_config", ROUND_ROBIN)]
    if target.startswith("dns:"):
        return target, [("grpc.service_config", ROUND_ROBIN)]
    return target, []


class ClientError(Exception):
    """A failed call: ``code`` is the grpc.StatusCode, the message the server's details."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidArgumentError(ClientError): ...
class NotFoundError(ClientError): ...
class ResourceExhaustedError(ClientError): ...
class UnavailableError(ClientError): ...
class DeadlineExceededError(ClientError): ...
class UnauthenticatedError(ClientError): ...
class FailedPreconditionError(ClientError): ...


ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError, grpc.StatusCode.NOT_FOUND: NotFoundError,
          grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
          grpc.StatusCode.UNAVAILABLE: UnavailableError, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
          grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
          grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError}


def _typed(error: grpc.RpcError) -> ClientError:
    return ERRORS.get(error.code(), ClientError)(error.code(), error.details() or "")


@dataclass
class Samples:
    model: str
    version: int
    seed: int
    images: np.ndarray  # uint8 NCHW for uint8/png encodings, float32 otherwise (toy2d: [N, 2])
    png: list[bytes] = field(default_factory=list)  # PNG encoding: the bytes as sent
    probabilities: np.ndarray | None = None
    logits: np.ndarray | None = None
    offset: int = 0
    provider: str = ""
    labels: np.ndarray | None = None  # class-conditional models: the class of each sample
    candidates: int = 0  # discriminator-guided sampling: candidates the server drew for the request
    candidate_indices: np.ndarray | None = None  # and each kept sample's index among them


@dataclass(frozen=True)
class Controls:
    """Latent controls of a seeded request (the .proto defines each): the truncation threshold,
    and discriminator-guided sampling by ``min_score`` or ``keep_top``."""

    truncation: float | None = None
    min_score: float | None = None
    keep_top: float | None = None

    def apply(self, request: pb.SampleRequest) -> None:
        for name in ("truncation", "min_score", "keep_top"):
            if getattr(self, name) is not None:
                setattr(request, name, getattr(self, name))

    def params(self) -> dict:
        """The controls that are set, by name (for job records)."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Scores:
    model: str
    version: int
    probabilities: np.ndarray
    logits: np.ndarray
    provider: str = ""
    labels: np.ndarray | None = None  # class-conditional models: the class each image was scored under
    anomaly: np.ndarray | None = None  # with anomaly=True: the encoder's score, higher is less like the data
    anomaly_percentile: np.ndarray | None = None  # its share among the held-out real images


@dataclass
class Projection:
    """Images' latents z = E(x) (float32 [N, latent]), their reconstructions G(z) (uint8 NCHW for
    PNG/uint8, else float32) and anomaly scores with percentiles."""

    model: str
    version: int
    latents: np.ndarray
    reconstructions: np.ndarray
    anomaly: np.ndarray
    anomaly_percentile: np.ndarray
    provider: str = ""
    labels: np.ndarray | None = None


@dataclass
class Translation:
    """Translated images (uint8 NCHW for PNG/uint8, else float32), with the discriminator's
    probability and logit per (source, translation) pair when asked."""

    model: str
    version: int
    images: np.ndarray
    scores: np.ndarray | None = None
    logits: np.ndarray | None = None
    provider: str = ""


def _with_images(request, images: np.ndarray | Sequence[bytes]):
    """A Score or Project request carrying ``images``: one raw tensor, or encoded files."""
    if isinstance(images, np.ndarray):
        request.tensor.CopyFrom(wire.array_to_tensor(images))
    else:
        request.images.extend(images)
    return request


def _labels(labels: Sequence[int] | int | None) -> list[int]:
    if labels is None:
        return []
    return [int(labels)] if np.ndim(labels) == 0 else [int(v) for v in labels]


def _point(point: int | tuple[int, int] | np.ndarray, label: int | None) -> pb.LatentPoint:
    """A walk end: a seed (its sample 0), (seed, index), or an explicit latent vector."""
    message = pb.LatentPoint()
    if isinstance(point, np.ndarray):
        message.latent.CopyFrom(wire.array_to_tensor(point.astype(np.float32).reshape(-1)))
    else:
        seed, index = (point, 0) if np.ndim(point) == 0 else point
        message.seeded.CopyFrom(pb.SeededLatent(seed=int(seed), index=int(index)))
    if label is not None:
        message.label = int(label)
    return message


class InferenceClient:
    def __init__(self, target: str = "localhost:50051", timeout: float | None = 60.0,
                 max_message_mb: int = 64, channel: grpc.Channel | None = None,
                 tls_ca: str | None = None, token: str | None = None, wait_for_ready: bool = False):
        """``wait_for_ready``: a call made while the server is away waits for it (up to the call's
        timeout) instead of failing at once with UNAVAILABLE (gRPC's own option; batch jobs use it)."""
        limit = max_message_mb * 1024 * 1024
        target, balancing = resolve_target(target)
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit), *balancing]
        self.channel = channel or security.channel(target, options, tls_ca, token)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.timeout = timeout
        self.call_options = {"timeout": timeout, "wait_for_ready": wait_for_ready}

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def ready(self, timeout: float) -> bool:
        """Whether the channel connects to a server within ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _request(self, count: int, model: str, version: int, seed: int | None, latents: np.ndarray | None,
                 encoding: str, include_scores: bool, labels: Sequence[int] | int | None = None,
                 controls: Controls = Controls()) -> pb.SampleRequest:
        request = pb.SampleRequest(model=model, version=version, count=count, encoding=wire.encoding(encoding),
                                   include_scores=include_scores, labels=_labels(labels))
        controls.apply(request)
        if seed is not None:
            request.seed = seed
        if latents is not None:
            request.latents.CopyFrom(wire.array_to_tensor(np.asarray(latents, dtype=np.float32)))
        return request

    @staticmethod
    def _samples(response: pb.SampleResponse) -> Samples:
        if response.png:
            pixels = np.stack([imaging.decode_image(blob) for blob in response.png])
        else:
            pixels = wire.tensor_to_array(response.samples, "samples")
        scored = len(response.scores) > 0
        return Samples(response.model, response.version, response.seed, pixels, list(response.png),
                       np.array(response.scores, np.float32) if scored else None,
                       np.array(response.logits, np.float32) if scored else None, response.offset,
                       response.provider, np.array(response.labels, np.int64) if response.labels else None,
                       response.candidates, np.array(response.candidate_indices, np.int64)
                       if response.candidate_indices else None)

    def sample(self, count: int = 0, *, model: str = "", version: int = 0, seed: int | None = None,
               latents: np.ndarray | None = None, encoding: str = "auto", include_scores: bool = False,
               labels: Sequence[int] | int | None = None, controls: Controls = Controls()) -> Samples:
        """``count`` samples (or one per latent row); same seed, same images. ``labels``
        (class-conditional models): one class for all, or one per sample. ``controls``:
        truncation and discriminator-guided sampling."""
        request = self._request(count, model, version, seed, latents, encoding, include_scores, labels, controls)
        try:
            return self._samples(self.stub.Sample(request, **self.call_options))
        except grpc.RpcError as error:
            raise _typed(error) from None

    def sample_stream(self, count: int, *, model: str = "", version: int = 0, seed: int | None = None,
                      encoding: str = "auto", include_scores: bool = False, chunk_size: int = 0,
                      labels: Sequence[int] | int | None = None, controls: Controls = Controls()) -> Iterator[Samples]:
        """The samples of one seeded request, in chunks (for counts too large for one message)."""
        request = pb.SampleStreamRequest(sample=self._request(count, model, version, seed, None, encoding,
                                                             include_scores, labels, controls), chunk_size=chunk_size)
        try:
            for response in self.stub.SampleStream(request, **self.call_options):
                yield self._samples(response.chunk)
        except grpc.RpcError as error:
            raise _typed(error) from None

    def walk(self, start: int | tuple[int, int] | np.ndarray, end: int | tuple[int, int] | np.ndarray,
             steps: int, *, interpolation: str = "slerp", model: str = "", version: int = 0,
             encoding: str = "auto", include_scores: bool = False, truncation: float | None = None,
             labels: tuple[int | None, int | None] = (None, None)) -> Samples:
        """``steps`` frames from ``start`` to ``end``, each a seed (its sample 0), a (seed, index)
        pair or a latent vector; ``labels``: the class at each end (conditional models)."""
        request = pb.WalkRequest(model=model, version=version, start=_point(start, labels[0]),
                                 end=_point(end, labels[1]), steps=steps, encoding=wire.encoding(encoding),
                                 interpolation=wire.interpolation(interpolation), include_scores=include_scores)
        if truncation is not None:
            request.truncation = truncation
        try:
            return self._samples(self.stub.Walk(request, **self.call_options).frames)
        except grpc.RpcError as error:
            raise _typed(error) from None

    def score(self, images: np.ndarray | Sequence[bytes], *, model: str = "", version: int = 0,
              labels: Sequence[int] | int | None = None, anomaly: bool = False) -> Scores:
        """Probability of being real per image: a uint8/float32 array, or encoded image files.
        ``labels`` (class-conditional models): the class each image claims; without them each
        is scored under its most likely class. ``anomaly``: also the encoder's anomaly score and
        its percentile (versions with an encoder)."""
        request = _with_images(pb.ScoreRequest(model=model, version=version, labels=_labels(labels),
                                               include_anomaly=anomaly), images)
        try:
            response = self.stub.Score(request, **self.call_options)
        except grpc.RpcError as error:
            raise _typed(error) from None
        floats = lambda values: np.array(values, np.float32) if len(values) else None  # noqa: E731
        return Scores(response.model, response.version, np.array(response.probabilities, np.float32),
                      np.array(response.logits, np.float32), response.provider,
                      np.array(response.labels, np.int64) if response.labels else None,
                      floats(response.anomaly), floats(response.anomaly_percentile))

    def project(self, images: np.ndarray | Sequence[bytes], *, model: str = "", version: int = 0,
                labels: Sequence[int] | int | None = None, encoding: str = "png") -> Projection:
        """The latents of images (versions with an encoder), with reconstructions and anomaly
        scores; Walk takes the latents as explicit points."""
        request = _with_images(pb.ProjectRequest(model=model, version=version, labels=_labels(labels),
                                                 encoding=wire.encoding(encoding)), images)
        try:
            response = self.stub.Project(request, **self.call_options)
        except grpc.RpcError as error:
            raise _typed(error) from None
        reconstructions = (np.stack([imaging.decode_image(blob) for blob in response.png]) if response.png
                           else wire.tensor_to_array(response.samples, "samples"))
        return Projection(response.model, response.version, wire.tensor_to_array(response.latents, "latents"),
                          reconstructions, np.array(response.anomaly, np.float32),
                          np.array(response.anomaly_percentile, np.float32), response.provider,
                          np.array(response.labels, np.int64) if response.labels else None)

    def translate(self, sources: np.ndarray | Sequence[bytes], *, model: str = "", version: int = 0,
                  encoding: str = "png", scores: bool = False) -> Translation:
        """Source images (a uint8/float32 array or encoded files, each the model's source size)
        translated by a translation model; ``scores``: also the discriminator's score of each pair."""
        request = _with_images(pb.TranslateRequest(model=model, version=version, include_scores=scores,
                                                   encoding=wire.encoding(encoding)), sources)
        try:
            response = self.stub.Translate(request, **self.call_options)
        except grpc.RpcError as error:
            raise _typed(error) from None
        translated = (np.stack([imaging.decode_image(blob) for blob in response.png]) if response.png
                      else wire.tensor_to_array(response.samples, "samples"))
        floats = lambda values: np.array(values, np.float32) if len(values) else None  # noqa: E731
        return Translation(response.model, response.version, translated, floats(response.scores),
                           floats(response.logits), response.provider)

    def models(self) -> pb.ListModelsResponse:
        try:
            return self.stub.ListModels(pb.ListModelsRequest(), **self.call_options)
        except grpc.RpcError as error:
            raise _typed(error) from None

    def get_model(self, model: str = "") -> pb.ModelInfo:
        try:
            return self.stub.GetModel(pb.GetModelRequest(model=model), **self.call_options).model
        except grpc.RpcError as error:
            raise _typed(error) from None

