"""The Open Inference Protocol (KServe V2) front end over gRPC: translates its messages to the
same InferenceService calls as dcgan.v1, and the results back.

Each repository model appears as up to three OIP models (OIP versions are repository versions):

- ``<name>``: the generator. Inputs ``z`` FP32 [-1, latent] and, for conditional models,
  ``labels`` INT64 [-1]; or no inputs and the request parameters ``seed``, ``count`` and
  ``truncation`` (the same latents as dcgan.v1 Sample with that seed); ``timeout`` (microseconds)
  on any model. Outputs ``samples`` FP32 in
  [-1, 1] and, for image models, ``images`` UINT8.
- ``<name>-discriminator``: inputs ``samples`` (FP32 in [-1, 1], or UINT8 pixels) [and labels];
  outputs ``logits`` and ``probabilities`` FP32 [-1].
- ``<name>-encoder`` (versions with an encoder): inputs as the discriminator's; outputs ``z``,
  ``reconstruction``, ``anomaly`` and ``anomaly_percentile``.

Translation models: ``<name>`` takes ``source`` (FP32 in [-1, 1], or UINT8 pixels) [-1, C, h, w]
and answers ``samples`` and ``images``; ``<name>-discriminator`` takes ``samples`` and ``source``
(pairs) and answers ``logits`` and ``probabilities``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import grpc
import numpy as np
from dcgan.oip import grpc_predict_v2_pb2 as oip
from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

import dcgan_core
from dcgan_core import images
from serving.server.errors import InvalidArgument, NotFound, quoted
from serving.server.inputs import ScoreSpec
from serving.server.plans import SampleSpec
from serving.server.service import Call, InferenceService, ModelCard
from serving.server.servicer import call_of, handled

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
SERVER_NAME = "dcgan-serve"
PLATFORM = "onnxruntime_onnx"
ROLES = {"-discriminator": "discriminator", "-encoder": "encoder"}  # OIP name suffix -> network; none: generator
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
            "INT32": "int_contents", "UINT8": "uint_contents"}
DATATYPES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}

TensorMeta = tuple[str, str, list[int]]


@dataclass(frozen=True)
class Target:
    """An OIP model name resolved: the repository model and the network it exposes. Its card is
    built on first use (metadata, readiness): inference never needs it."""

    name: str
    model: str
    role: str  # generator | discriminator | encoder
    service: InferenceService

    @functools.cached_property
    def card(self) -> ModelCard:
        return self.service.model(self.model)

    def ready_versions(self) -> list[int]:
        return [v.version for v in self.card.versions
                if v.state == "READY" and (self.role != "encoder" or v.encoder)]


def resolve(service: InferenceService, name: str) -> Target:
    """NOT_FOUND unless ``name`` is a model, or a model's discriminator or (with one) encoder.
    Looks up only the candidate models (this runs on every call); all of them only to say which
    names exist."""
    candidates = [(name[: -len(suffix)], network) for suffix, network in ROLES.items() if name.endswith(suffix)]
    for model, role in [*candidates, (name, "generator")]:
        if not (model and service.serves(model)):
            continue
        target = Target(name, model, role, service)
        if role != "encoder" or any(v.encoder for v in target.card.versions):
            return target
    raise NotFound(f"model {quoted(name)} not found; models: {', '.join(names(service.models()[0]))}")


def names(cards) -> list[str]:
    """Every OIP model name the repository's models give."""
    listed = []
    for card in cards:
        listed += [card.name, f"{card.name}-discriminator"]
        listed += [f"{card.name}-encoder"] if any(v.encoder for v in card.versions) else []
    return listed


def version_of(text: str) -> int:
    """An OIP version string: empty is the latest ready version (0 to the service)."""
    if text == "":
        return 0
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"model version {quoted(text)} is not a positive integer")
    return int(text)


