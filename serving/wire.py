"""The wire side of the API, shared by the server and the client: numpy arrays <-> Tensor
messages, and the names of the API's enums.

A Tensor's header is checked before numpy sees it (numpy itself fails on more than 64 dimensions
or sizes past int64, with errors nobody should get): a bad one is a ValueError naming the field.
"""

from __future__ import annotations

import math

import numpy as np
from dcgan.v1 import inference_pb2 as pb

#: The API's full gRPC service name (health checks, reflection, Envoy's and Kubernetes' probes).
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DTYPES = {pb.DTYPE_UINT8: np.dtype(np.uint8), pb.DTYPE_FLOAT32: np.dtype("<f4")}
MAX_TENSOR_DIMS = 8  # the API's tensors have 1 (a latent), 2 (latents, points) or 4 (images) dimensions
MAX_ELEMENTS = 2**31 - 1  # bounds every dimension and their product (zeros counted as 1)

#: Encoding names (clients, CLIs, the service) and their proto values; "auto" is UNSPECIFIED.
ENCODINGS = {"auto": pb.ENCODING_UNSPECIFIED, "png": pb.ENCODING_PNG, "uint8": pb.ENCODING_RAW_UINT8,
             "float32": pb.ENCODING_RAW_FLOAT32}
ENCODING_NAMES = {value: name for name, value in ENCODINGS.items()}
#: Interpolation names and their proto values; UNSPECIFIED means slerp.
INTERPOLATIONS = {"slerp": pb.INTERPOLATION_SLERP, "lerp": pb.INTERPOLATION_LERP}
INTERPOLATION_NAMES = {pb.INTERPOLATION_UNSPECIFIED: "slerp",
                       **{value: name for name, value in INTERPOLATIONS.items()}}


def check_tensor(shape: list[int], dtype_code: int, data_size: int, what: str) -> np.dtype:
    """The numpy dtype of a Tensor whose header and byte count agree; ValueError otherwise."""
    if dtype_code not in DTYPES:
        raise ValueError(f"{what}: dtype must be DTYPE_UINT8 or DTYPE_FLOAT32, got {dtype_code}")
    if not 1 <= len(shape) <= MAX_TENSOR_DIMS:
        raise ValueError(f"{what}: shape has {len(shape)} dimensions; 1..{MAX_TENSOR_DIMS} allowed")
    if any(d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise ValueError(f"{what}: shape {shape} is invalid: dimensions must be >= 0 and their "
                         f"product (zeros counted as 1) at most {MAX_ELEMENTS}")
    dtype = DTYPES[dtype_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if data_size != expected:
        raise ValueError(f"{what}: shape {shape} of {dtype.name} needs {expected} bytes, got {data_size}")
    return dtype


def tensor_to_array(tensor: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """A Tensor message as a (read-only) numpy array."""
    shape = list(tensor.shape)
    dtype = check_tensor(shape, tensor.dtype, len(tensor.data), what)
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    """uint8 arrays travel as DTYPE_UINT8, everything else as little-endian float32."""
    array = np.asarray(array)
    dtype = pb.DTYPE_UINT8 if array.dtype == np.uint8 else pb.DTYPE_FLOAT32
    data = np.ascontiguousarray(array, dtype=np.uint8 if dtype == pb.DTYPE_UINT8 else "<f4").tobytes()
    return pb.Tensor(shape=list(array.shape), dtype=dtype, data=data)


def encoding(name: str) -> int:
    """The proto value of an encoding name."""
    if name not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {name!r}")
    return ENCODINGS[name]


def interpolation(name: str) -> int:
    """The proto value of an interpolation name."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]
