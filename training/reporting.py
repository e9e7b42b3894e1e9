"""What people look at: sample grids, toy scatter plots, loss/accuracy curves (PNG), metrics log."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dcgan_core import images, records  # noqa: E402
from dcgan_core.atomic import atomic_write_bytes  # noqa: E402


class MetricsLog:
    """Append-only JSONL of per-step metrics; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._handle = path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if self.path.exists():
            records.rewrite_jsonl(self.path, [r for r in records.read_jsonl(self.path) if r["step"] <= step])

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(records.jsonl_line(record))

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def record_evaluation(path: Path, record: dict[str, Any]) -> None:
    """Add one evaluation to ``eval.jsonl``, replacing records of the same or later epochs (left by
    a run that crashed after evaluating and is now redoing that epoch). Written atomically."""
    kept = [r for r in records.read_jsonl(path) if r["epoch"] < record["epoch"]]
    records.rewrite_jsonl(path, [*kept, record])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return records.read_jsonl(path)


def _save_figure(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


#: What the curves show, top panel then bottom, of whichever a step logs (a GAN, an encoder).
LOSS_KEYS, OUTPUT_KEYS = ("loss_d", "loss_g", "loss_e", "pixel"), ("d_real", "d_fake", "d_acc", "l1")


def save_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Losses (top) and D's outputs/accuracy (bottom) against step, lightly smoothed."""
    if not records:
        return
    steps = np.array([r["step"] for r in records])
    window = max(1, len(records) // 200)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, axis in [(k, top) for k in LOSS_KEYS] + [(k, bottom) for k in OUTPUT_KEYS]:
        if key not in records[0]:
            continue
        values = _smooth(np.array([r[key] for r in records], dtype=float), window)
        axis.plot(steps[len(steps) - len(values):], values, label=key, linewidth=1)
    bottom.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("loss")
    bottom.set_ylabel("D output / accuracy / L1")
    bottom.set_xlabel("discriminator step")
    for axis in (top, bottom):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper right")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def save_image_grid(samples: np.ndarray, path: Path, nrow: int | None = None,
                    row_labels: list[str] | None = None) -> None:
    """Model-range NCHW samples as one PNG grid, ``nrow`` per row; with ``row_labels`` each row is
    captioned on its left (a conditional model's classes)."""
    grid = images.make_grid(images.model_to_uint8(samples), nrow)
    if row_labels:
        grid = images.caption_rows(grid, row_labels, samples.shape[2])
    images.save_png(grid, path)


def save_toy_scatter(samples: np.ndarray, modes: np.ndarray, path: Path, title: str = "") -> None:
    """Generated 2-D points over the mixture's mode centres."""
    fig, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4, label="generated")
    axis.scatter(modes[:, 0], modes[:, 1], s=30, c="red", marker="x", label="modes")
    limit = float(np.abs(modes).max()) * 1.5
    axis.set_xlim(-limit, limit)
    axis.set_ylim(-limit, limit)
    axis.set_aspect("equal")
    axis.set_title(title)
    axis.legend(loc="upper right")
    _save_figure(fig, path)
