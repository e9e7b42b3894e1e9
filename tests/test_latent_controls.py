"""Latent walks, truncation and discriminator-guided sampling: the algorithms as the .proto states
them, and each control through a real gRPC server (reproducible, bounded, validated, not mixed
between concurrent requests)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from dcgan.v1 import inference_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dcgan_core import images
from dcgan_core.latents import LatentStream, interpolate, latents
from serving.client import cli as client_cli
from serving.client.library import Controls, InferenceClient, InvalidArgumentError, ResourceExhaustedError
from serving.server import plans
from serving.server.errors import InvalidArgument
from serving.server.plans import Endpoint, SampleSpec
from tests.conftest import start_server

MAX_CANDIDATES = 256
CLOSE = {"rtol": 0, "atol": 1e-5}  # one sample run in batches of other sizes: float rounding only


def proto_truncation(seed: int, count: int, size: int, t: float) -> np.ndarray:
    """SampleRequest.truncation as its comment in the .proto words it, written independently."""
    z = np.random.default_rng(seed).standard_normal((count, size), dtype=np.float32)
    redraws = np.random.default_rng([seed, 2])
    for row in range(count):
        while outside := [i for i in range(size) if abs(z[row, i]) > t]:
            z[row, outside] = redraws.standard_normal(len(outside), dtype=np.float32)
    return z


@pytest.fixture(scope="module")
def server(conditional_repo):
    server = start_server(conditional_repo.root, poll_s=0, max_count=64, max_candidates=MAX_CANDIDATES,
                          max_queue_delay_ms=5)
    yield server
    server.stop(grace=1)


# ---------------------------------------------------------------------------- the algorithms


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), pieces=st.lists(st.integers(1, 9), min_size=1, max_size=5),
       truncation=st.none() | st.sampled_from([0.5, 1.0, 2.0]), classes=st.sampled_from([0, 3, 10]))
def test_a_seeds_rows_are_the_same_however_they_are_drawn(seed, pieces, truncation, classes):
    whole = LatentStream(seed, 16, classes, truncation).take(sum(pieces))
    stream = LatentStream(seed, 16, classes, truncation)
    parts = [stream.take(n) for n in pieces]
    np.testing.assert_array_equal(whole[0], np.concatenate([z for z, _ in parts]))
    if classes:
        np.testing.assert_array_equal(whole[1], np.concatenate([labels for _, labels in parts]))
    if truncation is None:  # the untruncated stream is the documented numpy call
        np.testing.assert_array_equal(whole[0], latents(seed, sum(pieces), 16))


@pytest.mark.parametrize("t", [0.5, 1.5])
def test_truncation_is_the_documented_redraw_and_respects_the_bound(t):
    z, _ = LatentStream(11, 100, truncation=t).take(20)
    assert np.abs(z).max() <= t
    np.testing.assert_array_equal(z, proto_truncation(11, 20, 100, t))
    plain = latents(11, 20, 100)
    inside = np.abs(plain) <= t
    np.testing.assert_array_equal(z[inside], plain[inside])  # only entries past the bound change


def test_interpolation_ends_exactly_and_slerp_keeps_the_norm():
    a, b = latents(1, 2, 100)
    for method in ("slerp", "lerp"):
        path = interpolate(a, b, 9, method)
        assert path.shape == (9, 100) and path.dtype == np.float32
        np.testing.assert_array_equal(path[0], a)
        np.testing.assert_array_equal(path[-1], b)
    lerp = interpolate(a, b, 3, "lerp")
    np.testing.assert_allclose(lerp[1], (a + b) / 2, atol=1e-6)
    unit = a / np.linalg.norm(a), b / np.linalg.norm(b)
    slerp = interpolate(*unit, 9)
    np.testing.assert_allclose(np.linalg.norm(slerp, axis=1), 1.0, atol=1e-5)  # on the sphere throughout
    with pytest.raises(ValueError, match="at least 2"):
        interpolate(a, b, 1)


# ---------------------------------------------------------------------------- walks


def test_the_ends_of_a_walk_are_the_samples_of_its_two_points(client, conditional_repo):
    walk = client.walk((5, 3), 9, 7, model="plain", encoding="float32")
    start = client.sample(4, model="plain", seed=5, encoding="float32").images[3]
    end = client.sample(1, model="plain", seed=9, encoding="float32").images[0]
    np.testing.assert_allclose(walk.images[0], start, **CLOSE)
    np.testing.assert_allclose(walk.images[-1], end, **CLOSE)
    generator = ort.InferenceSession(str(conditional_repo.version_dir("plain", 1) / "generator.onnx"),
                                     providers=["CPUExecutionProvider"])
    for method in ("slerp", "lerp"):  # every frame is the generator at the documented interpolation
        frames = client.walk((5, 3), 9, 7, interpolation=method, model="plain", encoding="float32").images
        path = interpolate(latents(5, 4, 8)[3], latents(9, 1, 8)[0], 7, method)
        np.testing.assert_allclose(frames, generator.run(None, {"z": path})[0], **CLOSE)
    explicit = client.walk(latents(5, 4, 8)[3], latents(9, 1, 8)[0], 7, model="plain", encoding="float32")
    np.testing.assert_allclose(explicit.images, walk.images, **CLOSE)
    again = client.walk((5, 3), 9, 7, model="plain")
    assert np.array_equal(again.images, client.walk((5, 3), 9, 7, model="plain").images)


def test_a_conditional_walk_keeps_its_class(client):
    walk = client.walk(1, 2, 5, model="cond", labels=(2, 2), encoding="float32")
    assert walk.labels.tolist() == [2] * 5
    np.testing.assert_allclose(walk.images[0], client.sample(1, model="cond", seed=1, labels=2,
                                                             encoding="float32").images[0], **CLOSE)
    with pytest.raises(InvalidArgumentError, match="classes 0 and 1: walks between classes are not supported"):
        client.walk(1, 2, 5, model="cond", labels=(0, 1))


def test_a_truncated_walk_starts_at_the_truncated_sample(client):
    walk = client.walk(3, 4, 4, model="plain", truncation=0.5, encoding="float32")
    sample = client.sample(1, model="plain", seed=3, controls=Controls(truncation=0.5), encoding="float32")
    np.testing.assert_allclose(walk.images[0], sample.images[0], **CLOSE)


# ---------------------------------------------------------------------------- truncation


def test_truncated_sampling_is_the_generator_at_the_documented_latents(client):
    for t in (0.5, 1.5):
        truncated = client.sample(12, model="plain", seed=21, controls=Controls(truncation=t), encoding="float32")
        expected = proto_truncation(21, 12, 8, t)
        assert np.abs(expected).max() <= t
        explicit = client.sample(model="plain", latents=expected, encoding="float32")
        np.testing.assert_array_equal(truncated.images, explicit.images)
        again = client.sample(12, model="plain", seed=21, controls=Controls(truncation=t), encoding="float32")
        np.testing.assert_array_equal(again.images, truncated.images)
    plain = client.sample(12, model="plain", seed=21, encoding="float32")
    assert not np.array_equal(plain.images, truncated.images)


# ---------------------------------------------------------------------------- guided sampling


def _scored_candidates(client: InferenceClient, count: int, seed: int, label: int | None = None,
                       model: str = "plain"):
    """The seed's first ``count`` candidates with their scores, from a plain scored request."""
    return client.sample(count, model=model, seed=seed, include_scores=True, encoding="float32", labels=label)


