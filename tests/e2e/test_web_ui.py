"""The web application in a real headless Chromium, as a researcher uses it: sign in, upload a
spreadsheet of examples (a bad file shows its line errors), fine-tune on it and watch the loss chart,
chat with the adapter (streamed, saved), compare it side by side with the base, manage keys and
members; then a member of another tenant sees none of it.

One server and one browser serve the whole module, so the steps run in order and build on each
other (the fine-tune takes ~7 s). Screenshots of every page land in test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from tests.conftest import (
    ARTIFACTS,
    REPO,
    SAMPLE_CHAT,
    ServerProcess,
    ca_pem,
    prepare_data_dir,
    start_server,
    stop_server,
)

# Playwright's default of 5 s per expectation: on 2 cores shared with the other pytest worker's servers, a page that
# signs in, reloads and lists (the invitation test) has taken longer. What must be fast is measured in bench/.
expect.set_options(timeout=20_000)

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ARTIFACTS / "screenshots"
PASSWORD = "correct horse battery"
GLAIVE = REPO / "tests" / "data" / "llamafactory" / "glaive_toolcall_en_demo.json"  # ShareGPT tool calls


@dataclass
class Journey:
    server: ServerProcess
    browser: Browser
    page: Page
    tmp: Path
    found: dict[str, str] = field(default_factory=dict)  # ids made along the way

    def go(self, route: str) -> None:
        self.page.goto(f"{self.server.url}/#/{route}")

    def shot(self, name: str, *, page: Page | None = None) -> None:
        (page or self.page).screenshot(path=SHOTS / f"{name}.png", full_page=True)

    def new_tenant_owner(self, tenant: str, owner: str) -> tuple[BrowserContext, Page]:
        """`adaptery tenants create` for a new person, who signs in with the link it printed, in a browser of their
        own (a context to close)."""
        created = self.server.cli("tenants", "create", tenant, "--owner", owner)
        assert created.returncode == 0, created.stderr
        token = re.search(r"ADAPTERY_LOGIN_URL=\S+/auth/link\?token=(\S+)", created.stdout).group(1)
        context = self.browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.goto(f"{self.server.url}/auth/link?token={token}")
        page.click("#link-submit")
        expect(page.locator("#tenant-name")).to_have_text(tenant)
        return context, page


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Journey]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_factory.mktemp("web")
    data_dir = prepare_data_dir(tmp / "data", demo_model_dir)
    server = start_server(data_dir, f"sqlite:///{tmp / 'adaptery.db'}")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield Journey(server, browser, page, tmp)
            browser.close()
            assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        stop_server(server)


def sample_question() -> tuple[str, str]:
    record = next(
        r
        for r in map(json.loads, SAMPLE_CHAT.read_text().splitlines())
        if all(m["role"] != "system" for m in r["messages"])
    )
    question = next(m["content"] for m in record["messages"] if m["role"] == "user")
    return question, record["messages"][-1]["content"]


def pick_first_version(page: Page) -> None:
    option = page.locator("#ft-training option", has_text=re.compile(r"^lab-facts v1 "))
    page.select_option("#ft-training", option.get_attribute("value"))


def open_settings(page: Page, prefix: str = "") -> None:
    page.click(f"#{prefix}settings summary")
    page.fill(f"#{prefix}temperature", "0")
    page.fill(f"#{prefix}max-tokens", "40")


def test_sign_in_with_the_link_set_a_password_and_sign_in_with_it(journey: Journey) -> None:
    page, server = journey.page, journey.server
    page.goto(server.url)
    expect(page.locator("#login-form")).to_be_visible()
    journey.shot("sign-in")
    page.fill("#username", "owner")
    page.fill("#password", "wrong password")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("Wrong username or password")

    page.goto(server.login_url)  # the link's page says whom it signs in; opening it spends nothing
    expect(page.locator("#link-username")).to_have_text("owner")
    expect(page.locator("#link-tenant")).to_have_text("default")
    expect(page.locator("#login-form")).to_be_hidden()
    expect(page.locator("#login-hint")).to_be_hidden()
    journey.shot("sign-in-link")
    page.reload()  # as a link preview fetching it would: still usable
    page.click("#link-submit")
    expect(page.locator("#app")).to_be_visible()
    assert "token=" not in page.url  # the spent link leaves the address bar
    expect(page.locator("#tenant-name")).to_have_text("default")
    expect(page.locator("#password-banner")).to_be_visible()
    page.fill("#new-password", PASSWORD)
    expect(page.locator("#new-password")).to_have_value(PASSWORD)
    page.click("#set-password-submit")
    expect(page.locator("#password-banner")).to_be_hidden()

    page.click("#logout")
    expect(page.locator("#login-form")).to_be_visible()
    page.goto(server.login_url)  # a used link signs nobody in
    expect(page.locator("#link-error")).to_contain_text("invalid, already used or expired")
    page.fill("#username", "owner")
    page.fill("#password", PASSWORD)
    page.press("#password", "Enter")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#user-name")).to_have_text("owner")


def test_a_bad_file_shows_its_line_errors(journey: Journey) -> None:
    page = journey.page
    bad = journey.tmp / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    bad.write_text(f'{good}\n{{"messages": [oops\n{{"messages": [{{"role": "user", "content": "q"}}]}}\n{good}\n')
    journey.go("datasets")
    page.set_input_files("#dataset-file", bad)
    page.click("#dataset-upload")
    report = page.locator("#validation-report")
    expect(report).to_contain_text("2 of 4 records are invalid", timeout=30_000)
    rows = report.locator("tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("line 2")
    expect(rows.nth(0)).to_contain_text("invalid JSON")
    expect(rows.nth(1)).to_contain_text("line 3")
    expect(rows.nth(1)).to_contain_text("has no assistant message")
    journey.shot("dataset-bad-file")

    page.click("#export-run")  # the error names the box to tick, not the API's parameter
    actions = page.locator("#dataset-actions")
    expect(actions.locator(".form-error")).to_contain_text("tick “Allow leaving invalid records out”")
    expect(actions.locator(".form-error")).not_to_contain_text("allow_invalid")
    journey.go("datasets")  # not a plain "ready": how many were dropped, with a way to see why
    dropped = page.locator("tr", has_text="bad.jsonl").locator(".dropped-link")
    expect(dropped).to_have_text("ready, 2 dropped")
    dropped.click()
    expect(page.locator("#validation-report")).to_contain_text("2 of 4 records are invalid")


def test_a_file_with_no_valid_record_is_refused_on_the_form_and_makes_no_dataset(journey: Journey) -> None:
    page = journey.page
    hopeless = journey.tmp / "hopeless.jsonl"
    hopeless.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"messages": [oops\n')
    journey.go("datasets")
    page.set_input_files("#dataset-file", hopeless)
    page.click("#dataset-upload")
    expect(page.locator("#upload-form .form-error")).to_contain_text("Nothing was kept of 'hopeless.jsonl'")
    expect(page.locator("#upload-form .form-error")).to_contain_text("line 2: invalid JSON")
    journey.go("datasets")
    expect(page.get_by_role("link", name="bad.jsonl")).to_be_visible()
    expect(page.get_by_role("link", name="hopeless.jsonl")).to_have_count(0)


def test_upload_a_dataset_see_its_report_statistics_and_curate_it(journey: Journey) -> None:
    page = journey.page
    journey.go("datasets")
    page.fill("#dataset-name", "lab-facts")
    page.set_input_files("#dataset-file", SAMPLE_CHAT)
    page.click("#dataset-upload")
    records = len(SAMPLE_CHAT.read_text().splitlines())
    expect(page.locator("#validation-report")).to_contain_text(f"All {records} records are valid", timeout=30_000)
    expect(page.locator("#detected-format")).to_have_text("openai-chat")
    expect(page.locator("#length-histogram svg rect.bar").first).to_be_visible()
    expect(page.locator("#preview .record")).to_have_count(min(records, 10))
    journey.found["dataset"] = page.url.rsplit("/", 1)[-1]
    journey.shot("dataset-report")

    page.click("#dedup-run")
    expect(page.locator("#dedup-report")).to_contain_text(f"{records} records in", timeout=30_000)
    page.click("#scrub-run")
    expect(page.locator("#pii-report")).to_contain_text("records had something redacted", timeout=30_000)
    expect(page.locator("#version-panel")).to_contain_text("scrub(v2)")
    journey.shot("dataset-curated")

    page.fill("#card-description", "Six facts about a fictional lab.")
    page.fill("#card-license", "CC-BY-4.0")
    page.click("#card-form button[type=submit]")
    expect(page.locator("#toast")).to_contain_text("Card saved")
    journey.go("datasets")
    expect(page.get_by_role("link", name="lab-facts")).to_be_visible()
    journey.shot("datasets")


def test_a_tool_calling_dataset_shows_calls_as_calls_and_results_as_results(journey: Journey) -> None:
    page = journey.page
    tip = journey.tmp / "tip.json"  # LLaMA-Factory's (ShareGPT) record of one call, its result and the answer
    tip.write_text(json.dumps([next(r for r in json.loads(GLAIVE.read_text()) if "calculate_tip" in r["tools"])]))
    journey.go("datasets")
    page.set_input_files("#dataset-file", tip)
    page.click("#dataset-upload")
    expect(page.locator("#validation-report")).to_contain_text("All 1 records are valid", timeout=30_000)
    record = page.locator("#preview .record")
    expect(record.locator(".muted", has_text="tools:")).to_have_text("tools: calculate_tip")
    call = record.locator(".bubble", has=page.locator(".tool-call"))
    expect(call.locator(".bubble-role")).to_have_text("assistant calls")
    expect(call.locator(".tool-call code").first).to_have_text("calculate_tip(")
    arguments = json.loads(call.locator(".tool-call pre").inner_text())  # an object, laid out, not a string of JSON
    assert arguments == {"bill_amount": 100, "tip_percentage": 15}
    result = record.locator(".bubble", has_text="result of calculate_tip")
    expect(result.locator(".bubble-text")).to_have_text('{"tip_amount": 15}')
    expect(record.locator(".bubble").last).to_contain_text("The tip amount for your bill is $15.")
    expect(record).not_to_contain_text('"name": "calculate_tip"')  # the call is not shown as its raw JSON text
    journey.shot("dataset-tool-calls")


def training_files(page: Page) -> list[str]:
    return page.evaluate("async () => (await (await fetch('/v1/files')).json()).data.map((f) => f.filename)")


def test_fine_tune_from_the_form_and_watch_it_finish_with_a_loss_chart(journey: Journey) -> None:
    page = journey.page
    journey.go(f"datasets/{journey.found['dataset']}/1")  # the dataset's "use for fine-tuning" path
    page.click("#export-run")
    page.click("#fine-tune-link")
    selected = page.locator("#ft-training option:checked")
    expect(selected).to_have_text(re.compile(r"^lab-facts v1 "))  # the version, offered once
    expect(page.locator("#ft-training option", has_text="lab-facts-v1.jsonl")).to_have_count(0)
    expect(page.locator("#ft-estimate")).to_contain_text("tokens to train")
    expect(page.locator("#ft-epochs")).to_have_value("20")  # the demo base's recommended default
    page.fill("#ft-epochs", "0")  # auto: what it resolves to, never "× 1 epochs"
    expect(page.locator("#ft-estimate")).to_contain_text("× 20 epochs: auto, this base model's default")
    page.fill("#ft-epochs", "20")
    page.click("#ft-advanced summary")
    expect(page.locator("#ft-rank")).to_have_value("16")
    page.fill("#ft-suffix", "web")
    journey.shot("fine-tune-form")
    page.click("#ft-start")
    expect(page).to_have_url(re.compile(r"#/jobs/ftjob-"))
    journey.found["job"] = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-phase")).to_be_visible()  # a sign of life from the start
    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded", timeout=240_000)
    expect(page.locator("#job-phase")).to_have_count(0)
    assert training_files(page).count("lab-facts-v1.jsonl") == 1  # the version's file, not a second copy
    expect(page.locator("#loss-chart svg polyline.s-train")).to_have_count(1)
    expect(page.locator("#loss-chart svg")).to_have_attribute("data-x-max", "40")  # all the steps, from the start
    page.check("#loss-log")
    expect(page.locator("#loss-chart figure")).to_have_attribute("data-scale", "log")
    expect(page.locator("#loss-chart .axis-label", has_text="log scale")).to_have_count(1)
    page.uncheck("#loss-log")
    expect(page.locator("#job-settings tr", has_text="n epochs")).to_contain_text("20")
    expect(page.locator("#job-settings tr", has_text="keep checkpoints")).to_contain_text("3")
    expect(page.locator("pre.json")).to_have_count(0)
    expect(page.locator("#job-events li", has_text="Loading the base model")).to_have_count(1)
    adapter = page.locator("#job-adapter code").inner_text()
    assert adapter.startswith("ft:adaptery-demo:default:web:")
    journey.found["adapter"] = adapter
    journey.shot("fine-tune-job")

    journey.go("fine-tune")  # a finished run on this base now times the next estimate
    pick_first_version(page)
    expect(page.locator("#ft-estimate")).to_contain_text("tokens/s your earlier runs")


def test_a_running_job_says_what_it_does_since_when_and_how_long_is_left(journey: Journey) -> None:
    state = journey.page.evaluate(
        """async () => { const { runState } = await import('/static/finetune.js');
        const job = {status: 'running', created_at: 100};
        const at = (created_at, data, type = 'message') => ({created_at, data, type});
        const events = [at(100, {}), at(104, {phase: 'started'}), at(106, {phase: 'loading_base'})];
        const loading = runState(job, events, 110);
        events.push(at(112, {step: 1, total_steps: 10}, 'metrics'), at(116, {step: 3, total_steps: 10}, 'metrics'));
        const done = runState({...job, status: 'succeeded'}, events);
        return {loading, training: runState(job, events, 117), done}; }"""
    )
    assert state["loading"] == {
        "phase": "loading_base",
        "text": "Loading the base model",
        "elapsed": 6,
        "remaining": None,
    }
    assert state["training"]["text"] == "Training: step 3 of 10" and state["training"]["elapsed"] == 13
    assert state["training"]["remaining"] == 14  # 2 s a step, 7 steps to go
    assert state["done"] is None


def test_chat_with_the_adapter_streamed_saved_and_regenerated(journey: Journey) -> None:
    page, adapter = journey.page, journey.found["adapter"]
    question, expected = sample_question()
    journey.go(f"jobs/{journey.found['job']}")
    page.click("#chat-with-adapter")
    expect(page.locator("#model-select")).to_have_value(adapter)
    open_settings(page)
    page.evaluate(
        """() => { window.__sizes = []; const target = document.querySelector('#messages');
        new MutationObserver(() => { const c = target.querySelectorAll('.message.assistant .content');
          if (c.length) window.__sizes.push(c[c.length - 1].textContent.length); })
        .observe(target, {subtree: true, childList: true, characterData: true}); }"""
    )
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    assert answer.locator(".content").inner_text() == expected
    # the answer arrived in pieces: the page showed more than one length of it
    assert len({s for s in page.evaluate("window.__sizes") if s > 0}) > 1
    expect(page.locator("#conversations .conversation")).to_have_count(1)
    journey.found["conversation"] = page.url.rsplit("/", 1)[-1]
    journey.shot("chat-adapter")

    page.reload()  # saved: the conversation and its settings come back
    expect(page.locator("#messages .message")).to_have_count(2)
    expect(page.locator("#model-select")).to_have_value(adapter)
    expect(page.locator("#temperature")).to_have_value("0")
    page.click(".message.assistant .regenerate")
    expect(page.locator("#messages")).to_have_attribute("aria-busy", "false", timeout=60_000)
    expect(page.locator("#messages .message")).to_have_count(2)
    assert page.locator(".message.assistant .content").inner_text() == expected
    expect(page.locator(".message.assistant .copy")).to_be_visible()

    page.click("#new-chat")
    expect(page.locator("#temperature")).to_have_value("0")  # a new chat starts with the last settings, not 0.7
    expect(page.locator("#max-tokens")).to_have_value("40")
    page.select_option("#model-select", "adaptery-demo")
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant").last).to_have_attribute("data-done", "true", timeout=60_000)
    assert page.locator(".message.assistant .content").inner_text() != expected
    expect(page.locator("#conversations .conversation")).to_have_count(2)
    titles = page.locator("#conversations .conversation-title")  # the same question, told apart, with dates
    expect(titles.first).to_have_text(f"{question} (2)"[:60] if len(question) <= 56 else re.compile(r"\(2\)$"))
    expect(page.locator("#conversations .conversation-date")).to_have_count(2)

    # rename and delete, from the keyboard
    first = page.locator("#conversations .conversation").first
    first.get_by_role("button", name=re.compile("^Rename")).click()
    page.keyboard.press("Control+A")
    page.keyboard.type("Mascot check")
    page.keyboard.press("Enter")
    expect(page.locator("#conversations .conversation-title").first).to_have_text("Mascot check")
    page.locator("#conversations .conversation").first.get_by_role("button", name=re.compile("^Delete")).click()
    page.click("#dialog-confirm")
    expect(page.locator("#conversations .conversation")).to_have_count(1)


def test_chat_follows_the_answer_bounds_max_tokens_and_keeps_a_failed_message_to_retry(journey: Journey) -> None:
    page, adapter = journey.page, journey.found["adapter"]
    question, expected = sample_question()
    journey.go(f"chat?model={adapter}")
    open_settings(page)
    page.fill("#max-tokens", "5000")  # more than the model's context (1,024 tokens) holds
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.url.endswith("/chat/completions") else None)
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    expect(page.locator("#settings .form-error")).to_contain_text("this model's context holds 1,024 tokens")
    assert not sent and page.locator("#messages .message").count() == 0
    page.fill("#max-tokens", "40")

    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=503, json={"error": {"message": "busy"}}))
    page.press("#prompt", "Enter")
    expect(page.locator("#composer .form-error")).to_contain_text("Your message is kept")
    last = page.locator("#messages .message").last
    expect(last).to_have_class(re.compile(r"\buser\b"))  # not an orphan: it offers to ask again
    page.unroute("**/v1/chat/completions")
    page.evaluate("document.querySelector('#messages').style.maxHeight = '90px'")  # a pane the answer overflows
    last.locator(".retry").click()
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    assert answer.locator(".content").inner_text() == expected
    expect(page.locator(".message .retry")).to_have_count(0)
    # the pane followed the answer to its end
    assert (
        page.evaluate("(m => m.scrollHeight - m.scrollTop - m.clientHeight)(document.querySelector('#messages'))") < 2
    )


def test_markdown_is_rendered_and_html_in_it_is_shown_as_text(journey: Journey) -> None:
    html = journey.page.evaluate(
        """async () => { const { renderMarkdown } = await import('/static/markdown.js');
        const box = document.createElement('div');
        box.append(renderMarkdown('<img src=x onerror="window.__pwned=1"> **bold** [x](javascript:alert(1))\\n\\n'
          + '```python\\nif a < b:\\n    print("<b>")\\n```\\n- one\\n- two'));
        return {html: box.innerHTML, text: box.textContent, imgs: box.querySelectorAll('img').length,
                links: box.querySelectorAll('a').length, strong: box.querySelectorAll('strong').length,
                code: box.querySelector('pre code').textContent, items: box.querySelectorAll('li').length}; }"""
    )
    assert html["imgs"] == 0 and html["links"] == 0
    assert "<img" in html["text"]
    assert html["strong"] == 1 and html["items"] == 2
    assert html["code"] == 'if a < b:\n    print("<b>")'
    assert journey.page.evaluate("window.__pwned") is None


def test_compare_the_base_and_the_adapter_side_by_side(journey: Journey) -> None:
    page, adapter = journey.page, journey.found["adapter"]
    question, expected = sample_question()
    journey.go(f"compare?a=adaptery-demo&b={adapter}")
    expect(page.locator("#compare-b")).to_have_value(adapter)
    open_settings(page, "compare-")
    timeline: list[tuple[str, str]] = []
    page.on("request", lambda r: timeline.append(("start", r.url)) if r.url.endswith("/chat/completions") else None)
    page.on(
        "requestfinished", lambda r: timeline.append(("end", r.url)) if r.url.endswith("/chat/completions") else None
    )
    page.fill("#compare-prompt", question)
    page.click("#compare-run")
    for side in "ab":
        expect(page.locator(f"#compare-col-{side}")).to_have_attribute("data-done", "true", timeout=60_000)
    assert page.locator("#compare-col-b .content").inner_text() == expected
    assert page.locator("#compare-col-a .content").inner_text() != expected
    # both streams were open together: the second request started before the first one finished
    assert [kind for kind, _ in timeline] == ["start", "start", "end", "end"]
    journey.shot("compare")


def test_models_page_shows_details_and_download(journey: Journey) -> None:
    page, adapter = journey.page, journey.found["adapter"]
    journey.go("models")
    page.click(".adapter-link")
    expect(page.locator("#model-id")).to_have_text(adapter)
    expect(page.locator("dl.stats")).to_contain_text("lab-facts-v1.jsonl")
    with page.expect_download() as download:
        page.click("#model-download")
    assert download.value.suggested_filename.endswith(".zip")
    page.click("#model-delete")
    expect(page.locator("dialog")).to_be_visible()
    page.keyboard.press("Escape")  # cancelled: the adapter stays
    expect(page.locator("dialog")).to_have_count(0)
    journey.shot("model-details")
    journey.go("models")
    journey.shot("models")


def test_create_a_key_see_it_once_use_it_and_revoke_it(journey: Journey) -> None:
    page, server = journey.page, journey.server
    journey.go("keys")
    page.fill("#key-name", "notebook")
    page.select_option("#key-env", "prod")
    page.select_option("#key-expiry", "30")
    page.click("#key-create")
    secret = page.locator("#new-key-value").inner_text()
    assert secret.startswith("sk-prod-")
    journey.shot("keys-created")
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200

    row = page.locator("#keys tbody tr", has_text="notebook")
    expect(row).to_contain_text("active")
    expect(row.locator(".key-scopes")).to_contain_text("files, fine-tuning, inference, models")
    expect(row.locator(".key-scopes")).not_to_contain_text("admin")  # the form leaves the admin scope off
    row.locator(".revoke").click()
    page.click("#dialog-confirm")
    expect(row).to_contain_text("revoked")
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    page.reload()
    expect(page.locator("#new-key-value")).to_have_count(0)  # shown once: never again
    journey.shot("keys")


def test_invite_a_member_who_signs_in_and_has_their_own_chats(journey: Journey) -> None:
    page = journey.page
    journey.go("admin")
    page.fill("#invite-username", "ada")
    page.select_option("#invite-role", "viewer")
    page.click("#invite-submit")
    link = page.locator("#invite-link-value").inner_text()
    invited = page.locator("#members tbody tr", has_text="ada")
    expect(invited).to_contain_text("not signed in yet")  # not "joined" before she ever signed in
    expect(page.locator("#agents")).to_contain_text("embedded")
    expect(page.locator("#engine-state table").first).to_be_visible()  # tables, not a JSON dump
    expect(page.locator("#engine-state pre")).to_have_count(0)
    journey.shot("admin")

    context = journey.browser.new_context(viewport={"width": 1280, "height": 860})
    ada = context.new_page()
    ada.goto(link)
    expect(ada.locator("#link-username")).to_have_text("ada")
    ada.click("#link-submit")
    expect(ada.locator("#user-name")).to_have_text("ada")
    expect(ada.locator("#tenant-name")).to_have_text("default")
    expect(ada.locator("#user-role")).to_have_text("viewer")
    expect(ada.locator("#nav-admin")).to_be_hidden()
    expect(ada.locator("#conversations")).to_contain_text("No saved chats yet")  # owner's chats are the owner's
    ada.goto(f"{journey.server.url}/#/chat/{journey.found['conversation']}")
    expect(ada.locator("#messages")).to_contain_text("No conversation")
    ada.goto(f"{journey.server.url}/#/datasets")
    expect(ada.get_by_role("link", name="lab-facts")).to_be_visible()  # the tenant's datasets are shared
    expect(ada.locator("#upload-form")).to_be_hidden()  # a viewer reads, does not upload
    context.close()


def test_the_admin_page_shows_the_ledgers_usage_and_pages_through_the_audit_log(journey: Journey) -> None:
    page = journey.page
    journey.go("admin")
    totals = page.locator("#usage-view table").first
    expect(totals).to_be_visible()
    headers = [t.strip().lower() for t in totals.locator("thead th").all_inner_texts()]  # CSS may upper-case them
    cells = [t.strip() for t in totals.locator("tbody tr").first.locator("td").all_inner_texts()]
    shown = dict(zip(headers, cells, strict=True))
    start = page.evaluate("() => { const n = Math.floor(Date.now() / 1000); return n - (n % 86400) - 29 * 86400; }")
    api = page.evaluate(f"() => fetch('/api/admin/usage?start_time={start}').then((r) => r.json())")["ledger"]
    for name in ("prompt_tokens", "completion_tokens", "trained_tokens", "requests"):
        assert re.sub(r"\D", "", shown[name.replace("_", " ")]) == str(api["totals"][name]), name
    assert api["totals"]["completion_tokens"] > 0  # the chats of the steps before, made from the page
    assert api["totals"]["trained_tokens"] > 0 and api["totals"]["cpu_seconds"] > 0  # measured by the agent
    assert re.sub(r"[^\d.]", "", shown["cpu seconds"]) != "0"
    by_model = page.get_by_role("img", name=re.compile("^Tokens by model: "))
    expect(by_model).to_be_visible()
    for model, figures in api["by_model"].items():
        expect(by_model).to_have_attribute("aria-label", re.compile(re.escape(model)))
        assert figures["requests"] >= 0
    expect(page.locator("#usage-export")).to_have_attribute("href", re.compile(r"^/api/admin/usage/export\?"))
    rows = page.locator("#audit-events tbody tr")
    expect(rows.first).to_be_visible()
    before = rows.count()
    if page.locator("#audit-more").is_visible():
        page.click("#audit-more")
        expect(rows).not_to_have_count(before)
    page.fill("#audit-action", "auth.")
    page.locator("#audit-filter button[type=submit]").click()
    expect(page.locator("#audit-events tbody tr").first).to_contain_text("auth.")
    journey.shot("admin-usage")


def test_a_federation_page_follows_its_rounds_live(journey: Journey) -> None:
    """The coordinator reports through the API (as `adaptery fed coordinator --federation` does); the open page
    follows without a reload: sites and their status, the round and stage, each round's loss, the adapter."""
    page, server = journey.page, journey.server
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=30)
    fed = api.post("/api/federations", json={"name": "hospitals", "base_model": "adaptery-demo"}).json()["id"]
    journey.found["federation"] = fed
    for number in (1, 2):
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        public = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        api.post(f"/api/federations/{fed}/sites", json={"name": f"clinic-{number}", "public_key": public})
    api.put(
        f"/api/federations/{fed}/coordinator",
        json={"superlink": "127.0.0.1:9093", "superlink_ca": ca_pem(), "rounds": 2},
    )

    def report(event: dict) -> None:
        assert api.post(f"/api/federations/{fed}/events", json=event).status_code == 200

    report({"event": "start", "rounds": 2})
    journey.go("fine-tune")
    page.click("#federations-link")
    page.get_by_role("link", name="hospitals").click()
    expect(page.locator("#federation-status")).to_have_attribute("data-status", "running")
    expect(page.locator("#federation-progress")).to_have_text("round 1 of 2 · local training")
    expect(page.locator("#federation-sites tbody tr")).to_have_count(2)
    report({"round": 1, "stage": "masked", "answered": 2, "asked": 2})
    expect(page.locator("#federation-progress")).to_have_text("round 1 of 2 · masked updates in")
    report({"event": "round", "round": 1, "loss": 2.5, "survivors": [1], "seconds": 31.0})
    expect(page.locator("#federation-rounds tbody tr")).to_have_count(1)
    expect(page.locator("#federation-rounds tbody tr").first.locator("td").nth(1)).to_have_text("2.5")
    expect(page.locator(".site-status[data-site='2']")).to_have_text("dropped")
    expect(page.locator("#rounds-progress")).to_have_attribute("value", "1")
    report({"event": "round", "round": 2, "loss": 1.75, "survivors": [1, 2], "seconds": 29.0})
    report({"event": "done"})
    report({"event": "adapter", "model": journey.found["adapter"]})
    expect(page.locator("#federation-status")).to_have_attribute("data-status", "done")
    expect(page.locator("#federation-rounds tbody tr")).to_have_count(2)
    expect(page.get_by_role("img", name=re.compile("Mean training loss by round"))).to_be_visible()
    link = page.locator("#federation-adapter a").first
    expect(link).to_have_attribute("href", f"#/models/{quote(journey.found['adapter'], safe='')}")
    journey.shot("federation")

    page.fill("#invite-name", "clinic-3")
    page.click("#invite-submit")
    command = page.locator("#invite-command")
    expect(command).to_contain_text(f"adaptery fed join --server {server.url} --token ")
    token = re.search(r"--token (\S+)", command.inner_text()).group(1)
    listed = api.get(f"/api/federations/{fed}").json()["invitations"]
    assert [i["name"] for i in listed] == ["clinic-3"] and token not in str(listed)  # shown once, kept as a hash
    api.close()


