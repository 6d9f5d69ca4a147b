"""The playground page in a real headless Chromium (Selenium, Debian's chromium + chromedriver) against
the real server on the demo model: streaming, reasoning apart from the answer, a tool call and its
second turn, usage and cost, the curl of the request, the token prompt, and an error shown; then what
the screen and the history sent back must agree on: New chat, Stop, max tokens, errors, old tool calls.

The demo model answers in a fraction of a second, so the tests that act while a reply is in flight
slow the page's view of the real server's stream down (a `fetch` wrapper that passes one SSE event at
a time, after a delay); the same wrapper records every request body and its AbortSignal."""

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
    assert "21°C and cloudy in Tokyo." in texts(driver, ".msg.assistant .answer")[-1]  # the tool's result, in the demo's words

    # The Workers AI route, not streamed, and an error from the server shown to the user.
    driver.find_element(By.ID, "clear").click()
    driver.find_element(By.CSS_SELECTOR, "#route option[value=workers]").click()
    driver.find_element(By.ID, "stream").click()
    send(driver, "Hello")
    wait(driver, lambda d: texts(d, ".msg.assistant .usage") and texts(d, ".msg.assistant .usage")[-1])
    assert texts(driver, ".msg.assistant .answer")[-1].startswith("Hello!")
    assert "/ai/run/" in driver.find_element(By.ID, "curl").text
    set_max_tokens(driver, "0")
    send(driver, "Hello again")
    wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "Max tokens" in driver.find_element(By.ID, "error").text


# -- the conversation the page keeps, against what it shows ------------------------------------------

# Wraps the page's fetch: records each request (body as sent, signal); `__delay` ms before each SSE
# event of a stream (before a sync answer is handed over); `__rewrite(body)` changes what is sent;
# `__errorAfter` events in, the stream ends with an error frame, as a server shutting down sends.
WRAP_FETCH = """
window.__requests = []; window.__delay = 0; window.__rewrite = null; window.__errorAfter = 0;
const realFetch = window.fetch;
const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); reject(new DOMException('aborted', 'AbortError')); });
});
window.fetch = async (url, options) => {
  let body = JSON.parse(options.body);
  if (window.__rewrite) { body = window.__rewrite(body); options = {...options, body: JSON.stringify(body)}; }
  window.__requests.push({url, body, signal: options.signal || null});
  const response = await realFetch(url, options);
  const delay = window.__delay, errorAfter = window.__errorAfter;
  if (!response.ok || !(delay || errorAfter)) return response;
  if (!body.stream) { await sleep(delay, options.signal); return response; }
  const reader = response.body.getReader(), encoder = new TextEncoder(), decoder = new TextDecoder();
  let buffer = '', passed = 0;
  return new Response(new ReadableStream({
    async pull(controller) {
      for (;;) {
        const cut = buffer.indexOf('\\n\\n');
        if (cut >= 0) {
          const event = buffer.slice(0, cut + 2);
          buffer = buffer.slice(cut + 2);
          if (delay) await sleep(delay, options.signal);
          if (errorAfter && passed === errorAfter) {
            controller.enqueue(encoder.encode('data: {"error": {"message": "The server is shutting down", "code": 3050}}\\n\\ndata: [DONE]\\n\\n'));
            controller.close();
            reader.cancel();
            return;
          }
          passed++;
          controller.enqueue(encoder.encode(event));
          return;
        }
        const {value, done} = await reader.read();
        if (done) { controller.close(); return; }
        buffer += decoder.decode(value, {stream: true});
      }
    },
    cancel(reason) { reader.cancel(reason); },
  }), {status: response.status, headers: response.headers});
};
"""


def open_page(driver, server, *, stream: bool = True, route: str = "openai", tools: bool = False, max_tokens: str = "256"):
    """A fresh page with the token, temperature 0 and the given settings, its fetch wrapped."""
    driver.get(server.base + "/")
    driver.execute_script(WRAP_FETCH)
    driver.execute_script("""
      const [token, stream, route, tools, maxTokens] = arguments;
      document.getElementById('token').value = token;
      document.getElementById('temperature').value = '0';
      document.getElementById('stream').checked = stream;
      document.getElementById('route').value = route;
      document.getElementById('tools').checked = tools;
      document.getElementById('max-tokens').value = maxTokens;""", server.token, stream, route, tools, max_tokens)


