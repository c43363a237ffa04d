"""The broker's accounts as generated: what crosses between a tenant's account and the control plane is exactly
the agent subject families of `protocol.agent_permissions`, per enrolled agent, and nothing else."""

from __future__ import annotations

import json

from adaptery.messaging import protocol
from adaptery.messaging.accounts import CONTROL_ACCOUNT, PLATFORM_ACCOUNT, Member, accounts, leaf_users

A1 = Member("agent-a1", "tenant-a", "CN=agent-a1,OU=lab,O=tenant-a")
LEAF = Member("agent-leaf", "tenant-a", "CN=agent-leaf,OU=lab,O=tenant-a", leaf=True)
P1 = Member("agent-p1", None, "CN=agent-p1,OU=cloud,O=adaptery-platform")


def test_the_loopback_server_never_names_a_certificate_subject_as_a_user():
    # There, a user without a password would let anyone on the host sign in as an agent by its subject.
    config = accounts("hash", {"agent-pw": "bcrypt"}, [A1, LEAF, P1], certificate_users=False)
    users = [user["user"] for block in config.values() for user in block.get("users", [])]
    assert users == ["control", "agent-pw"]
    on_fabric = accounts("hash", {}, [A1, LEAF, P1], certificate_users=True)
    assert on_fabric["T_tenant-a"]["users"] == [
        {"user": A1.subject, "permissions": protocol.agent_permissions("agent-a1")}
    ]
    assert "password" not in json.dumps(on_fabric["T_tenant-a"])


def test_a_tenant_account_imports_only_its_own_agents_subjects():
    config = accounts("hash", {}, [A1, LEAF, P1], certificate_users=True)
    imported = [next(iter(entry.values()))["subject"] for entry in config["T_tenant-a"]["imports"]]
    assert imported == [
        "adaptery.agent.agent-a1.>",
        "adaptery.notify.agent-a1",
        "adaptery.infer.agent-a1",
        "adaptery.infer.agent-a1.cancel",
    ]  # the leaf is not an agent: it carries its island's agents, and has no subjects of its own
    streams = {entry["stream"]["subject"]: entry["stream"]["account"] for entry in config[CONTROL_ACCOUNT]["imports"]}
    assert streams == {"adaptery.stream.agent-a1.>": "T_tenant-a", "adaptery.stream.agent-p1.>": PLATFORM_ACCOUNT}


def test_an_island_leaf_is_bound_to_its_tenants_account():
    assert leaf_users([A1, LEAF, P1]) == [{"user": LEAF.subject, "account": "T_tenant-a"}]


def test_accounts_once_defined_stay_defined_while_the_server_runs():
    config = accounts("hash", {}, [], certificate_users=False, keep=frozenset({"T_gone"}))
    assert config["T_gone"] == {"imports": [], "exports": [{"stream": "adaptery.stream.*.>", "accounts": ["CONTROL"]}]}
