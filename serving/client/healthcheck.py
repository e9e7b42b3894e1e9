"""``python -m serving.client.healthcheck``: exit 0 when the server's grpc.health.v1 says SERVING.

For container health checks and load-balancer probes: ``--service`` checks one model by name.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dcgan_core import helptext
from serving import security


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("python -m serving.client.healthcheck", __doc__)
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--service", default="", help='"" for the whole server, or a model name')
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--tls-ca", help="CA certificate (PEM) when the server uses TLS")
    args = parser.parse_args(argv)
    try:
        with security.channel(args.target, [], args.tls_ca) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
