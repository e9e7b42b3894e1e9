"""``dcgan-train``: train a DCGAN or toy GAN from a preset, a TOML config and overrides.

Exit codes: 0 done, 1 training diverged, 2 bad config/data/checkpoint (or the run directory is
in use), 3 cannot write (disk full, permissions; the last checkpoint stays loadable), 130
interrupted (SIGINT/SIGTERM finish the step and write a checkpoint; rerun the command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
from pathlib import Path

from dcgan_core import helptext, settings
from dcgan_core.locking import Locked
from training import distributed
from training.checkpoint import BEST_NAME, CheckpointError
from training.config import PRESETS, TOY_DATASETS, ConfigError, TrainConfig, load_config, parse_override
from training.data import DataError
from training.encoder import encoder_run
from training.gan_step import gan_run
from training.run_loop import TrainingDiverged
from training.translation import translation_run

log = logging.getLogger("dcgan-train")


#: Flags for the settings people change most; every setting is --set SECTION.KEY=VALUE too.
SHORTHANDS = {"data_dir": "data.path", "run_dir": "run.run_dir", "epochs": "run.epochs", "device": "run.device",
              "seed": "run.seed"}


def build_parser() -> argparse.ArgumentParser:
    parser = helptext.parser("dcgan-train", __doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="starting point for the config")
    parser.add_argument("--config", type=Path, help="TOML file with [data] [model] [optim] [loss] [run] tables")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set optim.lr_g=1e-4 (repeatable)")
    for name, key in SHORTHANDS.items():
        settings.add_shorthand(parser, "--" + name.replace("_", "-"), TrainConfig, key)
    parser.add_argument("--force", action="store_true", help="resume even if the config differs from the checkpoint's")
    parser.add_argument("--dry-run", action="store_true",
                        help="a few steps of a tiny model on synthetic data in a temporary run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return parser


def _overrides(args: argparse.Namespace) -> list[dict]:
    texts = [f"{key}={getattr(args, name)}" for name, key in SHORTHANDS.items() if getattr(args, name) is not None]
    if args.no_progress:
        texts.append("run.progress=false")
    return [parse_override(text) for text in texts + args.overrides]


DRY_RUN = {
    "data": {"dataset": "synthetic", "synthetic_samples": 64},
    "model": {"ngf": 8, "ndf": 8},
    "optim": {"batch_size": 16},
    "run": {"epochs": 1, "max_steps": 4},
}


def next_steps(run_dir: Path, evaluated: bool) -> str:
    """What to publish: best.pt when the run kept one (its best in-training evaluation)."""
    best = Path(run_dir) / BEST_NAME
    if evaluated and best.exists():
        return (f"best evaluation kept in {best}; publish it with: dcgan-export {run_dir} --best --name NAME "
                f"(the last checkpoint: without --best)")
    return f"publish the last checkpoint with: dcgan-export {run_dir} --name NAME"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves like Ctrl-C
    with contextlib.ExitStack() as cleanup:
        try:
            overrides = _overrides(args)
            if args.dry_run:  # its run directory is removed at the end unless --run-dir names one
                is_toy = args.preset in TOY_DATASETS
                dry = {k: v for k, v in DRY_RUN.items() if not (is_toy and k == "data")}
                run_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dcgan-dry-run-"))
                overrides = [dry, {"run": {"run_dir": run_dir}}] + overrides
            config = load_config(args.preset, args.config, overrides)
            run = encoder_run if config.encoder.source else translation_run if config.kind == "translation" else gan_run
            trainer = run(config, force=args.force)
            if not trainer.world.main:  # under torchrun rank 0 speaks for the job
                logging.getLogger().setLevel(logging.WARNING)
            log.info("run %s: %s on %s (%s), %d steps/epoch, step %d of %d", config.run.run_dir, config.kind,
                     trainer.device, "bf16 autocast" if trainer.model.bf16 else "fp32", trainer.steps_per_epoch,
                     trainer.step, trainer.total_steps)
            result = trainer.train()
            distributed.leave()
        except (ConfigError, DataError, CheckpointError, Locked) as exc:
            print(f"dcgan-train: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # a full disk, a permission: the checkpoint on disk is still the last good one
            where = f" {exc.filename}" if exc.filename else ""
            print(f"dcgan-train: error: cannot write{where}: {exc.strerror or exc}; the last checkpoint "
                  f"is intact, rerun to resume once this is fixed", file=sys.stderr)
            return 3
        except TrainingDiverged as exc:
            distributed.leave()  # every rank saw the same averaged loss and stopped at this step
            print(f"dcgan-train: training diverged: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            distributed.leave()  # the stop decision is collective: every rank stopped at this step
            print("dcgan-train: interrupted; run the same command to resume from the last checkpoint",
                  file=sys.stderr)
            return 130
        metrics = " ".join(f"{k}={v:.4f}" for k, v in result.last_metrics.items())
        log.info("done: step %d (epoch %.2f) in %s; %s", result.step, result.epoch, result.run_dir, metrics)
        log.info("%s", next_steps(result.run_dir, config.run.eval_every > 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
