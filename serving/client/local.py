"""``dcgan-client --local PATH``: a server of one model, started in this process for one command.

Sampling without a server still goes through the service (same seeds, same images, same errors as
a deployed server): the model is put in a temporary repository of its own and served on a free
loopback port until the command ends. PATH is a published version folder (``<repo>/<model>/<version>``)
or a training run directory (exported into the temporary repository first; needs the train extra).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dcgan_core.repository import MANIFEST_NAME, Repository, RepositoryError
from serving.server.app import InferenceServer
from serving.server.config import ServeConfig


class LocalModelError(ValueError):
    """PATH is neither a published version folder nor a training run."""


def _stage(path: Path, root: Path) -> None:
    """Put the model at ``path`` into the empty repository ``root``."""
    if (path / MANIFEST_NAME).is_file() and path.name.isdigit():
        model = root / path.parent.name
        model.mkdir()
        (model / path.name).symlink_to(path.resolve(), target_is_directory=True)
        Repository(root).manifest(path.parent.name, int(path.name))  # validates, checksums included
        return
    if (path / "checkpoint.pt").is_file():
        try:
            from training.export import export_run
        except ModuleNotFoundError as exc:
            raise LocalModelError(f"--local with a training run needs the 'train' extra ({exc.name} is not "
                                  f"installed): pip install 'dcgan[train]'") from None
        export_run(path, Repository(root), path.resolve().name)
        return
    raise LocalModelError(f"--local {path}: not a model version folder (<repo>/<model>/<version> with "
                          f"{MANIFEST_NAME}) nor a training run (with checkpoint.pt)")


@contextlib.contextmanager
def local_server(path: Path) -> Iterator[str]:
    """The address of a server of the model at ``path``, for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="dcgan-local-") as root:
        try:
            _stage(Path(path), Path(root))
        except RepositoryError as exc:
            raise LocalModelError(f"--local {path}: {exc}") from None
        config = ServeConfig(repository=root, host="127.0.0.1", port=0, http_port=-1, metrics_port=-1,
                             poll_s=0).validate()
        server = InferenceServer(config).start()
        try:
            yield f"127.0.0.1:{server.port}"
        finally:
            server.stop(grace=0)
