"""Adapters are the tenant's, seen as their visibility says: private, shared with named members, or tenant."""

from __future__ import annotations

from tests.security.conftest import World

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def share(world: World, who: str, visibility: str, members: list[str] | None = None):  # noqa: ANN201
    return world.client.put(
        f"/api/models/{world.ids['model_id']}/sharing",
        headers=world.auth(who),
        json={"visibility": visibility, "members": members or []},
    )


def sees(world: World, who: str) -> bool:
    """Whether `who` finds the adapter, everywhere it could look; all places must agree."""
    adapter = world.ids["model_id"]
    listed = adapter in [m["id"] for m in world.client.get("/v1/models", headers=world.auth(who)).json()["data"]]
    retrieved = world.client.get(f"/v1/models/{adapter}", headers=world.auth(who)).status_code
    chat = world.client.post("/v1/chat/completions", headers=world.auth(who), json={"model": adapter, **CHAT})
    assert {listed, retrieved == 200, chat.status_code == 200} in ({True}, {False}), (listed, retrieved, chat.text)
    if not listed:
        assert retrieved == 404 and chat.status_code == 404
    return listed


def test_tenant_visibility_is_the_default(world: World):
    assert all(sees(world, who) for who in ("viewer", "member", "admin"))
    assert not sees(world, "other_tenant_member")


def test_private_is_for_its_creator_and_the_tenant_admins(world: World):
    response = share(world, "member", "private")
    assert response.status_code == 200 and response.json()["visibility"] == "private"
    assert sees(world, "member") and sees(world, "admin") and sees(world, "owner")
    assert not sees(world, "viewer")


def test_shared_with_named_members_only_and_unsharing_takes_effect_at_once(world: World):
    assert share(world, "member", "shared", ["lab-viewer"]).json()["members"] == ["lab-viewer"]
    assert sees(world, "viewer")
    assert share(world, "member", "shared", []).status_code == 200
    assert not sees(world, "viewer")


def test_only_the_creator_or_an_admin_changes_who_sees_it(world: World):
    share(world, "member", "shared", ["lab-viewer"])
    refused = share(world, "viewer", "tenant")
    assert refused.status_code == 403
    assert share(world, "admin", "tenant").status_code == 200


def test_sharing_names_only_members_of_the_tenant(world: World):
    response = share(world, "member", "shared", ["else-member"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "members[0]"
    response = share(world, "member", "private", ["lab-viewer"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "members"
    assert (
        world.client.get(f"/api/models/{world.ids['model_id']}/sharing", headers=world.auth("member")).json()[
            "visibility"
        ]
        == "tenant"
    )  # a refused change changed nothing


def test_another_tenant_cannot_share_or_see_the_sharing(world: World):
    adapter = world.ids["model_id"]
    assert share(world, "other_tenant_member", "tenant").status_code == 404
    assert (
        world.client.get(f"/api/models/{adapter}/sharing", headers=world.auth("other_tenant_member")).status_code == 404
    )


def test_a_private_adapter_cannot_be_downloaded_or_deleted_by_who_cannot_see_it(world: World):
    share(world, "member", "private")
    adapter = world.ids["model_id"]
    world.client.put("/api/admin/members/lab-viewer", headers=world.auth("owner"), json={"role": "member"})
    assert world.client.get(f"/api/models/{adapter}/download", headers=world.auth("viewer")).status_code == 404
    assert world.client.delete(f"/v1/models/{adapter}", headers=world.auth("viewer")).status_code == 404
    assert sees(world, "member")