def test_a_member_of_another_tenant_sees_none_of_it(journey: Journey) -> None:
    created = journey.server.cli("tenants", "create", "other-lab", "--owner", "bob")
    assert created.returncode == 0, created.stderr
    # the CLI runs beside the server without its port: keep the link's token, not its address
    token = re.search(r"ADAPTERY_LOGIN_URL=\S+/auth/link\?token=(\S+)", created.stdout).group(1)
    link = f"{journey.server.url}/auth/link?token={token}"
    context = journey.browser.new_context(viewport={"width": 1280, "height": 860})
    bob = context.new_page()
    bob.goto(link)
    bob.click("#link-submit")
    expect(bob.locator("#tenant-name")).to_have_text("other-lab")
    url = journey.server.url
    expect(bob.locator("#conversations")).to_contain_text("No saved chats yet")
    expect(bob.locator(f"#model-select option[value='{journey.found['adapter']}']")).to_have_count(0)
    bob.goto(f"{url}/#/datasets")
    expect(bob.locator(".page")).to_contain_text("No datasets yet")
    bob.goto(f"{url}/#/fine-tune")
    expect(bob.locator("#jobs")).to_contain_text("No fine-tunes yet")
    bob.goto(f"{url}/#/models")
    expect(bob.locator(".page")).to_contain_text("No adapters yet")
    bob.goto(f"{url}/#/keys")
    expect(bob.locator("#keys")).not_to_contain_text("notebook")
    journey.shot("other-tenant-models", page=bob)
    for route, shown in [
        (f"datasets/{journey.found['dataset']}", "No dataset"),
        (f"jobs/{journey.found['job']}", "No fine-tuning job"),
        (f"chat/{journey.found['conversation']}", "No conversation"),
        (f"models/{journey.found['adapter']}", "does not exist"),
        (f"federations/{journey.found['federation']}", "No federation"),
    ]:
        bob.goto(f"{url}/#/{route}")
        expect(bob.locator("#view")).to_contain_text(shown)
    bob.goto(f"{url}/#/admin")
    expect(bob.locator("#members")).not_to_contain_text("ada")
    context.close()


