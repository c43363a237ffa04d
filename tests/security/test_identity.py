"""Who a person is, as an attacker tries it: invitations, sign-in links, passwords, platform power, keys.

Each test is an attack that worked before (issue 14's takeovers): a tenant owner inviting another tenant's
owner got a link that signed in as them, with platform power; a tenant admin rotated the owner's key and
held the owner's role and the platform flag; a password changed with no proof; a key minted a wider child.
"""

from __future__ import annotations

import time
from unittest import mock

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adaptery.auth.secrets import hash_password
from adaptery.db import models as m
from adaptery.services import sessions, tenants
from tests.conftest import link_token, use_sign_in_link
from tests.security.conftest import World

PASSWORD = "correct horse battery"


def set_password(world: World, username: str, password: str = PASSWORD) -> None:
    with world.platform.db.system() as s:
        s.query(m.User).filter_by(username=username).one().password_hash = hash_password(password)


def browser(world: World, ip: str = "198.51.100.7") -> TestClient:
    return TestClient(world.client.app, client=(ip, 40000))


def sign_in(world: World, username: str, password: str = PASSWORD, ip: str = "198.51.100.7") -> TestClient:
    client = browser(world, ip)
    response = client.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    client.headers["x-csrf-token"] = client.cookies.get("adaptery_csrf")
    return client


def follow_link(world: World, login_url: str) -> TestClient:
    client = browser(world)
    response = use_sign_in_link(client, login_url)
    assert response.status_code == 200, f"the link did not sign in: {response.text}"
    client.headers["x-csrf-token"] = client.cookies.get("adaptery_csrf")
    return client


def other_owner(world: World) -> dict[str, str]:
    """The owner of the other tenant, with their first key (an attacker who owns a tenant of their own)."""
    created = world.running.new_tenant("attacker", "mallory")
    return {"Authorization": f"Bearer {created.api_key}"}


# -- 1. invitations never hand out a way to sign in as someone else ----------------------------------------


