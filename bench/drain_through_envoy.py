"""Rolling restarts as clients see them: failed calls while replicas are drained behind Envoy.

Each trial starts 2 replicas behind Envoy, runs 8 clients (Sample(16) then Score of the result,
back to back), sends SIGTERM to one replica after 100 calls and counts 200 more. Every status
other than OK is a call a client saw fail. ``--retry-on`` overrides Envoy's retry conditions, to
measure what each one is worth.

    .venv/bin/python bench/drain_through_envoy.py --trials 8
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model, save  # noqa: E402
from serving import cluster  # noqa: E402
from serving.client.library import ClientError, InferenceClient  # noqa: E402


def trial(repository: str, model: str, counts: collections.Counter) -> None:
    serve = ["--repository", repository, "--poll-s", "0", "--grace-s", "5"]
    with tempfile.TemporaryDirectory() as scratch, cluster.local_cluster(2, Path(scratch), serve) as started:
        port, replicas = started.port, started.replicas
        stop, lock, done = threading.Event(), threading.Lock(), [0]

        def client_loop() -> None:
            with InferenceClient(f"127.0.0.1:{port}", timeout=10) as client:
                while not stop.is_set():
                    try:
                        client.score(client.sample(16, model=model, seed=1).images, model=model)
                        code = "OK"
                    except ClientError as exc:
                        code = f"{exc.code.name}: {exc.details[:60]}"
                    with lock:
                        counts[code] += 1
                        done[0] += 1

        threads = [threading.Thread(target=client_loop) for _ in range(8)]
        for thread in threads:
            thread.start()
        def until(calls: int) -> None:
            while done[0] < calls:
                time.sleep(0.01)

        until(100)
        replicas[0][0].send_signal(signal.SIGTERM)
        replicas[0][0].wait()
        until(300)
        stop.set()
        for thread in threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--model", default="mnist-dcgan")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--retry-on", default=cluster.RETRY_ON)
    args = parser.parse_args()
    cluster.RETRY_ON = args.retry_on  # read by envoy_config when each trial renders its bootstrap
    counts: collections.Counter = collections.Counter()
    for _ in range(args.trials):
        trial(args.repository, args.model, counts)
    failed = sum(n for code, n in counts.items() if code != "OK")
    print(f"CPU: {cpu_model()}; retry_on {args.retry_on}: {failed} of {sum(counts.values())} calls failed "
          f"over {args.trials} drains: {dict(counts)}")
    save("drain_through_envoy", {"cpu": cpu_model(), "retry_on": args.retry_on, "trials": args.trials,
                                 "failed": failed, "statuses": dict(counts)})


if __name__ == "__main__":
    main()
