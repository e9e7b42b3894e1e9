"""The README states only figures that benchmark JSON recorded: its tables are generated from it."""

from bench import readme


def test_the_readme_tables_are_the_benchmarks_figures():
    text = readme.README.read_text()
    names = [match["name"] for match in readme.BLOCK.finditer(text)]
    assert set(names) == set(readme.TABLES), "every generated table is in the README, once"
    assert readme.render(text) == text, "README tables differ from bench/results: run bench/readme.py --write"


def test_the_readme_python_client_example_runs_as_written(serving_repo, tmp_path, monkeypatch, capsys):
    import re

    from PIL import Image

    from tests.conftest import start_server

    text = readme.README.read_text()
    [code] = re.findall(r"<!-- example: python-client -->\n```python\n(.*?)```", text, re.S)
    server = start_server(serving_repo, poll_s=0)
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code.replace("localhost:50051", f"127.0.0.1:{server.port}"), "README.md", "exec"), {})
    finally:
        server.stop(grace=1)
    assert capsys.readouterr().out.startswith("tiny 1 [")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * (2 + 4 * 30), 4 * (2 + 4 * 30))


def test_the_committed_models_figures_are_their_manifests():
    """Every committed version has a row in the README's committed-models table, and each figure
    there is its manifest's, as rounded there."""
    import json
    import re

    rows = re.findall(r"^\| `([\w-]+)/(\d+)`[^|]*\|[^|]*\| ([^|]*) \|", readme.README.read_text(), re.M)
    committed = {(m.parent.parent.name, m.parent.name) for m in (readme.ROOT / "exported").glob("*/*/manifest.json")}
    assert {(name, version) for name, version, _ in rows} == committed
    for name, version, cell in rows:
        metrics = json.loads((readme.ROOT / "exported" / name / version / "manifest.json").read_text())["metrics"]
        stated = {key: value for key, value in re.findall(r"\b(FD|IS) (\d+\.\d+)", cell)}
        stated |= {f"{key} share": value for key, value in re.findall(r"(consistency) (\d+\.\d+)%", cell)}
        stated |= {f"{key} share": value for value, key in re.findall(r"(\d+\.\d+)% (high-quality)", cell)}
        expected = {"FD": metrics.get("fd"), "IS": metrics.get("is"), "consistency share": metrics.get("consistency"),
                    "high-quality share": metrics.get("high_quality")}
        assert stated, f"{name}/{version}: no figures found in {cell!r}"
        for key, text in stated.items():
            decimals = len(text.partition(".")[2])
            value = round(expected[key] * 100, decimals) if key.endswith("share") else round(expected[key], decimals)
            assert value == float(text), (name, version, key, text, expected[key])
