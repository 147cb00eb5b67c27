"""The chat page in a real headless Chromium: type, watch the reply stream, toggle think.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install -y chromium chromium-driver`;
`make test` installs them when it runs as root on a machine with apt-get). Without them the tests
skip, unless CRUCIBLE_REQUIRE_BROWSER=1 (set by `make test` after installing), when they fail.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from serve_util import chat_run, live_server  # noqa: F401  (chat_run: session fixture)

from crucible.serve.app import create_app
from crucible.serve.engine import ChatEngine, ChatEvent, Prepared, Sampling, load_engine

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
REASONING = ["Two plus two: ", "count 2, then 2 more."]
ANSWER = ["The answer ", "is ", "4."]


class ScriptedEngine(ChatEngine):
    """The real engine's prompt handling, with a scripted, slowly streamed reply: a browser test
    can see a partial reply on screen and a reasoning block, which a 2-step model cannot give."""

    def __init__(self, engine: ChatEngine, pause: float = 0.4) -> None:
        super().__init__(engine.model, engine.tokenizer, engine.renderer)
        self.pause = pause
        self.seen: list[list[Mapping[str, Any]]] = []

    def prepare(
        self, messages: Sequence[Mapping[str, Any]], enable_thinking: bool, max_tokens=None
    ):
        self.seen.append(list(messages))
        return super().prepare(messages, enable_thinking, max_tokens)

    def stream(self, request: Prepared, sampling: Sampling, cancel=None) -> Iterator[ChatEvent]:
        self.stats.thinking_modes.append(request.enable_thinking)
        for piece in REASONING if request.enable_thinking else []:
            yield ChatEvent(reasoning=piece)
            time.sleep(self.pause)
        for piece in ANSWER:
            yield ChatEvent(content=piece)
            time.sleep(self.pause)
        yield ChatEvent(finish_reason="stop", prompt_tokens=len(request.prompt_ids))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).exists()):
        msg = (
            f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install -y chromium chromium-driver "
            "(make test does this when it runs as root)"
        )
        if os.environ.get("CRUCIBLE_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or CHROMEDRIVER), options=options
    )
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def engine(chat_run) -> ChatEngine:  # noqa: F811
    return load_engine(chat_run)


def _wait(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _open(browser, url: str, model: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url)
    _wait(lambda: browser.find_element(By.ID, "model").text == model, what="the model name")


def _done(reply) -> bool:
    state = reply.get_attribute("data-state")
    assert state != "error", reply.text
    return state == "done"


def _send(browser, text: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = browser.find_element(By.ID, "input")
    if len(text) > 100:  # typing thousands of keys is slow; paste, then press Enter
        browser.execute_script("arguments[0].value = arguments[1]", box, text)
    else:
        box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return _wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[before:],
        what="the reply bubble",
    )[0]


def test_page_streams_reply_shows_reasoning_collapsed_and_toggles_think(browser, engine) -> None:
    from selenium.webdriver.common.by import By

    scripted = ScriptedEngine(engine)
    with live_server(create_app(scripted, "scripted")) as url:
        _open(browser, url, "scripted")
        assert browser.find_element(By.ID, "think").is_selected()  # think mode by default
        reply = _send(browser, "What is 2+2?")
        content = reply.find_element(By.CLASS_NAME, "content")
        # Mid-stream: part of the answer is on screen, not all of it.
        partial = _wait(
            lambda: content.text.startswith("The answer") and content.text, what="a partial reply"
        )
        assert partial != "".join(ANSWER) and reply.get_attribute("data-state") == "streaming"
        _wait(lambda: _done(reply), what="the end of the reply")
        assert content.text == "".join(ANSWER)
        assert int(reply.get_attribute("data-chunks")) == len(REASONING) + len(ANSWER)
        details = reply.find_element(By.CSS_SELECTOR, "details.reasoning")
        assert details.is_displayed() and details.get_attribute("open") is None  # collapsed
        thought = reply.find_element(By.CLASS_NAME, "thought")
        assert thought.get_attribute("textContent") == "".join(REASONING)
        details.find_element(By.TAG_NAME, "summary").click()  # the user opens it
        assert details.get_attribute("open") is not None and thought.text == "".join(REASONING)

        browser.find_element(By.ID, "think").click()  # think off
        second = _send(browser, "And 3+3?")
        _wait(lambda: _done(second), what="the second reply")
        assert not second.find_element(By.CSS_SELECTOR, "details.reasoning").is_displayed()
        assert second.find_element(By.CLASS_NAME, "content").text == "".join(ANSWER)
    assert scripted.stats.thinking_modes == [True, False]
    # The page keeps the history: the second request carried the first exchange.
    assert [m["role"] for m in scripted.seen[-1]] == ["user", "assistant", "user"]
    assert scripted.seen[-1][1]["content"] == "".join(ANSWER)
    assert "reasoning_content" not in scripted.seen[-1][1]  # shown, not sent back


def test_page_chats_with_the_real_model(browser, engine: ChatEngine) -> None:
    from selenium.webdriver.common.by import By

    # Two messages that each fill well over a third of the 1,024-token context: the second
    # request overflows, and the page drops the oldest exchange and retries.
    def size(text: str) -> int:
        return len(engine.renderer.render([{"role": "user", "content": text}], True))

    n = 1
    while size(" ".join(f"word{i}" for i in range(n))) < 0.55 * engine.context_length:
        n += 1
    long = " ".join(f"word{i}" for i in range(n))
    with live_server(create_app(engine, "tiny-chat")) as url:
        _open(browser, url, "tiny-chat")
        before = engine.stats.requests
        reply = _send(browser, long)
        _wait(lambda: _done(reply), what="the model's reply")
        browser.find_element(By.ID, "think").click()
        reply = _send(browser, long)
        _wait(lambda: _done(reply), what="the second reply")
        notes = browser.find_elements(By.CSS_SELECTOR, ".msg.note")
        assert len(notes) == 1 and "outgrew the context" in notes[0].text
    assert engine.stats.requests == before + 2  # the overflowing request was refused up front
    assert engine.stats.thinking_modes[-2:] == [True, False]
