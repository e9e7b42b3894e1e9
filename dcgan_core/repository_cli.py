"""``dcgan-repo``: list a model repository and show one model's manifest (for operators)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcgan_core.repository import Repository, RepositoryError


def _list(repository: Repository) -> None:
    default = repository.default_model()
    print(f"{'model':<24} {'versions':<16} {'kind':<6} {'shape':<12} status")
    for name in repository.models():
        versions = repository.versions(name)
        status, kind, shape = "ok", "-", "-"
        try:
            manifest = repository.manifest(name, versions[-1]) if versions else None
            if manifest:
                kind, shape = manifest.kind, "x".join(map(str, manifest.sample_shape))
            else:
                status = "no versions"
        except RepositoryError as exc:
            status = f"latest INVALID: {exc}"
        marker = " (default)" if name == default else ""
        print(f"{name + marker:<24} {','.join(map(str, versions)) or '-':<16} {kind:<6} {shape:<12} {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcgan-repo", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("exported"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="models, versions and whether the latest validates")
    show = commands.add_parser("show", help="one version's manifest, validated (sha256 included)")
    show.add_argument("name")
    show.add_argument("version", type=int, nargs="?", help="default: latest")
    args = parser.parse_args(argv)
    repository = Repository(args.repository)
    try:
        if args.command == "list":
            _list(repository)
        else:
            version = args.version or max(repository.versions(args.name), default=0)
            print(repository.manifest(args.name, version).to_json(), end="")
    except RepositoryError as exc:
        print(f"dcgan-repo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
