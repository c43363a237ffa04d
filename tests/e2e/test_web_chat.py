"""The web page in a real headless Chromium: sign in with the first-start link, chat with the
fine-tuned adapter and with the base model, streamed. Screenshots land in test-artifacts/."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ARTIFACTS, SAMPLE_CHAT

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def train_adapter(server) -> str:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    file = httpx.post(
        f"{server.url}/v1/files", headers=headers, files={"file": SAMPLE_CHAT.open("rb")}, data={"purpose": "fine-tune"}
    ).json()
    job = httpx.post(
        f"{server.url}/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "adaptery-demo", "training_file": file["id"], "suffix": "web"},
    ).json()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    return job["fine_tuned_model"]


@pytest.fixture
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


def ask(page, question: str) -> str:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    return answer.locator(".content").inner_text()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sign_in_and_chat_with_the_adapter_in_the_browser(server, browser):
    adapter = train_adapter(server)
    record = next(
        r
        for r in map(json.loads, SAMPLE_CHAT.read_text().splitlines())
        if all(m["role"] != "system" for m in r["messages"])
    )
    question = next(m["content"] for m in record["messages"] if m["role"] == "user")
    expected = record["messages"][-1]["content"]
    ARTIFACTS.mkdir(exist_ok=True)

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(server.url)
    expect(page.locator("#login-form")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "web-sign-in.png")
    page.fill("#username", "owner")
    page.fill("#password", "wrong password")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_be_visible()

    page.goto(server.login_url)
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#tenant-name")).to_have_text("default")
    expect(page.locator(f"#model-select option[value='{adapter}']")).to_have_count(1)
    page.select_option("#model-select", adapter)
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")

    assert ask(page, question) == expected
    page.screenshot(path=ARTIFACTS / "web-chat-adapter.png")

    page.click("#new-chat")
    page.select_option("#model-select", "adaptery-demo")
    assert ask(page, question) != expected
    page.screenshot(path=ARTIFACTS / "web-chat-base.png")

    page.set_viewport_size({"width": 375, "height": 800})
    page.screenshot(path=ARTIFACTS / "web-chat-phone.png")

    # the streamed answer arrived in pieces: the page saw more than one chunk
    page.click("#new-chat")
    page.select_option("#model-select", adapter)
    page.evaluate("""() => { window.__sizes = []; const target = document.querySelector('#messages');
        new MutationObserver(() => { const c = target.querySelectorAll('.message.assistant .content');
          if (c.length) window.__sizes.push(c[c.length - 1].textContent.length); })
        .observe(target, {subtree: true, childList: true, characterData: true}); }""")
    ask(page, question)
    sizes = page.evaluate("window.__sizes")
    assert len({s for s in sizes if s > 0}) > 1
