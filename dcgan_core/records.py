"""Append-only record files (JSON Lines, and CSV for job results): one policy for torn lines.

Records are appended as whole lines, so a process killed mid-write leaves at most one torn line:
the last one, without its newline. Readers drop it (``complete_text``, ``read_jsonl``); an
appender cuts it off first (``cut_torn_tail``), so the next record starts on a line of its own;
a rewrite (``rewrite_jsonl``) is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcgan_core.atomic import atomic_write_bytes


def _read(path: Path) -> tuple[bytes, int]:
    """The file's complete lines and its whole size in bytes (b"", 0 when it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b"", 0
    return data[: data.rfind(b"\n") + 1], len(data)


def complete_text(path: Path) -> str:
    """The file's complete lines ("" when it does not exist); a torn last line is left out."""
    return _read(path)[0].decode("utf-8")


def cut_torn_tail(path: Path) -> str:
    """Truncate a torn last line away before appending; returns the complete lines."""
    complete, size = _read(path)
    if len(complete) != size:
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    return complete.decode("utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in complete_text(path).splitlines() if line]


def jsonl_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def rewrite_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(jsonl_line(r) for r in records).encode("utf-8"))
