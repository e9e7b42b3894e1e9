"""The .proto is the API: `buf lint` (STANDARD rules) is clean and `buf breaking` finds no change
against the accepted API (protos/api-image.json; `make api-accept` records a deliberate change)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[1] / "protos"


def _buf() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed (requirements.txt pins buf-bin)")
    return found


def _run(*args: str, cwd: Path = PROTOS) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean():
    done = _run("lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_breaking_change_against_the_accepted_api():
    done = _run("breaking", "--against", "api-image.json")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_breaking_check_catches_a_removed_field(tmp_path):
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    proto = copy / "dcgan" / "v1" / "inference.proto"
    text = proto.read_text()
    assert "  bool include_scores = 7;\n" in text
    proto.write_text(text.replace("  bool include_scores = 7;\n", ""))
    done = _run("breaking", "--against", "api-image.json", cwd=copy)
    assert done.returncode != 0 and "include_scores" in done.stdout
