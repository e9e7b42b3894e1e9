"""``dcgan-client``: sample images (or points), score image files, list models.

    dcgan-client models
    dcgan-client sample --count 64 --seed 1 --out grid.png          (.png .jpg .webp .gif; --scale N)
    dcgan-client sample --count 16 --seed 1 --out-dir samples/
    dcgan-client sample --model toy-ring --count 1000 --out points.csv  (or .npy: the raw samples)
    dcgan-client score a.png b.png some/folder/
    dcgan-client sample --model mnist-cond --label 7 --count 16 --out sevens.png
    dcgan-client sample --model mnist-cond --per-class 8 --out grid.png
    dcgan-client sample --count 64 --seed 1 --truncation 1.0 --out truncated.png
    dcgan-client sample --count 64 --seed 1 --min-score 0.5 --out convincing.png
    dcgan-client walk --from-seed 1 --to-seed 2 --steps 32 --out walk.gif    (or a strip: --out strip.png)
    dcgan-client project a.png --out recon.png            (versions with an encoder: latents, anomaly)
    dcgan-client walk --from-image a.png --to-seed 3 --out walk.gif
    dcgan-client translate --model mnist-sr4 small.png --out big.png --scale 8   (translation models)
    dcgan-client translate-job --model mnist-sr4 --input small/ --out-dir big/
    dcgan-client --local exported/mnist-dcgan/3 sample --count 16 --out grid.png   (no server needed)

The server is --target, else $DCGAN_TARGET, else localhost:50051.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dcgan_core import helptext, images, publishing
from dcgan_core.atomic import atomic_write_bytes, atomic_write_text
from serving import wire
from serving.client import jobs
from serving.client.library import ClientError, Controls, InferenceClient, InvalidArgumentError

TARGET_ENVIRONMENT = "DCGAN_TARGET"
ARRAY_SUFFIXES = (".npy", ".csv")  # --out of raw samples: points of toy models, or images as numbers


def _scale(text: str) -> int:
    """--scale: a whole enlargement factor (argparse turns the error into a usage error, exit 2)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _controls(args: argparse.Namespace) -> Controls:
    return Controls(args.truncation, args.min_score, args.keep_top)


def _save_array(array: np.ndarray, path: Path) -> None:
    """Raw samples: .npy as served (float32 points, uint8 images), .csv one sample per row."""
    if path.suffix.lower() == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, array)
        atomic_write_bytes(path, buffer.getvalue())
        return
    rows = array.reshape(len(array), -1)
    header = "x,y" if rows.shape[1] == 2 else ",".join(f"v{i}" for i in range(rows.shape[1]))
    body = "\n".join(",".join(f"{v:.6g}" for v in row) for row in rows)
    atomic_write_text(path, f"{header}\n{body}\n")


def _sample(client: InferenceClient, args: argparse.Namespace) -> None:
    if bool(args.out) == bool(args.out_dir):
        raise SystemExit("dcgan-client sample: give exactly one of --out FILE or --out-dir DIR")
    if args.per_class:
        return _per_class_grid(client, args)
    raw = bool(args.out) and Path(args.out).suffix.lower() in ARRAY_SUFFIXES
    if args.out and not raw:
        images.picture_format(args.out)  # a bad suffix fails before the call
    batch = client.sample(args.count, model=args.model, version=args.version, seed=args.seed,
                          encoding="auto" if raw else "png" if args.out_dir else "uint8", labels=args.label,
                          controls=_controls(args))
    drawn = f" (kept from {batch.candidates} candidates)" if batch.candidates else ""
    if args.out:
        if raw:
            _save_array(batch.images, Path(args.out))
        else:
            images.save_picture(images.make_grid(batch.images), args.out, args.scale or images.GRID_SCALE)
        print(f"wrote {args.out}: {len(batch.images)} samples of {batch.model} v{batch.version}, "
              f"seed {batch.seed}{drawn}")
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index, (blob, pixels) in enumerate(zip(batch.png, batch.images)):
        path = out / f"seed{batch.seed}_{index:05d}.png"
        if args.scale and args.scale > 1:
            images.save_picture(pixels, path, args.scale)
        else:
            atomic_write_bytes(path, blob)
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
    images.picture_format(args.out)
    labels = [c for c in range(info.num_classes) for _ in range(args.per_class)]
    batch = client.sample(len(labels), model=args.model, version=args.version, seed=args.seed, labels=labels,
                          controls=Controls(truncation=args.truncation))
    grid = images.make_grid(batch.images, args.per_class)
    names = list(info.class_names) or [str(c) for c in range(info.num_classes)]
    captioned = images.caption_rows(grid, names, batch.images.shape[2])
    images.save_picture(captioned, args.out, args.scale or images.GRID_SCALE)
    print(f"wrote {args.out}: {args.per_class} samples per class of {batch.model} v{batch.version}, seed {batch.seed}")


