"""Shared fixtures: the MNIST directory beside the project, tiny configs, small runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return MNIST_DIR


def tiny_config(run_dir: Path, **sections) -> TrainConfig:
    """A 28x28 DCGAN small enough to take a few steps in well under a second."""
    values = {
        "data": {"dataset": "synthetic", "synthetic_samples": 64},
        "model": {"ngf": 4, "ndf": 4, "latent_size": 8},
        "optim": {"batch_size": 8},
        "run": {"run_dir": str(run_dir), "epochs": 2, "progress": False, "sample_count": 4,
                "checkpoint_every": 3},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    return load_config(overrides=[values])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-step run of a tiny 28x28 DCGAN (checkpoint with EMA)."""
    from training.gan_step import gan_run

    run_dir = tmp_path_factory.mktemp("tiny-run")
    gan_run(tiny_config(run_dir, run={"max_steps": 2})).train()
    return run_dir


@pytest.fixture(scope="session")
def tiny_toy_run(tmp_path_factory) -> Path:
    from training.gan_step import gan_run

    run_dir = tmp_path_factory.mktemp("tiny-toy-run")
    gan_run(tiny_config(run_dir, data={"dataset": "ring", "toy_epoch_samples": 64},
                        model={"toy_hidden": 16, "toy_layers": 2}, run={"max_steps": 2})).train()
    return run_dir


@pytest.fixture(scope="session")
def serving_repo(tmp_path_factory, tiny_run, tiny_toy_run) -> Path:
    """A repository with a tiny image model (default), a toy model and the committed MNIST model."""
    import json
    import shutil

    from dcgan_core.repository import Repository
    from training.export import export_run

    root = tmp_path_factory.mktemp("repository")
    repository = Repository(root)
    export_run(tiny_run, repository, "tiny")
    export_run(tiny_toy_run, repository, "toy")
    committed = ROOT / "exported" / "mnist-dcgan"
    if committed.is_dir():
        shutil.copytree(committed, root / "mnist-dcgan")
    (root / "repository.json").write_text(json.dumps({"default_model": "tiny"}))
    return root


@pytest.fixture(scope="session")
def conditional_repo(tmp_path_factory, tiny_run):
    """A repository with a tiny 3-class conditional model ``cond`` and the unconditional ``plain``."""
    from dcgan_core.repository import Repository
    from training.export import export_run
    from training.gan_step import gan_run

    run = tmp_path_factory.mktemp("cond-run")
    gan_run(tiny_config(run, model={"num_classes": 3}, run={"max_steps": 3})).train()
    repository = Repository(tmp_path_factory.mktemp("cond-repo"))
    export_run(run, repository, "cond")
    export_run(tiny_run, repository, "plain")
    return repository


@pytest.fixture(scope="session")
def encoder_repo(tmp_path_factory, tiny_run):
    """A repository with ``enc`` version 1 published from a tiny encoder run on ``tiny_run``:
    generator, discriminator and encoder.onnx (the anomaly scorer)."""
    from dcgan_core.repository import Repository
    from training.encoder import encoder_run
    from training.export import export_run

    run_dir = tmp_path_factory.mktemp("encoder-run")
    encoder_run(tiny_config(run_dir, encoder={"source": str(tiny_run), "nef": 4, "lr": 1e-3},
                            run={"eval_every": 1, "eval_samples": 100, "max_steps": 8})).train()
    repository = Repository(tmp_path_factory.mktemp("encoder-repo"))
    export_run(run_dir, repository, "enc")
    return repository


@pytest.fixture(scope="session")
def translation_repo(tmp_path_factory, mnist_dir, serving_repo) -> Path:
    """``sr4``: a tiny mnist-sr4 translation model (3 steps), beside the dcgan model ``tiny``."""
    import json
    import shutil

    from dcgan_core.repository import Repository
    from training import translation
    from training.export import export_run

    run_dir = tmp_path_factory.mktemp("sr4-run")
    translation.translation_run(tiny_config(run_dir, data={"dataset": "mnist-sr4", "path": str(mnist_dir)},
                                            model={"ngf": 4, "ndf": 4}, optim={"batch_size": 16},
                                            run={"max_steps": 3})).train()
    root = tmp_path_factory.mktemp("translation-repo")
    export_run(run_dir, Repository(root), "sr4")
    shutil.copytree(serving_repo / "tiny", root / "tiny")
    (root / "repository.json").write_text(json.dumps({"default_model": "tiny"}))
    return root


@pytest.fixture()
def client(server):
    """A client of the module's ``server`` fixture (each serving test module starts its own)."""
    from serving.client.library import InferenceClient

    with InferenceClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        yield client


def start_server(repository: Path, **settings):
    from serving.server.app import InferenceServer
    from serving.server.config import ServeConfig

    config = ServeConfig(**{"repository": str(repository), "host": "127.0.0.1", "port": 0, "http_port": 0,
                            "metrics_port": 0, **settings}).validate()
    return InferenceServer(config).start()


def wait_for(condition, timeout: float = 30.0, poll: float = 0.005) -> bool:
    """Whether ``condition()`` became true within ``timeout``: for state another thread or process
    changes where no event is exposed. Correctness never depends on the timing, only on the state."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


@pytest.fixture(scope="session")
def classifier_cache(mnist_dir, tmp_path_factory) -> Path:
    """The evaluation classifier, trained as dcgan-eval trains it, in this session's temporary
    folder: tests never write to the home directory's cache."""
    from training import classifier

    cache = tmp_path_factory.mktemp("classifier-cache")
    classifier.load_classifier(mnist_dir, cache, progress=False)
    return cache
