"""Single sign-on against a real OpenID provider (oidc-provider on Node.js), as an attacker tries it.

The attacks come first: a forged ID token, an expired one, one for another audience or issuer, another
sign-in's nonce, `alg: none`, a wrong or replayed `state`, an answer delivered to another browser (login CSRF),
a mixed-up issuer. Then the tenancy questions: a person of tenant A's provider never gets into tenant B, and an
email or username a provider asserts never takes over an existing local account (it makes a new person).
Then the life of an SSO member: provisioned on first sign-in with the role of their group, re-ruled at every
sign-in, cut off (sessions and keys) when the group goes; passwords and links turned off per tenant.

One provider process and one platform serve the module; each test signs in afresh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adaptery.api.app import create_app
from adaptery.auth.secrets import hash_password
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit
from tests.conftest import PostgresDatabases
from tests.integration.conftest import make_settings
from tests.oidc_provider import (
    CLIENT_ID,
    CLIENT_SECRET,
    OidcProvider,
    claims_of,
    new_key,
    sign_in_at_provider,
    start_provider,
)

BASE_URL = "http://127.0.0.1:8000"  # the platform's public URL (settings' default); the test carries the redirects
PASSWORD = "correct horse battery"
ACCOUNTS = {
    "alice": {"email": "alice@uni.example", "groups": ["lab-staff"]},
    "bob": {"email": "bob@uni.example", "groups": ["lab-admins", "lab-staff"]},
    "carol": {"email": "carol@uni.example", "groups": ["other-dept"]},
    # asserts the username and email of a local account of the tenant below: must not become them
    "mallory": {"email": "victim@lab.example", "preferred_username": "victim", "groups": ["lab-staff"]},
}


class TokenTamper(httpx.BaseTransport):
    """The network between the platform and the provider: passes everything, or rewrites the ID token of the
    token endpoint's answer (what a forger in the middle, or a compromised proxy, would do)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.rewrite: Callable[[str], str] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.rewrite is None or request.url.path != "/token":
            return response
        response.read()
        body = json.loads(response.content)
        body["id_token"] = self.rewrite(body["id_token"])
        return httpx.Response(response.status_code, json=body)