def test_someone_with_an_account_is_invited_accepts_and_switches_workspace(journey: Journey) -> None:
    context, carol = journey.new_tenant_owner("third-lab", "carol")
    expect(carol.locator("#tenant-switch")).to_be_hidden()

    page = journey.page
    journey.go("admin")
    page.fill("#invite-username", "carol")
    page.select_option("#invite-role", "member")
    page.click("#invite-submit")
    expect(page.locator("#invite-link")).to_contain_text("already has an account")
    accept_url = page.locator("#invite-link-value").inner_text()  # accepts; never signs in as carol
    assert "/invitations/accept?" in accept_url and "/auth/link" not in accept_url
    expect(page.locator("#members")).to_contain_text("Invitations waiting")

    # the account named carol sees the invitation, but joins only with the link the admin sent
    carol.reload()
    expect(carol.locator("#invitations-banner")).to_contain_text("default invites you as member")
    expect(carol.locator("#invitations-banner")).to_contain_text("open the link its admin sent you")
    expect(carol.get_by_role("button", name="Accept")).to_have_count(0)
    signed_out = journey.browser.new_context().new_page()
    signed_out.goto(accept_url)
    expect(signed_out.locator("#invitation-hint")).to_be_visible()  # sign in first; the link stays
    signed_out.context.close()
    carol.goto(accept_url)
    carol.get_by_role("button", name="Accept").click()
    expect(carol.locator("#invitations-banner")).to_be_hidden()
    assert "token" not in carol.url
    expect(carol.locator("#tenant-switch")).to_be_visible()
    carol.select_option("#tenant-switch", label="default (member)")
    expect(carol.locator("#tenant-name")).to_have_text("default")
    carol.goto(f"{journey.server.url}/#/datasets")
    expect(carol.get_by_role("link", name="lab-facts")).to_be_visible()
    context.close()


