"""/api/admin/agents: the enrolled agents, live (owners, platform admins): state, roles, bases, resident adapters,
load, tokens/s, current job, last heartbeat; an infer agent that stopped announcing is marked lost."""

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
    # Idle agents are seen at most every SEEN_RESOLUTION_SECONDS; busy ones heartbeat within their lease.
    offline_after = max(p.settings.job_lease_seconds, 3 * SEEN_RESOLUTION_SECONDS)
    with p.db.system() as s:
        data = agent_records.agents_view(s, who, p.router.snapshot(), now=time.time(), offline_after=offline_after)
    return {"object": "list", "data": data}
