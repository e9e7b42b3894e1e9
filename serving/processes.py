"""dcgan-serve as a child process: started on a free port, its port read from what it announces.

The cluster, the tests and the benchmarks start servers this one way: the server prints
``LISTENING`` and its port as its first line of stdout once it serves (stdout is a pipe).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

LISTENING = "dcgan-serve: listening on port "


class ServerDidNotStart(RuntimeError):
    """The process ended (or said something else) before it listened."""


def spawn_server(args: Sequence[str], prefix: Sequence[str] = (), **popen) -> subprocess.Popen:
    """``dcgan-serve --host 127.0.0.1 --port 0 ARGS`` (after ``prefix``, e.g. setpriv), stdout piped."""
    command = [*prefix, sys.executable, "-m", "serving.server", "--host", "127.0.0.1", "--port", "0", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, **popen)


def port_of(process: subprocess.Popen) -> int:
    """The port ``process`` listens on, from its first line; a process that fails is killed."""
    line = process.stdout.readline()
    if not line.startswith(LISTENING):
        process.kill()
        said = process.stderr.read() if process.stderr else ""
        raise ServerDidNotStart(f"dcgan-serve did not start (exit status {process.wait()}): {line}{said}")
    return int(line[len(LISTENING):])


def start_server(args: Sequence[str], **popen) -> tuple[subprocess.Popen, int]:
    """A started dcgan-serve and its port."""
    process = spawn_server(args, **popen)
    return process, port_of(process)
