"""``dcgan-export RUN_DIR --repository exported --name NAME``: publish a run as a new version.

Exit codes: 0 published, 1 refused (ONNX disagrees with torch; figures printed), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dcgan_core.repository import Repository, RepositoryError
from training.checkpoint import BEST_NAME, CHECKPOINT_NAME, CheckpointError
from training.export import ExportError, ExportOptions, export_run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="dcgan-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="training run directory (holds checkpoint.pt)")
    parser.add_argument("--repository", type=Path, default=Path("exported"), help="model repository root")
    parser.add_argument("--name", required=True, help="model name in the repository, e.g. mnist-dcgan")
    parser.add_argument("--raw-generator", action="store_true", help="export G's raw weights instead of the EMA")
    parser.add_argument("--best", action="store_true",
                        help="export best.pt (the best in-training evaluation, run.eval_every) "
                             "instead of the last checkpoint")
    parser.add_argument("--metrics", type=Path, help="JSON file of evaluation results to put in the manifest")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    try:
        metrics = json.loads(args.metrics.read_text()) if args.metrics else None
        options = ExportOptions(use_ema=not args.raw_generator, rtol=args.rtol, atol=args.atol,
                                checkpoint_name=BEST_NAME if args.best else CHECKPOINT_NAME)
        manifest = export_run(args.run_dir, Repository(args.repository), args.name, metrics, options)
    except ExportError as exc:
        print(f"dcgan-export: refused to publish: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, RepositoryError, OSError, ValueError) as exc:
        print(f"dcgan-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"published {manifest.name} version {manifest.version} in {args.repository}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
