"""The web playground in a real browser (Debian's Chromium, headless, Playwright): the time from a
click on "Sample" to a rendered grid of 64 (every image decoded), and the README's screenshots.

    .venv/bin/python bench/playground.py --repository exported --repeats 7

Each repeat asks for a new seed (no cache helps); the page's own timer (performance.now around the
request and the decoding of every image) and the wall clock seen from the test driver are both
recorded; medians in bench/results/playground.json, screenshots beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, cpu_model, median, save  # noqa: E402
from serving.server.app import InferenceServer  # noqa: E402
from serving.server.config import ServeConfig  # noqa: E402
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

GRID_DONE = ("n => document.querySelectorAll('#grid img').length === n && "
             "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0) && "
             "document.querySelector('#grid').dataset.renderMs !== undefined")


def click_to_grid(page, seed: int, count: int = 64) -> tuple[float, float]:
    """(wall ms seen by the driver, ms the page measured) from the click to every image decoded."""
    page.evaluate("delete document.querySelector('#grid').dataset.renderMs")
    page.fill("#sample-seed", str(seed))
    page.fill("#sample-count", str(count))
    start = time.perf_counter()
    page.click("#sample-go")
    page.wait_for_function(GRID_DONE, arg=count)
    wall = 1000 * (time.perf_counter() - start)
    return wall, float(page.get_attribute("#grid", "data-render-ms"))


def screenshots(browser, url: str, digit: Path) -> list[str]:
    """Desktop (1280x800): a grid with one sample's details, a walk, scores; and a phone's width."""
    saved = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#model option", state="attached")
    click_to_grid(page, 7, 64)
    page.click("#grid .cell >> nth=5")
    for name, prepare in (("sample", None), ("walk", _walk), ("score", lambda p: _score(p, digit))):
        if prepare:
            prepare(page)
        path = RESULTS / f"playground_{name}.png"
        page.screenshot(path=str(path), full_page=False)
        saved.append(path.name)
    context.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page = phone.new_page()
    page.goto(url)
    page.wait_for_selector("#model option", state="attached")
    click_to_grid(page, 7, 16)
    path = RESULTS / "playground_phone.png"
    page.screenshot(path=str(path), full_page=False)
    saved.append(path.name)
    phone.close()
    return saved


def _walk(page) -> None:
    page.click("#tab-walk")
    page.fill("#walk-from", "1")
    page.fill("#walk-to", "2")
    page.click("#walk-go")
    page.wait_for_function("document.querySelector('#walk-slider').max === '23'")
    page.click("#walk-play")
    page.fill("#walk-slider", "12")


def _score(page, digit: Path) -> None:
    page.click("#tab-score")
    page.set_input_files("#score-files", str(digit))
    page.wait_for_selector("#scores tbody tr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", default="exported")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    config = ServeConfig(repository=args.repository, host="127.0.0.1", port=0, http_port=0, metrics_port=-1,
                         poll_s=0).validate()
    server = InferenceServer(config).start()
    digit = RESULTS / "playground_input_digit.png"
    Image.fromarray(_a_digit()).save(digit)
    try:
        url = f"http://127.0.0.1:{server.http_port}/"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector("#model option", state="attached")
            click_to_grid(page, 0)  # warm: the first request also loads nothing more, but JIT and caches
            runs = [click_to_grid(page, seed) for seed in range(1, args.repeats + 1)]
            shots = screenshots(browser, url, digit)
            version = browser.version
            browser.close()
    finally:
        server.stop(grace=1)
    walls, pages = [w for w, _ in runs], [p for _, p in runs]
    report = {"cpu": cpu_model(), "chromium": version, "count": 64, "repeats": args.repeats,
              "click_to_grid_ms": {"median": median(walls), "runs": walls},
              "page_measured_ms": {"median": median(pages), "runs": pages}, "screenshots": shots}
    print(f"click to a rendered grid of 64: median {median(walls):.0f} ms (page's own timer {median(pages):.0f} ms)")
    save("playground", report)


def _a_digit() -> np.ndarray:
    """A handwritten-looking 7 (strokes drawn here: no data set needed to run the benchmark)."""
    canvas = np.zeros((28, 28), np.uint8)
    canvas[6:9, 7:21] = 255
    for row in range(9, 23):
        column = 20 - (row - 9) // 2
        canvas[row, column - 2:column + 1] = 255
    return canvas


if __name__ == "__main__":
    main()
