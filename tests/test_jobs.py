"""Batch jobs against a real server, killed with SIGKILL midway and resumed."""

import csv
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcgan_core import images
from serving.client import jobs
from serving.client.library import InferenceClient
from tests.conftest import start_server, wait_for


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
    return [sys.executable, "-m", "serving.client.cli", "--target", f"127.0.0.1:{server.port}", *args]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    wait_for(lambda: ready() or proc.poll() is not None, timeout, poll=0.002)
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
    lines = text.splitlines()
    rows = list(csv.DictReader(lines)) if suffix == ".csv" else [json.loads(line) for line in lines]
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


def test_two_score_jobs_on_one_output_the_second_is_refused(server, image_folder, tmp_path):
    output = tmp_path / "scores.jsonl"
    args = _cli(server, "score-job", "--input", str(image_folder), "--output", str(output), "--batch", "1",
                "--concurrency", "1", "--no-progress")
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: output.exists() and output.stat().st_size > 0 or first.poll() is not None)
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first job ended before the second started; make it longer"
        assert second.returncode == 2
        assert f"output {output} is in use by another process (pid {first.pid})" in second.stderr
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        first.kill()
    paths = [json.loads(line)["path"] for line in output.read_text().splitlines()]
    assert len(paths) == len(set(paths)) == 242


def test_the_same_sample_job_twice_the_second_is_refused(server, tmp_path):
    out = tmp_path / "samples"
    args = _cli(server, "sample-job", "--count", "120", "--chunk", "2", "--seed", "1", "--out-dir", str(out),
                "--concurrency", "1", "--no-progress")
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(list(out.glob("*.png"))) >= 2 or first.poll() is not None)
        first.send_signal(signal.SIGSTOP)  # 58 requests from done: held, so it cannot end before the second
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and f"is in use by another process (pid {first.pid})" in second.stderr
        assert first.wait(120) == 0, first.stderr.read()  # its temporary files were left alone
    finally:
        first.kill()
    assert len(list(out.glob("*.png"))) == 120 and not list(out.glob(".*.tmp"))


def test_a_resumed_sample_job_stays_on_its_model_version(tiny_run, tmp_path):
    from dcgan_core.repository import Repository
    from tests.repo_faults import add_version
    from training.export import export_run

    repository = Repository(tmp_path / "repo")
    export_run(tiny_run, repository, "tiny")
    for policy, resumable in (("all", True), ("latest:1", False)):
        server = start_server(repository.root, poll_s=0, version_policy=policy)
        out, reference = tmp_path / f"out-{policy}", tmp_path / f"reference-{policy}"
        try:
            with InferenceClient(f"127.0.0.1:{server.port}") as client:
                jobs.sample_job(client, 6, reference, seed=2, chunk=3, progress=False)
                jobs.sample_job(client, 6, out, seed=2, chunk=3, progress=False)
                for path in sorted(out.glob("seed3_*.png")):  # as if stopped after the first chunk
                    path.unlink()
                add_version(repository, "tiny", source=max(repository.versions("tiny")))
                server.reload()
                assert client.sample(1, seed=1).version == max(repository.versions("tiny"))
                if resumable:
                    assert jobs.sample_job(client, 6, out, seed=2, chunk=3, progress=False).done == 3
                    assert all((out / p.name).read_bytes() == p.read_bytes() for p in reference.glob("*.png"))
                    assert json.loads((out / "job.json").read_text())["version"] == 1
                else:
                    with pytest.raises(jobs.JobError, match="version .*which the server no longer serves"):
                        jobs.sample_job(client, 6, out, seed=2, chunk=3, progress=False)
        finally:
            server.stop(grace=1)


@pytest.mark.slow
def test_a_job_waits_for_a_server_that_is_not_there_yet(serving_repo, image_folder, tmp_path):
    with socket.socket() as probe:  # a free port, where the server will come up later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "scores.csv"
    args = [sys.executable, "-m", "serving.client.cli", "--target", f"127.0.0.1:{port}", "--timeout", "5",
            "score-job", "--input", str(image_folder / "img_00*.png"), "--output", str(output), "--no-progress",
            "--wait-s", "120"]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in job.stderr:  # the job says it is waiting: now bring the server up
            if "waiting for a server at" in line:
                break
        else:
            pytest.fail(f"the job ended without waiting: {job.stdout.read()}")
        server = start_server(serving_repo, poll_s=0, port=port)
        try:
            assert job.wait(120) == 0
        finally:
            server.stop(grace=1)
    finally:
        job.kill()
    rows = list(csv.DictReader(output.read_text().splitlines()))
    assert len(rows) == 10 and all(not r["error"] for r in rows)


def test_files_written_atomically_get_the_mode_open_would_give(tmp_path):
    """Job outputs, grids and checkpoints are for others to read too: not mkstemp's private 0600."""
    import stat

    from dcgan_core.atomic import atomic_write_bytes

    plain = tmp_path / "plain.png"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "atomic.png", b"x")
    assert stat.S_IMODE((tmp_path / "atomic.png").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
