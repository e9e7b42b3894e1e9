"""Run by tests/test_oip_clients.py with the Python of a venv holding only tritonclient (not this
project): Triton's own gRPC client against dcgan-serve's Open Inference Protocol front end.

    python tritonclient_grpc.py HOST:PORT MODEL IN.npz OUT.npz

IN.npz holds ``z`` and ``pixels``; OUT.npz gets what the server answered.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, source: str, target: str) -> None:
    given = np.load(source)
    client = triton.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model) and client.is_model_ready(f"{model}-discriminator")
    metadata = client.get_model_metadata(model, as_json=True)
    z = triton.InferInput("z", list(given["z"].shape), "FP32")
    z.set_data_from_numpy(given["z"])
    from_latents = client.infer(model, [z], outputs=[triton.InferRequestedOutput("images")])
    from_seed = client.infer(model, [], parameters={"seed": 5, "count": 3})
    pixels = triton.InferInput("samples", list(given["pixels"].shape), "UINT8")
    pixels.set_data_from_numpy(given["pixels"])
    judged = client.infer(f"{model}-discriminator", [pixels])
    try:
        client.infer("no-such-model", [z])
        missing = "answered"
    except InferenceServerException as error:
        missing = f"{error.status()} {error.message()}"
    np.savez(target, images=from_latents.as_numpy("images"), seeded=from_seed.as_numpy("images"),
             logits=judged.as_numpy("logits"), metadata=json.dumps(metadata), missing=missing,
             outputs=json.dumps([o["name"] for o in from_latents.get_response(as_json=True)["outputs"]]))


if __name__ == "__main__":
    main(*sys.argv[1:])
