"""/api/keys: the caller's tenant's API keys; a new key's secret is shown once."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import keys

router = APIRouter(prefix="/api/keys", tags=["keys"])


class CreateKeyRequest(BaseModel):
    name: str = Field("", max_length=128)
    environment: str = "dev"
    expires_in_days: float | None = None


def key_object(record: m.ApiKey) -> dict:
    return {
        "id": record.id,
        "object": "api_key",
        "name": record.name,
        "environment": record.environment,
        "redacted_value": record.redacted,
        "created_at": int(record.created_at),
        "last_used_at": int(record.last_used_at) if record.last_used_at else None,
        "expires_at": int(record.expires_at) if record.expires_at else None,
        "revoked_at": int(record.revoked_at) if record.revoked_at else None,
        "owner": record.user_id,
    }


@router.get("")
def list_keys(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        return {"object": "list", "data": [key_object(k) for k in keys.list_keys(s)]}


@router.post("")
def create_key(body: CreateKeyRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "manage_keys")
    with p.db.tenant(who.tenant_id) as s:
        new = keys.create_key(
            s,
            tenant_id=who.tenant_id,
            user_id=who.user_id,
            name=body.name,
            environment=body.environment,
            expires_in_days=body.expires_in_days,
        )
        return {**key_object(new.record), "value": new.secret}


@router.delete("/{key_id}")
def revoke_key(key_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "manage_keys")
    with p.db.tenant(who.tenant_id) as s:
        return key_object(keys.revoke_key(s, key_id))