@dataclass
class Sso:
    platform: Platform
    client: TestClient
    provider: OidcProvider
    tamper: TokenTamper
    owner_key: str  # the first tenant's owner, a platform admin
    tenant_id: str
    other_tenant_id: str
    other_key: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.owner_key}"}

    def browser(self) -> TestClient:
        return TestClient(self.client.app, base_url="http://testserver")

    def start(self, browser: TestClient, provider: str = "uni", tenant: str | None = None) -> str:
        params = {"tenant": tenant} if tenant else {}
        response = browser.get(f"/auth/oidc/{provider}/start", params=params, follow_redirects=False)
        assert response.status_code == 303, response.text
        assert response.headers["location"].startswith(self.provider.issuer), response.headers["location"]
        return response.headers["location"]

    def come_back(self, browser: TestClient, callback_url: str) -> httpx.Response:
        assert callback_url.startswith(BASE_URL + "/auth/oidc/callback?"), callback_url
        return browser.get(callback_url.removeprefix(BASE_URL), follow_redirects=False)

    def sign_in(
        self, login: str, *, provider: str = "uni", tenant: str | None = None
    ) -> tuple[TestClient, httpx.Response]:
        browser = self.browser()
        answer = self.come_back(browser, sign_in_at_provider(self.start(browser, provider, tenant), login))
        if answer.headers.get("location") == "/":
            browser.headers["x-csrf-token"] = browser.cookies.get("adaptery_csrf")
        return browser, answer


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sso(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresDatabases | None,
    demo_model_dir: Path,
) -> Iterator[Sso]:
    if request.param == "postgresql" and postgres is None:
        pytest.skip("PostgreSQL runs when ADAPTERY_TEST_DATABASE_URL is set")
    tmp = tmp_path_factory.mktemp("sso")
    provider = start_provider(tmp / "provider", [BASE_URL], ACCOUNTS)
    provider.clients = [
        {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": provider.redirect_uris,
            "post_logout_redirect_uris": provider.post_logout_redirect_uris,
        },
        {
            "client_id": "partner-client",
            "client_secret": "the partner's secret",
            "redirect_uris": provider.redirect_uris,
            "post_logout_redirect_uris": provider.post_logout_redirect_uris,
        },
    ]
    provider.stop()
    provider.start()
    url = f"sqlite:///{tmp / 'adaptery.db'}" if request.param == "sqlite" else postgres.create()
    platform = Platform(make_settings(tmp, url, demo_model_dir, embedded_agent=False, oidc_jwks_refresh_seconds=0))
    first = platform.prepare()
    tamper = TokenTamper()
    platform.oidc.http = httpx.Client(transport=tamper, timeout=30)
    try:
        with TestClient(create_app(platform, manage_lifecycle=False)) as client:
            with platform.db.system() as s:
                tenant_id = s.scalar(select(m.Tenant.id).where(m.Tenant.name == first.tenant))
                victim = m.User(id="user_victim", username="victim", password_hash=hash_password(PASSWORD))
                s.add(victim)
                s.flush()
                s.add(m.Membership(id="mem_victim", tenant_id=tenant_id, user_id=victim.id, role="admin"))
            other = Sso(platform, client, provider, tamper, first.api_key, tenant_id, "", "")
            created = client.post(
                "/api/platform/identity-providers",
                headers=other.auth(),
                json={
                    "name": "uni",
                    "display_name": "University",
                    "issuer": provider.issuer,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                },
            )
            assert created.status_code == 201, created.text
            assert "client_secret" not in created.json()
            partner = client.post(
                "/api/platform/identity-providers",
                headers=other.auth(),
                json={
                    "name": "partner",
                    "issuer": provider.issuer,
                    "client_id": "partner-client",
                    "client_secret": "the partner's secret",
                },
            )
            assert partner.status_code == 201, partner.text
            bound = client.put(
                f"/api/platform/tenants/{tenant_id}/identity-providers",
                headers=other.auth(),
                json={"providers": ["uni"]},
            )
            assert bound.status_code == 200, bound.text
            rules = client.put(
                "/api/admin/sso/rules",
                headers=other.auth(),
                json={
                    "rules": [
                        {"provider": "uni", "group": "lab-staff", "role": "member"},
                        {"provider": "uni", "group": "lab-admins", "role": "admin"},
                    ]
                },
            )
            assert rules.status_code == 200, rules.text
            # tenant B trusts only the partner provider, and its rules would give lab-staff a role there
            with platform.db.system() as s:
                from adaptery.services import tenants

                made = tenants.create_tenant(s, "other-lab", "other-owner", login_link_hours=1, invitation_days=1)
                other_tenant_id = made.tenant.id
            bound = client.put(
                f"/api/platform/tenants/{other_tenant_id}/identity-providers",
                headers=other.auth(),
                json={"providers": ["partner"]},
            )
            assert bound.status_code == 200, bound.text
            rules = client.put(
                "/api/admin/sso/rules",
                headers={"Authorization": f"Bearer {made.api_key}"},
                json={"rules": [{"provider": "partner", "group": "lab-staff", "role": "owner"}]},
            )
            assert rules.status_code == 200, rules.text
            yield Sso(platform, client, provider, tamper, first.api_key, tenant_id, other_tenant_id, made.api_key)
    finally:
        platform.oidc.http.close()
        provider.stop()
        platform.db.dispose()
        if request.param != "sqlite":
            postgres.drop(url)


@pytest.fixture
def tampered(sso: Sso) -> Iterator[Callable[[Callable[[str], str]], None]]:
    def use(rewrite: Callable[[str], str]) -> None:
        sso.tamper.rewrite = rewrite

    yield use
    sso.tamper.rewrite = None


def refused_with(answer: httpx.Response, reason: str) -> None:
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == f"/?sso={reason}", answer.headers["location"]
    assert "adaptery_session" not in answer.cookies


def last_sign_in(sso: Sso) -> m.AuditEvent:
    with sso.platform.db.system() as s:
        event = s.scalar(
            select(m.AuditEvent).where(m.AuditEvent.action == "auth.sign_in").order_by(m.AuditEvent.seq.desc())
        )
        s.expunge(event)
        return event


def now() -> int:
    return int(time.time())


# -- 1. attacks on the token ------------------------------------------------------------------------------------


def test_an_id_token_forged_with_another_key_under_the_providers_key_id_is_refused(sso: Sso, tampered):
    forger = new_key(sso.provider.keys[0].kid)  # same kid, not the provider's key
    tampered(lambda genuine: sso.provider.mint(claims_of(genuine), key=forger))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_signature")
    event = last_sign_in(sso)
    assert event.outcome == "failure" and event.detail["reason"] == "bad_signature"