@pytest.mark.parametrize("model, label", [("plain", None), ("cond", 1)])
def test_min_score_keeps_the_first_candidates_that_pass(client, model, label):
    pool = _scored_candidates(client, 64, 8, label, model)
    threshold = float(np.median(pool.probabilities))
    kept = client.sample(10, model=model, seed=8, labels=label, encoding="float32",
                         controls=Controls(min_score=threshold))
    passing = np.flatnonzero(pool.probabilities >= threshold)
    assert len(passing) >= 10  # (the median passes half of the 64)
    np.testing.assert_array_equal(kept.candidate_indices, passing[:10])
    assert np.all(kept.probabilities >= threshold)
    assert kept.candidates >= kept.candidate_indices[-1] + 1
    np.testing.assert_allclose(kept.images, pool.images[passing[:10]], **CLOSE)
    rescored = client.score(kept.images, model=model, labels=label)
    np.testing.assert_allclose(rescored.probabilities, kept.probabilities, atol=1e-5)
    if label is not None:
        assert kept.labels.tolist() == [label] * 10
    again = client.sample(10, model=model, seed=8, labels=label, encoding="float32",
                          controls=Controls(min_score=threshold))
    np.testing.assert_array_equal(again.images, kept.images)


def test_keep_top_keeps_the_best_share_of_exactly_the_candidates_it_needs(client):
    kept = client.sample(7, model="plain", seed=30, encoding="float32", controls=Controls(keep_top=0.7))
    assert kept.candidates == 10  # ceil(7 / 0.7), although 0.7 travels as 0.699999988
    pool = _scored_candidates(client, 10, 30)
    best = np.sort(np.argsort(-pool.logits, kind="stable")[:7])
    np.testing.assert_array_equal(kept.candidate_indices, best)
    assert kept.probabilities.min() >= np.delete(pool.probabilities, best).max()


