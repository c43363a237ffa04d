"""`adaptery agents token create`: `--kind leaf` asks for an island leaf's token (no roles), the default for an
agent's with the server's default roles unless `--roles` is given."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from adaptery.cli import main


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    bodies: list[dict] = []

    def api(method: str, path: str, *, json: dict) -> dict:
        bodies.append(json)
        roles = json.get("roles", [] if json["kind"] == "leaf" else ["train"])
        return {"id": "enroll-1", "token": "secret.pin", "kind": json["kind"], "roles": roles, "expires_at": 0}

    monkeypatch.setattr(main, "api", api)
    return bodies


def test_a_leaf_token_is_asked_for_without_roles(sent: list[dict]):
    runner = CliRunner()
    leaf = runner.invoke(main.app, ["agents", "token", "create", "--kind", "leaf", "--island", "edge"])
    assert leaf.exit_code == 0, leaf.output
    assert "an island's leaf node" in leaf.output and "ADAPTERY_ENROLLMENT_TOKEN=secret.pin" in leaf.output
    agent = runner.invoke(main.app, ["agents", "token", "create", "--roles", "infer"])
    assert agent.exit_code == 0, agent.output
    assert sent == [
        {"scope": "tenant", "kind": "leaf", "ttl_seconds": 3600, "island": "edge"},
        {"scope": "tenant", "kind": "agent", "ttl_seconds": 3600, "island": "default", "roles": ["infer"]},
    ]


def test_tokens_are_listed_with_their_whole_id_and_withdrawn_by_it(monkeypatch: pytest.MonkeyPatch):
    """A narrow terminal once cut the id short in the list, and `delete` then knew no such token."""
    token_id = "enroll-bnIndZbTaa6Orey5"
    calls: list[tuple[str, str]] = []

    def api(method: str, path: str, **_: object) -> dict:
        calls.append((method, path))
        pending = {"id": token_id, "scope": "tenant", "island": "a-rather-long-island-name", "kind": "agent"}
        pending |= {"roles": ["train", "infer"], "created_by": "someone-with-a-long-name", "expires_at": 0}
        return {"data": [pending]} if method == "GET" else {}

    monkeypatch.setattr(main, "api", api)
    runner = CliRunner()
    listed = runner.invoke(main.app, ["agents", "token", "list"], env={"COLUMNS": "60"})
    assert listed.exit_code == 0, listed.output
    assert token_id in listed.output
    withdrawn = runner.invoke(main.app, ["agents", "token", "delete", token_id])
    assert withdrawn.exit_code == 0 and f"Token {token_id} withdrawn" in withdrawn.output
    assert calls == [("GET", "/api/admin/agents/tokens"), ("DELETE", f"/api/admin/agents/tokens/{token_id}")]