def test_an_id_token_signed_with_an_unpublished_key_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint(claims_of(genuine), key=new_key("not-published")))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_signature")


def test_an_unsigned_id_token_is_refused(sso: Sso, tampered):
    def unsigned(genuine: str) -> str:
        header, payload, _ = genuine.split(".")
        none = json.dumps({"alg": "none", "typ": "JWT"}).encode()
        import base64

        return base64.urlsafe_b64encode(none).rstrip(b"=").decode() + "." + payload + "."

    tampered(unsigned)
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_algorithm")


def test_an_id_token_macd_with_the_client_secret_is_refused(sso: Sso, tampered):
    from joserfc.jwk import OctKey

    secret = OctKey.import_key(CLIENT_SECRET.encode())
    tampered(lambda genuine: jwt_encode_hs256(claims_of(genuine), secret))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_algorithm")


def jwt_encode_hs256(claims: dict, key) -> str:  # noqa: ANN001
    from joserfc import jwt

    return jwt.encode({"alg": "HS256"}, claims, key)


def test_an_expired_id_token_signed_by_the_provider_is_refused(sso: Sso, tampered):
    expired = {"exp": now() - 600, "iat": now() - 4200}  # ten minutes past, beyond the allowed clock skew
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), **expired}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "expired_token")


def test_an_id_token_issued_in_the_future_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), "iat": now() + 3600, "exp": now() + 7200}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_iat")


def test_an_id_token_with_another_sign_ins_nonce_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), "nonce": "the nonce of another sign-in"}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_nonce")


def test_an_id_token_without_a_nonce_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({k: v for k, v in claims_of(genuine).items() if k != "nonce"}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_nonce")


def test_an_id_token_for_another_client_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), "aud": "partner-client"}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_aud")


def test_an_id_token_from_another_issuer_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), "iss": "https://evil.example"}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_iss")


def test_an_id_token_with_an_overlong_subject_is_refused_not_cut(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), "sub": "alice" + "x" * 300}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_sub")


def test_an_id_token_with_several_audiences_not_authorized_for_us_is_refused(sso: Sso, tampered):
    tampered(lambda genuine: sso.provider.mint({**claims_of(genuine), "aud": [CLIENT_ID, "partner-client"]}))
    _, answer = sso.sign_in("alice")
    refused_with(answer, "bad_azp")


# -- 2. attacks on the flow -------------------------------------------------------------------------------------


def test_a_wrong_state_is_refused(sso: Sso):
    browser = sso.browser()
    callback = sign_in_at_provider(sso.start(browser), "alice")
    forged = callback.replace("state=", "state=x")
    refused_with(sso.come_back(browser, forged), "bad_state")
    refused_with(
        sso.come_back(browser, callback.split("&state=")[0].split("?state=")[0] + "?code=abc"), "missing_state"
    )


def test_an_answer_delivered_to_another_browser_is_refused(sso: Sso):
    """Login CSRF: the attacker signs in as themself and hands the victim's browser the callback URL."""
    attacker = sso.browser()
    callback = sign_in_at_provider(sso.start(attacker), "carol")
    victim = sso.browser()
    victim.get("/auth/oidc/uni/start", follow_redirects=False)  # the victim has a sign-in cookie of their own
    refused_with(sso.come_back(victim, callback), "browser_mismatch")
    refused_with(sso.come_back(sso.browser(), callback), "browser_mismatch")  # or none at all


def test_a_callback_is_used_once(sso: Sso):
    browser, answer = sso.sign_in("alice")
    assert answer.headers["location"] == "/"
    browser2 = sso.browser()
    callback = sign_in_at_provider(sso.start(browser2), "alice")
    assert sso.come_back(browser2, callback).headers["location"] == "/"
    refused_with(sso.come_back(browser2, callback), "bad_state")


def test_an_answer_naming_another_issuer_is_refused(sso: Sso):
    """RFC 9207: an authorization response carries `iss`; one from another provider is a mix-up."""
    browser = sso.browser()
    callback = sign_in_at_provider(sso.start(browser), "alice")
    assert "iss=" in callback
    mixed = callback.replace("iss=", "iss=https%3A%2F%2Fevil.example&was=")
    refused_with(sso.come_back(browser, mixed), "bad_iss")


