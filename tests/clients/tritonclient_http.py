"""Run by tests/test_oip_clients.py with the Python of a venv holding only tritonclient: Triton's
own HTTP client (JSON, and its binary tensor extension) against dcgan-serve's OIP REST API.

    python tritonclient_http.py HOST:PORT MODEL IN.npz OUT.npz
"""

import json
import sys

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, source: str, target: str) -> None:
    given = np.load(source)
    client = triton.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model) and client.is_model_ready(f"{model}-discriminator")
    metadata = client.get_model_metadata(model)
    results = {}
    for binary in (True, False):
        z = triton.InferInput("z", list(given["z"].shape), "FP32")
        z.set_data_from_numpy(given["z"], binary_data=binary)
        answer = client.infer(model, [z], outputs=[triton.InferRequestedOutput("images", binary_data=binary)])
        results["binary" if binary else "json"] = answer.as_numpy("images")
    pixels = triton.InferInput("samples", list(given["pixels"].shape), "UINT8")
    pixels.set_data_from_numpy(given["pixels"])
    judged = client.infer(f"{model}-discriminator", [pixels])
    try:
        client.infer("no-such-model", [z])
        missing = "answered"
    except InferenceServerException as error:
        missing = f"{error.status()} {error.message()}"
    np.savez(target, images=results["binary"], images_json=results["json"], logits=judged.as_numpy("logits"),
             metadata=json.dumps(metadata), missing=missing)


if __name__ == "__main__":
    main(*sys.argv[1:])
