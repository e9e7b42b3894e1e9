"""Client-side batch jobs: score many image files, generate many samples, or translate many
images, resumably.

All survive any interruption, kill -9 included. ``score_job`` appends whole lines to its output
and, on restart, drops a torn last line and skips inputs already present, so the output ends with
every input exactly once. ``sample_job`` names files after the seed that made them and
``translate_job`` after the input they translate, each written atomically, so a restart redoes
only what is missing.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import itertools
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from dcgan_core import locking
from dcgan_core.atomic import atomic_write_bytes, atomic_write_text
from dcgan_core.images import IMAGE_SUFFIXES, encode_png
from dcgan_core.records import cut_torn_tail
from serving.client.library import (
    Controls,
    DeadlineExceededError,
    InferenceClient,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

RETRYABLE = (UnavailableError, ResourceExhaustedError, DeadlineExceededError)
FIELDS = ["path", "probability", "logit", "model", "version", "error"]
T = TypeVar("T")
DEFAULT_PATIENCE_S = 600.0  # how long a job waits out an absent or overloaded server
JOB_FILE, LOCK_FILE = "job.json", ".lock"
log = logging.getLogger(__name__)


class JobError(RuntimeError):
    pass


def with_retries(call: Callable[[], T], patience_s: float = DEFAULT_PATIENCE_S, base_delay: float = 0.2,
                 max_delay: float = 10.0) -> T:
    """Retry UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED for up to ``patience_s``, with
    capped exponential backoff and full jitter (many job workers must not retry in step)."""
    deadline = time.monotonic() + patience_s
    for attempt in itertools.count():
        try:
            return call()
        except RETRYABLE as exc:
            delay = random.uniform(0, min(max_delay, base_delay * 2**attempt))
            if time.monotonic() + delay > deadline:
                raise
            if attempt == 0:
                log.warning("%s; retrying for up to %.0f s", exc, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)
    raise AssertionError("unreachable")


def list_inputs(spec: str) -> list[str]:
    """A directory (its images, recursively), a glob pattern, or a text file listing paths."""
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise JobError(f"--input {spec!r} matches no files")
    return matches


class ResultFile:
    """An append-only CSV or JSONL file of one record per input, safe against torn writes."""

    def __init__(self, path: Path):
        if path.suffix not in (".csv", ".jsonl"):
            raise JobError(f"--output must end in .csv or .jsonl, got {path.name}")
        self.path, self.csv = path, path.suffix == ".csv"

    def done(self) -> set[str]:
        """Paths already recorded; a torn last line (no newline) is cut off first."""
        text = cut_torn_tail(self.path)
        if self.csv:
            return {row["path"] for row in csv.DictReader(io.StringIO(text))}
        return {json.loads(line)["path"] for line in text.splitlines() if line}

    def append(self, records: list[dict]) -> None:
        """Write whole lines in one write() and fsync them: a crash loses at most a tail."""
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        buffer = io.StringIO()
        if self.csv:
            writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n", extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(records)
        else:
            buffer.writelines(json.dumps({k: r.get(k) for k in FIELDS}) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())


@dataclass
class JobSummary:
    total: int
    skipped: int
    done: int
    errors: int
    seconds: float

    def __str__(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        return (f"{self.total} inputs: {self.skipped} already done, {self.done} processed now "
                f"({self.errors} errors) in {self.seconds:.1f}s, {rate:.1f}/s")


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _score_batch(client: InferenceClient, paths: list[str], model: str, patience_s: float, version: int = 0,
                 label: int | None = None, anomaly: bool = False) -> list[dict]:
    """Score files together; an invalid image is recorded for its file, the others still scored."""
    blobs, records = [], []
    for path in paths:
        try:
            blobs.append(Path(path).read_bytes())
        except OSError as exc:
            blobs.append(None)
            records.append({"path": path, "error": f"cannot read: {exc.strerror}"})
    readable = [(p, b) for p, b in zip(paths, blobs) if b is not None]
    if not readable:
        return records
    try:
        scores = with_retries(lambda: client.score([b for _, b in readable], model=model, version=version,
                                                   labels=label, anomaly=anomaly), patience_s)
    except InvalidArgumentError as exc:
        if len(readable) == 1:
            return records + [{"path": readable[0][0], "error": exc.details}]
        return records + [r for p, _ in readable
                          for r in _score_batch(client, [p], model, patience_s, version, label, anomaly)]
    per_image = lambda values: [None] * len(readable) if values is None else values.tolist()  # noqa: E731
    return records + [{"path": p, "probability": float(prob), "logit": float(logit), "model": scores.model,
                       "version": scores.version, "label": y, "anomaly": a, "anomaly_percentile": share}
                      for (p, _), prob, logit, y, a, share in zip(
                          readable, scores.probabilities, scores.logits, per_image(scores.labels),
                          per_image(scores.anomaly), per_image(scores.anomaly_percentile))]


def score_paths(client: InferenceClient, paths: list[str], model: str = "", version: int = 0,
                label: int | None = None, batch: int = 64, anomaly: bool = False) -> list[dict]:
    """One record per path, in order: its scores, or the error that kept it from being scored."""
    records = {r["path"]: r for chunk in _chunks(list(dict.fromkeys(paths)), batch)
               for r in _score_batch(client, chunk, model, 0.0, version, label, anomaly)}
    return [records[p] for p in dict.fromkeys(paths)]


def await_server(client: InferenceClient, target: str, patience_s: float, report_every_s: float = 10.0) -> None:
    """Wait for the server to answer, saying so on stderr while it does not (a job started
    before its server, or while it restarts, should not look hung); JobError after ``patience_s``."""
    start, probe_s = time.monotonic(), 1.0  # the first report comes quickly, then every report_every_s
    while not client.ready(min(probe_s, max(0.1, patience_s - (time.monotonic() - start)))):
        probe_s = report_every_s
        waited = time.monotonic() - start
        if waited >= patience_s:
            raise JobError(f"no server answered at {target} within {patience_s:.0f} s (--wait-s)")
        print(f"dcgan-client: waiting for a server at {target} ({waited:.0f} s of up to {patience_s:.0f} s)",
              file=sys.stderr, flush=True)


def score_job(client: InferenceClient, inputs: list[str], output: Path, model: str = "", batch: int = 64,
              concurrency: int = 4, patience_s: float = DEFAULT_PATIENCE_S, progress: bool = True) -> JobSummary:
    results = ResultFile(output)
    with _owning(output.with_name(output.name + ".lock"), f"output {output}"):
        return _score_all(client, inputs, results, model, batch, concurrency, patience_s, progress)


@contextlib.contextmanager
def _owning(lock: Path, what: str) -> Iterator[None]:
    """The job's exclusive hold on its output; taken by another process, a JobError naming it."""
    try:
        with locking.exclusive(lock, what):
            yield
    except locking.Locked as exc:
        raise JobError(str(exc)) from None


