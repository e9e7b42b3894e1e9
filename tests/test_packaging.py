"""The package as users install it: every imported package declared, and the wheel's [serve] and
[client] extras working in fresh virtual environments, outside the repository."""

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from serving.processes import Ports
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OWN = {"dcgan", "dcgan_core", "serving", "training", "tests", "bench"}
#: The role each extra serves: the modules it must be able to import, with what they import.
ROLES = {"client": ["serving.client.cli", "serving.client.jobs", "dcgan_core.repository_cli"],
         "serve": ["serving.server.app", "serving.client.healthcheck"],
         "train": ["training.cli", "training.export_cli", "training.evaluate", "training.gan_step"],
         "cluster": ["serving.cluster"]}


def _requirement_name(text: str) -> str:
    return re.split(r"[<>=!\[; ]", text, maxsplit=1)[0].lower().replace("_", "-")


def _declared(extra: str) -> set[str]:
    """Distributions of the base dependencies plus ``extra``'s, following dcgan[...] references."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    names, todo = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}, [extra]
    while todo:
        for requirement in optional[todo.pop()]:
            if requirement.startswith("dcgan["):
                todo += requirement[6:-1].split(",")
            else:
                names.add(_requirement_name(requirement))
    return names


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    base = ROOT / "protos" if parts[0] == "dcgan" else ROOT
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def _guards_missing_modules(node: ast.Try) -> bool:
    names = {getattr(h.type, "id", None) for h in node.handlers}
    return bool(names & {"ModuleNotFoundError", "ImportError"})


def _imports_of(modules: list[str]) -> set[str]:
    """Top-level third-party modules imported anywhere in ``modules`` and the own modules they reach."""
    seen, todo, found = set(), list(modules), set()
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        tree = ast.parse(path.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _guards_missing_modules(t)
                    for stmt in t.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:  # `try: import x / except ModuleNotFoundError:` names the extra it needs
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.partition(".")[0]
                if top in OWN:
                    todo += [name, *(f"{name}.{a.name}" for a in getattr(node, "names", []))]
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)
    return found


@pytest.mark.parametrize("extra", ROLES)
def test_every_package_a_role_imports_is_declared_by_its_extra(extra):
    distributions = importlib.metadata.packages_distributions()
    modules = _imports_of(ROLES[extra])
    missing = {m: distributions.get(m, [m]) for m in modules
               if not {d.lower().replace("_", "-") for d in distributions.get(m, [m])} & _declared(extra)}
    assert not missing, f"[{extra}] imports packages its extra does not declare: {missing}"


def test_the_serve_and_client_extras_need_no_torch():
    for extra in ("serve", "client", "cluster"):
        assert "torch" not in _declared(extra) and "onnxruntime" not in _declared(extra)
    assert "onnxruntime-gpu" not in _declared("client")


def test_a_missing_extra_is_named_not_a_traceback(monkeypatch, capsys):
    from dcgan_core import commands

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if [serve] were not installed
    monkeypatch.delitem(sys.modules, "serving.server.app", raising=False)
    monkeypatch.delitem(sys.modules, "serving.server.runtime", raising=False)
    assert commands.serve() == 2
    assert "dcgan-serve: needs the 'serve' extra (onnxruntime is not installed): pip install 'dcgan[serve]'" in \
        capsys.readouterr().err


def _source_tree(target: Path) -> Path:
    """What a fresh clone holds: the tracked sources, no generated gRPC code, no venv."""
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "*_pb2*.py*",
                                    "exported", "bench", "tests", "runs", ".pytest_cache")
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def _venv(path: Path, wheel: Path, extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "requirements-serve.txt"),
                    f"{wheel}[{extra}]"], check=True, stdout=subprocess.DEVNULL)
    return path / "bin"


def _importable(bin_dir: Path, module: str) -> bool:
    return subprocess.run([str(bin_dir / "python"), "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_the_wheel_serves_and_samples_from_fresh_venvs_outside_the_repository(tmp_path):
    source = _source_tree(tmp_path / "clone")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("dcgan-*.whl"))
    serve, client = _venv(tmp_path / "serve", wheel, "serve"), _venv(tmp_path / "client", wheel, "client")
    assert not _importable(serve, "torch") and not _importable(client, "onnxruntime")
    assert not _importable(client, "torch")
    work = tmp_path / "elsewhere"
    shutil.copytree(ROOT / "exported" / "mnist-dcgan" / "3", work / "models" / "mnist-dcgan" / "3")
    server = subprocess.Popen([str(serve / "dcgan-serve"), "--repository", "models", "--host", "127.0.0.1",
                               "--port", "0", "--metrics-port", "-1", "--http-port", "0"], cwd=work,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        ports = Ports.parse(line := server.stdout.readline())
        assert ports is not None, line + server.stderr.read()
        port = ports.grpc
        done = subprocess.run([str(client / "dcgan-client"), "--target", f"127.0.0.1:{port}", "sample",
                               "--count", "16", "--seed", "3", "--out", "grid.png"], cwd=work,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/", timeout=30) as page:  # package data
            assert b"dcgan playground" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/playground/playground.js", timeout=30) as page:
            assert page.status == 200
    finally:
        server.terminate()
        server.wait(30)
    with Image.open(work / "grid.png") as grid:
        assert grid.size[0] >= 4 * 28 and grid.size[1] >= 4 * 28
