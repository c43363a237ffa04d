"""Agents in the database: one NATS user per agent, its password shown once and stored only as a bcrypt hash.

bcrypt because nats-server checks bcrypt hashes itself: the server's configuration is generated from
the database and never holds a usable secret.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.messaging.credentials import AgentCredentials, hash_secret
from adaptery.services.enrollment import check_roles
from adaptery.services.errors import Conflict, InvalidRequest, NotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EMBEDDED_PREFIX = "embedded-"


def create_agent(
    system: Session, name: str, *, tenant_scope: str | None = None, roles: list[str] | None = None
) -> AgentCredentials:
    """An agent signing in by password, with the roles the control plane lets it act in (default both: an agent
    started `--roles infer` on credentials made for infer only can never lease a training job)."""
    roles = check_roles(["train", "infer"] if roles is None else roles)
    if not _NAME.match(name or ""):
        raise InvalidRequest("an agent name is 1-64 letters, digits, '.', '_' or '-'", param="name")
    if system.scalar(select(m.Agent).where(m.Agent.name == name)) is not None:
        raise Conflict(f"an agent named '{name}' already exists")
    if tenant_scope is not None and system.get(m.Tenant, tenant_scope) is None:
        raise NotFound(f"no tenant '{tenant_scope}'", param="tenant")
    agent_id = new_id("agent-", 16)
    secret = random_token(40)
    system.add(m.Agent(id=agent_id, name=name, secret_hash=hash_secret(secret), tenant_scope=tenant_scope, roles=roles))
    system.flush()
    return AgentCredentials(agent_id, name, secret)


def embedded_agent(system: Session, port: int) -> AgentCredentials:
    """The agent inside `serve`: one per host and port, its secret replaced at every start."""
    name = f"{EMBEDDED_PREFIX}{socket.gethostname()}-{port}"[:64]
    agent = system.scalar(select(m.Agent).where(m.Agent.name == name))
    secret = random_token(40)
    if agent is None:
        agent = m.Agent(id=new_id("agent-", 16), name=name, secret_hash="", embedded=True)
        system.add(agent)
    agent.secret_hash = hash_secret(secret)
    agent.revoked_at = None
    system.flush()
    return AgentCredentials(agent.id, name, secret)


def find_agent(system: Session, ref: str) -> m.Agent:
    agent = system.get(m.Agent, ref) or system.scalar(select(m.Agent).where(m.Agent.name == ref))
    if agent is None:
        raise NotFound(f"no agent '{ref}'", param="agent")
    return agent


def revoke_agent(system: Session, ref: str) -> m.Agent:
    agent = find_agent(system, ref)
    agent.revoked_at = agent.revoked_at or time.time()
    return agent


def active_agents(system: Session) -> list[m.Agent]:
    return list(system.scalars(select(m.Agent).where(m.Agent.revoked_at.is_(None)).order_by(m.Agent.id)))


def password_agents(system: Session) -> dict[str, str]:
    """The unrevoked agents that sign in with a password (id -> bcrypt hash); those enrolled by certificate have
    none and never appear as password users."""
    return {agent.id: agent.secret_hash for agent in active_agents(system) if agent.secret_hash}


def list_agents(system: Session) -> list[m.Agent]:
    return list(system.scalars(select(m.Agent).order_by(m.Agent.created_at, m.Agent.id)))


def agent_state(agent: m.Agent, *, now: float, offline_after: float) -> str:
    if agent.revoked_at is not None:
        return "revoked"
    if agent.last_seen_at is None or now - agent.last_seen_at > offline_after:
        return "offline"
    return "busy" if agent.current_job_id else "idle"


def agents_view(
    system: Session, who: Principal, live: dict[str, dict[str, Any]], *, now: float, offline_after: float
) -> list[dict[str, Any]]:
    """The agents `who` may see (platform-wide ones and their tenant's; all for a platform admin), each with its
    record and, for an infer agent, its last announcement (`live`, from the router): roles, bases, adapters per
    tier, load, tokens/s, and whether it is lost. Another tenant's job id and adapter hashes are not shown."""
    rows = []
    for agent in list_agents(system):
        if agent.tenant_scope not in (None, who.tenant_id) and not who.is_platform_admin:
            continue
        job = system.get(m.FineTuningJob, agent.current_job_id) if agent.current_job_id else None
        own_job = job is not None and (who.is_platform_admin or job.tenant_id == who.tenant_id)
        state = agent_state(agent, now=now, offline_after=offline_after)
        announced = live.get(agent.id)
        row: dict[str, Any] = {
            "id": agent.id,
            "name": agent.name,
            "state": state,
            "embedded": agent.embedded,
            "tenant_scope": agent.tenant_scope,
            # Enrolled by certificate: the roles it was enrolled with, its island, and agent or island leaf.
            "roles": list(agent.roles) if agent.roles is not None else (["train"] if agent.embedded else []),
            "island": agent.island,
            "kind": agent.kind,
            "bases": [],
            "adapters": None,
            "running": 0,
            "queue_depth": 0,
            "tokens_per_second": 0.0,
            "served": 0,
            "adapter_hits": 0,
            "adapter_misses": 0,
            "lost": False,
            "last_heartbeat_at": agent.last_seen_at,
            "current_job": agent.current_job_id if own_job else None,
            "created_at": agent.created_at,
        }
        if announced is not None and agent.revoked_at is None:
            tiers = announced.get("adapters") or {}
            running, waiting = int(announced.get("running") or 0), int(announced.get("waiting") or 0)
            row.update(
                roles=list(announced.get("roles") or []),
                bases=sorted(announced.get("bases") or {}),
                lost=bool(announced.get("lost")),
                last_heartbeat_at=max(agent.last_seen_at or 0.0, float(announced.get("announced_at") or 0.0)),
            )
            if who.is_platform_admin or agent.tenant_scope == who.tenant_id:
                row.update(
                    adapters={tier: list(tiers.get(tier) or []) for tier in ("active", "memory", "disk", "loading")},
                    running=running,
                    queue_depth=waiting,
                    tokens_per_second=float(announced.get("tokens_per_second") or 0.0),
                    served=int(announced.get("served") or 0),
                    adapter_hits=int(announced.get("adapter_hits") or 0),
                    adapter_misses=int(announced.get("adapter_misses") or 0),
                )
            else:
                # A machine shared by every tenant: its load and counters are everyone's traffic, so a tenant sees
                # only whether it is busy, not how much the others use it.
                row.update(adapters=None, running=None, queue_depth=None, tokens_per_second=None, served=None,
                           adapter_hits=None, adapter_misses=None)  # fmt: skip
            if row["lost"]:
                row["state"] = "lost"
            elif state == "offline":
                row["state"] = "busy" if running or waiting else "idle"
        rows.append(row)
    return rows
