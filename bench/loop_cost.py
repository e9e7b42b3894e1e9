"""CPU time the server's event loop thread spends per call: the cost that caps how many
single-image calls one dcgan-serve process answers (the loop runs every handler and grpc.aio's
own work under one GIL), measured from /proc per thread, so it is much less noisy than a
throughput figure on a shared machine.

One client sends ``--calls`` sequential calls of each kind (dcgan.v1 Sample of 1 image, OIP
ModelInfer of one latent through tritonclient's message shape, Score of 1 image); the server's
``grpc-aio`` thread's user+system time over them, divided by the calls; and the same Sample calls
against bench/grpc_floor.py (a grpc.aio server that does no work) for what grpc.aio itself costs.
Repeats interleave the kinds; medians in bench/results/loop_cost.json.

    .venv/bin/python bench/loop_cost.py --repository exported --model mnist-dcgan
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dcgan.oip import grpc_predict_v2_pb2 as oip  # noqa: E402
from dcgan.oip import grpc_predict_v2_pb2_grpc as oip_grpc  # noqa: E402
from dcgan.v1 import inference_pb2 as pb  # noqa: E402
from dcgan.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

from bench.common import cpu_model, median, proc_stat, process_cpu_s, save  # noqa: E402
from bench.serve_throughput import start  # noqa: E402
from serving import processes  # noqa: E402


def thread_cpu_s(pid: int, name: str) -> float:
    """User + system seconds of the threads of ``pid`` named ``name``."""
    return sum(proc_stat(task / "stat")[1] for task in Path(f"/proc/{pid}/task").iterdir()
               if (task / "comm").read_text().strip() == name)


def floor_us_per_call(count: int, repeats: int) -> list[float]:
    """The same sequential Sample calls against bench/grpc_floor.py, a grpc.aio server that does no
    work: its whole process's CPU per call is what grpc.aio itself costs here."""
    floor, target = start([sys.executable, "-m", "bench.grpc_floor", "--port", "0"])
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for _ in range(50):
                stub.Sample(pb.SampleRequest(count=1))
            spent = []
            for _ in range(repeats):
                before = process_cpu_s(floor.pid)
                for _ in range(count):
                    stub.Sample(pb.SampleRequest(count=1))
                spent.append(1e6 * (process_cpu_s(floor.pid) - before) / count)
            return spent
    finally:
        floor.terminate()
        floor.wait(timeout=30)


def calls(channel: grpc.Channel, model: str) -> dict[str, Callable[[], object]]:
    sample = pb_grpc.InferenceServiceStub(channel)
    infer = oip_grpc.GRPCInferenceServiceStub(channel)
    z = np.random.default_rng(0).standard_normal((1, 100), np.float32)
    request = oip.ModelInferRequest(model_name=model, outputs=[{"name": "images"}],
                                    inputs=[{"name": "z", "datatype": "FP32", "shape": [1, 100]}],
                                    raw_input_contents=[z.tobytes()])
    image = pb.ScoreRequest(model=model, tensor=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 1, 28, 28], data=bytes(784)))
    return {"Sample(1)": lambda: sample.Sample(pb.SampleRequest(model=model, count=1, seed=1,
                                                                 encoding=pb.ENCODING_RAW_UINT8)),
            "oip ModelInfer(z: 1)": lambda: infer.ModelInfer(request),
            "Score(1)": lambda: sample.Score(image)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: more dcgan-serve flags")
    args = parser.parse_args()
    extra = [a for a in args.server_args if a != "--"]
    server, ports = processes.start_server(["--repository", args.repository, "--metrics-port", "-1",
                                            "--http-port", "-1", "--max-queue-delay-ms", "0", *extra],
                                           stderr=subprocess.DEVNULL)
    results: dict[str, list[float]] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            kinds = calls(channel, args.model)
            for call in kinds.values():
                for _ in range(50):
                    call()  # warm
            for _ in range(args.repeats):
                for name, call in kinds.items():
                    before = thread_cpu_s(server.pid, "grpc-aio")
                    for _ in range(args.calls):
                        call()
                    spent = thread_cpu_s(server.pid, "grpc-aio") - before
                    results.setdefault(name, []).append(1e6 * spent / args.calls)
    finally:
        server.terminate()
        server.wait(timeout=60)
    results["no-work grpc.aio server, whole process (floor)"] = floor_us_per_call(args.calls, args.repeats)
    for name, values in results.items():
        print(f"{name:<48} {median(values):6.0f} us per call  ({', '.join(f'{v:.0f}' for v in values)})")
    save("loop_cost", {"cpu": cpu_model(), "calls": args.calls, "repeats": args.repeats, "server_flags": extra,
                       "median_us_per_call": {k: median(v) for k, v in results.items()}, "runs_us": results})


if __name__ == "__main__":
    main()
