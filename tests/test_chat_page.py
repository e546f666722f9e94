"""The chat page at ``/`` in a real headless browser (Debian's Chromium driven through its chromedriver), against a
real server and the real default GGUF: the model list loads, a streamed answer appears, Stop aborts a long answer
and the server serves the next one. A screenshot is saved under reports/test-artifacts/.

Nothing downloads a browser: without /usr/bin/chromium and /usr/bin/chromedriver the test is skipped with the
command that installs them (`.ci/run` installs them before `make test`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import REPO, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "reports" / "test-artifacts"
MODEL = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="no headless browser: apt-get install -y chromium chromium-driver",
)


@pytest.fixture(scope="module")
def server(default_gguf: Any) -> Iterator[str]:
    # one slot: if Stop did not free it, the next request would wait for the aborted 2000-token answer
    with running_server("--set", "models.0.n_ctx=2048", "--set", "slots=1", "--no-reranker", "--no-embedder") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="edgellm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1200,800", f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assistant_messages(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error"))


def send(driver: Any, text: str, max_tokens: int) -> Any:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "max_tokens")
    box.clear()
    box.send_keys(str(max_tokens))
    n_before = len(assistant_messages(driver))
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    return wait_for(lambda: assistant_messages(driver)[n_before:], 10, "the answer bubble")[0]


def test_page_streams_an_answer_and_stop_frees_the_model(server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/")
    select = wait_for(lambda: Select(browser.find_element(By.ID, "model")).options, 30, "the model list")
    assert [o.get_attribute("value") for o in select] == [MODEL]
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "system").send_keys("You are a concise assistant.")

    # A short answer streams in and finishes, with its timings under it.
    answer = send(browser, "What is the capital of France?", 40)
    wait_for(lambda: answer.get_attribute("data-state") in ("done", "error"), 60, "the answer to finish")
    assert answer.get_attribute("data-state") == "done", answer.text
    assert "Paris" in answer.text
    meta = browser.find_elements(By.CSS_SELECTOR, ".meta")[-1].text
    assert "TTFT" in meta and "tok/s" in meta, meta

    # A long answer: text appears while it streams (seen growing), then Stop aborts it.
    long = send(browser, "Write a very long story about a lighthouse keeper and his cat.", 2000)
    first = wait_for(lambda: long.text.strip(), 30, "the first streamed text")
    wait_for(lambda: len(long.text) > len(first) + 20, 30, "more streamed text")
    assert long.get_attribute("data-state") == "streaming"
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: long.get_attribute("data-state") == "stopped", 10, "the stopped state")
    stopped_at = len(long.text)
    time.sleep(0.5)
    assert len(long.text) == stopped_at, "text kept arriving after Stop"

    # The aborted request freed its slot: the server answers the next request at once, not after 2000 tokens.
    t0 = time.monotonic()
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200 and time.monotonic() - t0 < 10

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
