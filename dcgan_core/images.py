"""The project's single image convention.

Models see NCHW float32 in [-1, 1] (the generator ends in tanh). Files and the wire carry
uint8 0..255 (or float32 in model range). Every conversion between the two lives here, so
training, export and serving cannot drift apart.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dcgan_core.atomic import atomic_write_bytes

#: Value range of model inputs and generator outputs.
VALUE_RANGE: tuple[float, float] = (-1.0, 1.0)
#: Decoded images larger than this many pixels are refused before decoding (decompression bombs).
MAX_DECODE_PIXELS = 4096 * 4096
#: Suffixes of the pictures the tools write, and their Pillow formats.
GRID_SCALE = 4  # pictures people look at: 28-pixel cells become 112 pixels
PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF"}
#: File suffixes read as images (training folders, score jobs): what Pillow decodes here.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def uint8_to_model(images: np.ndarray) -> np.ndarray:
    """Map uint8 0..255 to float32 [-1, 1]; shape is kept."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) * (2.0 / 255.0) - 1.0


def model_to_uint8(images: np.ndarray) -> np.ndarray:
    """Map model-range floats to uint8 with rounding; values outside [-1, 1] are clipped."""
    scaled = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_pil(image_chw: np.ndarray) -> Image.Image:
    """One uint8 CHW image (1 or 3 channels) as a PIL image."""
    if image_chw.ndim != 3 or image_chw.shape[0] not in (1, 3):
        raise ValueError(f"expected a CHW image with 1 or 3 channels, got shape {image_chw.shape}")
    if image_chw.shape[0] == 1:
        return Image.fromarray(image_chw[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0)), mode="RGB")


def encode_png(image_chw: np.ndarray) -> bytes:
    """One uint8 CHW image as PNG bytes."""
    buffer = io.BytesIO()
    to_pil(image_chw).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes, channels: int = 0, size: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 CHW with 1 or 3 channels (0: 1 for grayscale files, else 3).

    The header is checked before any pixel is decompressed: more than MAX_DECODE_PIXELS, or a
    size other than ``size`` x ``size`` (serving refuses to guess), raises ValueError with the
    reason, so a decompression bomb costs nothing.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_DECODE_PIXELS:
                raise ValueError(f"image of {img.width}x{img.height} pixels exceeds the decode limit")
            if size is not None and img.size != (size, size):
                raise ValueError(f"image is {img.width}x{img.height}, expected {size}x{size}")
            img.load()
            converted = to_8bit(img, channels)
    except UnidentifiedImageError:  # its message is the repr of our BytesIO: useless to the sender
        raise ValueError(f"cannot decode image: {len(data)} bytes in no image format Pillow reads "
                         f"(PNG, JPEG, ...)") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc
    return pil_to_chw(converted)


#: Pillow modes of 16-bit grayscale files (PNG opens as I;16, older Pillow as I).
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
GRAY_MODES = ("L", "1", "LA", "La", *WIDE_GRAY_MODES)


def to_8bit(img: Image.Image, channels: int = 0) -> Image.Image:
    """``img`` in mode L (``channels`` 1) or RGB (3); 0 keeps grayscale files grayscale.

    16-bit grayscale is scaled to 8 bits (65535 -> 255), never clipped: Pillow's own convert()
    clips it, so one picture would read differently as a 16-bit and an 8-bit file. Float
    images have no agreed range and are refused.
    """
    if img.mode == "F":
        raise ValueError("32-bit float images have no defined pixel range; save as 8- or 16-bit")
    if img.mode in WIDE_GRAY_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
    grayscale = channels == 1 or (channels == 0 and img.mode in GRAY_MODES)
    return img.convert("L" if grayscale else "RGB")


def pil_to_chw(img: Image.Image) -> np.ndarray:
    """A PIL image in mode L or RGB as uint8 CHW."""
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to ``size`` (the usual DCGAN preprocessing)."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    square = img.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC) if side != size else square


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile uint8 NCHW images into one CHW image, ``nrow`` per row (default: square-ish)."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), np.uint8)
    for i, image in enumerate(images):
        y = padding + (i // nrow) * (h + padding)
        x = padding + (i % nrow) * (w + padding)
        grid[:, y : y + h, x : x + w] = image
    return grid


def caption_rows(grid: np.ndarray, labels: list[str], cell: int, padding: int = 2) -> np.ndarray:
    """A ``make_grid`` grid with a white margin on its left holding each row's label (the classes
    of a conditional model's rows)."""
    from PIL import ImageDraw

    canvas = to_pil(grid)
    width = 8 + 7 * max(len(label) for label in labels)
    framed = Image.new(canvas.mode, (canvas.width + width, canvas.height), "white" if canvas.mode == "RGB" else 255)
    framed.paste(canvas, (width, 0))
    draw = ImageDraw.Draw(framed)
    for row, label in enumerate(labels):
        draw.text((4, padding + row * (cell + padding) + cell // 2 - 5), label, fill=0)
    return pil_to_chw(framed)


def save_png(image_chw: np.ndarray, path: str | Path) -> None:
    """Write one uint8 CHW image as PNG atomically (temporary file, then rename)."""
    atomic_write_bytes(Path(path), encode_png(image_chw))


def picture_format(path: str | Path) -> str:
    """The Pillow format a picture's suffix asks for; any other suffix is a ValueError naming them."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_FORMATS:
        raise ValueError(f"{path}: cannot write {suffix or 'a file without a suffix'}; pictures are "
                         f"{', '.join(PICTURE_FORMATS)}")
    return PICTURE_FORMATS[suffix]


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    """Nearest-neighbour enlargement: each pixel becomes a ``scale`` x ``scale`` block (a 28-pixel
    digit is too small to look at, and smoothing would invent detail the model did not make)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def resize_nearest(image_chw: np.ndarray, size: int) -> np.ndarray:
    """A uint8 CHW image at ``size`` x ``size``, nearest neighbour (a small source shown beside
    its translation, each source pixel a block)."""
    return pil_to_chw(to_pil(image_chw).resize((size, size), Image.Resampling.NEAREST))


def save_picture(image_chw: np.ndarray, path: str | Path, scale: int = 1) -> None:
    """Write one uint8 CHW image atomically, enlarged ``scale`` times, in the format of its suffix."""
    buffer = io.BytesIO()
    enlarge(to_pil(image_chw), scale).save(buffer, format=picture_format(path))
    atomic_write_bytes(Path(path), buffer.getvalue())


def encode_gif(frames: np.ndarray, duration_ms: int = 80, scale: int = 4) -> bytes:
    """uint8 NCHW frames as an animated GIF that loops, each frame enlarged ``scale`` times."""
    pictures = [enlarge(to_pil(frame), scale) for frame in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms,
                     loop=0)
    return buffer.getvalue()