def test_a_401_for_a_session_the_browser_has_since_replaced_leaves_it_signed_in(journey: Journey) -> None:
    """A request the page sent with the session it held before a tenant switch (which ends that session) came back
    401 after the switch, and sent the page to the sign-in form (the invitation test above failed so under load). A
    401 now counts only for the session the browser still holds: each session has its own CSRF cookie."""
    context, dave = journey.new_tenant_owner("fourth-lab", "dave")
    csrf = next(c for c in context.cookies() if c["name"] == "adaptery_csrf")
    ended = json.dumps({"error": {"message": "Your session has ended.", "type": "invalid_request_error",
                                  "param": None, "code": "session_expired"}})  # fmt: skip
    answered: list[str] = []

    def replaced_meanwhile(route: Route) -> None:  # the browser's session is replaced while this request is out
        context.add_cookies([{**csrf, "value": "the-next-sessions-token"}])
        answered.append(route.request.url)
        route.fulfill(status=401, content_type="application/json", body=ended)

    dave.route("**/api/datasets", replaced_meanwhile)
    journey_go = f"{journey.server.url}/#/datasets"
    dave.goto(journey_go)
    for _ in range(200):  # until the page has had its answer
        if answered:
            break
        dave.wait_for_timeout(50)
    assert answered, "the datasets page did not ask for its list"
    dave.wait_for_timeout(500)  # the page has read the 401 by now: what it did with it shows
    expect(dave.locator("#login-view")).to_be_hidden()
    expect(dave.locator("#app")).to_be_visible()

    dave.unroute("**/api/datasets")  # a 401 for the session the browser holds still signs it out
    dave.route("**/api/datasets", lambda route: route.fulfill(status=401, content_type="application/json", body=ended))
    dave.goto(f"{journey.server.url}/#/models")
    dave.goto(journey_go)
    expect(dave.locator("#login-view")).to_be_visible()
    context.close()


