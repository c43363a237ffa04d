"""The feedback loop's collecting side in a real headless Chromium: the admin turns collection on, a person
gives a thumbs-down with a reason and corrects an answer in the chat, votes blind in the arena (the names
appear after the vote, the leaderboard counts it), and builds a DPO dataset of it all.

One server and one browser for the module (the `journey` fixture of `test_web_ui`); an adapter is imported
through the API so the arena has two models of the demo base."""

from __future__ import annotations

import httpx
from playwright.sync_api import expect

from tests.e2e.test_web_ui import Journey, journey, open_settings  # noqa: F401 - the module's shared browser
from tests.security.conftest import lora_zip


def test_give_feedback_vote_in_the_arena_and_build_a_dataset(journey: Journey, demo_model_dir) -> None:  # noqa: F811, ANN001
    page, server = journey.page, journey.server
    adapter = httpx.post(
        f"{server.url}/api/models/import",
        params={"base_model": "adaptery-demo", "suffix": "arena"},
        content=lora_zip(demo_model_dir, journey.tmp / "lora"),
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=120,
    )
    assert adapter.status_code == 200, adapter.text
    page.goto(server.login_url)
    expect(page.locator("#app")).to_be_visible()

    journey.go("feedback")  # collection is off until an admin says otherwise
    expect(page.locator("#feedback-policy")).to_contain_text("collects no feedback")
    page.select_option("#policy-collect", "feedback")
    page.click("#policy-save")
    expect(page.locator("#feedback-policy")).to_contain_text("Ratings, corrections and arena votes")

    journey.go("chat")
    expect(page.locator("#feedback-policy")).to_contain_text("the owner of the adapter that answered")
    page.select_option("#model-select", "adaptery-demo")
    open_settings(page)
    page.fill("#prompt", "Who runs the imaging lab?")
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    answer.get_by_role("button", name="Bad answer").click()
    expect(answer.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
    answer.locator(".feedback-reason").fill("it made a name up")
    answer.locator(".save-reason").click()
    expect(answer.locator(".save-reason")).to_have_text("Saved")
    answer.locator(".edit-answer").click()
    answer.locator(".correction-input").fill("Dr. Okafor runs the imaging lab.")
    answer.locator(".save-correction").click()
    expect(answer.locator(".correction")).to_contain_text("Dr. Okafor runs the imaging lab.")
    page.reload()  # kept: the thumb, the reason and the correction come back with the chat
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".correction")).to_contain_text("Dr. Okafor")
    expect(answer.locator(".feedback-reason")).to_have_value("it made a name up")
    journey.shot("chat-feedback")

    page.click("#open-arena")  # the arena is one click from the chat
    page.fill("#arena-prompt", "Name the lab's microscope.")
    page.fill("#arena-max-tokens", "8")
    page.click("#arena-run")
    expect(page.locator("#arena-votes")).to_be_visible(timeout=60_000)
    expect(page.locator("#arena-col-a .compare-model")).to_have_text("Model A")  # blind until the vote
    page.click("#vote-a")
    expect(page.locator("#arena-reveal")).to_contain_text("A was")
    expect(page.locator("#leaderboard tbody tr")).to_have_count(2)
    expect(page.locator("#leaderboard")).to_contain_text("1 vote(s)")
    journey.shot("arena")

    journey.go("feedback")
    expect(page.locator("table")).to_contain_text("corrected")
    page.fill("#build-name", "lab-feedback")
    page.select_option("#build-kind", "dpo")
    page.click("#build-run")
    expect(page.locator("#build-result")).to_contain_text("is ready", timeout=60_000)
    expect(page.locator("#build-result a")).to_have_text("lab-feedback")
    journey.shot("feedback-dataset")


def test_the_cli_sets_the_policy_gives_feedback_by_completion_id_and_shows_the_leaderboard(journey: Journey) -> None:  # noqa: F811
    server = journey.server
    shown = server.cli("feedback", "policy", "--collect", "all")
    assert shown.returncode == 0, shown.stderr
    assert "collect: all" in shown.stdout and "Every chat completion" in shown.stdout
    made = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        json={"model": "adaptery-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    given = server.cli("feedback", "give", made.json()["id"], "--rating", "1", "--reason", "fine")
    assert given.returncode == 0, given.stderr
    assert "Feedback fb_" in given.stdout
    unknown = server.cli("feedback", "give", "chatcmpl-unknown", "--rating", "1")
    assert unknown.returncode == 1 and "Error 404" in unknown.stderr
    board = server.cli("feedback", "leaderboard", "adaptery-demo")
    assert board.returncode == 0 and "1 vote(s)" in board.stdout