def _score_all(client: InferenceClient, inputs: list[str], results: ResultFile, model: str, batch: int,
               concurrency: int, patience_s: float, progress: bool) -> JobSummary:
    done = results.done()
    todo = [p for p in dict.fromkeys(inputs) if p not in done]
    start, errors = time.monotonic(), 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="scoring")
    with ThreadPoolExecutor(concurrency) as pool:
        pending = set()
        for chunk in _chunks(todo, batch):
            if len(pending) >= concurrency * 2:  # bounded in-flight work, results written in turn
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                errors += _record(results, finished, bar)
            pending.add(pool.submit(_score_batch, client, chunk, model, patience_s))
        errors += _record(results, wait(pending).done, bar)
    bar.close()
    return JobSummary(len(set(inputs)), len(set(inputs)) - len(todo), len(todo), errors, time.monotonic() - start)


def _record(results: ResultFile, finished, bar) -> int:
    errors = 0
    for future in finished:
        records = future.result()
        results.append(records)
        errors += sum(1 for r in records if r.get("error"))
        bar.update(len(records))
    return errors


def sample_job(client: InferenceClient, count: int, out_dir: Path, seed: int = 0, chunk: int = 256,
               model: str = "", concurrency: int = 2, patience_s: float = DEFAULT_PATIENCE_S,
               progress: bool = True, label: int | None = None, controls: Controls = Controls()) -> JobSummary:
    """``count`` PNGs named ``seed{S}_{i:04d}.png``: chunk k is request seed ``seed + k``.

    The folder belongs to one job at a time (a lock), and to one model version: the version that
    made the first samples is recorded in job.json and every later request asks for it, so a
    resumed job never mixes versions; if the server no longer serves it, the job stops and says so.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with _owning(out_dir / LOCK_FILE, f"output folder {out_dir}"):
        return _sample_all(client, count, out_dir, seed, chunk, model, concurrency, patience_s, progress, label,
                           controls)


def _job_version(client: InferenceClient, out_dir: Path, params: dict, patience_s: float) -> int:
    """The model version of this folder's job: recorded, or the served latest for a new job."""
    job_file = out_dir / JOB_FILE
    if job_file.exists():
        recorded = json.loads(job_file.read_text())
        if {k: v for k, v in recorded.items() if k != "version"} != params:
            raise JobError(f"{out_dir} holds a job with other parameters {job_file.read_text().strip()}; "
                           f"use another --out-dir")
        if "version" in recorded:
            return int(recorded["version"])
    version = with_retries(lambda: client.get_model(params["model"]).latest_version, patience_s)
    if version <= 0:
        raise JobError(f"the server has no ready version of model {params['model'] or '(default)'}")
    atomic_write_text(job_file, json.dumps({**params, "version": version}) + "\n")
    return version


