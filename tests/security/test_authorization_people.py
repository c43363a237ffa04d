"""Keys and members by object: every caller role × whose key (or which member) × every action, exact status.

Written from what the platform promises, not from `adaptery.auth.policy`:
- a key is its person's: they list, rename, limit, rotate and revoke it; nobody else ever rotates it;
- tenant admins and owners list every key (redacted) and may rename, limit or revoke the keys of people at
  or below their own role; anything else is 404, as for a key that does not exist;
- members and viewers manage no members (403); admins manage members and viewers, owners everyone (an
  admin aiming at an admin or owner: 403); another tenant's people do not exist (404).
Every cell acts on a fresh object, so the world is built once per module.
"""

from __future__ import annotations

import itertools

import pytest

from adaptery.auth.principal import Role
from tests.security.conftest import World, add_key, add_user

CALLERS = ("viewer", "member", "admin", "owner", "other_tenant_member")
OWNERS = ("self", "viewer", "member", "admin", "owner")
RANK = {"viewer": 0, "member": 1, "admin": 2, "owner": 3}
USER_OF = {"viewer": "lab-viewer", "member": "lab-member", "admin": "lab-admin", "owner": "lab-owner"}


def key_status(caller: str, owner: str, action: str) -> int:
    if caller == "viewer":
        return 403  # keys need the member role
    if caller == "other_tenant_member":
        return 404
    if owner == "self" or owner == caller:
        return 200
    if action == "list":
        return 200 if RANK[caller] >= RANK["admin"] else 404  # admins see every key, redacted
    if action == "rotate" or RANK[caller] < RANK["admin"]:
        return 404
    return 200 if RANK[owner] <= RANK[caller] else 404


@pytest.mark.parametrize(("caller", "owner"), list(itertools.product(CALLERS, OWNERS)))
def test_who_may_do_what_with_whose_key(world_once: World, caller: str, owner: str):
    world, client = world_once, world_once.client
    person = USER_OF.get(caller if owner == "self" else owner, "lab-owner")
    if owner == "self" and caller == "other_tenant_member":
        person = "lab-owner"  # a caller of another tenant has no key here: aim at the lab's owner's
    wrong = []
    for action in ("list", "update", "rotate", "revoke"):
        secret = add_key(world.platform, world.tenant_id, world.users[person], name=f"{owner}-{action}")
        key_id = secret.split("-")[2]
        headers = world.auth(caller)
        if action == "list":
            response = client.get("/api/keys", headers=headers)
            want = key_status(caller, owner, action)
            listed = response.status_code == 200 and key_id in [k["id"] for k in response.json()["data"]]
            status = 200 if listed else (response.status_code if response.status_code != 200 else 404)
            if response.status_code == 200:
                assert all("value" not in k for k in response.json()["data"])
        else:
            method, path, body = {
                "update": ("PATCH", f"/api/keys/{key_id}", {"name": "renamed"}),
                "rotate": ("POST", f"/api/keys/{key_id}/rotate", {"overlap_seconds": 0}),
                "revoke": ("DELETE", f"/api/keys/{key_id}", None),
            }[action]
            response = client.request(method, path, headers=headers, json=body)
            want, status = key_status(caller, owner, action), response.status_code
            still_works = client.get("/api/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
            if status != 200:  # a refused action leaves the key as it was
                assert still_works, f"{action} of {owner}'s key by {caller} answered {status} but changed the key"
        if status != want:
            wrong.append(f"{action} {owner}'s key as {caller}: got {status}, want {want}")
    assert not wrong, "\n".join(wrong)


def member_status(caller: str, target: str, action: str) -> int:
    if caller in ("viewer", "member"):
        return 403
    if caller == "other_tenant_member":
        return 403  # a member there: the route needs an admin
    if caller == "admin" and RANK[target] >= RANK["admin"]:
        return 403
    return {"role": 200, "link": 200, "remove": 204}[action]


_made = itertools.count()


@pytest.mark.parametrize(("caller", "target"), list(itertools.product(CALLERS, ("viewer", "member", "admin", "owner"))))
def test_who_may_manage_which_member(world_once: World, caller: str, target: str):
    world, client = world_once, world_once.client
    wrong = []
    for action in ("role", "link", "remove"):
        username = f"t-{target}-{action}-{next(_made)}"
        add_user(world.platform, world.tenant_id, username, Role(target))
        method, path, body = {
            "role": ("PUT", f"/api/admin/members/{username}", {"role": target}),
            "link": ("POST", f"/api/admin/members/{username}/link", None),
            "remove": ("DELETE", f"/api/admin/members/{username}", None),
        }[action]
        status = client.request(method, path, headers=world.auth(caller), json=body).status_code
        want = member_status(caller, target, action)
        if status != want:
            wrong.append(f"{action} a {target} as {caller}: got {status}, want {want}")
    assert not wrong, "\n".join(wrong)


def test_another_tenants_owner_reaches_none_of_the_labs_people(world_once: World):
    world, client = world_once, world_once.client
    created = world.running.new_tenant(f"rival-{next(_made)}", f"rival-owner-{next(_made)}")
    rival = {"Authorization": f"Bearer {created.api_key}"}
    for method, path, body in (
        ("PUT", "/api/admin/members/lab-member", {"role": "viewer"}),
        ("POST", "/api/admin/members/lab-member/link", None),
        ("DELETE", "/api/admin/members/lab-member", None),
        ("PATCH", f"/api/keys/{world.tokens['member'].split('-')[2]}", {"name": "x"}),
        ("POST", f"/api/keys/{world.tokens['member'].split('-')[2]}/rotate", {}),
        ("DELETE", f"/api/keys/{world.tokens['member'].split('-')[2]}", None),
    ):
        response = client.request(method, path, headers=rival, json=body)
        assert response.status_code == 404, f"{method} {path}: {response.status_code} {response.text}"
    assert client.get("/api/me", headers=world.auth("member")).status_code == 200