def test_a_provider_error_is_refused_and_audited(sso: Sso):
    browser = sso.browser()
    authorize = sso.start(browser)
    state = httpx.URL(authorize).params["state"]
    answer = browser.get(
        "/auth/oidc/callback",
        params={"state": state, "error": "access_denied", "iss": sso.provider.issuer},
        follow_redirects=False,
    )
    refused_with(answer, "provider_error")
    assert last_sign_in(sso).detail["reason"] == "provider_error"


def test_the_authorization_request_uses_pkce_state_and_nonce(sso: Sso):
    params = httpx.URL(sso.start(sso.browser())).params
    assert params["response_type"] == "code" and params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43 and len(params["state"]) >= 43 and len(params["nonce"]) >= 43
    assert params["redirect_uri"] == BASE_URL + "/auth/oidc/callback"


def test_unknown_provider_goes_back_to_the_sign_in_page(sso: Sso):
    answer = sso.browser().get("/auth/oidc/nope/start", follow_redirects=False)
    assert answer.headers["location"] == "/?sso=provider_not_found"


def test_signing_in_gives_a_new_session_and_ends_the_one_the_browser_held(sso: Sso):
    """Session fixation: whatever session cookie the browser carried (planted, or the last person's) ends."""
    browser = sso.browser()
    assert browser.post("/api/auth/login", json={"username": "victim", "password": PASSWORD}).status_code == 200
    planted = browser.cookies.get("adaptery_session")
    answer = sso.come_back(browser, sign_in_at_provider(sso.start(browser), "alice"))
    assert answer.headers["location"] == "/"
    fresh = answer.cookies.get("adaptery_session")
    assert fresh and fresh != planted
    stale = sso.browser()
    stale.cookies.set("adaptery_session", planted)
    assert stale.get("/api/me").status_code == 401


# -- 3. tenancy -------------------------------------------------------------------------------------------------


def test_sign_in_provisions_a_member_with_the_role_of_their_group(sso: Sso):
    browser, answer = sso.sign_in("alice")
    assert answer.headers["location"] == "/"
    me = browser.get("/api/me").json()
    assert me["user"]["username"] == "alice" and me["role"] == "member" and me["sign_in_method"] == "sso"
    assert me["tenant"]["id"] == sso.tenant_id
    assert [t["id"] for t in me["tenants"]] == [sso.tenant_id]
    bob, _ = sso.sign_in("bob")
    assert bob.get("/api/me").json()["role"] == "admin"  # the highest of his groups' roles
    event = last_sign_in(sso)
    assert event.outcome == "success" and event.detail["provider"] == "uni" and event.actor == "bob"


def test_a_person_of_tenant_as_provider_never_gets_into_tenant_b(sso: Sso):
    """Tenant B trusts only its partner provider (whose lab-staff would be owners there). Alice, lab-staff at
    tenant A's provider, asks for B: she lands in A, has no membership in B, and cannot switch to it."""
    browser, answer = sso.sign_in("alice", tenant="other-lab")
    assert answer.headers["location"] == "/"
    me = browser.get("/api/me").json()
    assert me["tenant"]["id"] == sso.tenant_id and sso.other_tenant_id not in [t["id"] for t in me["tenants"]]
    assert browser.post("/api/auth/switch", json={"tenant_id": sso.other_tenant_id}).status_code == 404
    members = sso.client.get("/api/admin/members", headers=sso.auth(sso.other_key)).json()["data"]
    assert [member["username"] for member in members] == ["other-owner"]


def test_tenant_b_admits_people_of_the_provider_it_trusts_and_only_into_b(sso: Sso):
    """Through the partner provider (B's), alice is another person than through A's: B's rules make her an owner
    there, and that identity has nothing in A. (Its client secret holds a quote and spaces: sent form-encoded.)"""
    browser, answer = sso.sign_in("alice", provider="partner")
    assert answer.headers["location"] == "/", answer.headers["location"]
    me = browser.get("/api/me").json()
    assert me["tenant"]["id"] == sso.other_tenant_id and me["role"] == "owner"
    assert me["user"]["username"] == "alice-2" and [t["id"] for t in me["tenants"]] == [sso.other_tenant_id]


