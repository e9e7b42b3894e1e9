"""``dcgan-client``: sample images, score image files, list models.

    dcgan-client sample --count 64 --seed 1 --out grid.png
    dcgan-client sample --count 16 --seed 1 --out-dir samples/
    dcgan-client score a.png b.png
    dcgan-client models
    dcgan-client sample --model mnist-cond --label 7 --count 16 --out sevens.png
    dcgan-client sample --model mnist-cond --per-class 8 --out grid.png
    dcgan-client sample --count 64 --seed 1 --truncation 1.0 --out truncated.png
    dcgan-client sample --count 64 --seed 1 --min-score 0.5 --out convincing.png
    dcgan-client walk --from-seed 1 --to-seed 2 --steps 32 --out walk.gif    (or a PNG strip: --out strip.png)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dcgan_core import images
from dcgan_core.atomic import atomic_write_bytes
from serving import wire
from serving.client import jobs
from serving.client.library import ClientError, Controls, InferenceClient, InvalidArgumentError


def _controls(args: argparse.Namespace) -> Controls:
    return Controls(args.truncation, args.min_score, args.keep_top)


def _sample(client: InferenceClient, args: argparse.Namespace) -> None:
    if bool(args.out) == bool(args.out_dir):
        raise SystemExit("dcgan-client sample: give exactly one of --out GRID.png or --out-dir DIR")
    if args.per_class:
        return _per_class_grid(client, args)
    batch = client.sample(args.count, model=args.model, version=args.version, seed=args.seed,
                          encoding="png" if args.out_dir else "uint8", labels=args.label, controls=_controls(args))
    drawn = f" (kept from {batch.candidates} candidates)" if batch.candidates else ""
    if args.out:
        images.save_png(images.make_grid(batch.images), args.out)
        print(f"wrote {args.out}: {len(batch.images)} samples of {batch.model} v{batch.version}, "
              f"seed {batch.seed}{drawn}")
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index, blob in enumerate(batch.png):
        atomic_write_bytes(out / f"seed{batch.seed}_{index:05d}.png", blob)
    print(f"wrote {len(batch.png)} PNGs to {out} ({batch.model} v{batch.version}, seed {batch.seed})")


def _per_class_grid(client: InferenceClient, args: argparse.Namespace) -> None:
    """One labelled row of ``--per-class`` samples for each class of a conditional model."""
    info = client.get_model(args.model)
    if not info.num_classes:
        raise SystemExit(f"dcgan-client sample: --per-class needs a class-conditional model; "
                         f"{info.name} has no classes")
    if not args.out:
        raise SystemExit("dcgan-client sample: --per-class writes one grid: use --out GRID.png")
    if args.min_score is not None or args.keep_top is not None:
        raise SystemExit("dcgan-client sample: --per-class takes no --min-score or --keep-top (guided sampling "
                         "draws one class per request); use --label with --count for one class")
    labels = [c for c in range(info.num_classes) for _ in range(args.per_class)]
    batch = client.sample(len(labels), model=args.model, version=args.version, seed=args.seed, labels=labels,
                          controls=Controls(truncation=args.truncation))
    grid = images.make_grid(batch.images, args.per_class)
    names = list(info.class_names) or [str(c) for c in range(info.num_classes)]
    images.save_png(images.caption_rows(grid, names, batch.images.shape[2]), args.out)
    print(f"wrote {args.out}: {args.per_class} samples per class of {batch.model} v{batch.version}, seed {batch.seed}")


def _walk(client: InferenceClient, args: argparse.Namespace) -> None:
    """Frames of a latent walk as an animated GIF (.gif) or one PNG strip (.png)."""
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".gif", ".png"):
        raise SystemExit(f"dcgan-client walk: --out must end in .gif (animation) or .png (strip), got {args.out}")
    walk = client.walk((args.from_seed, args.from_index), (args.to_seed, args.to_index), args.steps,
                       interpolation=args.interpolation, model=args.model, version=args.version,
                       encoding="uint8", truncation=args.truncation, labels=(args.label, args.label))
    if suffix == ".gif":
        atomic_write_bytes(Path(args.out), images.encode_gif(walk.images, args.frame_ms))
    else:
        images.save_png(images.make_grid(walk.images, len(walk.images)), args.out)
    print(f"wrote {args.out}: {len(walk.images)} frames of {walk.model} v{walk.version}, seed {args.from_seed}"
          f"[{args.from_index}] -> seed {args.to_seed}[{args.to_index}] by {args.interpolation}")


def _score(client: InferenceClient, args: argparse.Namespace) -> None:
    blobs = [Path(f).read_bytes() for f in args.files]
    scores = client.score(blobs, model=args.model, version=args.version, labels=args.label)
    width = max(len(f) for f in args.files)
    label_column = "  class" if scores.labels is not None else ""
    print(f"{'file':<{width}}  p(real)   logit{label_column}    ({scores.model} v{scores.version})")
    for index, (name, p, logit) in enumerate(zip(args.files, scores.probabilities, scores.logits)):
        label = f"  {scores.labels[index]:5d}" if scores.labels is not None else ""
        print(f"{name:<{width}}  {p:7.4f}  {logit:8.3f}{label}")


def _models(client: InferenceClient, args: argparse.Namespace) -> None:
    listing = client.models()
    for info in listing.models:
        versions = ", ".join(f"v{v.version} {('READY', 'FAILED', 'UNLOADED')[v.state - 1] if v.state else '?'}"
                             + (f" on {v.provider}" if v.provider else "") + (f" ({v.error})" if v.error else "")
                             for v in info.versions)
        default = " (default)" if info.name == listing.default_model else ""
        shape = "x".join(map(str, info.sample_shape))
        print(f"{info.name}{default}: {info.kind} {shape}, latent {info.latent_size}; {versions}")
        if args.verbose:
            for v in info.versions:
                if v.manifest_json:
                    print(json.dumps(json.loads(v.manifest_json).get("metrics", {}), indent=2))


def _score_job(client: InferenceClient, args: argparse.Namespace) -> None:
    summary = jobs.score_job(client, jobs.list_inputs(args.input), Path(args.output), args.model,
                             args.batch, args.concurrency, args.wait_s, not args.no_progress)
    print(f"score-job: {summary}; results in {args.output}")


def _sample_job(client: InferenceClient, args: argparse.Namespace) -> None:
    summary = jobs.sample_job(client, args.count, Path(args.out_dir), args.seed, args.chunk, args.model,
                              args.concurrency, args.wait_s, not args.no_progress, label=args.label,
                              controls=_controls(args))
    print(f"sample-job: {summary}; PNGs in {args.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051",
                        help="server or Envoy address (default: localhost:50051); several replicas as "
                             "IP:PORT,IP:PORT or dns:///NAME:PORT are balanced per call (round_robin)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to trust: connect with TLS")
    parser.add_argument("--token-file", help="file holding the bearer token (needs --tls-ca)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_commands(commands)
    return parser


def _add_commands(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser("sample", help="generate images")
    sample.add_argument("--count", type=int, default=64)
    sample.add_argument("--seed", type=int, help="same seed, same images (default: the server draws one)")
    sample.add_argument("--out", help="write one grid PNG")
    sample.add_argument("--out-dir", help="write one PNG per sample")
    sample.add_argument("--per-class", type=int, help="conditional models: a grid (--out) of this many "
                                                      "samples per class, one labelled row per class")
    walk = commands.add_parser("walk", help="frames along a path between two latent points (GIF or PNG strip)")
    walk.add_argument("--from-seed", type=int, required=True, help="start: sample --from-index of this seed")
    walk.add_argument("--from-index", type=int, default=0)
    walk.add_argument("--to-seed", type=int, required=True, help="end: sample --to-index of this seed")
    walk.add_argument("--to-index", type=int, default=0)
    walk.add_argument("--steps", type=int, default=32, help="frames, both ends included (default: 32)")
    walk.add_argument("--interpolation", choices=list(wire.INTERPOLATIONS), default="slerp")
    walk.add_argument("--out", required=True, help="walk.gif (animation) or strip.png (one row)")
    walk.add_argument("--frame-ms", type=int, default=80, help="GIF frame duration (default: 80)")
    score = commands.add_parser("score", help="probability of being real for image files")
    score.add_argument("files", nargs="+")
    score_job = commands.add_parser("score-job", help="score many files into CSV/JSONL, resumably")
    score_job.add_argument("--input", required=True, help="a folder, a glob pattern, or a file listing paths")
    score_job.add_argument("--output", required=True, help="results .csv or .jsonl (appended; rerun to resume)")
    score_job.add_argument("--batch", type=int, default=64, help="images per request")
    sample_job = commands.add_parser("sample-job", help="generate many PNGs, resumably")
    sample_job.add_argument("--count", type=int, required=True)
    sample_job.add_argument("--out-dir", required=True)
    sample_job.add_argument("--seed", type=int, default=0, help="chunk k uses seed + k")
    sample_job.add_argument("--chunk", type=int, default=256, help="images per request")
    sample_job.add_argument("--label", type=int, help="conditional models: the class of every sample")
    for sub in (score_job, sample_job):
        sub.add_argument("--model", default="")
        sub.add_argument("--concurrency", type=int, default=4, help="requests in flight")
        sub.add_argument("--wait-s", type=float, default=jobs.DEFAULT_PATIENCE_S,
                         help="how long to wait out an absent or overloaded server, with backoff (default: 600)")
        sub.add_argument("--no-progress", action="store_true")
    models = commands.add_parser("models", help="models, versions and their state")
    models.add_argument("-v", "--verbose", action="store_true", help="also print each version's metrics")
    for sub in (sample, score, walk):
        sub.add_argument("--model", default="", help="model name (default: the server's default model)")
        sub.add_argument("--version", type=int, default=0, help="version (default: latest)")
        sub.add_argument("--label", type=int, help="conditional models: the class of every image "
                                                   "(default: drawn from the seed / the most likely class)")
    for sub in (sample, sample_job, walk):
        sub.add_argument("--truncation", type=float, help="redraw latent entries with |z| above this (>= 0.1)")
    for sub in (sample, sample_job):
        guided = sub.add_mutually_exclusive_group()
        guided.add_argument("--min-score", type=float,
                            help="keep only samples the discriminator scores >= this probability, in (0, 1)")
        guided.add_argument("--keep-top", type=float,
                            help="keep this share of the best-scored candidates, in (0, 1)")


COMMANDS = {"sample": _sample, "score": _score, "models": _models, "walk": _walk, "score-job": _score_job,
            "sample-job": _sample_job}


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage error (a bad flag or value, refused here or by the server as
    INVALID_ARGUMENT, or an unreadable file), 1 any other failure of the call."""
    args = build_parser().parse_args(argv)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        patient = args.command in ("score-job", "sample-job")  # jobs wait for the server to come (back)
        with InferenceClient(args.target, timeout=args.timeout, tls_ca=args.tls_ca, token=token,
                             wait_for_ready=patient) as client:
            COMMANDS[args.command](client, args)
    except InvalidArgumentError as exc:
        print(f"dcgan-client: error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"dcgan-client: {exc}", file=sys.stderr)
        return 1
    except jobs.JobError as exc:
        print(f"dcgan-client: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"dcgan-client: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