def tensors(target: Target) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """The inputs and outputs of the target's network: (name, datatype, shape), -1 any size."""
    card = target.card
    sample = [-1, *card.sample_shape]
    labels = [("labels", "INT64", [-1])] if card.num_classes else []
    if card.kind == "translation":
        source = ("source", "FP32", [-1, *card.source_shape])
        if target.role == "generator":
            return [source], [("samples", "FP32", sample), ("images", "UINT8", sample)]
        return [("samples", "FP32", sample), source], [("logits", "FP32", [-1]), ("probabilities", "FP32", [-1])]
    if target.role == "generator":
        outputs = [("samples", "FP32", sample)] + ([("images", "UINT8", sample)] if card.kind == "dcgan" else [])
        return [("z", "FP32", [-1, card.latent_size]), *labels], outputs
    if target.role == "discriminator":
        return [("samples", "FP32", sample), *labels], [("logits", "FP32", [-1]), ("probabilities", "FP32", [-1])]
    return [("samples", "FP32", sample), *labels], [("z", "FP32", [-1, card.latent_size]),
                                                   ("reconstruction", "FP32", sample), ("anomaly", "FP32", [-1]),
                                                   ("anomaly_percentile", "FP32", [-1])]


def input_arrays(request: oip.ModelInferRequest) -> dict[str, np.ndarray]:
    """Each input tensor by name, from raw_input_contents or from its typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    arrays = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.datatype not in DTYPES:
            raise InvalidArgument(f"input {quoted(tensor.name)}: datatype {quoted(tensor.datatype)} is not one "
                                  f"of {', '.join(DTYPES)}")
        if tensor.name in arrays:
            raise InvalidArgument(f"input {quoted(tensor.name)} appears twice")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {quoted(tensor.name)}: shape {list(shape)} has a negative size")
        dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
        if raw:
            if len(raw[i]) != math.prod(shape) * dtype.itemsize:
                raise InvalidArgument(f"input {quoted(tensor.name)}: {len(raw[i])} bytes for shape {list(shape)} "
                                      f"of {tensor.datatype}")
            values = np.frombuffer(raw[i], dtype)
        else:
            values = np.asarray(getattr(tensor.contents, CONTENTS[tensor.datatype]), dtype)
            if values.size != math.prod(shape):
                raise InvalidArgument(f"input {quoted(tensor.name)}: {values.size} values for shape {list(shape)}")
        arrays[tensor.name] = values.reshape(shape).astype(dtype.newbyteorder("="))
    return arrays


def grpc_parameters(parameters) -> dict[str, object]:
    """An OIP gRPC parameter map as plain values (bool, int, float or str)."""
    return {name: getattr(given, given.WhichOneof("parameter_choice") or "", None)
            for name, given in parameters.items()}


def parameter(parameters: dict[str, object], name: str, kind: type) -> int | float | None:
    """A request parameter as ``kind`` (int or float), None when absent."""
    if name not in parameters:
        return None
    value = parameters[name]
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (kind is int and not float(value).is_integer()):
        raise InvalidArgument(f"parameter {quoted(name)} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _expect(arrays: dict[str, np.ndarray], allowed: set[str]) -> None:
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown input {quoted(unknown[0])}; inputs: {', '.join(sorted(allowed))}")


def _labels(arrays: dict[str, np.ndarray]) -> tuple[int, ...]:
    labels = arrays.get("labels")
    if labels is None:
        return ()
    if labels.dtype not in (np.int64, np.int32) or labels.ndim != 1:
        raise InvalidArgument("input 'labels' must be INT64 [N]")
    return tuple(int(v) for v in labels)


def server_ready(service: InferenceService) -> bool:
    """Every model has a ready version, and the server is not draining (so that a load balancer's
    HTTP health check takes a replica out of rotation when it starts to shut down)."""
    cards, _ = service.models()
    return bool(cards) and all(card.latest_version for card in cards) and not service.shutting_down


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": dcgan_core.__version__,
            "extensions": ["model_repository", "binary_tensor_data", "parameters"]}


def model_ready(service: InferenceService, name: str, version_text: str) -> bool:
    version, target = version_of(version_text), resolve(service, name)
    ready = target.ready_versions()
    return (version in ready) if version else bool(ready)


def model_metadata(service: InferenceService, name: str, version_text: str) -> dict:
    """The spec's model metadata: ready versions, platform, inputs and outputs."""
    version, target = version_of(version_text), resolve(service, name)
    if version and version not in target.ready_versions():
        raise NotFound(f"model {quoted(name)} has no ready version {version}")
    inputs, outputs = tensors(target)
    described = lambda metas: [{"name": n, "datatype": d, "shape": s} for n, d, s in metas]  # noqa: E731
    return {"name": target.name, "versions": [str(v) for v in target.ready_versions()], "platform": PLATFORM,
            "inputs": described(inputs), "outputs": described(outputs)}