def test_an_unreachable_provider_sends_the_browser_back_with_why(sso: Sso):
    made = sso.client.post(
        "/api/platform/identity-providers",
        headers=sso.auth(),
        json={"name": "down", "issuer": "http://127.0.0.1:9", "client_id": "c"},
    )
    assert made.status_code == 201
    answer = sso.browser().get("/auth/oidc/down/start", follow_redirects=False)
    assert answer.headers["location"] == "/?sso=provider_unavailable"
    assert sso.client.delete("/api/platform/identity-providers/down", headers=sso.auth()).status_code == 204


def test_an_sso_session_cannot_switch_into_a_tenant_that_does_not_trust_its_provider(sso: Sso):
    """Even a member of B (invited there by hand, and accepted) does not enter B with A's provider's word."""
    sso.provider.add_account("frank", groups=["lab-staff"])
    browser, _ = sso.sign_in("frank")
    invited = sso.client.post("/api/admin/members", headers=sso.auth(sso.other_key), json={"username": "frank"})
    assert invited.status_code == 201 and invited.json()["status"] == "pending"
    invitation = browser.get("/api/invitations").json()["data"][0]["id"]
    token = parse_qs(urlsplit(invited.json()["accept_url"]).query)["token"][0]
    assert browser.post(f"/api/invitations/{invitation}/accept", json={"token": token}).status_code == 200
    switched = browser.post("/api/auth/switch", json={"tenant_id": sso.other_tenant_id})
    assert switched.status_code == 403 and switched.json()["error"]["code"] == "sign_in_method_refused"


def test_someone_whose_groups_have_no_rule_is_refused_and_gets_no_account_anywhere(sso: Sso):
    _, answer = sso.sign_in("carol")
    refused_with(answer, "no_role")
    with sso.platform.db.system() as s:
        carol = s.scalar(select(m.User).where(m.User.username == "carol"))
        assert s.scalars(select(m.Membership).where(m.Membership.user_id == carol.id)).all() == []
    event = last_sign_in(sso)
    assert event.outcome == "failure" and event.tenant_id == sso.tenant_id and event.detail["reason"] == "no_role"


def test_an_asserted_email_or_username_never_takes_over_a_local_account(sso: Sso):
    """mallory's provider account claims the username 'victim' and the victim's email: she becomes a new
    person ('victim-2'), not the local 'victim' (an admin of this tenant with a password)."""
    browser, answer = sso.sign_in("mallory")
    assert answer.headers["location"] == "/"
    me = browser.get("/api/me").json()
    assert me["user"]["username"] == "victim-2" and me["user"]["id"] != "user_victim"
    assert me["role"] == "member"  # lab-staff's role, not the victim's admin
    with sso.platform.db.system() as s:
        victim = s.get(m.User, "user_victim")
        assert s.scalar(select(m.SsoIdentity).where(m.SsoIdentity.user_id == victim.id)) is None
    local = sso.browser().post("/api/auth/login", json={"username": "victim", "password": PASSWORD})
    assert local.status_code == 200 and local.json()["role"] == "admin"  # the victim is untouched


def test_an_sso_person_gets_no_local_password_or_link(sso: Sso):
    browser, _ = sso.sign_in("alice")
    refused = browser.post("/api/auth/password", json={"password": "a password of my own"})
    assert refused.status_code == 403
    link = sso.client.post("/api/admin/members/alice/link", headers=sso.auth())
    assert link.status_code == 409 and link.json()["error"]["code"] == "signs_in_with_sso"


# -- 4. the rules, at every sign-in -----------------------------------------------------------------------------


def test_a_changed_group_changes_the_role_at_the_next_sign_in_and_a_lost_group_ends_access(sso: Sso):
    sso.provider.add_account("dave", email="dave@uni.example", groups=["lab-staff"])
    browser, _ = sso.sign_in("dave")
    assert browser.get("/api/me").json()["role"] == "member"
    key = browser.post("/api/keys", json={"name": "dave's"}).json()["value"]

    sso.provider.set_groups("dave", ["lab-admins"])
    promoted, _ = sso.sign_in("dave")
    assert promoted.get("/api/me").json()["role"] == "admin"
    assert browser.get("/api/me").json()["role"] == "admin"  # the older session follows the membership

    sso.provider.set_groups("dave", [])
    again, answer = sso.sign_in("dave")
    refused_with(answer, "no_role")
    for session in (browser, promoted):
        assert session.get("/api/me").status_code == 401  # his sessions ended
    assert sso.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401  # his key too
    with sso.platform.db.system() as s:
        actions = [
            e.action
            for e in s.scalars(select(m.AuditEvent).where(m.AuditEvent.target == "dave").order_by(m.AuditEvent.seq))
        ]
    assert actions[:1] == ["member.sso_add"] and "member.sso_role" in actions and "member.sso_remove" in actions
    assert actions[-1] == "auth.sign_in"

    sso.provider.set_groups("dave", ["lab-staff"])  # back in the group: back in, as a new membership
    back, answer = sso.sign_in("dave")
    assert answer.headers["location"] == "/" and back.get("/api/me").json()["role"] == "member"