def _sample_all(client: InferenceClient, count: int, out_dir: Path, seed: int, chunk: int, model: str,
                concurrency: int, patience_s: float, progress: bool, label: int | None,
                controls: Controls) -> JobSummary:
    params = {"count": count, "seed": seed, "chunk": chunk, "model": model}
    if label is not None:  # (absent for unlabelled jobs, so their job.json stays as it was)
        params["label"] = label
    params.update(controls.params())
    version = _job_version(client, out_dir, params, patience_s)
    for stale in out_dir.glob(".*.tmp"):  # left by a kill during an atomic write (we hold the lock)
        stale.unlink(missing_ok=True)
    plan = [(seed + k, min(chunk, count - k * chunk)) for k in range((count + chunk - 1) // chunk)]
    names = lambda s, n: [out_dir / f"seed{s}_{i:04d}.png" for i in range(n)]  # noqa: E731
    todo = [(s, n) for s, n in plan if not all(p.exists() for p in names(s, n))]
    start = time.monotonic()
    bar = tqdm(total=sum(n for _, n in todo), unit="img", disable=not progress, desc="sampling")

    def run(s: int, n: int) -> None:
        request = lambda: client.sample(n, seed=s, model=model, version=version, encoding="png",  # noqa: E731
                                        labels=label, controls=controls)
        try:
            batch = with_retries(request, patience_s)
        except NotFoundError as exc:
            raise JobError(f"this folder's samples come from model {model or '(default)'} version {version}, "
                           f"which the server no longer serves ({exc.details}); serve that version again "
                           f"to finish, or start over in another --out-dir") from None
        for path, blob in zip(names(s, n), batch.png):
            atomic_write_bytes(path, blob)
        bar.update(n)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(run, s, n) for s, n in todo]:
            future.result()
    bar.close()
    done = sum(n for _, n in todo)
    return JobSummary(count, count - done, done, 0, time.monotonic() - start)


TRANSLATE_ERRORS = "errors.jsonl"  # translate_job: the inputs that could not be translated, and why


def translate_job(client: InferenceClient, inputs: list[str], out_dir: Path, model: str = "", batch: int = 64,
                  concurrency: int = 4, patience_s: float = DEFAULT_PATIENCE_S, progress: bool = True) -> JobSummary:
    """Each input image translated into ``out_dir`` as a PNG at the same path relative to the
    inputs' common folder. Like sample_job the folder belongs to one job and one model version
    (job.json); inputs whose PNG exists are skipped, and those the server refuses (INVALID_ARGUMENT)
    or that cannot be read are listed with the reason in errors.jsonl (rewritten by each run)."""
    if not inputs:
        raise JobError("no input images")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _owning(out_dir / LOCK_FILE, f"output folder {out_dir}"):
        version = _job_version(client, out_dir, {"job": "translate", "model": model}, patience_s)
        base = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in inputs]))
        target = {p: out_dir / Path(p).resolve().relative_to(base).with_suffix(".png") for p in dict.fromkeys(inputs)}
        todo = [p for p, out in target.items() if not out.exists()]
        start = time.monotonic()
        bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="translating")

        def run(paths: list[str]) -> list[dict]:
            failed = _translate_batch(client, paths, target, model, version, patience_s)
            bar.update(len(paths))
            return failed

        with ThreadPoolExecutor(concurrency) as pool:
            failed = [r for f in [pool.submit(run, c) for c in _chunks(todo, batch)] for r in f.result()]
        bar.close()
        errors = out_dir / TRANSLATE_ERRORS  # this run's refusals (a rerun tries them again)
        if failed:
            atomic_write_text(errors, "".join(json.dumps(r) + "\n" for r in failed))
        else:
            errors.unlink(missing_ok=True)
        return JobSummary(len(target), len(target) - len(todo), len(todo), len(failed), time.monotonic() - start)


def _translate_batch(client: InferenceClient, paths: list[str], target: dict[str, Path], model: str, version: int,
                     patience_s: float) -> list[dict]:
    """Translate files together and write each result; returns the files that failed, with why
    (a batch the server refuses is retried file by file, so one bad image fails alone)."""
    try:
        blobs = [Path(p).read_bytes() for p in paths]
        result = with_retries(lambda: client.translate(blobs, model=model, version=version), patience_s)
    except (OSError, InvalidArgumentError) as exc:
        if len(paths) == 1:
            why = exc.details if isinstance(exc, InvalidArgumentError) else f"cannot read: {exc.strerror}"
            return [{"path": paths[0], "error": why}]
        return [r for p in paths for r in _translate_batch(client, [p], target, model, version, patience_s)]
    for path, image in zip(paths, result.images):
        target[path].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target[path], encode_png(image))
    return []