def test_the_candidate_limit_answers_how_many_passed(client):
    with pytest.raises(ResourceExhaustedError) as caught:
        client.sample(5, model="plain", seed=1, controls=Controls(min_score=0.999999))
    assert f"of {MAX_CANDIDATES} candidates scored >= min_score 0.999999, 5 were asked for" in caught.value.details
    assert "--max-candidates" in caught.value.details
    limit = f"needs 500 candidates, over the server's limit of {MAX_CANDIDATES}"
    with pytest.raises(ResourceExhaustedError, match=limit):
        client.sample(50, model="plain", seed=1, controls=Controls(keep_top=0.1))
    assert len(client.sample(25, model="plain", seed=1, controls=Controls(keep_top=0.1)).images) == 25


@pytest.mark.parametrize("count, keep_top, drawn", [
    (1, 2**-8, 256),  # exactly the limit: allowed (rounded to 6 decimals it needed 257)
    (1, 0.0039065, 256),  # ceil(255.98...): rounded first, it read 0.003906 and needed 257
    (3, 0.75, 4),
])
def test_keep_top_draws_ceil_of_count_over_the_float32_as_the_proto_reads_it(client, count, keep_top, drawn):
    kept = client.sample(count, model="plain", seed=5, controls=Controls(keep_top=keep_top))
    assert kept.candidates == drawn == _proto_keep_top_candidates(count, keep_top)


@pytest.mark.parametrize("keep_top", [1e-7, 5e-7, 1e-30, float(np.finfo(np.float32).smallest_subnormal)])
def test_a_tiny_keep_top_is_resource_exhausted_not_a_server_fault(client, keep_top):
    with pytest.raises(ResourceExhaustedError, match=f"over the server's limit of {MAX_CANDIDATES}"):
        client.sample(1, model="plain", seed=1, controls=Controls(keep_top=keep_top))


def _proto_keep_top_candidates(count: int, keep_top: float) -> int:
    """SampleRequest.keep_top as the .proto words it, written independently: the shortest decimal
    that rounds to the same float32, then ceil(count / keep_top) exactly."""
    import decimal

    share = decimal.Decimal(np.format_float_positional(np.float32(keep_top), unique=True))
    with decimal.localcontext(decimal.Context(prec=200, rounding=decimal.ROUND_CEILING)):
        return int((decimal.Decimal(count) / share).to_integral_value())


@given(count=st.integers(1, 2**20), keep_top=st.floats(0, 1, exclude_min=True, exclude_max=True, width=32))
def test_the_server_computes_keep_top_candidates_as_the_proto_states(count, keep_top):
    from serving.server.plans import candidates_for

    assert candidates_for(count, keep_top) == _proto_keep_top_candidates(count, keep_top)


# ---------------------------------------------------------------------------- together


def test_concurrent_controlled_requests_each_get_their_own_results(client):
    requests = [
        lambda: client.walk((2, 1), 7, 9, model="plain", encoding="float32").images,
        lambda: client.sample(9, model="plain", seed=4, encoding="float32", controls=Controls(truncation=0.5)).images,
        lambda: client.sample(6, model="plain", seed=4, encoding="float32", controls=Controls(keep_top=0.5)).images,
        lambda: client.sample(5, model="cond", seed=4, labels=2, encoding="float32",
                              controls=Controls(min_score=0.01)).images,
        lambda: client.walk(3, 5, 4, model="cond", labels=(0, 0), encoding="float32").images,
        lambda: client.sample(9, model="plain", seed=4, encoding="float32").images,
    ]
    alone = [request() for request in requests]
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(requests) * 3)

    def run(index: int) -> None:
        start.wait()
        results[index] = requests[index % len(requests)]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests) * 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in results.items():
        np.testing.assert_allclose(result, alone[index % len(requests)], **CLOSE)
    assert len(results) == len(requests) * 3


BAD_SAMPLES = [
    ({"truncation": 0.0}, "truncation = 0.0 is out of range: use a threshold >= 0.1"),
    ({"truncation": -1.0}, "truncation = -1.0 is out of range"),
    ({"truncation": float("nan")}, "truncation = nan is out of range"),
    ({"min_score": 0.0}, "min_score = 0.0 is out of range: use a value in (0, 1)"),
    ({"min_score": 1.0}, "min_score = 1.0 is out of range"),
    ({"min_score": float("nan")}, "min_score = nan is out of range"),
    ({"keep_top": 1.5}, "keep_top = 1.5 is out of range: use a value in (0, 1)"),
    ({"keep_top": -0.5}, "keep_top = -0.5 is out of range"),
    ({"min_score": 0.5, "keep_top": 0.5}, "give min_score or keep_top, not both"),
]


