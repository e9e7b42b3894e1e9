"""The web playground in a real browser: Debian's Chromium, headless, driven by Playwright, against
a real server on the committed MNIST models and a tiny conditional model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, start_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root in a sandboxless machine with no network: what the project's probe used.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground-repo")
    for name, version in (("mnist-dcgan", "4"), ("mnist-cond", "3")):
        shutil.copytree(ROOT / "exported" / name / version, root / name / version)
    server = start_server(root, poll_s=0)
    yield server
    server.stop(grace=1)


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{server.http_port}/")
    page.wait_for_selector("#model option", state="attached")
    page.select_option("#model", "mnist-dcgan")
    page.wait_for_function("document.querySelector('#card').textContent.includes('unconditional')")
    yield page
    context.close()


def _digit_png(tmp_path: Path) -> Path:
    """A real MNIST-like PNG: the committed model's own sample 0 of seed 7 would do, but a drawn
    stroke keeps the test independent of the model."""
    canvas = np.zeros((28, 28), np.uint8)
    canvas[5:23, 12:16] = 255  # a "1"
    path = tmp_path / "one.png"
    Image.fromarray(canvas).save(path)
    return path


def test_the_page_lists_the_models_with_their_cards(page):
    options = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert sorted(options) == ["mnist-cond", "mnist-dcgan"]
    facts = dict(page.eval_on_selector_all("#card div", "divs => divs.map(d => [d.firstChild.textContent, "
                                                         "d.lastChild.textContent])"))
    assert facts["versions"] == "4 ready" and facts["fd"] == "2.093"  # the manifest's figures
    page.select_option("#model", "mnist-cond")
    page.wait_for_function("document.querySelector('#card').textContent.includes('0, 1, 2')")
    assert page.is_visible("#sample-label")


def test_a_sample_request_renders_the_grid_and_a_click_shows_seed_index_and_score(page):
    page.fill("#sample-seed", "5")
    page.fill("#sample-count", "16")
    page.click("#sample-go")
    page.wait_for_function("document.querySelectorAll('#grid img').length === 16 && "
                           "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.eval_on_selector("#grid img", "img => img.naturalWidth") == 112  # 28-pixel cells, enlarged 4x
    assert page.eval_on_selector("#grid img", "img => img.getBoundingClientRect().width") >= 84
    page.click("#grid .cell >> nth=3")
    facts = dict(page.eval_on_selector_all("#detail-facts div", "divs => divs.map(d => [d.firstChild.textContent, "
                                                                 "d.lastChild.textContent])"))
    assert facts["seed"] == "5" and facts["index"] == "3" and 0 < float(facts["P(real)"]) < 1
    assert page.get_attribute("#detail-download", "href").startswith("data:image/png;base64,")


def test_a_walk_plays_and_the_slider_moves_through_its_frames(page):
    page.click("#tab-walk")
    page.fill("#walk-steps", "8")
    page.click("#walk-go")
    page.wait_for_function("document.querySelector('#walk-slider').max === '7'")
    seen = page.evaluate("""() => new Promise(done => {
        const frames = new Set();
        const timer = setInterval(() => {
            frames.add(document.querySelector('#walk-slider').value);
            if (frames.size >= 3) { clearInterval(timer); done([...frames]); }
        }, 20);
    })""")
    assert len(seen) >= 3  # it plays
    page.click("#walk-play")  # pause, then step by hand
    page.fill("#walk-slider", "6")
    assert page.inner_text("#walk-position") == "7 / 8"


def test_an_uploaded_image_is_scored_with_its_reconstruction_and_a_walk_starts_from_it(page, tmp_path):
    png = _digit_png(tmp_path)
    page.click("#tab-score")
    page.set_input_files("#score-files", str(png))
    page.wait_for_selector("#scores tbody tr")
    cells = page.eval_on_selector_all("#scores tbody td", "cells => cells.map(c => c.textContent)")
    probability, anomaly, percentile = float(cells[2]), float(cells[3]), cells[4]
    assert 0 <= probability <= 1 and anomaly > 0 and percentile.endswith("%")
    assert page.eval_on_selector("#scores tbody td:nth-child(2) img", "img => img.naturalWidth") == 112
    page.click("#tab-walk")
    page.set_input_files("#walk-image", str(png))
    page.fill("#walk-steps", "4")
    page.click("#walk-go")
    page.wait_for_function("document.querySelector('#walk-slider').max === '3'")


def test_a_bad_value_shows_the_api_error_on_the_page(page):
    page.fill("#sample-count", "100000")
    page.click("#sample-go")
    page.wait_for_selector("#error:not([hidden])")
    assert "count" in page.inner_text("#error")
    page.fill("#sample-count", "4")
    page.click("#sample-go")
    page.wait_for_selector("#error", state="hidden")


def test_it_works_by_keyboard_and_at_a_phone_width(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{server.http_port}/")
    page.wait_for_selector("#model option", state="attached")
    page.focus("#tab-sample")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-walk" and page.is_visible("#walk-form")
    page.keyboard.press("ArrowLeft")
    page.focus("#sample-count")
    page.fill("#sample-count", "8")
    page.keyboard.press("Enter")  # submits the form
    page.wait_for_function("document.querySelectorAll('#grid img').length === 8")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    context.close()


def test_a_conditional_model_samples_the_chosen_class(page):
    page.select_option("#model", "mnist-cond")
    page.wait_for_function("document.querySelector('#card').textContent.includes('0, 1, 2')")
    page.select_option("#sample-label", "7")
    page.fill("#sample-seed", "3")
    page.fill("#sample-count", "4")
    page.click("#sample-go")
    page.wait_for_function("document.querySelectorAll('#grid img').length === 4")
    page.click("#grid .cell >> nth=2")
    facts = dict(page.eval_on_selector_all("#detail-facts div", "divs => divs.map(d => [d.firstChild.textContent, "
                                                                 "d.lastChild.textContent])"))
    assert facts["class"] == "7" and facts["index"] == "2"