def test_platform_administration_is_a_step_up_with_the_password(journey: Journey) -> None:
    page = journey.page
    journey.go("admin")
    expect(page.locator("#platform-form")).to_be_visible()
    expect(page.locator("#tenants")).to_have_count(0)  # the tenant session carries no platform power
    page.fill("#platform-password", "not my password")
    page.click("#platform-form button[type=submit]")
    expect(page.locator("#view")).to_contain_text("password is wrong")
    page.fill("#platform-password", PASSWORD)
    page.click("#platform-form button[type=submit]")
    expect(page.locator("#tenants")).to_contain_text("third-lab")
    journey.shot("admin-platform")
    page.click("#platform-leave")
    expect(page.locator("#tenants")).to_have_count(0)


# Every table cell can be reached at phone width: it is on screen, or inside a wrapper that scrolls sideways.
UNREACHABLE_CELLS = """() => {
  const out = [];
  for (const cell of document.querySelectorAll('#view td, #view th')) {
    const box = cell.getBoundingClientRect();
    if (!box.width || (box.left >= 0 && box.right <= innerWidth + 0.5)) continue;
    let wrap = cell.closest('.table-wrap');  // the outermost: a nested table scrolls with the one it is in
    while (wrap && wrap.parentElement.closest('.table-wrap')) wrap = wrap.parentElement.closest('.table-wrap');
    const scrolls = wrap && wrap.scrollWidth > wrap.clientWidth
      && ['auto', 'scroll'].includes(getComputedStyle(wrap).overflowX);
    const inView = wrap && wrap.getBoundingClientRect().right <= innerWidth + 0.5;
    if (!(scrolls && inView)) out.push(cell.textContent.slice(0, 30));
  }
  return out;
}"""


