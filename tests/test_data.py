import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_core import images
from training import data
from training.data import DataError


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_roundtrip():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(data.parse_idx(_idx(array), "x"), array)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
    (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "unsupported IDX type"),
    (b"\x00\x00\x08\x02" + (3).to_bytes(4, "big"), "truncated IDX header"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", r"header says \(5,\)"),
])
def test_parse_idx_rejects_inconsistent_files(raw, message):
    with pytest.raises(DataError, match=message):
        data.parse_idx(raw, "file.idx")


def test_load_mnist_test_split(mnist_dir):
    pixels, labels = data.load_mnist(mnist_dir, "test")
    assert pixels.shape == (10000, 1, 28, 28) and pixels.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def _copy_mnist(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


def test_missing_mnist_file_is_named(mnist_dir, tmp_path):
    copy = _copy_mnist(mnist_dir, tmp_path / "mnist")
    (copy / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is missing"):
        data.load_mnist(copy, "test")


def test_corrupt_mnist_file_fails_checksum_list(mnist_dir, tmp_path):
    copy = _copy_mnist(mnist_dir, tmp_path / "mnist")
    target = copy / "t10k-images-idx3-ubyte.gz"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: sha256 does not match"):
        data.load_mnist(copy, "test")


def test_content_is_verified_without_checksum_list(mnist_dir, tmp_path):
    """A re-compressed file with altered content is caught by the content hash alone."""
    copy = _copy_mnist(mnist_dir, tmp_path / "mnist")
    (copy / "SHA256SUMS").unlink()
    target = copy / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="content sha256 is not the standard MNIST"):
        data.load_mnist(copy, "test")


def test_image_folder_skips_broken_files(tmp_path, caplog):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 50), (255, 0, 0)).save(folder / "wide.png")
    Image.new("L", (30, 40), 128).save(folder / "sub" / "tall.jpg")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("ignored")
    loaded = data.load_image_folder(folder, 32, 3, progress=False)
    assert loaded.shape == (2, 3, 32, 32) and loaded.dtype == np.uint8
    assert "broken.png" in caplog.text
    red = loaded[[i for i in range(2) if loaded[i, 0].mean() > 200][0]]
    assert red[1].max() < 10 and red[2].max() < 10


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable images"):
        data.load_image_folder(tmp_path, 28, 1, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope", 28, 1, progress=False)


@pytest.mark.parametrize("name, modes, radius, sigma", [("ring", 8, 1.0, 0.01), ("grid", 25, None, 0.05)])
def test_toy_mixtures(name, modes, radius, sigma):
    mixture = data.toy_mixture(name)
    assert mixture.means.shape == (modes, 2) and mixture.sigma == sigma
    if radius:
        np.testing.assert_allclose(np.linalg.norm(mixture.means, axis=1), radius)
    else:
        assert set(mixture.means[:, 0]) == {-4, -2, 0, 2, 4}
    points = mixture.sample(20000, torch.Generator().manual_seed(0)).numpy()
    distances = np.linalg.norm(points[:, None] - mixture.means[None], axis=2)
    nearest = distances.argmin(1)
    assert np.bincount(nearest, minlength=modes).min() > 20000 / modes * 0.8
    assert np.percentile(distances.min(1), 99) < 4 * sigma


def test_batches_are_a_function_of_seed_epoch_index():
    source = torch.arange(100, dtype=torch.float32)[:, None]
    a, b = data.ImageBatches(source, 10, seed=1), data.ImageBatches(source, 10, seed=1)
    assert torch.equal(a.batch(2, 3), b.batch(2, 3))
    assert not torch.equal(a.batch(0, 0), a.batch(1, 0))
    epoch = torch.cat([a.batch(0, i) for i in range(a.steps_per_epoch)])
    assert sorted(epoch[:, 0].tolist()) == list(range(100))


def test_image_convention_roundtrip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    model = images.uint8_to_model(pixels)
    assert model.min() == -1.0 and model.max() == 1.0
    np.testing.assert_array_equal(images.model_to_uint8(model), pixels)


def test_a_held_out_digit_is_left_out_of_training(mnist_dir):
    """data.hold_out removes the digits from the training images (and --set parses a list)."""
    from training.config import ConfigError, load_config, parse_override

    config = load_config("mnist", overrides=[parse_override(f"data.path={mnist_dir}"),
                                             parse_override("data.hold_out=3,8")])
    assert config.data.hold_out == [3, 8]
    batches = data.build_batches(config)
    _, labels = data.load_mnist(mnist_dir, "train")
    kept = images.uint8_to_model(data.load_mnist(mnist_dir, "train")[0][~np.isin(labels, [3, 8])])
    assert len(batches.data) == len(kept) < len(labels)
    assert torch.equal(batches.data, torch.from_numpy(kept))
    for bad in ("data.hold_out=10", "data.hold_out=[0,1,2,3,4,5,6,7,8,9]", "data.hold_out=x"):
        with pytest.raises(ConfigError, match="data.hold_out"):
            load_config("mnist", overrides=[parse_override(bad)])
    with pytest.raises(ConfigError, match="data.hold_out"):
        load_config("mnist-cond", overrides=[parse_override("data.hold_out=3")])
