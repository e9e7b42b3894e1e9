"""Outside clients of the Open Inference Protocol front end, each run from a venv of its own
(requirements-clients.txt) against a real server: what they get equals dcgan.v1's answers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcgan_core.latents import latents
from serving.client.library import InferenceClient
from tests.conftest import ROOT, start_server

CLIENTS = Path(__file__).parent / "clients"


@pytest.fixture(scope="session")
def clients_python(tmp_path_factory) -> Path:
    """A venv with tritonclient and nothing of this project."""
    venv = tmp_path_factory.mktemp("clients-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(ROOT / "requirements-clients.txt")],
                   check=True, stdout=subprocess.DEVNULL)
    return venv / "bin" / "python"


def _drive(python: Path, script: str, repository, tmp_path: Path, http: bool) -> tuple[dict, dict]:
    """Run a client script against a real server on ``repository`` ("enc"): what it got, and
    dcgan.v1's answers to the same questions."""
    z = latents(3, 4, 8)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", z=z, pixels=pixels)
    server = start_server(repository.root, poll_s=0)
    try:
        port = server.http_port if http else server.port
        subprocess.run([str(python), str(CLIENTS / script), f"127.0.0.1:{port}", "enc", str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz")], check=True, timeout=120)
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            expected = {"images": client.sample(latents=z, model="enc").images,
                        "seeded": client.sample(3, seed=5, model="enc").images,
                        "logits": client.score(pixels, model="enc").logits}
    finally:
        server.stop(grace=1)
    return dict(np.load(tmp_path / "out.npz")), expected


@pytest.mark.slow
def test_tritonclient_grpc_gets_the_pixels_dcgan_v1_gives(clients_python, encoder_repo, tmp_path):
    got, expected = _drive(clients_python, "tritonclient_grpc.py", encoder_repo, tmp_path, http=False)
    np.testing.assert_array_equal(got["images"], expected["images"])
    np.testing.assert_array_equal(got["seeded"], expected["seeded"])
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    assert json.loads(str(got["outputs"])) == ["images"]  # only the requested output
    metadata = json.loads(str(got["metadata"]))
    assert metadata["inputs"] == [{"name": "z", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert str(got["missing"]).startswith("StatusCode.NOT_FOUND model 'no-such-model' not found")


@pytest.mark.slow
def test_tritonclient_http_gets_the_same_pixels_in_json_and_binary(clients_python, encoder_repo, tmp_path):
    got, expected = _drive(clients_python, "tritonclient_http.py", encoder_repo, tmp_path, http=True)
    np.testing.assert_array_equal(got["images"], expected["images"])
    np.testing.assert_array_equal(got["images_json"], expected["images"])
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    assert json.loads(str(got["metadata"]))["outputs"][1] == {"name": "images", "datatype": "UINT8",
                                                               "shape": [-1, 1, 28, 28]}
    assert str(got["missing"]).startswith("404 model 'no-such-model' not found")
