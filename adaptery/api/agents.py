"""/api/admin/agents: the enrolled training agents, their state and current job (owners, platform admins)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require_agents_admin
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import agents as agent_records
from adaptery.services.queue import SEEN_RESOLUTION_SECONDS

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/agents")
def list_agents(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require_agents_admin(who)
    now = time.time()
    # Idle agents are seen at most every SEEN_RESOLUTION_SECONDS; busy ones heartbeat within their lease.
    offline_after = max(p.settings.job_lease_seconds, 3 * SEEN_RESOLUTION_SECONDS)
    with p.db.system() as s:
        agents = agent_records.list_agents(s)
        data = [
            {
                "id": agent.id,
                "name": agent.name,
                "state": agent_records.agent_state(agent, now=now, offline_after=offline_after),
                "embedded": agent.embedded,
                "tenant_scope": agent.tenant_scope,
                "island": agent.island,  # enrolled by certificate: its island, roles, and agent or island leaf
                "roles": agent.roles,
                "kind": agent.kind,
                "last_heartbeat_at": agent.last_seen_at,
                # Another tenant's job id is not theirs to see unless they administer the platform.
                "current_job": agent.current_job_id if who.is_platform_admin or _own_job(s, who, agent) else None,
                "created_at": agent.created_at,
            }
            for agent in agents
            if agent.tenant_scope in (None, who.tenant_id) or who.is_platform_admin
        ]
    return {"object": "list", "data": data}


def _own_job(s, who: Principal, agent) -> bool:  # noqa: ANN001 - a system session and an Agent row
    from adaptery.db import models as m

    job = s.get(m.FineTuningJob, agent.current_job_id) if agent.current_job_id else None
    return job is not None and job.tenant_id == who.tenant_id