def repository_index(service: InferenceService, ready_only: bool) -> list[dict]:
    """Every OIP model and version the store knows, with its state (Triton's RepositoryIndex)."""
    entries = []
    for card in service.models()[0]:
        for version in card.versions:
            for name in names([card]):
                state = "READY" if version.state == "READY" else "UNAVAILABLE"
                if (name.endswith("-encoder") and not version.encoder) or (ready_only and state != "READY"):
                    continue
                entries.append({"name": name, "version": str(version.version), "state": state,
                                "reason": version.error})
    return entries


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the InferenceService (metrics name each call
    ``oip.<method>``: the protocol is in the method label)."""

    def __init__(self, service: InferenceService):
        self.service = service

    def _rpc(self, method: str, model: str, context: grpc.aio.ServicerContext):
        return handled(self.service, f"oip.{method}", model, context)

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        async with self._rpc("ServerReady", "", context):
            return oip.ServerReadyResponse(ready=server_ready(self.service))

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(**server_metadata())

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        async with self._rpc("ModelReady", request.name, context):
            return oip.ModelReadyResponse(ready=model_ready(self.service, request.name, request.version))

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        async with self._rpc("ModelMetadata", request.name, context):
            return oip.ModelMetadataResponse(**model_metadata(self.service, request.name, request.version))

    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context) -> oip.RepositoryIndexResponse:
        async with self._rpc("RepositoryIndex", "", context):
            return oip.RepositoryIndexResponse(models=repository_index(self.service, request.ready))

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        async with self._rpc("ModelInfer", request.model_name, context):
            result = await infer(self.service, request.model_name, request.model_version, input_arrays(request),
                                 grpc_parameters(request.parameters), call_of(context))
            return response(request, result)


@dataclass(frozen=True)
class InferResult:
    target: Target
    version: int
    outputs: dict[str, np.ndarray]
    parameters: dict[str, int]

    def selected(self, names: list[str]) -> dict[str, np.ndarray]:
        """The named outputs in that order (all when none is named); INVALID_ARGUMENT for others."""
        unknown = [name for name in names if name not in self.outputs]
        if unknown:
            raise InvalidArgument(f"unknown output {quoted(unknown[0])}; outputs: {', '.join(self.outputs)}")
        return {name: self.outputs[name] for name in names or self.outputs}


async def infer(service: InferenceService, name: str, version_text: str, arrays: dict[str, np.ndarray],
                parameters: dict[str, object], call: Call) -> InferResult:
    """One OIP inference, any transport: the target network's service call. The request parameter
    ``timeout`` (microseconds, as Triton and tritonclient's ``timeout=`` have it) shortens the
    call's deadline."""
    target, version = resolve(service, name), version_of(version_text)
    timeout_us = parameter(parameters, "timeout", int)
    if timeout_us is not None:
        if timeout_us <= 0:
            raise InvalidArgument(f"parameter timeout = {timeout_us} must be a positive number of microseconds")
        call = call.within(timeout_us / 1e6)
    run = {"generator": _generate, "discriminator": _discriminate, "encoder": _encode}[target.role]
    outputs, used, extra = await run(service, target.model, version, arrays, parameters, call)
    return InferResult(target, used, outputs, extra)


async def _generate(service: InferenceService, model: str, version: int, arrays: dict[str, np.ndarray],
                    parameters: dict[str, object], call: Call):
    if "source" in arrays:  # a translation model's generator
        _expect(arrays, {"source"})
        result = await service.translate(_images(arrays, "source", model, version), "float32", False, call)
        return ({"samples": result.samples, "images": images.model_to_uint8(result.samples)},
                result.manifest.version, {})
    _expect(arrays, {"z", "labels"})
    z = arrays.get("z")
    if z is not None and z.dtype != np.float32:
        raise InvalidArgument("input 'z' must be FP32 [N, latent]")
    count = parameter(parameters, "count", int)
    spec = SampleSpec(count or (0 if z is not None else 1), parameter(parameters, "seed", int), z,
                      _labels(arrays), parameter(parameters, "truncation", float), model=model, version=version,
                      encoding="float32")
    result = await service.sample(spec, call)
    outputs = {"samples": result.samples}
    if result.manifest.kind == "dcgan":
        outputs["images"] = images.model_to_uint8(result.samples)
    return outputs, result.manifest.version, {"seed": result.seed}


async def _discriminate(service: InferenceService, model: str, version: int, arrays: dict[str, np.ndarray],
                        parameters: dict[str, object], call: Call):
    if "source" in arrays:  # a translation model's discriminator: (samples, source) pairs
        _expect(arrays, {"samples", "source"})
        pairs = _images(arrays, "samples", model, version), _images(arrays, "source", model, version)
        result = await service.score_pairs(*pairs, call)
    else:
        result = await service.score(_score_spec(model, version, arrays), call)
    return {"logits": result.logits, "probabilities": result.probabilities}, result.manifest.version, {}


async def _encode(service: InferenceService, model: str, version: int, arrays: dict[str, np.ndarray],
                  parameters: dict[str, object], call: Call):
    result = await service.project(_score_spec(model, version, arrays), "float32", call)
    return ({"z": result.latents, "reconstruction": result.reconstructions, "anomaly": result.anomaly,
             "anomaly_percentile": result.anomaly_percentile}, result.manifest.version, {})


def _score_spec(model: str, version: int, arrays: dict[str, np.ndarray]) -> ScoreSpec:
    _expect(arrays, {"samples", "labels"})
    return dataclasses.replace(_images(arrays, "samples", model, version), labels=_labels(arrays))


def _images(arrays: dict[str, np.ndarray], name: str, model: str, version: int) -> ScoreSpec:
    """The image input ``name`` (FP32 model range, or UINT8 pixels) as the service's image batch."""
    if name not in arrays:
        raise InvalidArgument(f"input {quoted(name)} is required")
    if arrays[name].dtype not in (np.float32, np.uint8):
        raise InvalidArgument(f"input {quoted(name)} must be FP32 (model range) or UINT8 (pixels)")
    return ScoreSpec(array=arrays[name], model=model, version=version)


def response(request: oip.ModelInferRequest, result: InferResult) -> oip.ModelInferResponse:
    """The requested outputs (all when none is named), as raw little-endian bytes."""
    reply = oip.ModelInferResponse(model_name=result.target.name, model_version=str(result.version), id=request.id)
    for key, value in result.parameters.items():
        reply.parameters[key].int64_param = value
    for name, array in result.selected([o.name for o in request.outputs]).items():
        reply.outputs.add(name=name, datatype=DATATYPES[array.dtype], shape=list(array.shape))
        reply.raw_output_contents.append(little_endian_bytes(array))
    return reply


def little_endian_bytes(array: np.ndarray) -> bytes:
    """An output's raw contents as the protocol sends them: row-major, little-endian."""
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
