"""``dcgan-export RUN_DIR --name NAME``: publish a run as the next version of a model.

The new version must keep the model's interface (kind, shapes, latent size, classes) and, unless
--allow-worse, its quality: the run is measured under the latest version's protocol and refused
if a figure is worse beyond its noise, both versions' figures printed side by side.

Exit codes: 0 published, 1 refused (worse figures, or ONNX disagrees with torch), 2 bad input
(incompatible with the model, no repository, unreadable run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dcgan_core import helptext, publishing
from dcgan_core.repository import ENVIRONMENT, Repository, RepositoryError, default_root
from training import quality
from training.checkpoint import BEST_NAME, CHECKPOINT_NAME, CheckpointError
from training.evaluate import EvalError
from training.export import ExportError, ExportOptions, export_run


def parser() -> argparse.ArgumentParser:
    parser = helptext.parser("dcgan-export", __doc__)
    parser.add_argument("run_dir", type=Path, help="training run directory (holds checkpoint.pt)")
    parser.add_argument("--repository", type=Path, default=default_root(),
                        help=f"model repository root (default: ${ENVIRONMENT}, else %(default)s)")
    parser.add_argument("--init", action="store_true", help="create the repository if there is none")
    parser.add_argument("--name", required=True, help="model name in the repository, e.g. mnist-dcgan")
    parser.add_argument("--raw-generator", action="store_true", help="export G's raw weights instead of the EMA")
    parser.add_argument("--best", action="store_true",
                        help="export best.pt (the best in-training evaluation, run.eval_every) "
                             "instead of the last checkpoint")
    parser.add_argument("--allow-worse", action="store_true",
                        help="publish even if its figures are worse than the latest version's")
    parser.add_argument("--data-dir", type=Path, default=quality.DEFAULT_DATA_DIR,
                        help="MNIST, for the figures of 1x28x28 image models (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="ONNX vs torch tolerance (default: %(default)s)")
    parser.add_argument("--atol", type=float, default=1e-5, help="ONNX vs torch tolerance (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    repository = Repository(args.repository)
    if not repository.exists() and not args.init:
        print(f"dcgan-export: error: no model repository at {args.repository.resolve()} (name one with "
              f"--repository or ${ENVIRONMENT}, or create it with --init)", file=sys.stderr)
        return 2
    try:
        if args.init:
            repository.initialise()
        options = ExportOptions(use_ema=not args.raw_generator, rtol=args.rtol, atol=args.atol,
                                checkpoint_name=BEST_NAME if args.best else CHECKPOINT_NAME, evaluate=True,
                                allow_worse=args.allow_worse, data_dir=args.data_dir)
        manifest = export_run(args.run_dir, repository, args.name, options)
    except (ExportError, publishing.Worse) as exc:
        print(f"dcgan-export: refused to publish: {exc}", file=sys.stderr)
        return 1
    except (publishing.Incompatible, CheckpointError, RepositoryError, EvalError, OSError, ValueError) as exc:
        print(f"dcgan-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"published {manifest.name} version {manifest.version} in {args.repository}")
    for key, value in publishing.gated(manifest.metrics).items():
        print(f"  {key:<14} {value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