@pytest.mark.parametrize("fields, message", BAD_SAMPLES)
def test_bad_control_values_are_invalid_argument_with_the_value_and_range(client, fields, message):
    request = pb.SampleRequest(model="plain", count=4, seed=1, **fields)
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Sample(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_bad_walks_and_misused_controls_are_invalid_argument(client):
    cases = [
        (lambda: client.walk(1, 2, 1, model="plain"), "steps = 1 is out of range: a walk has 2..64 frames"),
        (lambda: client.walk(1, 2, 65, model="plain"), "steps = 65 is out of range"),
        (lambda: client.walk((1, 64), 2, 4, model="plain"), "start.seeded.index = 64 is out of range: 0..63"),
        (lambda: client.walk(1, np.zeros(5, np.float32), 4, model="plain"),
         "end.latent has 5 entries; model 'plain' has latent size 8"),
        (lambda: client.walk(1, 2, 4, model="plain", truncation=0.05), "truncation = 0.05"),
        (lambda: client.walk(1, 2, 4, model="plain", labels=(1, 1)), "model 'plain' is not class-conditional"),
        (lambda: client.walk(np.zeros(8, np.float32), 2, 4, model="cond"), "explicit latents need labels"),
        (lambda: client.sample(model="plain", latents=np.zeros((2, 8), np.float32),
                               controls=Controls(truncation=1.0)), "send a seed (or none), not latents"),
        (lambda: client.sample(3, model="cond", seed=1, labels=[0, 1, 2], controls=Controls(min_score=0.5)),
         "takes one label for every sample (or none), got 3"),
        (lambda: client.sample(3, model="cond", seed=1, labels=5, controls=Controls(keep_top=0.5)),
         "labels[0] = 5 is out of range for model 'cond': classes are 0..2"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidArgumentError) as caught:
            call()
        assert message in caught.value.details, caught.value.details
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Walk(pb.WalkRequest(model="plain", steps=3, end=pb.LatentPoint(seeded=pb.SeededLatent(seed=1))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start: give a seeded point or an explicit latent" in caught.value.details()


def test_guided_sampling_streams_the_same_samples_in_chunks(client):
    whole = client.sample(12, model="plain", seed=6, controls=Controls(keep_top=0.5))
    chunks = list(client.sample_stream(12, model="plain", seed=6, chunk_size=5, controls=Controls(keep_top=0.5)))
    assert [c.offset for c in chunks] == [0, 5, 10]
    np.testing.assert_array_equal(np.concatenate([c.images for c in chunks]), whole.images)
    np.testing.assert_array_equal(np.concatenate([c.candidate_indices for c in chunks]), whole.candidate_indices)


@settings(max_examples=300, deadline=None)
@given(model=st.sampled_from(["plain", "cond"]), count=st.integers(-1, 66),
       labels=st.lists(st.integers(-1, 3), max_size=3), truncation=st.none() | st.floats(width=32),
       min_score=st.none() | st.floats(width=32), keep_top=st.none() | st.floats(width=32))
def test_any_controls_give_a_valid_plan_or_invalid_argument(conditional_repo, model, count, labels, truncation,
                                                            min_score, keep_top):
    manifest = conditional_repo.manifest(model, 1)
    spec = SampleSpec(count, 3, None, tuple(labels), truncation, min_score, keep_top)
    try:
        plan = plans.plan(manifest, spec, plans.Limits(max_count=64))
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert 1 <= plan.count <= 64 and (min_score is None or keep_top is None)
    assert all(0 < v < 1 for v in (min_score, keep_top) if v is not None)
    if plan.stream is None:
        assert plan.latents.shape == (count, 8)
        assert truncation is None or np.abs(plan.latents).max() <= truncation
        assert (plan.labels is not None) == (model == "cond")


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(-1, 70), index=st.integers(-2, 70), seed=st.integers(0, 2**64 - 1),
       latent=st.none() | st.lists(st.floats(width=32), min_size=7, max_size=9),
       label=st.none() | st.integers(-1, 3), model=st.sampled_from(["plain", "cond"]))
def test_any_walk_gives_its_latents_or_invalid_argument(conditional_repo, steps, index, seed, latent, label, model):
    manifest = conditional_repo.manifest(model, 1)
    start = Endpoint(seed, index, label=label)
    end = Endpoint(latent=None if latent is None else np.array(latent, np.float32), label=label) \
        if latent is not None else Endpoint(seed + 1 if seed < 2**63 else 0, 0, label=label)
    try:
        z, labels = plans.walk_latents(manifest, plans.WalkSpec(start, end, steps), plans.Limits(max_count=64))
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert z.shape == (steps, 8) and np.all(np.isfinite(z)) and 2 <= steps <= 64
    assert (labels is not None) == (model == "cond")


# ---------------------------------------------------------------------------- CLI and jobs


def test_cli_walk_writes_an_animated_gif_and_a_strip(server, tmp_path, capsys):
    target = ["--target", f"127.0.0.1:{server.port}"]
    gif, strip = tmp_path / "walk.gif", tmp_path / "strip.png"
    common = ["walk", "--model", "plain", "--from-seed", "1", "--to-seed", "2", "--steps", "6"]
    assert client_cli.main([*target, *common, "--out", str(gif)]) == 0
    assert client_cli.main([*target, *common, "--out", str(strip)]) == 0
    assert "6 frames of plain v1, seed 1[0] -> seed 2[0] by slerp" in capsys.readouterr().out
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        frames = client.walk(1, 2, 6, model="plain").images
    distinct = [f for i, f in enumerate(frames) if i == 0 or not np.array_equal(f, frames[i - 1])]
    with Image.open(gif) as animation:  # GIF merges repeated frames into one longer frame
        assert animation.n_frames == len(distinct)
        animation.seek(len(distinct) - 1)
        last = np.asarray(animation.convert("L"))
    np.testing.assert_array_equal(last[::4, ::4], frames[-1][0])
    strip_pixels = images.decode_image(strip.read_bytes())  # enlarged 4x by default: every 4th pixel
    np.testing.assert_array_equal(strip_pixels[:, ::4, ::4], images.make_grid(frames, 6))
    assert client_cli.main([*target, *common, "--out", str(tmp_path / "walk.bmp")]) == 2
    assert "cannot write .bmp; pictures are .png, .jpg, .jpeg, .webp, .gif" in capsys.readouterr().err


def test_cli_and_sample_job_take_the_controls(server, tmp_path, capsys):
    target = ["--target", f"127.0.0.1:{server.port}"]
    assert client_cli.main([*target, "sample", "--model", "plain", "--count", "4", "--seed", "3", "--keep-top",
                            "0.5", "--out", str(tmp_path / "grid.png")]) == 0
    assert "(kept from 8 candidates)" in capsys.readouterr().out
    out = tmp_path / "job"
    assert client_cli.main([*target, "sample-job", "--model", "plain", "--count", "6", "--chunk", "3",
                            "--truncation", "0.5", "--seed", "40", "--out-dir", str(out), "--no-progress"]) == 0
    with InferenceClient(f"127.0.0.1:{server.port}") as client:
        expected = client.sample(3, model="plain", seed=41, encoding="png", controls=Controls(truncation=0.5))
    assert (out / "seed41_0002.png").read_bytes() == expected.png[2]
    assert '"truncation": 0.5' in (out / "job.json").read_text()
    assert client_cli.main([*target, "sample", "--count", "2", "--min-score", "2", "--model", "plain",
                            "--out", str(tmp_path / "x.png")]) == 2  # a usage error, refused by the server
    assert "min_score = 2.0 is out of range" in capsys.readouterr().err
    assert client_cli.main(["--target", "127.0.0.1:1", "--timeout", "5", "models"]) == 1  # no server: not usage



def test_truncated_and_guided_draws_run_off_the_event_loop(client, monkeypatch):
    """At t = 0.1 a latent row takes dozens of redraw rounds: on the server's event loop, one such
    request would stall every other call."""
    import asyncio

    on_loop = []
    take = LatentStream.take

    def recording(self, count):
        try:
            asyncio.get_running_loop()
            on_loop.append(count)
        except RuntimeError:
            pass  # a worker thread: no loop here
        return take(self, count)

    monkeypatch.setattr(LatentStream, "take", recording)
    client.sample(64, model="plain", seed=2, controls=Controls(truncation=0.1))
    client.sample(4, model="plain", seed=2, controls=Controls(keep_top=0.5))
    client.walk(1, 2, 4, model="plain", truncation=0.1)
    list(client.sample_stream(8, model="plain", seed=2, chunk_size=4, controls=Controls(truncation=0.1)))
    assert on_loop == []
