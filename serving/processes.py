"""dcgan-serve as a child process: started on a free port, its ports read from what it announces.

The cluster, the tests and the benchmarks start servers this one way: the server prints
``LISTENING`` and its ports as its first line of stdout once it serves (stdout is a pipe):

    dcgan-serve: listening on port 50051 (gRPC), 8080 (HTTP), 8000 (metrics)

A port that is off (``--http-port -1``) is left out of the line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

LISTENING = "dcgan-serve: listening on port "
_PORT = re.compile(r"(\d+) \((gRPC|HTTP|metrics)\)")


class ServerDidNotStart(RuntimeError):
    """The process ended (or said something else) before it listened."""


@dataclass(frozen=True)
class Ports:
    """Where one server listens: gRPC (dcgan.v1, OIP, health), and HTTP and metrics when on."""

    grpc: int
    http: int | None = None
    metrics: int | None = None

    def line(self) -> str:
        named = [(self.grpc, "gRPC"), (self.http, "HTTP"), (self.metrics, "metrics")]
        return LISTENING + ", ".join(f"{port} ({what})" for port, what in named if port is not None)

    @classmethod
    def parse(cls, line: str) -> Ports | None:
        """The ports of a ``line()``; None for any other line."""
        if not line.startswith(LISTENING):
            return None
        found = {what: int(port) for port, what in _PORT.findall(line)}
        return cls(found["gRPC"], found.get("HTTP"), found.get("metrics")) if "gRPC" in found else None


def spawn_server(args: Sequence[str], prefix: Sequence[str] = (), **popen) -> subprocess.Popen:
    """``dcgan-serve --host 127.0.0.1 --port 0 --http-port 0 ARGS`` (after ``prefix``, e.g. setpriv),
    stdout piped: free ports, so that servers started side by side never collide."""
    command = [*prefix, sys.executable, "-m", "serving.server", "--host", "127.0.0.1", "--port", "0",
               "--http-port", "0", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **popen)


def ports_of(process: subprocess.Popen) -> Ports:
    """The ports ``process`` listens on, from its first line; a process that fails is killed."""
    line = process.stdout.readline()
    ports = Ports.parse(line)
    if ports is None:
        process.kill()
        said = process.stderr.read() if process.stderr else ""
        raise ServerDidNotStart(f"dcgan-serve did not start (exit status {process.wait()}): {line}{said}")
    return ports


def port_of(process: subprocess.Popen) -> int:
    """The gRPC port ``process`` listens on (see ``ports_of``)."""
    return ports_of(process).grpc


def start_server(args: Sequence[str], **popen) -> tuple[subprocess.Popen, Ports]:
    """A started dcgan-serve and its ports."""
    process = spawn_server(args, **popen)
    return process, ports_of(process)
