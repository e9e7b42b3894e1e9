"""dcgan-serve's Open Inference Protocol front end side by side with Triton serving the same
``generator.onnx`` (PyTriton, its dynamic batcher on, onnxruntime on the CPU), both driven by
tritonclient from one client program (bench/oip_load.py), over gRPC and HTTP; and, from the same
program with generated stubs, OIP against dcgan.v1 on the same seeded load.

Loads: ``--clients`` (64) threads each asking for one image, and one client asking for 256
images per request. Repeats interleave every server, protocol and load; the report gives medians
and ratios measured in this one run (bench/results/oip_vs_triton.json).

    .venv/bin/python bench/oip_vs_triton.py --repository exported --model mnist-dcgan

The Triton venv (``--triton-python``) is made on first use from bench/requirements-triton.txt.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import cpu_model, median, save  # noqa: E402
from dcgan_core.repository import Repository  # noqa: E402
from serving import processes  # noqa: E402
from serving.client.library import InferenceClient  # noqa: E402

TRITON_VENV = ROOT / ".venv-triton"
DEBIAN_PYTHON = "/usr/bin/python3.11"
LOAD = ROOT / "bench" / "oip_load.py"


def triton_python(venv: Path) -> Path:
    """The Triton venv's interpreter, made first if there is none."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} from bench/requirements-triton.txt (once)", flush=True)
        subprocess.run([DEBIAN_PYTHON, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r",
                        str(ROOT / "bench" / "requirements-triton.txt")], check=True)
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_triton(python: Path, onnx: Path, model: str, log: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """PyTriton on free ports, returned once it says it serves the model."""
    ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
    with log.open("w") as sink:
        process = subprocess.Popen([str(python), str(ROOT / "bench" / "triton_server.py"), str(onnx), "--model", model,
                                    *(f"--{k}-port={v}" for k, v in ports.items())],
                                   stdout=subprocess.PIPE, stderr=sink, text=True)
    for line in process.stdout:
        if line.startswith("triton_server: ready"):
            return process, ports
    raise SystemExit(f"Triton did not start (exit status {process.wait()}); see {log}")


def served_version(port: int, model: str) -> int:
    with InferenceClient(f"127.0.0.1:{port}") as client:
        return next(m.latest_version for m in client.models().models if m.name == model)


def measure(python: Path | str, kind: str, target: str, model: str, clients: int, count: int, seconds: float) -> dict:
    done = subprocess.run([str(python), str(LOAD), kind, target, "--model", model, "--clients", str(clients),
                           "--count", str(count), "--seconds", str(seconds)], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} on {target} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--clients", type=int, default=64, help="single-image clients of the first load")
    parser.add_argument("--batch", type=int, default=256, help="images per request of the second load")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--triton-venv", type=Path, default=TRITON_VENV)
    args = parser.parse_args()
    triton_py = triton_python(args.triton_venv)
    loads = {f"{args.clients}x1": (args.clients, 1), f"1x{args.batch}": (1, args.batch)}
    with tempfile.TemporaryDirectory() as scratch:
        serve, ours = processes.start_server(["--repository", args.repository, "--metrics-port", "-1"],
                                             stderr=subprocess.DEVNULL)
        version = served_version(ours.grpc, args.model)  # Triton serves the same file
        onnx = Repository(Path(args.repository)).version_dir(args.model, version) / "generator.onnx"
        triton, theirs = start_triton(triton_py, onnx, args.model, Path(scratch) / "triton.log")
        peers = {  # name: (client interpreter, client kind, target)
            "triton grpc": (triton_py, "tritonclient-grpc", f"127.0.0.1:{theirs['grpc']}"),
            "dcgan-serve oip grpc": (triton_py, "tritonclient-grpc", f"127.0.0.1:{ours.grpc}"),
            "triton http": (triton_py, "tritonclient-http", f"127.0.0.1:{theirs['http']}"),
            "dcgan-serve oip http": (triton_py, "tritonclient-http", f"127.0.0.1:{ours.http}"),
            "dcgan-serve dcgan.v1 seeded": (sys.executable, "dcgan-v1", f"127.0.0.1:{ours.grpc}"),
            "dcgan-serve oip grpc seeded": (sys.executable, "oip-grpc", f"127.0.0.1:{ours.grpc}"),
        }
        runs: dict[str, dict[str, list[dict]]] = {load: {peer: [] for peer in peers} for load in loads}
        try:
            for repeat in range(args.repeats):
                for load, (clients, count) in loads.items():
                    for peer, (python, kind, target) in peers.items():
                        result = measure(python, kind, target, args.model, clients, count, args.seconds)
                        runs[load][peer].append(result)
                        print(f"repeat {repeat + 1}/{args.repeats} {load:>6} {peer:<28} "
                              f"{result['images_per_s']:8.0f} img/s  p99 {result['p99_ms']:6.1f} ms", flush=True)
        finally:
            for process in (serve, triton):
                process.terminate()
                process.wait(timeout=60)
    report = summarize(runs)
    save("oip_vs_triton", {"cpu": cpu_model(), "model": f"{args.model}/{version}", "seconds": args.seconds,
                           "repeats": args.repeats, "loads": {k: {"clients": c, "images_per_request": n}
                                                              for k, (c, n) in loads.items()},
                           "dcgan_serve_flags": "defaults", "triton": "PyTriton 0.7.0, max_batch_size 256, "
                           "max_queue_delay 2000 us, one instance", **report, "runs": runs})


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Medians per load and peer, and the ratios the README states."""
    medians = {load: {peer: {key: median([r[key] for r in results]) for key in ("images_per_s", "p50_ms", "p99_ms")}
                      for peer, results in peers.items()} for load, peers in runs.items()}
    ratio = lambda load, a, b: medians[load][a]["images_per_s"] / medians[load][b]["images_per_s"]  # noqa: E731
    ratios = {load: {"oip grpc vs triton grpc": ratio(load, "dcgan-serve oip grpc", "triton grpc"),
                     "oip http vs triton http": ratio(load, "dcgan-serve oip http", "triton http"),
                     "oip vs dcgan.v1 (seeded, grpc)": ratio(load, "dcgan-serve oip grpc seeded",
                                                            "dcgan-serve dcgan.v1 seeded"),
                     "oip http vs oip grpc (tritonclient)": ratio(load, "dcgan-serve oip http",
                                                                  "dcgan-serve oip grpc")}
              for load in runs}
    for load, named in ratios.items():
        for name, value in named.items():
            print(f"{load:>6} {name:<38} {value:5.2f}x")
    return {"median": medians, "ratios": ratios}


if __name__ == "__main__":
    main()