def test_pages_fit_a_phone(journey: Journey) -> None:
    page = journey.page
    page.set_viewport_size({"width": 375, "height": 800})
    for route, name in [
        (f"chat/{journey.found['conversation']}", "phone-chat"),
        ("datasets", "phone-datasets"),
        (f"datasets/{journey.found['dataset']}/1", "phone-dataset"),
        ("fine-tune", "phone-fine-tune"),
        (f"jobs/{journey.found['job']}", "phone-job"),
        ("keys", "phone-keys"),
        ("admin", "phone-admin"),
    ]:
        journey.go(route)
        expect(page.locator("#view .page")).to_be_visible()
        page.wait_for_load_state("networkidle")
        journey.shot(name)
        # nothing wider than the screen: no sideways scrolling of the page itself
        assert page.evaluate("document.documentElement.scrollWidth") <= 375, name
        assert page.evaluate(UNREACHABLE_CELLS) == [], name
    # the menu shows every page: it wraps rather than hiding some off the edge
    for link in page.locator("#nav a:visible").all():
        box = link.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, link.inner_text()

    # on a phone, the answer and the message box are on screen together after a send
    question, _ = sample_question()
    journey.go(f"chat/{journey.found['conversation']}")
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-done", "false")
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    prompt, shown = page.locator("#prompt").bounding_box(), answer.bounding_box()
    assert prompt["y"] >= 0 and prompt["y"] + prompt["height"] <= 800
    assert shown["y"] < 800 and shown["y"] + shown["height"] > 0
    journey.shot("phone-chat-answered")
    page.set_viewport_size({"width": 1280, "height": 860})