def _walk(client: InferenceClient, args: argparse.Namespace) -> None:
    """Frames of a latent walk as an animated GIF (.gif) or one strip picture (.png, .jpg, .webp)."""
    images.picture_format(args.out)
    start = (args.from_seed, args.from_index)
    if args.from_image:  # the image's latent (Project), so the walk starts at what the model makes of it
        start = client.project([Path(args.from_image).read_bytes()], model=args.model, version=args.version,
                               labels=args.label).latents[0]
    walk = client.walk(start, (args.to_seed, args.to_index), args.steps,
                       interpolation=args.interpolation, model=args.model, version=args.version,
                       encoding="uint8", truncation=args.truncation, labels=(args.label, args.label))
    scale = args.scale or images.GRID_SCALE
    if Path(args.out).suffix.lower() == ".gif":
        atomic_write_bytes(Path(args.out), images.encode_gif(walk.images, args.frame_ms, scale))
    else:
        images.save_picture(images.make_grid(walk.images, len(walk.images)), args.out, scale)
    origin = args.from_image or f"seed {args.from_seed}[{args.from_index}]"
    print(f"wrote {args.out}: {len(walk.images)} frames of {walk.model} v{walk.version}, {origin} -> "
          f"seed {args.to_seed}[{args.to_index}] by {args.interpolation}")


def _score(client: InferenceClient, args: argparse.Namespace) -> int:
    """Files and folders (their images), scored in batches; a file that fails is named and
    skipped, and the exit status says so (1)."""
    paths = [p for spec in args.files for p in (jobs.list_inputs(spec) if Path(spec).is_dir() else [spec])]
    if not paths:
        raise jobs.JobError(f"no image files in {', '.join(args.files)}")
    records = jobs.score_paths(client, paths, args.model, args.version, args.label, args.batch, args.anomaly)
    width = max(len(r["path"]) for r in records)
    print(f"{'file':<{width}}  p(real)   logit  model" + ("  anomaly (percentile)" if args.anomaly else ""))
    for r in records:
        if r.get("error"):
            print(f"{r['path']:<{width}}  skipped: {r['error']}")
        else:
            label = f" class {r['label']}" if r.get("label") is not None else ""
            anomaly = f"  {r['anomaly']:.4f} ({r['anomaly_percentile']:.1%})" if args.anomaly else ""
            print(f"{r['path']:<{width}}  {r['probability']:7.4f}  {r['logit']:8.3f}  "
                  f"{r['model']} v{r['version']}{label}{anomaly}")
    failed = sum(1 for r in records if r.get("error"))
    if failed:
        print(f"dcgan-client score: {failed} of {len(records)} files could not be scored", file=sys.stderr)
    return 1 if failed else 0