def test_rule_changes_apply_at_the_next_sign_in_and_are_audited(sso: Sso):
    sso.provider.add_account("erin", groups=["visitors"])
    _, answer = sso.sign_in("erin")
    refused_with(answer, "no_role")
    current = sso.client.get("/api/admin/sso", headers=sso.auth()).json()["rules"]
    updated = sso.client.put(
        "/api/admin/sso/rules",
        headers=sso.auth(),
        json={"rules": [*current, {"provider": "uni", "group": "visitors", "role": "viewer"}]},
    )
    assert updated.status_code == 200, updated.text
    browser, _ = sso.sign_in("erin")
    assert browser.get("/api/me").json()["role"] == "viewer"
    with sso.platform.db.system() as s:
        event = s.scalar(
            select(m.AuditEvent).where(m.AuditEvent.action == "sso.rules_change").order_by(m.AuditEvent.seq.desc())
        )
        assert event.detail["added"] == [{"provider": "uni", "group": "visitors", "role": "viewer"}]
        assert audit.verify(s).ok
    restored = sso.client.put("/api/admin/sso/rules", headers=sso.auth(), json={"rules": current})
    assert restored.status_code == 200


def test_only_an_owner_makes_rules_that_make_admins_and_rules_name_the_tenants_providers(sso: Sso):
    bob, _ = sso.sign_in("bob")  # an admin through his group
    current = bob.get("/api/admin/sso").json()["rules"]
    more = {"provider": "uni", "group": "anyone", "role": "admin"}
    assert bob.put("/api/admin/sso/rules", json={"rules": [*current, more]}).status_code == 403
    other = {"provider": "partner", "group": "x", "role": "viewer"}
    refused = bob.put("/api/admin/sso/rules", json={"rules": [*current, other]})
    assert (
        refused.status_code == 400 and "not an identity provider of this tenant" in refused.json()["error"]["message"]
    )
    viewer = {"provider": "uni", "group": "guests", "role": "viewer"}
    assert bob.put("/api/admin/sso/rules", json={"rules": [*current, viewer]}).status_code == 200
    assert bob.put("/api/admin/sso/rules", json={"rules": current}).status_code == 200


# -- 5. keys rotate ---------------------------------------------------------------------------------------------


def test_a_rotated_signing_key_is_fetched_from_the_providers_jwks(sso: Sso):
    _, answer = sso.sign_in("alice")  # the platform has the old key set cached
    assert answer.headers["location"] == "/"
    fresh = sso.provider.rotate_keys()
    browser, answer = sso.sign_in("alice")
    assert answer.headers["location"] == "/", answer.headers["location"]
    token = sso.platform.oidc._cache[sso.provider.issuer].keys  # noqa: SLF001 - the cache is what rotated
    assert fresh.kid in [key.kid for key in token]


# -- 6. passwords and links off ---------------------------------------------------------------------------------


def test_passwords_and_links_off_refuse_local_sign_in_and_end_local_sessions(sso: Sso):
    victim = sso.browser()
    assert victim.post("/api/auth/login", json={"username": "victim", "password": PASSWORD}).status_code == 200
    victim.headers["x-csrf-token"] = victim.cookies.get("adaptery_csrf")
    with sso.platform.db.system() as s:
        from adaptery.services import tenants

        link = tenants.create_login_token(s, tenant_id=sso.tenant_id, user_id="user_victim", hours=1, purpose="reset")
    off = sso.client.put(
        "/api/admin/sso/policy", headers=sso.auth(), json={"password_sign_in": False, "link_sign_in": False}
    )
    assert off.status_code == 200 and off.json()["password_sign_in"] is False
    try:
        assert victim.get("/api/me").status_code == 401  # the password session ended
        refused = sso.browser().post("/api/auth/login", json={"username": "victim", "password": PASSWORD})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "password_sign_in_disabled"
        followed = sso.browser().post("/api/auth/link", json={"token": link})
        assert followed.status_code == 401 and followed.json()["error"]["code"] == "invalid_login_link"
        browser, answer = sso.sign_in("alice")  # single sign-on still works
        assert answer.headers["location"] == "/"
        event = sso.client.get("/api/admin/audit", headers=sso.auth(), params={"action": "sso.policy_change"})
        assert event.json()["data"][0]["detail"]["ended"] >= 1
    finally:
        on = sso.client.put(
            "/api/admin/sso/policy", headers=sso.auth(), json={"password_sign_in": True, "link_sign_in": True}
        )
        assert on.status_code == 200


