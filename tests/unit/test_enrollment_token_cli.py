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
