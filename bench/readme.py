"""The README's tables of benchmark figures, generated from bench/results/*.json.

A figure in the README must be the figure a benchmark recorded, with the CPU it ran on. The
tables between ``<!-- table: NAME -->`` and ``<!-- end table -->`` are written by this script
(``--write``); tests/test_readme.py fails when the README and the JSON disagree.

    .venv/bin/python bench/readme.py --write
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def preset_table(result_name: str) -> str:
    """One row per training seed of bench/preset_seeds.py: time and the kept best.pt's figures."""
    report = json.loads((RESULTS / f"{result_name}.json").read_text())
    rows = ["| seed | `dcgan-train` wall time | modes covered (best.pt) | high-quality share (best.pt) |",
            "| --- | --- | --- | --- |"]
    for run in report["runs"]:
        best = run["best"]
        rows.append(f"| {run['seed']} | {run['train_s']:.0f} s | {best['modes_covered']}/{best['modes']} | "
                    f"{best['high_quality']:.2%} |")
    protocol, extra = report["protocol"], " ".join(report["train_args"])
    given = f"; run with `{extra}`, settings the preset has taken since" if extra else ""
    rows.append(f"\n`bench/results/{result_name}.json` ({report['cpu']}, {report['date'][:10]}; figures of "
                f"{protocol['samples']} samples, latent seed {protocol['seed']}; median time "
                f"{report['median_train_s']:.0f} s{given})")
    return "\n".join(rows) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "preset-ring": lambda: preset_table("preset_ring_eval_10k"),
}


def render(text: str) -> str:
    """``text`` with every known table replaced by its generated body."""
    def body(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"README names table {name!r}; tables are {', '.join(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)
    return BLOCK.sub(body, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite README.md (else: print the difference)")
    args = parser.parse_args()
    text = README.read_text()
    rendered = render(text)
    if args.write:
        README.write_text(rendered)
    print("README tables up to date" if rendered == text else "README tables " +
          ("rewritten" if args.write else "differ: run with --write"))


if __name__ == "__main__":
    main()