def test_an_admin_cannot_turn_local_sign_in_off_and_lock_the_owners_out(sso: Sso):
    """The attacker's MEDIUM-3: a tenant admin turned passwords and links off, ending the owner's session and locking
    the local owner out of the page. Only an owner decides how people sign in."""
    admin = sso.browser()
    assert admin.post("/api/auth/login", json={"username": "victim", "password": PASSWORD}).status_code == 200
    admin.headers["x-csrf-token"] = admin.cookies.get("adaptery_csrf")
    assert admin.get("/api/me").json()["role"] == "admin"
    refused = admin.put("/api/admin/sso/policy", json={"password_sign_in": False, "link_sign_in": False})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_role"
    assert sso.client.get("/api/admin/sso", headers=sso.auth()).json()["password_sign_in"] is True
    assert admin.get("/api/me").status_code == 200  # nothing ended


def test_a_password_session_cannot_switch_into_a_tenant_with_passwords_off(sso: Sso):
    with sso.platform.db.system() as s:
        s.add(m.Membership(id="mem_victim_b", tenant_id=sso.other_tenant_id, user_id="user_victim", role="viewer"))
    other_owner = sso.auth(sso.other_key)
    rules = sso.client.get("/api/admin/sso", headers=other_owner).json()["rules"]
    assert rules, "tenant B administers itself through SSO (its lab-staff are owners), so passwords may go"
    off = sso.client.put(
        "/api/admin/sso/policy", headers=other_owner, json={"password_sign_in": False, "link_sign_in": True}
    )
    assert off.status_code == 200, off.text
    try:
        victim = sso.browser()
        assert victim.post("/api/auth/login", json={"username": "victim", "password": PASSWORD}).status_code == 200
        victim.headers["x-csrf-token"] = victim.cookies.get("adaptery_csrf")
        switched = victim.post("/api/auth/switch", json={"tenant_id": sso.other_tenant_id})
        assert switched.status_code == 403 and switched.json()["error"]["code"] == "sign_in_method_refused"
    finally:
        sso.client.put(
            "/api/admin/sso/policy", headers=other_owner, json={"password_sign_in": True, "link_sign_in": True}
        )
        with sso.platform.db.system() as s:
            s.delete(s.get(m.Membership, "mem_victim_b"))


def test_passwords_stay_on_until_someone_administers_the_tenant_through_sso(sso: Sso):
    made = sso.client.post(
        "/api/platform/identity-providers",
        headers=sso.auth(),
        json={"name": "lonely", "issuer": sso.provider.issuer, "client_id": "nobody"},
    )
    assert made.status_code == 201
    with sso.platform.db.system() as s:
        from adaptery.services import tenants

        third = tenants.create_tenant(s, "third-lab", "third-owner", login_link_hours=1, invitation_days=1)
    owner = {"Authorization": f"Bearer {third.api_key}"}
    off = {"password_sign_in": False, "link_sign_in": True}
    refused = sso.client.put("/api/admin/sso/policy", headers=owner, json=off)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_sso_administrator"
    sso.client.put(
        f"/api/platform/tenants/{third.tenant.id}/identity-providers",
        headers=sso.auth(),
        json={"providers": ["lonely"]},
    )
    assert sso.client.put("/api/admin/sso/policy", headers=owner, json=off).status_code == 409  # no admin rule yet
    rule = {"provider": "lonely", "group": "heads", "role": "owner"}
    assert sso.client.put("/api/admin/sso/rules", headers=owner, json={"rules": [rule]}).status_code == 200
    assert sso.client.put("/api/admin/sso/policy", headers=owner, json=off).status_code == 200
    unbound = sso.client.put(
        f"/api/platform/tenants/{third.tenant.id}/identity-providers", headers=sso.auth(), json={"providers": []}
    )
    assert unbound.status_code == 200  # nobody administers it through SSO now: passwords come back
    assert unbound.json()["password_sign_in"] is True and unbound.json()["rules"] == []
    assert sso.client.delete("/api/platform/identity-providers/lonely", headers=sso.auth()).status_code == 204
    assert sso.client.get("/api/admin/sso", headers=owner).json()["providers"] == []


