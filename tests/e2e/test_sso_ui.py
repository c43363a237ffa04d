"""Single sign-on in a real headless Chromium against a real OpenID provider (oidc-provider on Node.js): the
owner maps the provider's groups to roles on the admin page; people sign in through the provider and get the
role of their group; someone taken out of the group is refused at their next sign-in and their open session
ends; signing out ends the provider's session too; with passwords and links turned off, the owner's session
ends and their password no longer signs in.

The provider comes from `ADAPTERY_OIDC_PROVIDERS` (the settings path); a platform admin binds it to the tenant
through the API. One server, one provider and one browser serve the module; the steps build on each other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.conftest import ARTIFACTS, ServerProcess, free_port, prepare_data_dir, start_server, stop_server
from tests.e2e.test_web_ui import CHROMIUM, LAUNCH_ARGS, PASSWORD
from tests.oidc_provider import CLIENT_ID, CLIENT_SECRET, OidcProvider, start_provider

SHOTS = ARTIFACTS / "screenshots"
ACCOUNTS = {
    "alice": {"email": "alice@uni.example", "groups": ["lab-staff"]},
    "bob": {"email": "bob@uni.example", "groups": ["lab-admins"]},
}


@dataclass
class Scene:
    server: ServerProcess
    provider: OidcProvider
    browser: Browser
    owner: Page  # the owner's own browser, signed in with the first-start link

    def fresh(self) -> tuple[BrowserContext, Page]:
        """Another person's browser: cookies of its own, here and at the provider."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 860})
        return context, context.new_page()

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Scene]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_factory.mktemp("sso-ui")
    provider_port = free_port()
    issuer = f"http://127.0.0.1:{provider_port}"
    configured = [
        {
            "name": "uni",
            "display_name": "University",
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
    ]
    data_dir = prepare_data_dir(tmp / "data", demo_model_dir)
    server = start_server(
        data_dir,
        f"sqlite:///{tmp / 'adaptery.db'}",
        extra_env={"ADAPTERY_OIDC_PROVIDERS": json.dumps(configured), "ADAPTERY_EMBEDDED_AGENT": "false"},
    )
    provider = None
    try:
        provider = start_provider(tmp / "provider", [server.url], ACCOUNTS, port=provider_port)
        tenant_id = httpx.get(f"{server.url}/api/me", headers={"Authorization": f"Bearer {server.api_key}"}).json()[
            "tenant"
        ]["id"]
        bound = httpx.put(
            f"{server.url}/api/platform/tenants/{tenant_id}/identity-providers",
            headers={"Authorization": f"Bearer {server.api_key}"},
            json={"providers": ["uni"]},
        )
        assert bound.status_code == 200, bound.text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            owner = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            owner.on("pageerror", lambda e: errors.append(str(e)))
            yield Scene(server, provider, browser, owner)
            browser.close()
            assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        if provider is not None:
            provider.stop()
        stop_server(server)


def sign_in_through_the_provider(scene: Scene, page: Page, login: str) -> None:
    page.goto(scene.server.url)
    page.click("#sso-uni")
    expect(page.locator("#op-login")).to_be_visible()
    page.fill("#op-login", login)
    page.fill("#op-password", f"{login} password")
    page.click("#op-submit")


def test_the_owner_maps_groups_to_roles_on_the_admin_page(scene: Scene) -> None:
    page = scene.owner
    page.goto(scene.server.login_url)
    page.click("#link-submit")
    expect(page.locator("#app")).to_be_visible()
    page.fill("#new-password", PASSWORD)  # for the last step: a password that stops working
    page.click("#set-password-submit")
    expect(page.locator("#password-banner")).to_be_hidden()
    page.goto(f"{scene.server.url}/#/admin")
    card = page.locator("#sso-card")
    expect(card).to_contain_text("Trusted identity providers: University")
    for group, role in (("lab-staff", "member"), ("lab-admins", "admin")):
        page.fill("#sso-rule-group", group)
        page.select_option("#sso-rule-role", role)
        page.click("#sso-rule-add")
        expect(card.locator("tr", has_text=group)).to_contain_text(role)
    scene.shot(page, "sso-rules")


def test_people_sign_in_through_the_provider_with_the_role_of_their_group(scene: Scene) -> None:
    for login, role in (("alice", "member"), ("bob", "admin")):
        context, page = scene.fresh()
        page.goto(scene.server.url)
        expect(page.locator("#sso-uni")).to_have_text("Sign in with University")
        scene.shot(page, "sso-sign-in")
        sign_in_through_the_provider(scene, page, login)
        expect(page.locator("#app")).to_be_visible()
        expect(page.locator("#user-name")).to_have_text(login)
        expect(page.locator("#user-role")).to_have_text(role)
        expect(page.locator("#password-banner")).to_be_hidden()  # the provider vouches for them: no password
        if role == "admin":
            expect(page.locator("#nav-admin")).to_be_visible()
        else:
            expect(page.locator("#nav-admin")).to_be_hidden()
        context.storage_state(path=str(scene.provider.workdir / f"{login}.json"))
        context.close()


def test_someone_taken_out_of_the_group_is_refused_and_their_session_ends(scene: Scene) -> None:
    kept = scene.browser.new_context(storage_state=str(scene.provider.workdir / "alice.json"))
    open_page = kept.new_page()
    open_page.goto(scene.server.url)
    expect(open_page.locator("#user-name")).to_have_text("alice")  # her session from before

    scene.provider.set_groups("alice", ["visitors"])
    context, page = scene.fresh()
    sign_in_through_the_provider(scene, page, "alice")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#sso-error")).to_contain_text("gives you no role in any workspace here")
    scene.shot(page, "sso-refused")
    context.close()

    open_page.reload()
    expect(open_page.locator("#login-form")).to_be_visible()  # her open session ended with her membership
    kept.close()


def test_signing_out_ends_the_providers_session_too(scene: Scene) -> None:
    context = scene.browser.new_context(storage_state=str(scene.provider.workdir / "bob.json"))
    page = context.new_page()
    page.goto(scene.server.url)
    expect(page.locator("#user-name")).to_have_text("bob")
    page.click("#logout")
    expect(page.locator("#op-logout")).to_be_visible()  # the provider asks before ending its session
    page.click("#op-logout")
    expect(page.locator("#login-form")).to_be_visible()  # back on the platform's sign-in page
    page.click("#sso-uni")
    expect(page.locator("#op-login")).to_be_visible()  # the provider asks who it is again
    context.close()


def test_with_passwords_and_links_off_a_password_no_longer_signs_in(scene: Scene) -> None:
    page = scene.owner
    page.goto(f"{scene.server.url}/#/admin")
    page.uncheck("#sso-password-sign-in")
    page.uncheck("#sso-link-sign-in")  # the owner's session came from the first-start link
    page.click("#sso-policy-save")
    page.click("#dialog-confirm")
    expect(page.locator("#toast")).to_contain_text("Single sign-on saved")
    page.reload()
    expect(page.locator("#login-form")).to_be_visible()  # the owner's own session ended
    page.fill("#username", "owner")
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("turned password sign-in off")
    audit = httpx.get(
        f"{scene.server.url}/api/admin/audit",
        params={"action": "sso.policy_change"},
        headers={"Authorization": f"Bearer {scene.server.api_key}"},
    ).json()
    assert audit["data"][0]["detail"]["password_sign_in"] is False
