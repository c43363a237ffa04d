"""Agents in the database: one NATS user per agent, its password shown once and stored only as a bcrypt hash.

bcrypt because nats-server checks bcrypt hashes itself: the server's configuration is generated from
the database and never holds a usable secret.
"""

from __future__ import annotations

import re
import socket
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.db.ids import new_id, random_token
from adaptery.messaging.credentials import AgentCredentials, hash_secret
from adaptery.services.errors import Conflict, InvalidRequest, NotFound

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EMBEDDED_PREFIX = "embedded-"


def create_agent(system: Session, name: str, *, tenant_scope: str | None = None) -> AgentCredentials:
    if not _NAME.match(name or ""):
        raise InvalidRequest("an agent name is 1-64 letters, digits, '.', '_' or '-'", param="name")
    if system.scalar(select(m.Agent).where(m.Agent.name == name)) is not None:
        raise Conflict(f"an agent named '{name}' already exists")
    if tenant_scope is not None and system.get(m.Tenant, tenant_scope) is None:
        raise NotFound(f"no tenant '{tenant_scope}'", param="tenant")
    agent_id = new_id("agent-", 16)
    secret = random_token(40)
    system.add(m.Agent(id=agent_id, name=name, secret_hash=hash_secret(secret), tenant_scope=tenant_scope))
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