def _project(client: InferenceClient, args: argparse.Namespace) -> None:
    """Latents of image files (versions with an encoder): each file's anomaly score and percentile,
    and with --out the images over their reconstructions."""
    blobs = [Path(f).read_bytes() for f in args.files]
    projection = client.project(blobs, model=args.model, version=args.version, labels=args.label)
    width = max(len(f) for f in args.files)
    print(f"{'file':<{width}}  anomaly  percentile  ({projection.model} v{projection.version})")
    for name, score, share in zip(args.files, projection.anomaly, projection.anomaly_percentile):
        print(f"{name:<{width}}  {score:7.4f}  {share:10.1%}")
    if args.out:
        originals = np.stack([images.decode_image(b, projection.reconstructions.shape[1]) for b in blobs])
        pairs = np.concatenate([originals, projection.reconstructions])
        images.save_picture(images.make_grid(pairs, len(blobs)), args.out, args.scale or images.GRID_SCALE)
        print(f"wrote {args.out}: the images (top) and their reconstructions (bottom)")


def _translate(client: InferenceClient, args: argparse.Namespace) -> None:
    """Image files through a translation model: one file's translation to --out, several files'
    sources over their translations as one grid; --scores prints how real D finds each pair."""
    blobs = [Path(f).read_bytes() for f in args.files]
    result = client.translate(blobs, model=args.model, version=args.version, scores=args.scores)
    if args.scores:
        width = max(len(f) for f in args.files)
        print(f"{'file':<{width}}  p(real)   logit  ({result.model} v{result.version})")
        for name, score, logit in zip(args.files, result.scores, result.logits):
            print(f"{name:<{width}}  {score:7.4f}  {logit:7.3f}")
    if not args.out:
        return
    scale = args.scale or 1
    if len(blobs) == 1:
        images.save_picture(result.images[0], args.out, scale)
        print(f"wrote {args.out}: {args.files[0]} translated by {result.model} v{result.version}")
        return
    size = result.images.shape[-1]
    sources = np.stack([images.resize_nearest(images.decode_image(b, result.images.shape[1]), size) for b in blobs])
    images.save_picture(images.make_grid(np.concatenate([sources, result.images]), len(blobs)), args.out,
                        args.scale or images.GRID_SCALE)
    print(f"wrote {args.out}: the sources (top) and their translations (bottom)")


def _figures(manifest_json: str) -> str:
    """A version's gated figures (the publishing gate's list), as key=value."""
    metrics = json.loads(manifest_json).get("metrics", {}) if manifest_json else {}
    return " ".join(f"{k}={v:.4g}" for k, v in publishing.gated(metrics).items())


def _models(client: InferenceClient, args: argparse.Namespace) -> None:
    listing = client.models()
    for info in listing.models:
        default = " (default)" if info.name == listing.default_model else ""
        shape = "x".join(map(str, info.sample_shape))
        classes = f", classes {', '.join(info.class_names) or info.num_classes}" if info.num_classes else ""
        print(f"{info.name}{default}: {info.kind} {shape}, latent {info.latent_size}{classes}; "
              f"policy {info.version_policy or '?'}")
        for v in info.versions:
            state = ("READY", "FAILED", "UNLOADED")[v.state - 1] if v.state else "?"
            where = f" on {v.provider}" if v.provider else ""
            figures = _figures(v.manifest_json)
            print(f"  v{v.version} {state}{where}" + (f"  {figures}" if figures else "")
                  + (f" ({v.error})" if v.error else ""))
            if args.verbose and v.manifest_json:
                print(json.dumps(json.loads(v.manifest_json).get("metrics", {}), indent=2))


def _score_job(client: InferenceClient, args: argparse.Namespace) -> None:
    summary = jobs.score_job(client, jobs.list_inputs(args.input), Path(args.output), args.model,
                             args.batch, args.concurrency, args.wait_s, not args.no_progress)
    print(f"score-job: {summary}; results in {args.output}")


def _translate_job(client: InferenceClient, args: argparse.Namespace) -> None:
    summary = jobs.translate_job(client, jobs.list_inputs(args.input), Path(args.out_dir), args.model, args.batch,
                                 args.concurrency, args.wait_s, not args.no_progress)
    failures = f", failures in {Path(args.out_dir) / jobs.TRANSLATE_ERRORS}" if summary.errors else ""
    print(f"translate-job: {summary}; PNGs in {args.out_dir}{failures}")