def requests(driver) -> list[dict]:
    return driver.execute_script("return window.__requests.map((r) => ({url: r.url, body: r.body, aborted: !!(r.signal && r.signal.aborted)}))")


def idle(driver) -> None:
    wait(driver, lambda d: not d.execute_script("return document.getElementById('send').disabled"))


def last_reply_done(driver, count: int) -> None:
    """Waits until `count` assistant bubbles exist and the page is idle again."""
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) >= count)
    idle(driver)


def history(driver) -> list[dict]:
    return driver.execute_script("return state.chat.messages")


@pytest.mark.parametrize("stream", [True, False])
def test_new_chat_abandons_the_reply_in_flight(browser, demo_server, stream):
    """New chat aborts the request and the old reply never reaches the new conversation."""
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server, stream=stream)
    browser.execute_script("window.__delay = arguments[0]", 150 if stream else 1500)
    send(browser, "What is the capital of Japan?")
    if stream:
        wait(browser, lambda d: texts(d, ".msg.assistant .reasoning .text") and texts(d, ".msg.assistant .reasoning .text")[-1])
    browser.find_element(By.ID, "clear").click()
    assert requests(browser)[0]["aborted"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .msg")
    browser.execute_script("window.__delay = 0")
    idle(browser)
    send(browser, "Hi")
    last_reply_done(browser, 1)
    assert requests(browser)[-1]["body"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2
    assert [m["role"] for m in history(browser)] == ["user", "assistant"]


@pytest.mark.parametrize("route", ["openai", "workers"])
def test_reasoning_before_a_tool_call_is_sent_back(browser, demo_server, route):
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server, route=route, tools=True)
    send(browser, "What is the weather in Tokyo?")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".tool-call form"))
    reasoning = texts(browser, ".msg.assistant .reasoning .text")[-1]
    assert "Tokyo" in reasoning
    browser.find_element(By.CSS_SELECTOR, ".tool-call form button").click()
    last_reply_done(browser, 2)
    assert texts(browser, ".msg.assistant .answer")[-1] == "It is 21°C and cloudy in Tokyo."
    sent = requests(browser)[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["reasoning_content"] == reasoning
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2]["tool_call_id"] == sent[1]["tool_calls"][0]["id"]


def test_stop_keeps_what_arrived(browser, demo_server):
    """Stop aborts the stream; the part shown is the part kept, and it is what the next request sends."""
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server)
    browser.execute_script("window.__delay = 250")
    send(browser, "What is the capital of Japan?")
    wait(browser, lambda d: texts(d, ".msg.assistant .answer")[-1])
    browser.find_element(By.ID, "stop").click()
    idle(browser)
    assert requests(browser)[0]["aborted"]
    assert not browser.find_element(By.ID, "stop").is_displayed()
    shown = texts(browser, ".msg.assistant .answer")[-1]
    assert shown and "The capital of Japan is Tokyo.".startswith(shown) and shown != "The capital of Japan is Tokyo."
    assert "Stopped" in texts(browser, ".msg.assistant .note")[-1]
    kept = history(browser)[-1]
    assert kept["role"] == "assistant" and kept["content"] == shown
    assert kept["reasoning_content"] == texts(browser, ".msg.assistant .reasoning .text")[-1]
    browser.execute_script("window.__delay = 0")
    send(browser, "Hi")
    last_reply_done(browser, 2)
    assert requests(browser)[-1]["body"]["messages"][:2] == [{"role": "user", "content": "What is the capital of Japan?"}, kept]


