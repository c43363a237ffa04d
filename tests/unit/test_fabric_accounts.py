"""The broker's accounts as generated: one per island of a scope, and what crosses between an island's account and
the control plane is exactly the agent subject families of `protocol.agent_permissions`, per agent enrolled in
that island, and nothing else."""

from __future__ import annotations

import json
import re

from adaptery.messaging import protocol
from adaptery.messaging.accounts import (
    CONTROL_ACCOUNT,
    PLATFORM_ACCOUNT,
    Member,
    accounts,
    island_account,
    leaf_users,
)

A1 = Member("agent-a1", "tenant-a", "lab", "CN=agent-a1,OU=lab,O=tenant-a")
LEAF = Member("agent-leaf", "tenant-a", "lab", "CN=agent-leaf,OU=lab,O=tenant-a", leaf=True)
A2 = Member("agent-a2", "tenant-a", "edge.gpu-1", "CN=agent-a2,OU=edge.gpu-1,O=tenant-a")  # another island of A's
EDGE_LEAF = Member("agent-leaf-e", "tenant-a", "edge.gpu-1", "CN=agent-leaf-e,OU=edge.gpu-1,O=tenant-a", leaf=True)
P1 = Member("agent-p1", None, "cloud", "CN=agent-p1,OU=cloud,O=adaptery-platform")
LAB, EDGE, CLOUD = (
    island_account("tenant-a", "lab"),
    island_account("tenant-a", "edge.gpu-1"),
    island_account(None, "cloud"),
)
EVERYONE = [A1, LEAF, A2, EDGE_LEAF, P1]


def imported(block: dict) -> list[str]:
    return [next(iter(entry.values()))["subject"] for entry in block["imports"]]


def test_each_island_of_a_scope_has_an_account_of_its_own_with_a_name_nats_server_takes():
    assert len({LAB, EDGE, CLOUD, island_account("tenant-b", "lab"), island_account(None, "lab")}) == 5
    assert LAB.startswith("T_tenant-a_") and CLOUD.startswith(f"{PLATFORM_ACCOUNT}_")
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in (LAB, EDGE, CLOUD))  # no '.' of the island's name
    assert island_account("tenant-a", "lab") == LAB  # stable across restarts: the same island, the same account


def test_the_loopback_server_never_names_a_certificate_subject_as_a_user():
    # There, a user without a password would let anyone on the host sign in as an agent by its subject.
    config = accounts("hash", {"agent-pw": "bcrypt"}, EVERYONE, certificate_users=False)
    users = [user["user"] for block in config.values() for user in block.get("users", [])]
    assert users == ["control", "agent-pw"]
    on_fabric = accounts("hash", {}, EVERYONE, certificate_users=True)
    assert on_fabric[LAB]["users"] == [{"user": A1.subject, "permissions": protocol.agent_permissions("agent-a1")}]
    assert on_fabric[EDGE]["users"] == [{"user": A2.subject, "permissions": protocol.agent_permissions("agent-a2")}]
    assert "password" not in json.dumps(on_fabric[LAB])


def test_an_island_account_imports_only_the_subjects_of_that_islands_agents():
    config = accounts("hash", {}, EVERYONE, certificate_users=True)
    assert imported(config[LAB]) == [
        "adaptery.agent.agent-a1.>",
        "adaptery.notify.agent-a1",
        "adaptery.infer.agent-a1",
        "adaptery.infer.agent-a1.cancel",
    ]  # the leaf is not an agent: it carries its island's agents, and has no subjects of its own
    assert imported(config[EDGE]) == [
        "adaptery.agent.agent-a2.>",
        "adaptery.notify.agent-a2",
        "adaptery.infer.agent-a2",
        "adaptery.infer.agent-a2.cancel",
    ]  # the same tenant's other island: nothing of a1's
    assert config[PLATFORM_ACCOUNT]["imports"] == []  # kept, empty, so that no export's account list is empty
    streams = {entry["stream"]["subject"]: entry["stream"]["account"] for entry in config[CONTROL_ACCOUNT]["imports"]}
    assert streams == {
        "adaptery.stream.agent-a1.>": LAB,
        "adaptery.stream.agent-a2.>": EDGE,
        "adaptery.stream.agent-p1.>": CLOUD,
    }
    exported_to = {tuple(entry["accounts"]) for entry in config[CONTROL_ACCOUNT]["exports"]}
    assert exported_to == {tuple(sorted([PLATFORM_ACCOUNT, LAB, EDGE, CLOUD]))}


def test_an_island_leaf_is_bound_to_its_islands_account_not_its_tenants():
    assert leaf_users(EVERYONE) == [
        {"user": LEAF.subject, "account": LAB},
        {"user": EDGE_LEAF.subject, "account": EDGE},
    ]


def test_accounts_once_defined_stay_defined_while_the_server_runs():
    config = accounts("hash", {}, [], certificate_users=False, keep=frozenset({"T_gone"}))
    assert config["T_gone"] == {"imports": [], "exports": [{"stream": "adaptery.stream.*.>", "accounts": ["CONTROL"]}]}