def _sample_job(client: InferenceClient, args: argparse.Namespace) -> None:
    summary = jobs.sample_job(client, args.count, Path(args.out_dir), args.seed, args.chunk, args.model,
                              args.concurrency, args.wait_s, not args.no_progress, label=args.label,
                              controls=_controls(args))
    print(f"sample-job: {summary}; PNGs in {args.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = helptext.parser("dcgan-client", __doc__)
    parser.add_argument("--target", default=os.environ.get(TARGET_ENVIRONMENT) or "localhost:50051",
                        help=f"server or Envoy address (default: ${TARGET_ENVIRONMENT}, else localhost:50051); "
                             "several replicas as IP:PORT,IP:PORT or dns:///NAME:PORT are balanced per call")
    parser.add_argument("--local", type=Path, metavar="PATH",
                        help="no server: serve this model version folder (<repo>/<model>/<version>) or "
                             "training run here, in-process, for this one command (needs the serve extra)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default: %(default)s)")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to trust: connect with TLS")
    parser.add_argument("--token-file", help="file holding the bearer token (needs --tls-ca)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_commands(commands)
    return parser


def _add_commands(commands: argparse._SubParsersAction) -> None:
    sample = helptext.subcommand(commands, "sample", "generate images")
    sample.add_argument("--count", type=int, default=64, help="samples (default: %(default)s)")
    sample.add_argument("--seed", type=int, help="same seed, same images (default: the server draws one)")
    sample.add_argument("--out", help=f"one grid picture ({', '.join(images.PICTURE_FORMATS)}), or the raw samples "
                                      f"({', '.join(ARRAY_SUFFIXES)}: toy models' points)")
    sample.add_argument("--out-dir", help="one PNG per sample")
    sample.add_argument("--per-class", type=int, help="conditional models: a grid (--out) of this many "
                                                      "samples per class, one labelled row per class")
    walk = helptext.subcommand(commands, "walk", "frames along a path between two latent points (GIF or PNG strip)")
    start = walk.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-seed", type=int, help="start: sample --from-index of this seed")
    start.add_argument("--from-image", help="start: this image's latent (versions with an encoder)")
    walk.add_argument("--from-index", type=int, default=0)
    walk.add_argument("--to-seed", type=int, required=True, help="end: sample --to-index of this seed")
    walk.add_argument("--to-index", type=int, default=0)
    walk.add_argument("--steps", type=int, default=32, help="frames, both ends included (default: 32)")
    walk.add_argument("--interpolation", choices=list(wire.INTERPOLATIONS), default="slerp")
    walk.add_argument("--out", required=True, help="walk.gif (animation) or a strip picture (.png, .jpg, .webp)")
    walk.add_argument("--frame-ms", type=int, default=80, help="GIF frame duration (default: 80)")
    project = helptext.subcommand(commands, "project", "latents, anomaly scores and reconstructions of image "
                                                       "files (versions with an encoder)")
    project.add_argument("files", nargs="+")
    project.add_argument("--out", help="the images over their reconstructions (.png, .jpg, .webp, .gif)")
    translate = helptext.subcommand(commands, "translate", "image files through a translation model "
                                                           "(e.g. mnist-sr4: 7x7 -> 28x28)")
    translate.add_argument("files", nargs="+", help="source images, each the model's source size")
    translate.add_argument("--out", help="one file: its translation; several: sources over translations "
                                         "(.png, .jpg, .webp, .gif)")
    translate.add_argument("--scores", action="store_true", help="print the discriminator's score of each pair")
    score = helptext.subcommand(commands, "score", "probability of being real for image files")
    score.add_argument("files", nargs="+", help="image files and folders (their images, recursively)")
    score.add_argument("--batch", type=int, default=64, help="images per request (default: %(default)s)")
    score.add_argument("--anomaly", action="store_true",
                       help="also each image's anomaly score and percentile (versions with an encoder)")
    score_job = helptext.subcommand(commands, "score-job", "score many files into CSV/JSONL, resumably")
    score_job.add_argument("--input", required=True, help="a folder, a glob pattern, or a file listing paths")
    score_job.add_argument("--output", required=True, help="results .csv or .jsonl (appended; rerun to resume)")
    score_job.add_argument("--batch", type=int, default=64, help="images per request (default: %(default)s)")
    translate_job = helptext.subcommand(commands, "translate-job", "translate many image files into PNGs, "
                                                                   "resumably (translation models)")
    translate_job.add_argument("--input", required=True, help="a folder, a glob pattern, or a file listing paths")
    translate_job.add_argument("--out-dir", required=True, help="one PNG per input, at its path below the inputs' "
                                                                "common folder")
    translate_job.add_argument("--batch", type=int, default=64, help="images per request (default: %(default)s)")
    sample_job = helptext.subcommand(commands, "sample-job", "generate many PNGs, resumably")
    sample_job.add_argument("--count", type=int, required=True)
    sample_job.add_argument("--out-dir", required=True)
    sample_job.add_argument("--seed", type=int, default=0, help="chunk k uses seed + k")
    sample_job.add_argument("--chunk", type=int, default=256, help="images per request (default: %(default)s)")
    sample_job.add_argument("--label", type=int, help="conditional models: the class of every sample")
    for sub in (score_job, sample_job, translate_job):
        sub.add_argument("--model", default="")
        sub.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")
        sub.add_argument("--wait-s", type=float, default=jobs.DEFAULT_PATIENCE_S,
                         help="how long to wait out an absent or overloaded server, with backoff (default: 600)")
        sub.add_argument("--no-progress", action="store_true")
    models = helptext.subcommand(commands, "models", "models, versions and their state")
    models.add_argument("-v", "--verbose", action="store_true", help="also print each version's metrics")
    for sub in (sample, score, walk, project, translate):
        sub.add_argument("--model", default="", help="model name (default: the server's default model)")
        sub.add_argument("--version", type=int, default=0, help="version (default: the latest ready one)")
    for sub in (sample, score, walk, project):
        sub.add_argument("--label", type=int, help="conditional models: the class of every image "
                                                   "(default: drawn from the seed / the most likely class)")
    for sub in (sample, walk, project, translate):
        sub.add_argument("--scale", type=_scale, help=f"enlarge pictures N times, nearest neighbour (default: "
                                                   f"{images.GRID_SCALE} for grids, strips and GIFs; 1 for --out-dir)")
    for sub in (sample, sample_job, walk):
        sub.add_argument("--truncation", type=float, help="redraw latent entries with |z| above this (>= 0.1)")
    for sub in (sample, sample_job):
        guided = sub.add_mutually_exclusive_group()
        guided.add_argument("--min-score", type=float,
                            help="keep only samples the discriminator scores >= this probability, in (0, 1)")
        guided.add_argument("--keep-top", type=float,
                            help="keep this share of the best-scored candidates, in (0, 1)")


COMMANDS = {"sample": _sample, "score": _score, "project": _project, "translate": _translate, "models": _models,
            "walk": _walk, "translate-job": _translate_job,
            "score-job": _score_job, "sample-job": _sample_job}


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[str]:
    """--target, or with --local a server started here for this command."""
    if args.local is None:
        yield args.target
        return
    try:
        from serving.client.local import local_server
    except ModuleNotFoundError as exc:
        raise jobs.JobError(f"--local needs the 'serve' extra ({exc.name} is not installed): "
                            f"pip install 'dcgan[serve]'") from None
    with local_server(args.local) as target:
        yield target


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage error (a bad flag or value, refused here or by the server as
    INVALID_ARGUMENT, or an unreadable file), 1 any other failure of the call (and score: some
    files could not be scored)."""
    args = build_parser().parse_args(argv)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        patient = args.command.endswith("-job")  # jobs wait for the server to come (back)
        with _target(args) as target, InferenceClient(target, timeout=args.timeout, tls_ca=args.tls_ca,
                                                      token=token, wait_for_ready=patient) as client:
            if patient:
                jobs.await_server(client, target, args.wait_s)
            return COMMANDS[args.command](client, args) or 0
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


if __name__ == "__main__":
    sys.exit(main())
