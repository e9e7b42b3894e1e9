"""Broken versions an operator can publish by mistake, made from a good one (for fault tests)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx

from dcgan_core.repository import MANIFEST_NAME, Repository, sha256_file

Mutation = Callable[[Path, dict], None]


def _rehash(folder: Path, manifest: dict) -> None:
    for net in ("generator", "discriminator"):
        manifest[net]["sha256"] = sha256_file(folder / manifest[net]["file"])


def random_bytes(folder: Path, manifest: dict) -> None:
    """onnxruntime cannot parse the file, though its sha256 matches the manifest."""
    (folder / "generator.onnx").write_bytes(os.urandom(4096))
    _rehash(folder, manifest)


def swapped(folder: Path, manifest: dict) -> None:
    """Generator and discriminator files swapped, hashes updated to match."""
    g, d = folder / "generator.onnx", folder / "discriminator.onnx"
    tmp = folder / "swap.tmp"
    g.rename(tmp)
    d.rename(g)
    tmp.rename(d)
    _rehash(folder, manifest)


def future_opset(folder: Path, manifest: dict) -> None:
    """A valid ONNX file that needs an opset newer than the runtime's."""
    model = onnx.load(str(folder / "generator.onnx"))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    onnx.save(model, str(folder / "generator.onnx"))
    _rehash(folder, manifest)


def manifest_not_utf8(folder: Path, manifest: dict) -> None:
    manifest["source_run"] = "caf\xe9"  # written below as Latin-1: one byte that is not UTF-8
    (folder / MANIFEST_NAME).write_bytes(json.dumps(manifest, ensure_ascii=False).encode("latin-1"))
    manifest.clear()  # tells add_version the manifest is written already


def manifest_is_a_directory(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST_NAME).unlink()
    (folder / MANIFEST_NAME).mkdir()
    manifest.clear()


def missing_networks(folder: Path, manifest: dict) -> None:
    """What a copy caught halfway shows: the manifest is there, the ONNX files not yet."""
    for net in ("generator", "discriminator"):
        (folder / manifest[net]["file"]).unlink()


#: kind -> (mutation, a fragment of the FAILED reason the server must give)
BROKEN = {
    "random-bytes": (random_bytes, "generator.onnx"),
    "swapped": (swapped, "wrong or swapped file"),
    "future-opset": (future_opset, "opset"),
    "manifest-not-utf8": (manifest_not_utf8, "manifest.json is not UTF-8 text"),
    "manifest-is-a-directory": (manifest_is_a_directory, "manifest.json cannot be read"),
}


def add_version(repository: Repository, name: str, mutate: Mutation | None = None, source: int | None = None) -> int:
    """Copy version ``source`` (default: the first) to the next number, changed by ``mutate``;
    built in a hidden folder and renamed, like an export."""
    versions = repository.versions(name)
    source = source or versions[0]
    version = max(versions) + 1
    staging = repository.root / name / f".building-{version}"
    shutil.copytree(repository.version_dir(name, source), staging)
    for path in staging.iterdir():
        path.chmod(0o644)
    manifest = json.loads((staging / MANIFEST_NAME).read_text())
    manifest["version"] = version
    if mutate is not None:
        mutate(staging, manifest)
    if manifest:
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest))
    staging.rename(repository.version_dir(name, version))
    return version


def repair(repository: Repository, name: str, version: int, source: int) -> None:
    """Replace a broken version's files with a good version's (renumbered), in place."""
    folder = repository.version_dir(name, version)
    for path in folder.iterdir():
        path.chmod(0o755) if path.is_dir() else path.chmod(0o644)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in repository.version_dir(name, source).iterdir():
        shutil.copyfile(path, folder / path.name)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["version"] = version
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def finish_copy(repository: Repository, name: str, version: int, source: int = 1) -> None:
    """Copy the ONNX files that ``missing_networks`` left out: the half-copied version completes."""
    for net in ("generator.onnx", "discriminator.onnx"):
        shutil.copyfile(repository.version_dir(name, source) / net, repository.version_dir(name, version) / net)
