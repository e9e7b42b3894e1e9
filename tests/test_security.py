"""TLS, bearer-token authentication and input limits on a real server."""

import io
import subprocess

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving import security
from serving.client.library import InferenceClient, InvalidArgumentError, UnauthenticatedError, UnavailableError
from serving.server.config import ServeConfigError, load_serve_config
from tests.conftest import start_server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(folder / "key.pem"),
                    "-out", str(folder / "cert.pem")], check=True, capture_output=True)
    (folder / "token").write_text("s3cret-token\n")
    return folder


@pytest.fixture(scope="module")
def secure_server(serving_repo, certificate):
    server = start_server(serving_repo, poll_s=0, tls_cert=str(certificate / "cert.pem"),
                          tls_key=str(certificate / "key.pem"), auth_token_file=str(certificate / "token"))
    yield server
    server.stop(grace=1)


def test_tls_with_token_is_served(secure_server, certificate):
    ca = str(certificate / "cert.pem")
    with InferenceClient(f"localhost:{secure_server.port}", tls_ca=ca, token="s3cret-token") as client:
        assert client.sample(2, seed=1).images.shape == (2, 1, 28, 28)
        assert sum(len(c.images) for c in client.sample_stream(5, seed=1, chunk_size=2)) == 5


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, certificate, token):
    ca = str(certificate / "cert.pem")
    with InferenceClient(f"localhost:{secure_server.port}", tls_ca=ca, token=token) as client:
        with pytest.raises(UnauthenticatedError, match="missing or invalid bearer token"):
            client.sample(1, seed=1)
        with pytest.raises(UnauthenticatedError):
            list(client.sample_stream(2, seed=1))
        with pytest.raises(UnauthenticatedError):
            client.models()
        # probes need no token
        health = health_pb2_grpc.HealthStub(client.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_the_open_inference_protocol_needs_the_token_too(secure_server, certificate):
    """Bearer-token auth covers every front end on the port, the OIP's included."""
    import grpc
    from dcgan.oip import grpc_predict_v2_pb2 as oip
    from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc

    ca, target = str(certificate / "cert.pem"), f"localhost:{secure_server.port}"
    request = oip.ModelMetadataRequest(name="tiny")
    with security.channel(target, [], ca) as channel:
        with pytest.raises(grpc.RpcError, match="missing or invalid bearer token"):
            oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(request)
    with security.channel(target, [], ca, "s3cret-token") as channel:
        assert oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(request).name == "tiny"


def test_http_is_tls_and_needs_the_token_except_health(secure_server, certificate):
    def status(path: str, *headers: str) -> str:
        return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                               str(certificate / "cert.pem"), *headers,
                               f"https://localhost:{secure_server.http_port}{path}"],
                              capture_output=True, text=True, timeout=60).stdout

    assert status("/v2/models/tiny") == "401"
    assert status("/v2/models/tiny", "-H", "Authorization: Bearer wrong") == "401"
    assert status("/v2/models/tiny", "-H", "Authorization: Bearer s3cret-token") == "200"
    assert status("/v2/health/ready") == "200"  # probes need no token
    assert status("/") == "200" and status("/playground/playground.js") == "200"  # the page asks for the token
    assert status("/v1/models") == "401"
    assert status("/playground/../v1/models", "--path-as-is") in ("401", "403", "404")  # no way around it
    plain = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://localhost:{secure_server.http_port}/v2/health/live"],
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout == "000"  # no plaintext HTTP beside TLS


def test_plaintext_client_cannot_talk_to_tls_server(secure_server):
    with InferenceClient(f"localhost:{secure_server.port}", timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.sample(1, seed=1)


def test_token_without_tls_is_refused(tmp_path):
    (tmp_path / "t").write_text("x")
    with pytest.raises(ServeConfigError, match="needs TLS"):
        load_serve_config(None, {"auth_token_file": str(tmp_path / "t")})
    with pytest.raises(ValueError, match="needs TLS"):
        security.channel("localhost:1", [], None, "token")


def test_decompression_bomb_is_rejected_before_decoding(serving_repo):
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG", optimize=True)  # 400 MP, a few hundred KB
    bomb = buffer.getvalue()
    assert len(bomb) < 2_000_000
    server = start_server(serving_repo, poll_s=0)
    try:
        with InferenceClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(InvalidArgumentError, match="image 0: .*(decode limit|decompression bomb)"):
                client.score([bomb])  # refused from the header, before any pixel is decompressed
            with pytest.raises(InvalidArgumentError, match="number of images must be in 1..1024"):
                client.score(np.zeros((1025, 1, 28, 28), np.uint8))
    finally:
        server.stop(grace=1)


@pytest.mark.parametrize("content", [b"", b"\n", b"   \t\n", b"two words\n", b"\xff\xfe"])
def test_empty_or_malformed_token_file_is_refused(serving_repo, certificate, tmp_path, content):
    """An empty token must never mean "no authentication"."""
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    with pytest.raises(ServeConfigError, match="auth_token_file .* (is empty|one token|ASCII)"):
        start_server(serving_repo, poll_s=0, tls_cert=str(certificate / "cert.pem"),
                     tls_key=str(certificate / "key.pem"), auth_token_file=str(token_file))


def test_empty_token_file_exits_2_from_the_cli(serving_repo, certificate, tmp_path):
    import sys

    (tmp_path / "token").write_text("\n")
    done = subprocess.run([sys.executable, "-m", "serving.server", "--repository", str(serving_repo), "--port", "0",
                           "--metrics-port", "-1", "--tls-cert", str(certificate / "cert.pem"),
                           "--tls-key", str(certificate / "key.pem"), "--auth-token-file", str(tmp_path / "token")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is empty" in done.stderr