def test_stop_before_a_sync_answer(browser, demo_server):
    """Stopped before anything arrived: the turn is marked unanswered, and the next message replaces it."""
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server, stream=False)
    browser.execute_script("window.__delay = 3000")
    send(browser, "What is the capital of Japan?")
    wait(browser, lambda d: d.find_element(By.ID, "stop").is_displayed())
    browser.find_element(By.ID, "stop").click()
    idle(browser)
    assert requests(browser)[0]["aborted"]
    assert "Stopped before any answer" in texts(browser, ".msg.assistant .note")[-1]
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user.failed")
    browser.execute_script("window.__delay = 0")
    send(browser, "Hi")
    last_reply_done(browser, 1)
    assert requests(browser)[-1]["body"]["messages"] == [{"role": "user", "content": "Hi"}]
    assert texts(browser, "#log .msg.user") == ["Hi"] and len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2


def set_max_tokens(browser, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(value)


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_cut_at_max_tokens_says_so(browser, demo_server, stream):
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server, stream=stream, max_tokens="5")
    send(browser, "What is 2+2?")
    last_reply_done(browser, 1)
    assert "max tokens (5)" in texts(browser, ".msg.assistant .note")[-1]
    set_max_tokens(browser, "256")
    send(browser, "What is 3+4?")
    last_reply_done(browser, 2)
    assert not texts(browser, ".msg.assistant .note")[1:]
    sent = requests(browser)[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] is None and sent[1]["reasoning_content"] == texts(browser, ".msg.assistant .reasoning .text")[0]
    # Cut off with nothing at all (max tokens 1 ends in the channel header): no empty assistant turn goes back.
    open_page(browser, demo_server, stream=stream, max_tokens="1")
    send(browser, "What is 2+2?")
    last_reply_done(browser, 1)
    assert "max tokens (1)" in texts(browser, ".msg.assistant .note")[-1]
    set_max_tokens(browser, "256")
    send(browser, "What is 3+4?")
    wait(browser, lambda d: len(requests(d)) == 2)
    assert all(m["role"] != "assistant" for m in requests(browser)[-1]["body"]["messages"])
    # The unanswered turn is replaced by the next one, on screen as in the history.
    last_reply_done(browser, 1)
    assert requests(browser)[-1]["body"]["messages"] == [{"role": "user", "content": "What is 3+4?"}]
    assert texts(browser, "#log .msg.user") == ["What is 3+4?"] and len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2


@pytest.mark.parametrize("value", ["", "0", "2.5", "-3"])
def test_max_tokens_is_checked_on_the_page(browser, demo_server, value):
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server)
    max_tokens = browser.find_element(By.ID, "max-tokens")
    assert (max_tokens.get_attribute("type"), max_tokens.get_attribute("min"), max_tokens.get_attribute("step")) == ("number", "1", "1")
    set_max_tokens(browser, value)
    send(browser, "What is 2+2?")
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "Max tokens must be a whole number" in browser.find_element(By.ID, "error").text
    assert requests(browser) == [] and not browser.find_elements(By.CSS_SELECTOR, "#log .msg")
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What is 2+2?"
    max_tokens.clear()
    max_tokens.send_keys("12")
    browser.find_element(By.ID, "send").click()
    last_reply_done(browser, 1)
    assert requests(browser)[-1]["body"]["max_tokens"] == 12 and not browser.find_element(By.ID, "error").is_displayed()


def test_a_failed_turn_is_marked_and_replaced(browser, demo_server):
    """A real 400 from the server: the user turn is marked, and the next message replaces it on screen too."""
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server)
    browser.execute_script("window.__rewrite = (body) => ({...body, max_tokens: 0})")
    send(browser, "What is the capital of Italy?")
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "max_tokens" in browser.find_element(By.ID, "error").text
    assert texts(browser, ".msg.user.failed") and "Not answered" in texts(browser, ".msg.user.failed .note")[0]
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    browser.execute_script("window.__rewrite = null")
    send(browser, "What is the capital of Spain?")
    last_reply_done(browser, 1)
    assert texts(browser, "#log .msg.user") == ["What is the capital of Spain?"]
    assert requests(browser)[-1]["body"]["messages"] == [{"role": "user", "content": "What is the capital of Spain?"}]
    assert not browser.find_elements(By.CSS_SELECTOR, ".failed") and not browser.find_element(By.ID, "error").is_displayed()


