"""The broker's tenancy: which NATS account each connection lands in, and exactly which subjects cross between
accounts (issue 16, "Tenancy in the fabric").

- `CONTROL` holds the control plane's user and the password agents of before (the embedded agent on loopback and
  `adaptery agents create`'s), each limited by its user permissions (`protocol.agent_permissions`).
- Every agent or island leaf enrolled by certificate lands in the account of its scope *and island*:
  `T_<tenant id>_<h>` for a tenant's, `AGENTS_<h>` for the platform's, `h` a short hash of the island's name (which
  may hold '.', and an account's name ends up in subjects). Its agents are users there (certificate subject ->
  user, with the same permissions), whether they dial the hub or their island's leaf; an island's leaf connection
  is bound to the account as a whole. `AGENTS` itself stays defined and empty, so that no export's list of
  accounts is ever empty (an export without one would be public).
- Between them, per enrolled agent id and nothing else: the agent's account imports the control plane's service
  `adaptery.agent.<id>.>` (requests with their replies) and its streams `adaptery.notify.<id>`,
  `adaptery.infer.<id>` and `adaptery.infer.<id>.cancel`; the control plane imports `adaptery.stream.<id>.>` from
  the account that agent belongs to.

Why per island and not per tenant: whoever runs an island's leaf can publish anything the leaf's account imports
(the leaf is bound to the account, not to a user with permissions), so an account per tenant let one island's
operator lease, finish and read the jobs and prompts of every agent of the tenant, on any island (finding F2).
Bound to its island's account, a leaf reaches the control plane only as the agents enrolled in that island, which
its operator runs anyway.

An account that appears at a configuration reload does not get the interest of its imports (nats-server 2.15,
as its issue #8560 reports for clusters; here a single server too): the servers restart instead when an island's
first machine joins, and an account stays defined for the servers' lifetime once it was.

So an island, whatever its own leaf lets its machines publish, reaches the control plane only under its own
agents' ids, hears only what is addressed to them, and never sees a subject of another island's account, of its
tenant or another: the broker answers such a request with "no responders". Nothing here touches the database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from adaptery.messaging import protocol

CONTROL_ACCOUNT = "CONTROL"
PLATFORM_ACCOUNT = "AGENTS"
PLATFORM_ORGANIZATION = "adaptery-platform"  # the O= of a platform-wide agent's certificate subject


def island_account(tenant_id: str | None, island: str) -> str:
    """The account of one island of a tenant (None: of the platform). 48 bits of the island's hash: a tenant has
    a handful of islands, so two of them sharing an account by chance is not a case to handle."""
    digest = hashlib.sha256(island.encode()).hexdigest()[:12]
    return f"{PLATFORM_ACCOUNT}_{digest}" if tenant_id is None else f"T_{tenant_id}_{digest}"


@dataclass(frozen=True)
class Member:
    """An agent or island leaf enrolled by certificate, as the broker sees it."""

    agent_id: str
    tenant_id: str | None  # None: platform-wide
    island: str
    subject: str  # its certificate's subject, RFC 4514 (how nats-server's verify_and_map names it)
    leaf: bool = False

    @property
    def account(self) -> str:
        return island_account(self.tenant_id, self.island)


def _agent_imports(agent_id: str) -> list[dict[str, Any]]:
    streams = [protocol.notify_subject(agent_id), protocol.infer_subject(agent_id)]
    streams.append(protocol.infer_cancel_subject(agent_id))
    return [{"service": {"account": CONTROL_ACCOUNT, "subject": protocol.agent_subject(agent_id, ">")}}] + [
        {"stream": {"account": CONTROL_ACCOUNT, "subject": subject}} for subject in streams
    ]


def accounts(
    control_hash: str,
    password_agents: dict[str, str],
    members: list[Member],
    *,
    certificate_users: bool,
    keep: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The `accounts` block. `certificate_users`: list the enrolled agents' certificate subjects as users (the
    server with the mTLS listener does; the loopback one, whose users sign in with passwords, must not, or a
    subject could be used as a user name without a password). `keep`: agent accounts to define even if empty."""
    agent_accounts = sorted({PLATFORM_ACCOUNT} | keep | {member.account for member in members})
    control_users: list[dict[str, Any]] = [{"user": "control", "password": control_hash}]
    for agent_id, secret_hash in sorted(password_agents.items()):
        control_users.append(
            {"user": agent_id, "password": secret_hash, "permissions": protocol.agent_permissions(agent_id)}
        )
    control_exports: list[dict[str, Any]] = [
        {"service": f"{protocol.PREFIX}.*.>", "accounts": agent_accounts},
        {"stream": protocol.notify_subject("*"), "accounts": agent_accounts},
        {"stream": protocol.infer_subject("*"), "accounts": agent_accounts},
        {"stream": protocol.infer_cancel_subject("*"), "accounts": agent_accounts},
    ]
    blocks: dict[str, Any] = {
        CONTROL_ACCOUNT: {
            "users": control_users,
            "exports": control_exports,
            "imports": [
                {"stream": {"account": member.account, "subject": f"{protocol.STREAM_PREFIX}.{member.agent_id}.>"}}
                for member in sorted(members, key=lambda member: member.agent_id)
                if not member.leaf
            ],
        }
    }
    for account in agent_accounts:
        own = sorted((m for m in members if m.account == account), key=lambda member: member.agent_id)
        users = [
            {"user": m.subject, "permissions": protocol.agent_permissions(m.agent_id)}
            for m in own
            if certificate_users and not m.leaf
        ]
        block: dict[str, Any] = {
            "imports": [entry for m in own if not m.leaf for entry in _agent_imports(m.agent_id)],
            "exports": [{"stream": f"{protocol.STREAM_PREFIX}.*.>", "accounts": [CONTROL_ACCOUNT]}],
        }
        if users:
            block["users"] = users
        blocks[account] = block
    return blocks


def leaf_users(members: list[Member]) -> list[dict[str, Any]]:
    """The leafnode listener's users: each island leaf's certificate subject, bound to its island's account."""
    return [{"user": m.subject, "account": m.account} for m in sorted(members, key=lambda m: m.agent_id) if m.leaf]
