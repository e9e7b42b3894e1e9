"""``dcgan-repo``: list a model repository, show a manifest, pin a model to a version and unpin it.

A pin is the operator's rollback: ``dcgan-repo pin mnist-dcgan 2`` makes running servers serve
version 2 alone (its version policy becomes specific:2 at their next rescan), whatever was
published after it; ``dcgan-repo unpin mnist-dcgan`` returns the model to the servers' policy.
Nothing is deleted. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dcgan_core import helptext, locking, publishing
from dcgan_core.repository import ENVIRONMENT, Repository, RepositoryError, default_root


def _list(repository: Repository) -> None:
    default, pins = repository.default_model(), repository.pins()
    print(f"{'model':<24} {'versions':<12} {'pinned':<7} {'kind':<6} {'shape':<8} {'figures (latest)':<34} status")
    for name in repository.models():
        versions = repository.versions(name)
        status, kind, shape, figures = "ok", "-", "-", "-"
        try:
            manifest = repository.manifest(name, versions[-1]) if versions else None
            if manifest:
                kind, shape = manifest.kind, "x".join(map(str, manifest.sample_shape))
                figures = " ".join(f"{k}={v:.4g}" for k, v in publishing.gated(manifest.metrics).items()) or "-"
            else:
                status = "no versions"
        except RepositoryError as exc:
            status = f"latest INVALID: {exc}"
        marker = " (default)" if name == default else ""
        print(f"{name + marker:<24} {','.join(map(str, versions)) or '-':<12} {pins.get(name, '-')!s:<7} "
              f"{kind:<6} {shape:<8} {figures:<34} {status}")


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("dcgan-repo", __doc__)
    parser.add_argument("--repository", type=Path, default=default_root(),
                        help=f"model repository root (default: ${ENVIRONMENT}, else %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    helptext.subcommand(commands, "list", "models, versions, pins, figures and whether the latest validates")
    show = helptext.subcommand(commands, "show", "one version's manifest, validated (sha256 included)")
    show.add_argument("name")
    show.add_argument("version", type=int, nargs="?", help="default: latest")
    pin = helptext.subcommand(commands, "pin", "serve only this version of the model (roll back)")
    pin.add_argument("name")
    pin.add_argument("version", type=int)
    unpin = helptext.subcommand(commands, "unpin", "return the model to the servers' version policy")
    unpin.add_argument("name")
    args = parser.parse_args(argv)
    repository = Repository(args.repository)
    try:
        if not repository.exists():
            raise RepositoryError(f"no model repository at {args.repository.resolve()}")
        if args.command == "list":
            _list(repository)
        elif args.command == "show":
            version = args.version or max(repository.versions(args.name), default=0)
            print(repository.manifest(args.name, version).to_json(), end="")
        elif args.command == "pin":
            repository.pin(args.name, args.version)
            print(f"pinned {args.name} to version {args.version}: servers serve it alone from their next rescan")
        else:
            if args.name not in repository.pins():
                raise RepositoryError(f"model {args.name!r} is not pinned")
            repository.pin(args.name, None)
            print(f"unpinned {args.name}: servers return to their version policy at their next rescan")
    except (RepositoryError, locking.Locked) as exc:
        print(f"dcgan-repo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
