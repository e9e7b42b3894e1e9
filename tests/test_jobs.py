"""Batch jobs against a real server, killed with SIGKILL midway and resumed."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dcgan_core import images
from serving import jobs
from serving.client import InferenceClient
from tests.conftest import start_server


@pytest.fixture(scope="module")
def server(serving_repo):
    server = start_server(serving_repo, poll_s=0)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i in range(240):
        (folder / f"img_{i:03d}.png").write_bytes(images.encode_png(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "wrong_size.png").write_bytes(images.encode_png(np.zeros((1, 10, 10), np.uint8)))
    return folder


def _cli(server, *args) -> list[str]:
    return [sys.executable, "-m", "serving.client_cli", "--target", f"127.0.0.1:{server.port}", *args]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_score_job_killed_and_resumed_has_every_input_once(server, image_folder, tmp_path, suffix):
    output = tmp_path / f"scores{suffix}"
    args = _cli(server, "score-job", "--input", str(image_folder), "--output", str(output), "--batch", "2",
                "--concurrency", "1", "--no-progress")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: output.exists() and output.stat().st_size > 2000)
    partial = output.read_bytes()
    assert 0 < len(partial) and partial.count(b"\n") < 243, "the job must be killed midway"
    with output.open("ab") as handle:
        handle.write(b'{"path": "torn')  # what a kill during write() could leave
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "already done" in done.stdout
    text = output.read_text()
    assert text.endswith("\n")
    rows = list(csv.DictReader(text.splitlines())) if suffix == ".csv" else [json.loads(l) for l in text.splitlines()]
    paths = [r["path"] for r in rows]
    expected = jobs.list_inputs(str(image_folder))
    assert sorted(paths) == sorted(expected) and len(paths) == len(set(paths)) == 242
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.png", "wrong_size.png"} and "expected 28x28" in errors["wrong_size.png"]
    scored = [float(r["probability"]) for r in rows if not r["error"]]
    assert all(0.0 < p < 1.0 for p in scored)


def test_score_job_from_list_file_and_glob(server, image_folder, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(str(p) for p in sorted(image_folder.glob("img_00*.png"))) + "\n")
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        first = jobs.score_job(client, jobs.list_inputs(str(listing)), tmp_path / "a.jsonl", progress=False)
        again = jobs.score_job(client, jobs.list_inputs(str(image_folder / "img_00*.png")), tmp_path / "a.jsonl",
                               progress=False)
    assert (first.done, again.done, again.skipped) == (10, 0, 10)
    with pytest.raises(jobs.JobError, match="matches no files"):
        jobs.list_inputs(str(tmp_path / "nothing*.png"))


def test_sample_job_killed_and_resumed_matches_an_uninterrupted_run(server, tmp_path):
    out = tmp_path / "samples"
    args = _cli(server, "sample-job", "--count", "60", "--chunk", "3", "--seed", "5", "--out-dir", str(out),
                "--concurrency", "1", "--no-progress")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: len(list(out.glob("*.png"))) >= 9)
    assert 0 < len(list(out.glob("*.png"))) < 60
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reference = tmp_path / "reference"
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        jobs.sample_job(client, 60, reference, seed=5, chunk=3, progress=False)
    made = sorted(p.name for p in out.glob("*.png"))
    assert made == sorted(p.name for p in reference.glob("*.png")) and len(made) == 60
    assert all((out / n).read_bytes() == (reference / n).read_bytes() for n in made)
    assert not list(out.glob(".*.tmp"))
    changed = subprocess.run(_cli(server, "sample-job", "--count", "61", "--out-dir", str(out)),
                             capture_output=True, text=True, timeout=60)
    assert changed.returncode == 2 and "other parameters" in changed.stderr
