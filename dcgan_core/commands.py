"""The console commands. Each runs one module's ``main`` and names the extra it needs, so that a
command whose extra is not installed says ``pip install 'dcgan[serve]'`` instead of a traceback."""

from __future__ import annotations

import importlib
import sys

#: Top-level packages of this project: a missing one is a broken install, not a missing extra.
OWN_PACKAGES = {"dcgan", "dcgan_core", "serving", "training"}


def _run(command: str, module: str, extra: str) -> int:
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.partition(".")[0] in OWN_PACKAGES:
            raise
        print(f"{command}: needs the '{extra}' extra ({exc.name} is not installed): "
              f"pip install 'dcgan[{extra}]'", file=sys.stderr)
        return 2
    return main()


def train() -> int:
    return _run("dcgan-train", "training.cli", "train")


def export() -> int:
    return _run("dcgan-export", "training.export_cli", "train")


def evaluate() -> int:
    return _run("dcgan-eval", "training.evaluate", "train")


def repo() -> int:
    return _run("dcgan-repo", "dcgan_core.repository_cli", "client")


def serve() -> int:
    return _run("dcgan-serve", "serving.server.app", "serve")


def client() -> int:
    return _run("dcgan-client", "serving.client.cli", "client")


def cluster() -> int:
    return _run("dcgan-cluster", "serving.cluster", "cluster")
