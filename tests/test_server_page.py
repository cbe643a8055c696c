"""The web page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): ask a question, watch the answer stream, find each token coloured by its source, the
stats line filled in, and the shown text equal to the model's greedy answer. A screenshot goes to
$RAGSPEC_SCREENSHOT_DIR (or the test's tmp dir).

The browser is required where CI runs (.ci/run installs it): there a missing browser fails the
test; elsewhere it is skipped with the reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import FLAT_CURVE
from server_fixtures import LiveServer

from ragspec import Engine
from ragspec.server import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SOURCES = {"context", "past", "recycling", "datastore", "model", "target"}
QUESTION = "Tell me a story about a red fox and a green frog."


def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        reason = f"{', '.join(missing)} not installed: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"the web page test needs a browser in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser(tmp_path):
    driver = _browser()
    yield driver
    driver.quit()


def test_page_streams_a_coloured_answer(browser, tiny_llama, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = Engine(tiny_llama, latency_curve=FLAT_CURVE, persist_state=False)
    want = Engine(tiny_llama, persist_state=False, prefix_cache=False).generate(
        [{"role": "user", "content": QUESTION}], max_new_tokens=60, speculative=False)
    engine.generate([{"role": "user", "content": QUESTION}], max_new_tokens=60)  # the past drafter learns it
    with LiveServer(create_app(engine)) as server:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "question").send_keys(QUESTION)
        max_tokens = browser.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("60")
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
        spans = browser.find_elements(By.CSS_SELECTOR, "#answer span.tok")
        sources = [span.get_attribute("data-source") for span in spans]
        answer = browser.execute_script("return document.getElementById('answer').textContent")
        stats = browser.find_element(By.ID, "stats").text
        error = browser.find_element(By.ID, "error").text
        colours = {s: browser.execute_script("return getComputedStyle(arguments[0]).backgroundColor", span)
                   for span, s in zip(spans, sources)}
        shot = Path(os.environ.get("RAGSPEC_SCREENSHOT_DIR", tmp_path)) / "page.png"
        browser.save_screenshot(str(shot))
    assert error == ""
    assert answer == want.text
    assert set(sources) <= SOURCES and "target" in sources
    drafted = [s for s in sources if s != "target"]
    assert drafted, "the second ask of the same question drafts from the past answer"
    assert colours[drafted[0]] != colours["target"]  # drafted tokens are coloured, the target's are not
    assert "tokens/s" in stats and "mean acceptance length" in stats
    assert shot.stat().st_size > 10_000