def test_an_error_mid_stream_keeps_the_partial_answer_marked(browser, demo_server):
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server)
    browser.execute_script("window.__errorAfter = 25")
    send(browser, "What is the capital of Japan?")
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    idle(browser)
    assert "shutting down" in browser.find_element(By.ID, "error").text
    partial = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.failed")
    assert partial and texts(browser, ".msg.assistant.failed .reasoning .text")[0]
    assert "not kept" in texts(browser, ".msg.assistant.failed .note")[0]
    assert history(browser) == [{"role": "user", "content": "What is the capital of Japan?"}]
    browser.execute_script("window.__errorAfter = 0")
    send(browser, "Hi")
    last_reply_done(browser, 1)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2
    assert requests(browser)[-1]["body"]["messages"] == [{"role": "user", "content": "Hi"}]


def test_an_old_tool_call_cannot_be_answered(browser, demo_server):
    """Going on without answering a call drops the call from the history (the server, as OpenAI, refuses a call
    left without its result before the next message), and the reasoning that led to it: a turn that was only
    those leaves the history, while its bubble stays on screen."""
    from selenium.webdriver.common.by import By

    open_page(browser, demo_server, tools=True)
    send(browser, "What is the weather in Tokyo?")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".tool-call form"))
    idle(browser)
    send(browser, "Hello")
    last_reply_done(browser, 2)
    sent = requests(browser)[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "user"] and len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
    assert not browser.find_element(By.ID, "error").is_displayed() and texts(browser, ".msg.assistant .answer")[-1]
    assert not browser.find_element(By.CSS_SELECTOR, ".tool-call form button").is_enabled()
    browser.execute_script("document.querySelector('.tool-call form').requestSubmit()")
    assert len(requests(browser)) == 2


def test_enter_while_composing_does_not_send(browser, demo_server):
    open_page(browser, demo_server)
    browser.execute_script("""
      const box = document.getElementById('prompt');
      box.value = 'にほん';
      box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}));""")
    assert requests(browser) == [] and texts(browser, "#log .msg") == []


def test_curl_and_favicon(browser, demo_server):
    from selenium.webdriver.common.by import By

    page = httpx.get(demo_server.base + "/", timeout=10).text
    assert '<link rel="icon" href="data:' in page
    open_page(browser, demo_server)
    send(browser, "Hi")
    last_reply_done(browser, 1)
    curl = browser.find_element(By.ID, "curl").text
    assert "export OSSRUN_API_TOKEN=" in curl and curl.splitlines()[1].startswith("curl -N ")


# The API document's page: Swagger UI served by the server itself (FastAPI's default loads it from a CDN, which left the
# page blank offline, where ossrun runs).

def test_docs_page_loads_nothing_from_elsewhere(demo_server):
    page = httpx.get(demo_server.base + "/docs", headers=demo_server.headers, timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # every script, style and icon is ours
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        answer = httpx.get(f"{demo_server.base}/docs/assets/{asset}", timeout=10)  # no token: they hold nothing
        assert answer.status_code == 200 and len(answer.content) > 500, asset
    assert httpx.get(demo_server.base + "/docs/assets/../../openapi.json", timeout=10).status_code in (403, 404)
    assert httpx.get(demo_server.base + "/docs/assets/index.html", timeout=10).status_code == 404
    assert httpx.get(demo_server.base + "/docs", timeout=10).status_code == 403  # the page is behind the token as the API


def test_docs_page_renders_every_route_offline(browser, demo_server):
    """In Chromium: the operations appear, and every resource the page loaded came from the server."""
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": demo_server.headers})
    try:
        browser.get(demo_server.base + "/docs")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 20)
        paths = texts(browser, ".opblock-summary-path")
        assert "/v1/chat/completions" in paths and "/client/v4/accounts/{account_id}/ai/run/{model}" in paths
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(demo_server.base) for url in loaded), loaded
        assert not browser.find_elements(By.CSS_SELECTOR, ".errors-wrapper")  # Swagger UI read the document
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