@pytest.mark.parametrize("target", ["lab-owner", "lab-member", "owner"])  # owner: the platform admin
def test_inviting_an_existing_person_gives_no_link_and_no_membership_until_they_accept(world: World, target: str):
    attacker = other_owner(world)
    response = world.client.post("/api/admin/members", headers=attacker, json={"username": target, "role": "viewer"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "pending" and body["login_url"] is None
    members = world.client.get("/api/admin/members", headers=attacker).json()["data"]
    assert target not in [member["username"] for member in members]
    # a fresh link for the invitation accepts it (signed in as the target); it never signs in as them
    link = world.client.post(f"/api/admin/members/{target}/link", headers=attacker)
    assert link.status_code == 200 and link.json()["login_url"] is None and link.json()["accept_url"]
    with world.platform.db.system() as s:  # the attacker's tenant holds no link for the target
        user = s.query(m.User).filter_by(username=target).one()
        tenant = s.query(m.Tenant).filter_by(name="attacker").one()
        assert s.query(m.LoginToken).filter_by(user_id=user.id, tenant_id=tenant.id).count() == 0


def test_a_person_who_never_signed_in_is_not_handed_to_another_tenant_either(world: World):
    invited = world.client.post("/api/admin/members", headers=world.auth("owner"), json={"username": "newcomer"})
    assert invited.status_code == 201 and invited.json()["login_url"]
    attacker = other_owner(world)
    again = world.client.post("/api/admin/members", headers=attacker, json={"username": "newcomer"})
    assert again.status_code == 201 and again.json()["login_url"] is None  # pending, no link


def test_the_invited_person_accepts_signed_in_as_themself_and_switches_tenant(world: World):
    set_password(world, "lab-member")
    attacker = other_owner(world)
    invited = world.client.post(
        "/api/admin/members", headers=attacker, json={"username": "lab-member", "role": "member"}
    ).json()
    token = {"token": link_token(invited["accept_url"])}
    # an API key cannot answer for its person, even with the link
    mine = world.client.get("/api/invitations", headers=world.auth("member")).json()["data"]
    assert len(mine) == 1 and mine[0]["tenant"]["name"] == "attacker"
    by_key = world.client.post(f"/api/invitations/{mine[0]['id']}/accept", headers=world.auth("member"), json=token)
    assert by_key.status_code == 403 and by_key.json()["error"]["code"] == "session_required"
    # nobody else can answer it, even with the link
    outsider = sign_in_new(world, "lab-viewer")
    assert outsider.post(f"/api/invitations/{mine[0]['id']}/accept", json=token).status_code == 404

    client = sign_in(world, "lab-member")
    assert client.get("/api/me").json()["invitations"] == 1
    accepted = client.post(f"/api/invitations/{mine[0]['id']}/accept", json=token)
    assert accepted.status_code == 200, accepted.text
    tenants_of = {t["name"]: t for t in accepted.json()["tenants"]}
    assert set(tenants_of) == {"lab", "attacker"} and tenants_of["attacker"]["role"] == "member"
    assert client.get("/api/me").json()["tenant"]["name"] == "lab"  # still where it was
    switched = client.post("/api/auth/switch", json={"tenant_id": tenants_of["attacker"]["id"]})
    assert switched.status_code == 200 and switched.json()["tenant"]["name"] == "attacker"
    client.headers["x-csrf-token"] = client.cookies.get("adaptery_csrf")
    assert client.get("/api/me").json()["tenant"]["name"] == "attacker"
    nowhere = client.post("/api/auth/switch", json={"tenant_id": world.other_tenant_id})
    assert nowhere.status_code == 404


def sign_in_new(world: World, username: str) -> TestClient:
    set_password(world, username)
    return sign_in(world, username)


def test_opening_a_sign_in_link_spends_nothing_only_its_button_does(world: World):
    """The second attacker's informational find: GET /auth/link spent the link, so a mail scanner or a chat's
    link preview fetching it burned it (and, keeping the cookie, was signed in as the person). Opening it now
    gives the page, which says whom it signs in; only the POST of its button spends it, once, and a cross-site
    form cannot send that POST (JSON only)."""
    invited = world.client.post("/api/admin/members", headers=world.auth("owner"), json={"username": "previewed"})
    url, token = invited.json()["login_url"], {"token": link_token(invited.json()["login_url"])}
    previewer = browser(world, "203.0.113.9")
    for _ in range(2):
        opened = previewer.get("/auth/link?" + url.split("?", 1)[1], follow_redirects=False)
        assert opened.status_code == 200 and opened.headers["content-type"].startswith("text/html")
        assert opened.headers["cache-control"] == "no-store" and "adaptery_session" not in previewer.cookies
    holder = previewer.post("/api/auth/link/holder", json=token)
    assert holder.status_code == 200, holder.text
    assert holder.json() == {"object": "sign_in_link", "username": "previewed", "tenant": "lab", "purpose": "setup"}
    assert previewer.get("/api/me").status_code == 401 and "adaptery_session" not in previewer.cookies
    assert previewer.post("/api/auth/link", data=token).status_code == 415  # a form post from another site

    person = sign_in_new(world, "lab-viewer")  # this browser held someone's session: it ends
    before = person.cookies.get("adaptery_session")
    signed = use_sign_in_link(person, url)
    assert signed.status_code == 200 and signed.json()["user"]["username"] == "previewed"
    person.headers["x-csrf-token"] = person.cookies.get("adaptery_csrf")
    assert person.get("/api/me").json()["user"]["username"] == "previewed"
    stale = browser(world)
    stale.cookies.set("adaptery_session", before)
    assert stale.get("/api/me").status_code == 401
    for spent in (use_sign_in_link(browser(world), url), browser(world).post("/api/auth/link/holder", json=token)):
        assert spent.status_code == 401 and spent.json()["error"]["code"] == "invalid_login_link"
    too_long = browser(world).post("/api/auth/link/holder", json={"token": "x" * 129})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "token"


def test_signing_in_with_a_password_again_ends_the_browsers_earlier_session(world: World):
    """A third attacker's low find: a password sign-in only overwrote the cookies, so a session stolen earlier kept
    working after its person signed in again (a link, a tenant switch and single sign-on each ended it)."""
    set_password(world, "lab-member")
    person = sign_in(world, "lab-member")
    earlier = person.cookies.get("adaptery_session")
    again = person.post("/api/auth/login", json={"username": "lab-member", "password": PASSWORD})
    assert again.status_code == 200
    stolen = browser(world)
    stolen.cookies.set("adaptery_session", earlier)
    assert stolen.get("/api/me").status_code == 401
    person.headers["x-csrf-token"] = person.cookies.get("adaptery_csrf")
    assert person.get("/api/me").json()["user"]["username"] == "lab-member"


def test_a_new_link_is_only_for_someone_who_never_set_up_their_account(world: World):
    owner = world.auth("owner")
    invited = world.client.post("/api/admin/members", headers=owner, json={"username": "newbie"}).json()
    fresh = world.client.post("/api/admin/members/newbie/link", headers=owner)
    assert fresh.status_code == 200 and fresh.json()["login_url"] != invited["login_url"]
    old = use_sign_in_link(browser(world), invited["login_url"])
    assert old.json()["error"]["code"] == "invalid_login_link"  # a new link replaces the old one

    client = follow_link(world, fresh.json()["login_url"])
    assert client.post("/api/auth/password", json={"password": PASSWORD}).status_code == 204
    refused = world.client.post("/api/admin/members/newbie/link", headers=owner)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "account_set_up"
    set_password(world, "lab-admin")
    admin = world.client.post("/api/admin/members/lab-admin/link", headers=owner)
    assert admin.status_code == 409


def test_a_setup_link_stops_working_once_its_person_has_a_password(world: World):
    invited = world.client.post("/api/admin/members", headers=world.auth("owner"), json={"username": "late"}).json()
    set_password(world, "late")  # they set one up some other way (an earlier link)
    late = use_sign_in_link(browser(world), invited["login_url"])
    assert late.json()["error"]["code"] == "invalid_login_link"


def test_no_new_link_for_someone_who_signed_in_by_link_without_a_password(world: World):
    """FINDINGS M3: a member who signed in by their link but never set a password was taken over by an admin's
    fresh link. Having signed in at all is what counts, and the members page says so."""
    owner = world.auth("owner")
    invited = world.client.post("/api/admin/members", headers=owner, json={"username": "linker"}).json()
    listed = {row["username"]: row for row in world.client.get("/api/admin/members", headers=owner).json()["data"]}
    assert listed["linker"]["set_up"] is False
    follow_link(world, invited["login_url"])
    refused = world.client.post("/api/admin/members/linker/link", headers=owner)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "account_set_up"
    listed = {row["username"]: row for row in world.client.get("/api/admin/members", headers=owner).json()["data"]}
    assert listed["linker"]["set_up"] is True


def test_a_setup_link_stops_working_once_its_person_signed_in_some_other_way(world: World):
    invited = world.client.post("/api/admin/members", headers=world.auth("owner"), json={"username": "elsewise"})
    with world.platform.db.system() as s:  # signed in by other means (a password since removed, SSO, ...)
        user = s.query(m.User).filter_by(username="elsewise").one()
        sessions.open_session(s, user, world.tenant_id, world.platform.settings, method="password")
    late = use_sign_in_link(browser(world), invited.json()["login_url"])
    assert late.json()["error"]["code"] == "invalid_login_link"
    refused = world.client.post("/api/admin/members/elsewise/link", headers=world.auth("owner"))
    assert refused.status_code == 409


# -- 1. platform administration is a step-up, never inherited --------------------------------------------


def test_a_platform_admins_tenant_session_has_no_platform_power_until_they_step_up(world: World):
    set_password(world, "owner")
    client = sign_in(world, "owner")
    me = client.get("/api/me").json()
    assert me["is_platform_admin"] is False and me["can_administer_platform"] is True
    assert client.get("/api/platform/tenants").status_code == 403
    wrong = client.post("/api/auth/platform", json={"password": "not it at all"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_password"
    stepped = client.post("/api/auth/platform", json={"password": PASSWORD})
    assert stepped.status_code == 200 and stepped.json()["is_platform_admin"] is True
    assert client.get("/api/platform/tenants").status_code == 200
    assert client.delete("/api/auth/platform").status_code == 204
    assert client.get("/api/platform/tenants").status_code == 403


def test_a_tenant_owner_cannot_step_up_and_a_link_session_carries_no_platform_power(world: World):
    set_password(world, "lab-owner")
    owner = sign_in(world, "lab-owner")
    refused = owner.post("/api/auth/platform", json={"password": PASSWORD})
    assert refused.status_code == 403
    with world.platform.db.system() as s:
        user = s.query(m.User).filter_by(username="owner").one()
        tenant = s.query(m.Tenant).filter_by(name="default").one()
        _, token = tenants.reset_link(s, user.username, hours=1)
    client = follow_link(world, f"http://x/auth/link?token={token}")
    assert tenant.id == client.get("/api/me").json()["tenant"]["id"]
    assert client.get("/api/platform/tenants").status_code == 403


def test_only_platform_keys_carry_platform_power_and_only_a_platform_admin_mints_them(world: World):
    platform_key = world.auth("platform_admin")
    assert world.client.get("/api/platform/tenants", headers=platform_key).status_code == 200
    plain = world.client.post("/api/keys", headers=platform_key, json={"name": "everyday"}).json()
    assert plain["platform"] is False
    assert (
        world.client.get("/api/platform/tenants", headers={"Authorization": f"Bearer {plain['value']}"}).status_code
        == 403
    )
    refused = world.client.post("/api/keys", headers=world.auth("owner"), json={"platform": True})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "platform"
    minted = world.client.post("/api/keys", headers=platform_key, json={"platform": True}).json()
    assert (
        world.client.get("/api/platform/tenants", headers={"Authorization": f"Bearer {minted['value']}"}).status_code
        == 200
    )


# -- 1. a password changes only with proof, and the change ends every other session ------------------------


def test_a_password_change_needs_the_current_password_and_ends_other_sessions(world: World):
    set_password(world, "lab-member")
    by_key = world.client.post("/api/auth/password", headers=world.auth("member"), json={"password": "taken over!"})
    assert by_key.status_code == 403 and by_key.json()["error"]["code"] == "session_required"
    laptop, phone = sign_in(world, "lab-member"), sign_in(world, "lab-member", ip="203.0.113.9")
    bare = laptop.post("/api/auth/password", json={"password": "new password 1"})
    assert bare.status_code == 400 and bare.json()["error"]["param"] == "current_password"
    wrong = laptop.post("/api/auth/password", json={"password": "new password 1", "current_password": "nope nope"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_password"
    ok = laptop.post("/api/auth/password", json={"password": "new password 1", "current_password": PASSWORD})
    assert ok.status_code == 204
    assert laptop.get("/api/me").status_code == 200
    assert phone.get("/api/me").status_code == 401  # every other session ended
    events = world.client.get(
        "/api/admin/audit", headers=world.auth("admin"), params={"action": "user.password_change"}
    ).json()["data"]
    assert [e["outcome"] for e in events] == ["success", "failure"]
    assert all(e["actor"] == "lab-member" for e in events)


def test_guessing_the_current_password_from_a_stolen_session_is_throttled(world: World):
    set_password(world, "lab-member")
    stolen = sign_in(world, "lab-member")
    for i in range(world.platform.settings.login_max_failures):
        stolen.post("/api/auth/password", json={"password": "new password 1", "current_password": f"guess {i}"})
    locked = stolen.post("/api/auth/password", json={"password": "new password 1", "current_password": PASSWORD})
    assert locked.status_code == 429


def test_a_session_from_a_setup_link_sets_the_first_password_once(world: World):
    invited = world.client.post("/api/admin/members", headers=world.auth("owner"), json={"username": "fresh"}).json()
    client = follow_link(world, invited["login_url"])
    assert client.post("/api/auth/password", json={"password": PASSWORD}).status_code == 204
    again = client.post("/api/auth/password", json={"password": "another one 2"})
    assert again.status_code == 400 and again.json()["error"]["param"] == "current_password"


def test_a_stale_link_session_cannot_set_a_first_password(world: World):
    invited = world.client.post("/api/admin/members", headers=world.auth("owner"), json={"username": "slow"}).json()
    client = follow_link(world, invited["login_url"])
    with world.platform.db.system() as s:
        for record in s.query(m.WebSession).filter(m.WebSession.via_link.is_(True)):
            record.created_at = time.time() - sessions.FRESH_LINK_SECONDS - 1
    refused = client.post("/api/auth/password", json={"password": PASSWORD})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "fresh_link_required"


# -- 2. a key is its person's --------------------------------------------------------------------------------


def _key_of(world: World, role: str) -> str:
    return world.tokens[role].split("-")[2]


def test_an_admin_can_neither_rotate_nor_revoke_the_owners_key(world: World):
    owner_key = _key_of(world, "owner")
    admin = world.auth("admin")
    rotated = world.client.post(f"/api/keys/{owner_key}/rotate", headers=admin, json={})
    assert rotated.status_code == 404
    assert world.client.delete(f"/api/keys/{owner_key}", headers=admin).status_code == 404
    assert world.client.patch(f"/api/keys/{owner_key}", headers=admin, json={"name": "x"}).status_code == 404
    assert world.client.get("/v1/models", headers=world.auth("owner")).status_code == 200  # untouched


def test_an_admin_revokes_but_never_rotates_the_keys_of_people_below_them(world: World):
    member_key = _key_of(world, "member")
    admin = world.auth("admin")
    assert world.client.post(f"/api/keys/{member_key}/rotate", headers=admin, json={}).status_code == 404
    listed = world.client.get("/api/keys", headers=admin).json()["data"]
    assert member_key in [k["id"] for k in listed] and all("value" not in k for k in listed)
    assert world.client.delete(f"/api/keys/{member_key}", headers=admin).status_code == 200
    assert world.client.get("/v1/models", headers=world.auth("member")).status_code == 401


def test_only_its_person_rotates_a_key(world: World):
    member_key = _key_of(world, "member")
    rotated = world.client.post(f"/api/keys/{member_key}/rotate", headers=world.auth("member"), json={})
    assert rotated.status_code == 200 and rotated.json()["value"]
    assert world.client.post(f"/api/keys/{member_key}/rotate", headers=world.auth("owner"), json={}).status_code == 404


# -- 8. a child key is never wider than its parent ----------------------------------------------------------


def _parent(world: World) -> dict[str, str]:
    parent = world.client.post(
        "/api/keys",
        headers=world.auth("owner"),
        json={
            "scopes": ["admin", "inference"],
            "allowed_models": ["adaptery-demo"],
            "expires_in_days": 1,
            "limits": {"requests_per_minute": 30, "concurrent_streams": 2},
        },
    ).json()
    return {"Authorization": f"Bearer {parent['value']}"}


def test_a_child_key_inherits_its_parents_bounds_when_it_names_none(world: World):
    child = world.client.post("/api/keys", headers=_parent(world), json={})
    assert child.status_code == 200, child.text
    body = child.json()
    assert body["allowed_models"] == ["adaptery-demo"] and body["expires_at"] is not None
    assert body["expires_at"] <= time.time() + 86400 + 5
    assert body["limits"]["requests_per_minute"] == 30 and body["limits"]["concurrent_streams"] == 2
    assert body["scopes"] == ["admin", "inference"]


@pytest.mark.parametrize(
    ("wider", "param"),
    [
        ({"allowed_models": ["adaptery-demo", "MODEL"]}, "allowed_models[1]"),
        ({"expires_in_days": 30}, "expires_in_days"),
        ({"limits": {"requests_per_minute": 1000}}, "limits.requests_per_minute"),
        ({"scopes": ["files"]}, "scopes"),
        ({"platform": True}, "platform"),
    ],
)
def test_a_child_key_asking_for_more_than_its_parent_is_refused(world: World, wider: dict, param: str):
    if "allowed_models" in wider:
        wider = {"allowed_models": ["adaptery-demo", world.ids["model_id"]]}
    refused = world.client.post("/api/keys", headers=_parent(world), json=wider)
    assert refused.status_code in (400, 403), refused.text
    assert refused.json()["error"]["param"] == param


def test_a_key_cannot_lift_limits_above_its_own(world: World):
    parent = _parent(world)
    child = world.client.post("/api/keys", headers=parent, json={"name": "child"}).json()
    lifted = world.client.patch(
        f"/api/keys/{child['id']}", headers=parent, json={"limits": {"requests_per_minute": None}}
    )
    assert lifted.status_code == 400 and lifted.json()["error"]["param"] == "limits.requests_per_minute"
    higher = world.client.patch(f"/api/keys/{child['id']}", headers=parent, json={"limits": {"concurrent_streams": 9}})
    assert higher.status_code == 400
    lower = world.client.patch(f"/api/keys/{child['id']}", headers=parent, json={"limits": {"concurrent_streams": 1}})
    assert lower.status_code == 200 and lower.json()["limits"]["concurrent_streams"] == 1


def test_a_narrow_key_cannot_rotate_a_wider_sibling_into_its_hands(world: World):
    """The attack: a key with the admin scope but one model, a rate limit and a day to live rotated its person's
    full key (or their platform key) and was handed the new secret, with every scope and no limits."""
    full = world.client.post("/api/keys", headers=world.auth("member"), json={"name": "full"}).json()
    narrow = world.client.post(
        "/api/keys",
        headers=world.auth("member"),
        json={
            "scopes": ["admin"],
            "allowed_models": ["adaptery-demo"],
            "expires_in_days": 1,
            "limits": {"requests_per_minute": 10},
        },
    ).json()
    as_narrow = {"Authorization": f"Bearer {narrow['value']}"}
    refused = world.client.post(f"/api/keys/{full['id']}/rotate", headers=as_narrow, json={"overlap_seconds": 0})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "key_too_narrow"
    assert world.client.get("/v1/models", headers={"Authorization": f"Bearer {full['value']}"}).status_code == 200
    itself = world.client.post(f"/api/keys/{narrow['id']}/rotate", headers=as_narrow, json={"overlap_seconds": 0})
    assert itself.status_code == 200 and itself.json()["scopes"] == ["admin"]
    platform = world.client.post("/api/keys", headers=world.auth("platform_admin"), json={"platform": True}).json()
    plain = world.client.post("/api/keys", headers=world.auth("platform_admin"), json={"name": "plain"}).json()
    escalate = world.client.post(
        f"/api/keys/{platform['id']}/rotate", headers={"Authorization": f"Bearer {plain['value']}"}, json={}
    )
    assert escalate.status_code == 403


def test_an_old_secret_in_its_overlap_cannot_take_the_key_over(world: World):
    """The attack: after a rotation with an overlap, the leaked old secret rotated the key again and held the
    only working secret."""
    key = world.client.post("/api/keys", headers=world.auth("member"), json={"name": "leaky"}).json()
    old = {"Authorization": f"Bearer {key['value']}"}
    new = world.client.post(f"/api/keys/{key['id']}/rotate", headers=old, json={"overlap_seconds": 3600}).json()
    assert world.client.get("/v1/models", headers=old).status_code == 200  # running clients keep working
    for method, path in (
        ("POST", f"/api/keys/{key['id']}/rotate"),
        ("POST", "/api/keys"),
        ("DELETE", f"/api/keys/{key['id']}"),
        ("PATCH", f"/api/keys/{key['id']}"),
    ):
        response = world.client.request(method, path, headers=old, json={} if method != "DELETE" else None)
        assert response.status_code == 403 and response.json()["error"]["code"] == "rotated_secret", path
    assert world.client.get("/v1/models", headers={"Authorization": f"Bearer {new['value']}"}).status_code == 200


def test_a_person_cannot_lift_the_limit_an_admin_put_on_their_key(world: World):
    key_id = world.tokens["member"].split("-")[2]
    limited = world.client.patch(
        f"/api/keys/{key_id}", headers=world.auth("admin"), json={"limits": {"requests_per_minute": 3}}
    )
    assert limited.status_code == 200
    set_password(world, "lab-member")
    session = sign_in(world, "lab-member")
    for value in (None, 100000):
        lifted = session.patch(f"/api/keys/{key_id}", json={"limits": {"requests_per_minute": value}})
        assert lifted.status_code == 400 and lifted.json()["error"]["param"] == "limits.requests_per_minute"
    assert session.patch(f"/api/keys/{key_id}", json={"limits": {"requests_per_minute": 2}}).status_code == 200
    raised = world.client.patch(
        f"/api/keys/{key_id}", headers=world.auth("admin"), json={"limits": {"requests_per_minute": None}}
    )
    assert raised.status_code == 200 and raised.json()["limits"]["requests_per_minute"] is None


# -- 9. sign-in tells nobody apart, and nobody locks out someone else -----------------------------------


def test_an_unknown_username_costs_the_same_password_hash_as_a_known_one(world: World):
    set_password(world, "lab-member")
    with mock.patch.object(sessions, "verify_password", wraps=sessions.verify_password) as verify:
        browser(world).post("/api/auth/login", json={"username": "nobody-here", "password": "whatever1"})
        browser(world).post("/api/auth/login", json={"username": "lab-member", "password": "whatever1"})
        browser(world).post("/api/auth/login", json={"username": "lab-viewer", "password": "whatever1"})  # no password
    assert verify.call_count == 3


def test_a_removed_person_reads_the_same_as_a_wrong_password(world: World):
    set_password(world, "lab-target")
    assert world.client.delete("/api/admin/members/lab-target", headers=world.auth("owner")).status_code == 204
    removed = browser(world).post("/api/auth/login", json={"username": "lab-target", "password": PASSWORD})
    wrong = browser(world).post("/api/auth/login", json={"username": "lab-member", "password": "whatever1"})
    assert removed.status_code == wrong.status_code == 401 and removed.json() == wrong.json()


def test_failures_from_one_source_do_not_lock_the_account_for_its_person(world: World):
    set_password(world, "lab-owner")
    attacker = browser(world, ip="192.0.2.66")
    for i in range(world.platform.settings.login_max_failures + 3):
        attacker.post("/api/auth/login", json={"username": "lab-owner", "password": f"guess-{i}"})
    locked = attacker.post("/api/auth/login", json={"username": "lab-owner", "password": PASSWORD})
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert sign_in(world, "lab-owner", ip="198.51.100.20").get("/api/me").status_code == 200


def test_a_source_spraying_many_accounts_is_locked_and_locks_grow(world: World):
    settings = world.platform.settings
    sprayer = browser(world, ip="192.0.2.99")
    for i in range(settings.login_max_failures_per_source):
        sprayer.post("/api/auth/login", json={"username": f"user-{i}", "password": "password1"})
    set_password(world, "lab-viewer")
    locked = sprayer.post("/api/auth/login", json={"username": "lab-viewer", "password": PASSWORD})
    assert locked.status_code == 429
    first = int(locked.headers["retry-after"])
    with world.platform.db.system() as s:  # the lock ends; the next failure locks for twice as long
        s.query(m.SignInThrottle).filter_by(key="source:192.0.2.99").one().locked_until = time.time() - 1
    sprayer.post("/api/auth/login", json={"username": "user-x", "password": "password1"})
    again = sprayer.post("/api/auth/login", json={"username": "lab-viewer", "password": PASSWORD})
    assert again.status_code == 429 and int(again.headers["retry-after"]) > first


def test_a_guesser_spread_over_many_sources_cannot_lock_the_person_out_of_their_own_browser(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """The attack: 5 failures from each of 40 sources locked the account for everyone, its person included."""
    settings = world.platform.settings
    monkeypatch.setattr(settings, "login_max_failures_per_account", 8)
    set_password(world, "lab-admin")
    mine = browser(world, ip="198.51.100.30")
    assert mine.post("/api/auth/login", json={"username": "lab-admin", "password": PASSWORD}).status_code == 200
    assert mine.cookies.get("adaptery_device")
    for source in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        guesser = browser(world, ip=source)
        for i in range(4):
            guesser.post("/api/auth/login", json={"username": "lab-admin", "password": f"guess-{i}"})
    elsewhere = browser(world, ip="198.51.100.31").post(
        "/api/auth/login", json={"username": "lab-admin", "password": PASSWORD}
    )
    assert elsewhere.status_code == 429  # a browser never used before meets the account's lock
    again = mine.post("/api/auth/login", json={"username": "lab-admin", "password": PASSWORD})
    assert again.status_code == 200, again.text  # the person's own browser does not
    stolen = browser(world, ip="192.0.2.4")
    stolen.cookies.set("adaptery_device", mine.cookies.get("adaptery_device"), path="/api/auth/login")
    other = stolen.post("/api/auth/login", json={"username": "lab-member", "password": "guess"})
    assert other.status_code == 401  # a device cookie counts only for the account it signed in


def test_a_link_kept_by_one_tenant_dies_when_its_person_joins_another(world: World):
    """The attack: a rival owner kept a second setup link of a person they invited; the person joined the lab
    as an admin (without ever setting a password); the kept link then signed in as them, into the lab."""
    rival = other_owner(world)
    first = world.client.post("/api/admin/members", headers=rival, json={"username": "dave"}).json()
    dave = follow_link(world, first["login_url"])
    # dave has signed in: the rival gets no second link at all (FINDINGS M3), so there is none to keep
    kept = world.client.post("/api/admin/members/dave/link", headers=rival)
    assert kept.status_code == 409 and kept.json()["error"]["code"] == "account_set_up"
    invited = world.client.post(
        "/api/admin/members", headers=world.auth("owner"), json={"username": "dave", "role": "admin"}
    ).json()
    invitation = dave.get("/api/invitations").json()["data"][0]
    accepted = dave.post(
        f"/api/invitations/{invitation['id']}/accept", json={"token": link_token(invited["accept_url"])}
    )
    assert accepted.status_code == 200
    used = use_sign_in_link(browser(world), first["login_url"])
    assert used.json()["error"]["code"] == "invalid_login_link"


def test_a_signed_in_person_steps_up_and_changes_their_password_while_their_account_is_locked(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """The attack: failures from many sources locked the account, and then the platform admin's own signed-in
    browser could neither step up nor change the password (429)."""
    monkeypatch.setattr(world.platform.settings, "login_max_failures_per_account", 8)
    set_password(world, "owner")
    mine = sign_in(world, "owner")
    for source in ("192.0.2.11", "192.0.2.12", "192.0.2.13"):
        guesser = browser(world, ip=source)
        for i in range(4):
            guesser.post("/api/auth/login", json={"username": "owner", "password": f"guess-{i}"})
    assert (
        browser(world, ip="198.51.100.99")
        .post("/api/auth/login", json={"username": "owner", "password": PASSWORD})
        .status_code
        == 429
    )
    assert mine.post("/api/auth/platform", json={"password": PASSWORD}).status_code == 200
    changed = mine.post("/api/auth/password", json={"password": "a new password 9", "current_password": PASSWORD})
    assert changed.status_code == 204


def test_a_squatted_username_cannot_accept_another_tenants_invitation_without_its_link(world: World):
    """The attack (F1): usernames are platform-wide. A rival admin invited a new 'carol', kept her sign-in link,
    used it and set the password; the lab then invited 'carol' as an admin (meaning the real Carol), and the
    squatter accepted the lab's invitation from the pending list, switched into the lab and read its files."""
    rival = other_owner(world)
    squatted = world.client.post("/api/admin/members", headers=rival, json={"username": "carol"}).json()
    carol = follow_link(world, squatted["login_url"])
    assert carol.post("/api/auth/password", json={"password": PASSWORD}).status_code == 204
    carol = sign_in(world, "carol")
    invited = world.client.post(
        "/api/admin/members", headers=world.auth("owner"), json={"username": "carol", "role": "admin"}
    )
    assert invited.status_code == 201, invited.text

    invitation = carol.get("/api/invitations").json()["data"][0]  # she still sees it, to open the link
    accept = f"/api/invitations/{invitation['id']}/accept"
    for body in (None, {}, {"token": "not-the-link"}, {"token": squatted["login_url"].split("token=")[1]}):
        refused = carol.post(accept, json=body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "invitation_link_required"
    assert carol.post("/api/auth/switch", json={"tenant_id": world.tenant_id}).status_code == 404
    assert [t["name"] for t in carol.get("/api/me").json()["tenants"]] == ["attacker"]
    with world.platform.db.system() as s:  # only the link's hash is kept
        kept = s.get(m.Invitation, invitation["id"])
        assert kept.token_hash and link_token(invited.json()["accept_url"]) not in kept.token_hash

    # the lab's link, passed to the real Carol out of band (here the account is hers after all): once
    body = invited.json()
    assert body["status"] == "pending" and body["login_url"] is None
    assert body["accept_url"].startswith(f"{world.platform.settings.base_url}/invitations/accept?")
    token = link_token(body["accept_url"])
    accepted = carol.post(accept, json={"token": token})
    assert accepted.status_code == 200, accepted.text
    assert {t["name"]: t["role"] for t in accepted.json()["tenants"]} == {"attacker": "member", "lab": "admin"}
    assert carol.post(accept, json={"token": token}).status_code == 404  # used: the invitation is gone
    switched = carol.post("/api/auth/switch", json={"tenant_id": world.tenant_id})
    assert switched.status_code == 200 and switched.json()["tenant"]["name"] == "lab"


def test_a_fresh_accept_link_voids_the_previous_one(world: World):
    set_password(world, "else-member")
    owner = world.auth("owner")
    first = world.client.post("/api/admin/members", headers=owner, json={"username": "else-member"}).json()
    fresh = world.client.post("/api/admin/members/else-member/link", headers=owner)
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["login_url"] is None and fresh.json()["accept_url"] != first["accept_url"]
    person = sign_in(world, "else-member")
    accept = f"/api/invitations/{person.get('/api/invitations').json()['data'][0]['id']}/accept"
    stale = person.post(accept, json={"token": link_token(first["accept_url"])})
    assert stale.status_code == 403 and stale.json()["error"]["code"] == "invitation_link_required"
    assert person.post(accept, json={"token": link_token(fresh.json()["accept_url"])}).status_code == 200
    # an admin of the lab cannot mint a link for an owner's invitation
    made = world.client.post("/api/admin/members", headers=owner, json={"username": "else-owner", "role": "owner"})
    assert made.json()["user_id"] is None  # an account of another tenant: its id is not the lab's to know
    by_admin = world.client.post("/api/admin/members/else-owner/link", headers=world.auth("admin"))
    assert by_admin.status_code == 403
    # nor replace it with an invitation of its own, as a member (a second attacker's find: it voided the owner's)
    replaced = world.client.post(
        "/api/admin/members", headers=world.auth("admin"), json={"username": "else-owner", "role": "member"}
    )
    assert replaced.status_code == 403 and replaced.json()["error"]["code"] == "insufficient_role"
    assert world.client.post("/api/admin/members/else-owner/link", headers=owner).json()["role"] == "owner"


def test_an_expired_accept_link_is_refused_and_declining_needs_none(world: World):
    set_password(world, "else-member")
    owner = world.auth("owner")
    invited = world.client.post("/api/admin/members", headers=owner, json={"username": "else-member"}).json()
    person = sign_in(world, "else-member")
    invitation = person.get("/api/invitations").json()["data"][0]
    with world.platform.db.system() as s:
        s.get(m.Invitation, invitation["id"]).expires_at = time.time() - 1
    late = person.post(f"/api/invitations/{invitation['id']}/accept", json={"token": link_token(invited["accept_url"])})
    assert late.status_code == 404
    again = world.client.post("/api/admin/members/else-member/link", headers=owner).json()
    invitation = person.get("/api/invitations").json()["data"][0]
    assert person.post(f"/api/invitations/{invitation['id']}/decline").status_code == 200
    gone = person.post(f"/api/invitations/{invitation['id']}/accept", json={"token": link_token(again["accept_url"])})
    assert gone.status_code == 404


def test_a_new_tenant_whose_owner_has_an_account_is_theirs_only_once_they_accept_its_link(world: World):
    """Before, `adaptery tenants create newco --owner <a name that exists>` made that account owner at once and
    minted a key as it: whoever held the name (a squatter's account) owned the new tenant."""
    set_password(world, "lab-member")
    created = world.running.new_tenant("newco", "lab-member")
    assert created.api_key is None and created.login_token is None and created.accept_token
    person = sign_in(world, "lab-member")
    assert [t["name"] for t in person.get("/api/me").json()["tenants"]] == ["lab"]
    accept = f"/api/invitations/{created.invitation.id}/accept"
    refused = person.post(accept)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "invitation_link_required"
    joined = person.post(accept, json={"token": created.accept_token})
    assert joined.status_code == 200, joined.text
    assert {t["name"]: t["role"] for t in joined.json()["tenants"]} == {"lab": "member", "newco": "owner"}


def test_the_operator_renews_an_expired_owner_invitation_and_only_the_new_link_joins(world: World):
    """A tenant made for a person who already had an account has no member until they accept: once its link
    expired, nobody could invite them again. `adaptery tenants invite-owner` gives a fresh link; the old one stays
    dead, the command renews only that pending owner invitation, and it is audited."""
    from typer.testing import CliRunner

    from adaptery.cli.main import app

    set_password(world, "lab-member")
    created = world.running.new_tenant("newlab", "lab-member")
    with world.platform.db.system() as s:
        s.get(m.Invitation, created.invitation.id).expires_at = time.time() - 1
    person = sign_in(world, "lab-member")
    accept = f"/api/invitations/{created.invitation.id}/accept"
    assert person.post(accept, json={"token": created.accept_token}).status_code == 404
    settings = world.platform.settings
    where = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]

    def invite_owner(tenant: str, owner: str):  # noqa: ANN202
        return CliRunner().invoke(app, ["tenants", "invite-owner", tenant, "--owner", owner, *where])

    for tenant, owner in [("newlab", "else-member"), ("no-such-lab", "lab-member"), ("lab", "lab-member")]:
        refused = invite_owner(tenant, owner)  # no pending owner invitation of that person there
        assert refused.exit_code == 1 and "No pending owner invitation" in refused.output
    renewed = invite_owner("newlab", "lab-member")
    assert renewed.exit_code == 0, renewed.output
    url = next(line.split("=", 1)[1] for line in renewed.output.splitlines() if line.startswith("ADAPTERY_ACCEPT_URL="))
    assert f"invitation={created.invitation.id}" in url
    stale = person.post(accept, json={"token": created.accept_token})  # the old link stays dead
    assert stale.status_code == 403 and stale.json()["error"]["code"] == "invitation_link_required", stale.text
    assert [t["name"] for t in person.get("/api/me").json()["tenants"]] == ["lab"]  # nobody joined by the command
    joined = person.post(accept, json={"token": link_token(url)})
    assert joined.status_code == 200, joined.text
    assert {t["name"]: t["role"] for t in joined.json()["tenants"]} == {"lab": "member", "newlab": "owner"}
    assert invite_owner("newlab", "lab-member").exit_code == 1  # accepted: nothing pending to renew
    with world.platform.db.system() as s:
        events = s.scalars(select(m.AuditEvent).where(m.AuditEvent.action == "tenant.owner_invitation_renewed"))
        assert [(e.actor, e.target) for e in events] == [("operator", "lab-member")]
