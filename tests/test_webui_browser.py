"""The web page in a real browser: Debian's headless chromium driven by Playwright.

`bash scripts/install-test-browser.sh` (run by `make test`) installs chromium; where it is absent this
test skips itself and says why. The screenshot lands in test-artifacts/webui.png.
"""

import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing of the browser's own reaches out (updates, sync, safe browsing, QUIC probes).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def browser_page():
    if not CHROMIUM.exists():
        pytest.skip(
            f"Debian's chromium is not at {CHROMIUM}; `bash scripts/install-test-browser.sh` installs it"
        )
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def test_a_browser_chats_with_the_page(
    browser_page, webui_url, scripted_run, generations, repo_root, monkeypatch
):
    from playwright.sync_api import expect

    from tinylm.generate import Engine

    page = browser_page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(webui_url)

    question = page.locator("#question textarea")
    question.fill("What are you?")
    question.press("Enter")
    expect(page.get_by_test_id("user").last).to_have_text("What are you?")
    expect(page.get_by_test_id("bot").last).to_have_text(scripted_run.answer, timeout=20_000)
    expect(page.locator("#status")).to_contain_text("tokens/s")
    assert generations[-1][1].temperature == 0.0  # the checkpoint's own default

    temperature = page.get_by_label("number input for Temperature")
    temperature.fill("1.2")
    temperature.press("Enter")
    question.fill("And now?")
    question.press("Enter")
    expect(page.get_by_test_id("bot")).to_have_count(2)
    expect(page.get_by_test_id("bot").last).to_have_text(scripted_run.answer, timeout=20_000)
    assert len(generations) == 2 and generations[-1][1].temperature == 1.2

    artifacts = repo_root / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=artifacts / "webui.png", full_page=True)

    # Stop keeps the answer so far; Clear empties the page. The answer is held after its first piece
    # until the checks are done, so Stop surely lands mid-answer.
    release = threading.Event()
    streaming = Engine.stream

    def held(engine, *args, **kwargs):
        for number, chunk in enumerate(streaming(engine, *args, **kwargs)):
            yield chunk
            if number == 0:
                release.wait(timeout=30)

    monkeypatch.setattr(Engine, "stream", held)
    question.fill("Can you stop?")
    question.press("Enter")
    expect(page.get_by_test_id("bot")).to_have_count(3)
    expect(page.get_by_test_id("bot").last).not_to_be_empty()
    page.locator("#stop").click()
    expect(page.locator("#status")).to_have_text("stopped")
    partial = page.get_by_test_id("bot").last.inner_text()
    assert scripted_run.answer.startswith(partial) and len(partial) < len(scripted_run.answer)
    release.set()
    page.locator("#clear").click()
    expect(page.get_by_test_id("bot")).to_have_count(0)

    # Nothing but the page's own server: no fonts, scripts or telemetry from elsewhere.
    served_from = urlparse(webui_url).netloc
    web = [urlparse(url) for url in requested if urlparse(url).scheme in ("http", "https", "ws", "wss")]
    assert [url.geturl() for url in web if url.netloc != served_from] == []
