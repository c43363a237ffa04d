"""Prometheus metrics (/metrics) and the engine's state (GET /api/admin/engine).

/metrics counts every tenant's traffic without tenant labels: the engine's counters, and the usage ledger's sums
(`adaptery_usage_*`, read from the database at each scrape, so they equal the ledger whichever process served
the traffic). Only platform admins may read it (point Prometheus at it with such a key as its bearer token). The
engine state is for tenant owners too: it names adapters by content hash; a tenant owner sees the model ids of
their own tenant's adapters, and other tenants' adapters only as counts.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require_engine_admin
from adaptery.auth.principal import Principal
from adaptery.engine import process_setup
from adaptery.platform import Platform
from adaptery.services import catalog, usage

router = APIRouter(tags=["engine"])


@router.get("/metrics", include_in_schema=False)
def metrics(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Response:
    text = generate_latest(p.engine.metrics.registry) + generate_latest(usage.registry(p.db))
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def _visible_state(p: Platform, who: Principal) -> dict[str, Any]:
    state = p.engine.describe()
    with p.db.system() if who.is_platform_admin else p.db.tenant(who.tenant_id) as s:
        rows = catalog.adapter_keys(s)
    names = {row.sha256: row.model_id for row in rows}

    def name(key: str) -> str | None:
        return names.get(key)

    hidden = 0
    adapters = {}
    for key, info in state["adapters"].items():
        if name(key) is None:
            hidden += 1
            continue
        adapters[key] = {"model": name(key), **info}
    state["adapters"] = adapters
    if who.is_platform_admin:
        state["other_tenants_adapters"] = hidden  # a tenant is not told how many adapters the others have
        state["process"] = process_setup.describe()  # the machine's set-up: the platform's to know
    for base_id, base in state["bases"].items():
        tiers = base.get("adapters")
        if tiers is None:
            continue
        in_memory = {*tiers["active"], *(a["key"] for a in tiers["memory"]), *tiers["loading"]}
        tiers["disk"] = [
            {"key": row.sha256, "model": row.model_id}
            for row in rows
            if row.base_model == base_id and row.sha256 not in in_memory
        ]
        tiers["active"] = [{"key": k, "model": name(k)} for k in tiers["active"] if name(k)]
        tiers["memory"] = [{**a, "model": name(a["key"])} for a in tiers["memory"] if name(a["key"])]
        tiers["loading"] = [{"key": k, "model": name(k)} for k in tiers["loading"] if name(k)]
    return state


@router.get("/api/admin/engine")
async def engine_state(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    """Which base models are loaded and on which path, KV-cache use, and adapters by tier."""
    require_engine_admin(who)
    return await run_in_threadpool(_visible_state, p, who)