# -- 7. sign-out ------------------------------------------------------------------------------------------------


def test_sign_out_ends_the_session_and_points_at_the_providers_logout(sso: Sso):
    browser, _ = sso.sign_in("alice")
    answer = browser.post("/api/auth/logout")
    assert answer.status_code == 200
    url = httpx.URL(answer.json()["end_session_url"])
    assert str(url).startswith(sso.provider.issuer + "/session/end")
    assert url.params["post_logout_redirect_uri"] == BASE_URL + "/" and url.params["id_token_hint"]
    assert browser.get("/api/me").status_code == 401
    event = sso.client.get("/api/admin/audit", headers=sso.auth(), params={"action": "auth.sign_out"}).json()
    assert event["data"][0]["detail"] == {"method": "sso", "provider_logout": True}
    # a password session signs out as before: 204, nothing to follow
    local = sso.browser()
    local.post("/api/auth/login", json={"username": "victim", "password": PASSWORD})
    assert (
        local.post("/api/auth/logout", headers={"x-csrf-token": local.cookies.get("adaptery_csrf")}).status_code == 204
    )


def test_the_sign_in_page_lists_the_providers_tenants_trust(sso: Sso):
    listed = sso.browser().get("/api/auth/providers").json()["data"]
    assert {"name": "uni", "display_name": "University", "start_url": "/auth/oidc/uni/start"} in listed
    assert all(choice["name"] != "lonely" for choice in listed)
    providers = sso.client.get("/api/platform/identity-providers", headers=sso.auth()).json()["data"]
    assert all("secret" not in json.dumps(p).replace("has_client_secret", "") for p in providers)
    with sso.platform.db.system() as s:
        sealed = s.scalar(select(m.IdentityProvider.secret_sealed).where(m.IdentityProvider.name == "uni"))
        assert CLIENT_SECRET not in sealed  # sealed under the master key


def test_a_client_secret_is_resealed_by_a_master_key_rotation(tmp_path: Path):
    from adaptery.db.session import Database
    from adaptery.services import sso as sso_service
    from adaptery.settings import Settings
    from adaptery.storage.crypto import LocalKeyProvider
    from adaptery.storage.keys import rotate_master_key

    database = Database(f"sqlite:///{tmp_path / 'rotation.db'}")
    database.migrate()
    key_file = tmp_path / "keys" / "master.key"
    try:
        with database.system() as s:
            made = sso_service.NewProvider(name="uni", issuer="https://idp.example", client_id="c", client_secret="s3")
            provider_id = sso_service.create_provider(s, LocalKeyProvider(key_file), made).id
        rotation = rotate_master_key(database, LocalKeyProvider(key_file))
        only_the_new_key = LocalKeyProvider(key_file)
        with database.system() as s:
            row = s.get(m.IdentityProvider, provider_id)
            assert row.secret_key_id == rotation.new_key_id
            assert sso_service.config(row, Settings(data_dir=tmp_path), only_the_new_key).client_secret == "s3"
    finally:
        database.dispose()


def test_a_role_lost_through_the_provider_withdraws_the_enrollment_tokens_made_with_it(sso: Sso):
    """As for an admin demoted by hand (an attacker's find): an SSO admin demoted by their groups leaves no
    enrollment token behind that could still join a machine to the tenant."""
    sso.provider.add_account("erin", email="erin@uni.example", groups=["lab-admins"])
    browser, _ = sso.sign_in("erin")
    made = browser.post("/api/admin/agents/tokens", json={"roles": ["train"], "island": "erins"})
    assert made.status_code == 200, made.text
    sso.provider.set_groups("erin", ["lab-staff"])
    demoted, _ = sso.sign_in("erin")
    assert demoted.get("/api/me").json()["role"] == "member"
    with sso.platform.db.system() as s:
        assert s.get(m.EnrollmentToken, made.json()["id"]) is None
