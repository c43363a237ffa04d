"""/api/keys: API keys of the caller's tenant; a new or rotated key's secret is shown once.

Members see and manage their own keys, admins and owners every key of the tenant. Every change is audited.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import Positive, platform, principal
from adaptery.auth.principal import Principal, Role
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit, keys, models
from adaptery.services.errors import InvalidRequest, PermissionDenied

router = APIRouter(prefix="/api/keys", tags=["keys"])
Limit = Positive | None


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None
    concurrent_streams: Limit = None
    monthly_tokens: Limit = None


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=128)
    environment: str = "dev"
    expires_in_days: float | None = Field(None, gt=0, le=3650)
    scopes: list[str] | None = Field(None, max_length=8, description="Default: the scopes of the calling key")
    allowed_models: list[str] | None = Field(None, max_length=256, description="Default: every model")
    limits: KeyLimits | None = None
    platform: bool = Field(False, description="Carry your platform-admin power (platform admins, stepped up)")


class RotateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap_seconds: float = Field(3600, ge=0, le=keys.MAX_ROTATION_OVERLAP_SECONDS)


class UpdateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=128)
    limits: KeyLimits | None = None


def key_object(record: m.ApiKey) -> dict:
    return {
        "id": record.id,
        "object": "api_key",
        "name": record.name,
        "environment": record.environment,
        "redacted_value": record.redacted,
        "scopes": record.scopes,
        "allowed_models": record.allowed_models,
        "limits": {field: getattr(record, field) for field in keys.LIMIT_FIELDS},
        "created_at": int(record.created_at),
        "last_used_at": int(record.last_used_at) if record.last_used_at else None,
        "expires_at": int(record.expires_at) if record.expires_at else None,
        "revoked_at": int(record.revoked_at) if record.revoked_at else None,
        "rotated_at": int(record.rotated_at) if record.rotated_at else None,
        "previous_secret_expires_at": (
            int(record.previous_secret_expires_at) if record.previous_secret_expires_at else None
        ),
        "owner": record.user_id,
        "platform": record.platform,
    }


@router.get("")
def list_keys(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        return {"object": "list", "data": [key_object(k) for k in keys.list_keys(s, who)]}


@router.post("")
def create_key(body: CreateKeyRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """A new key of the caller's own. A key made with a key is never wider than it: scopes, models, limits,
    expiry and platform power are at most the parent's (and default to them)."""
    scopes = keys.check_scopes(body.scopes if body.scopes is not None else who.scopes, within=who.scopes)
    if body.platform and not who.is_platform_admin:
        raise PermissionDenied(
            "Only a platform admin in platform administration may mint a platform key.",
            param="platform",
            code="platform_admin_required",
        )
    with p.db.tenant(who.tenant_id) as s:
        expires_at, allowed, limits = keys.child_settings(
            keys.calling_key(s, who),
            expires_in_days=body.expires_in_days,
            allowed_models=body.allowed_models,
            limits=body.limits.model_dump() if body.limits else {},
            platform=body.platform,
        )
        if allowed is not None and not allowed:
            raise InvalidRequest("allowed_models must name at least one model (or be left out)", param="allowed_models")
        for i, model_id in enumerate(allowed or []):
            if model_id == p.embeddings.name:
                continue
            models.get_model(s, model_id, param=f"allowed_models[{i}]", viewer=who)
        new = keys.create_key(
            s,
            tenant_id=who.tenant_id,
            user_id=who.user_id,
            name=body.name,
            environment=body.environment,
            expires_at=expires_at,
            scopes=scopes,
            allowed_models=allowed,
            limits=limits,
            platform=body.platform,
        )
        detail = {
            "environment": new.record.environment,
            "scopes": scopes,
            "allowed_models": allowed,
            "platform": body.platform,
        }
        audit.record(s, who, "key.create", target=new.record.id, detail=detail)
        return {**key_object(new.record), "value": new.secret}


@router.patch("/{key_id}")
def update_key(
    key_id: str,
    body: UpdateKeyRequest,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Rename a key or change its own limits (within the tenant's, which still apply)."""
    with p.db.tenant(who.tenant_id) as s:
        record = keys.get_key(s, who, key_id, action="update")
        changes = body.model_dump(exclude_unset=True)
        if body.name is not None:
            record.name = body.name
        if body.limits is not None:
            owner_role = keys.owner_role(s, record)
            may_raise = who.has_role(Role.ADMIN) and (owner_role is None or who.has_role(owner_role))
            wanted = keys.limits_change(
                record,
                body.limits.model_dump(exclude_unset=True),
                calling_key=keys.calling_key(s, who),
                may_raise=may_raise,
            )
            for field, value in wanted.items():
                setattr(record, field, value)
        audit.record(s, who, "key.update", target=key_id, detail=changes)
        return key_object(record)


@router.delete("/{key_id}")
def revoke_key(key_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Revoke a key: the very next request with it is refused."""
    with p.db.tenant(who.tenant_id) as s:
        record = keys.revoke_key(s, who, key_id)
        audit.record(s, who, "key.revoke", target=key_id)
        return key_object(record)


@router.post("/{key_id}/rotate")
def rotate_key(
    key_id: str,
    body: RotateKeyRequest | None = None,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """A new secret under the same key id; the old secret keeps working for `overlap_seconds`."""
    overlap = (body or RotateKeyRequest()).overlap_seconds
    with p.db.tenant(who.tenant_id) as s:
        new = keys.rotate_key(s, who, key_id, overlap_seconds=overlap)
        audit.record(s, who, "key.rotate", target=key_id, detail={"overlap_seconds": overlap})
        return {**key_object(new.record), "value": new.secret}
