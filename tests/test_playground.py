"""The playground page in a real headless Chromium (Selenium, Debian's chromium + chromedriver) against
the real server on the demo model: streaming, reasoning apart from the answer, a tool call and its
second turn, usage and cost, the curl of the request, the token prompt, and an error shown."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1280,900")
# Every text the answer element shows, recorded as it changes: proof that tokens arrive one by one.
RECORD_SNAPSHOTS = """
window.__answers = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant .answer');
  if (answers.length) window.__answers.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="ossrun-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def texts(driver, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_page_is_served_without_a_token(demo_server):
    page = httpx.get(demo_server.base + "/", timeout=10)
    assert page.status_code == 200 and "ossrun" in page.text and page.headers["content-type"].startswith("text/html")
    assert httpx.get(demo_server.base + "/playground/playground.js", timeout=10).status_code == 200
    assert httpx.get(demo_server.base + "/playground/app.py", timeout=10).status_code == 404


def test_chat_in_a_real_browser(browser, demo_server, tmp_path):
    """One session through the page; a screenshot of where it got to is saved whatever happens."""
    try:
        chat_session(browser, demo_server)
    finally:
        browser.save_screenshot(str(Path(os.environ.get("OSSRUN_SCREENSHOT", tmp_path / "playground.png"))))


def chat_session(driver, demo_server) -> None:
    from selenium.webdriver.common.by import By

    driver.get(demo_server.base + "/")
    driver.execute_script(RECORD_SNAPSHOTS)

    # The server has --api-token: the first request is refused and the page asks for the token.
    send(driver, "What is the capital of France?")
    wait(driver, lambda d: d.find_element(By.ID, "token-dialog").is_displayed())
    driver.find_element(By.ID, "token-input").send_keys(demo_server.token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button").click()

    # Streamed: the answer grows token by token; reasoning is shown apart, folded once the answer is done.
    wait(driver, lambda d: texts(d, ".msg.assistant .usage") and texts(d, ".msg.assistant .usage")[-1])
    assert texts(driver, ".msg.assistant .answer")[-1] == "The capital of France is Paris."
    assert "France" in texts(driver, ".msg.assistant .reasoning .text")[-1]
    assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant details.reasoning").get_attribute("open") is None
    partial = set(driver.execute_script("return window.__answers"))
    assert len(partial) > 3, partial
    usage = texts(driver, ".msg.assistant .usage")[-1]
    assert "completion tokens" in usage and "$" in usage and "neurons" in usage
    curl = driver.find_element(By.ID, "curl").text
    assert "/v1/chat/completions" in curl and "What is the capital of France?" in curl and "Bearer" in curl

    # A tool call rendered with its arguments, then the second turn with its result.
    driver.find_element(By.ID, "tools").click()
    send(driver, "What is the weather in Tokyo?")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".tool-call form"))
    assert texts(driver, ".tool-call .name")[-1] == "get_weather"
    assert '"city": "Tokyo"' in texts(driver, ".tool-call .args")[-1]
    driver.find_element(By.CSS_SELECTOR, ".tool-call form button").click()
    wait(driver, lambda d: len(texts(d, ".msg.assistant .usage")) == 3 and texts(d, ".msg.assistant .usage")[-1])
    assert texts(driver, ".msg.assistant .answer")[-1] == "It is 21°C and cloudy in Tokyo."

    # The Workers AI route, not streamed, and an error from the server shown to the user.
    driver.find_element(By.ID, "clear").click()
    driver.find_element(By.CSS_SELECTOR, "#route option[value=workers]").click()
    driver.find_element(By.ID, "stream").click()
    send(driver, "Hello")
    wait(driver, lambda d: texts(d, ".msg.assistant .usage") and texts(d, ".msg.assistant .usage")[-1])
    assert texts(driver, ".msg.assistant .answer")[-1].startswith("Hello!")
    assert "/ai/run/" in driver.find_element(By.ID, "curl").text
    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("0")
    send(driver, "Hello again")
    wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "max_tokens" in driver.find_element(By.ID, "error").text
