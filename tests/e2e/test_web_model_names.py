"""The Models page's stable names in a real headless Chromium (the fixtures of test_web_ui): make a name, promote
another adapter to it, roll back, promote a version from its list, read the history, and find the name in the
chat's model picker. Two imported adapters stand in for trained ones (no training run: a few seconds)."""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import expect

from tests.e2e.test_web_ui import Journey, journey  # noqa: F401 - the module's server and browser
from tests.security.conftest import lora_zip

NAME = "lab-assistant"


def import_adapter(web: Journey, demo_model_dir, suffix: str, seed: int) -> str:  # noqa: ANN001
    data = lora_zip(demo_model_dir, web.tmp / suffix, seed=seed)
    response = httpx.post(
        f"{web.server.url}/api/models/import",
        params={"base_model": "adaptery-demo", "suffix": suffix},
        content=data,
        headers={"Authorization": f"Bearer {web.server.api_key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def confirm(web: Journey) -> None:
    web.page.click("#dialog-confirm")


def test_models_page_names_versions_promote_and_roll_back(journey: Journey, demo_model_dir) -> None:  # noqa: ANN001, F811
    page = journey.page
    first = import_adapter(journey, demo_model_dir, "first", 1)
    second = import_adapter(journey, demo_model_dir, "second", 2)
    page.goto(journey.server.login_url)
    expect(page.locator("#app")).to_be_visible()

    journey.go("models")
    page.fill("#name-new", NAME)
    page.select_option("#name-version", first)
    page.click("#name-create")
    card = page.locator(f"#name-{NAME}")
    expect(card).to_have_attribute("data-current", "1")
    expect(card).to_contain_text(f"ft:adaptery-demo:default:{NAME}")

    page.select_option(f"#promote-pick-{NAME}", second)  # another adapter becomes version 2 as it is promoted
    page.click(f"#promote-adapter-{NAME}")
    confirm(journey)
    expect(card).to_have_attribute("data-current", "2")
    versions = card.locator("table").first
    expect(versions.locator("tr", has_text="v2")).to_contain_text("current")

    page.click(f"#rollback-{NAME}")
    confirm(journey)
    expect(card).to_have_attribute("data-current", "1")
    page.click(f"#promote-{NAME}-v2")
    confirm(journey)
    expect(card).to_have_attribute("data-current", "2")

    card.locator("details.name-history summary").click()
    history = card.locator("details.name-history tbody tr")
    expect(history).to_have_count(4)
    expect(history.first).to_contain_text(re.compile(r"promote\s*v1\s*v2"))
    journey.shot("model-names")

    journey.go("chat")
    expect(page.locator(f"#model-select option[value='ft:adaptery-demo:default:{NAME}']")).to_have_count(1)


def test_the_cli_shows_the_history_rolls_back_and_refuses_a_bad_share(journey: Journey) -> None:  # noqa: F811
    shown = journey.server.cli("names", "show", NAME)
    assert shown.returncode == 0, shown.stderr
    assert "answers from version 2" in shown.stdout and "rollback" in shown.stdout
    rolled = journey.server.cli("names", "rollback", NAME)
    assert rolled.returncode == 0 and "answers from version 1" in rolled.stdout, rolled.stderr
    refused = journey.server.cli("names", "canary", NAME, "2", "--share", "250")
    assert refused.returncode == 1 and "share" in refused.stderr
