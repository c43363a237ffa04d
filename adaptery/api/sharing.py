"""/api/models/{model_id}/sharing: who in the tenant may see and use an adapter (audited)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, models

router = APIRouter(prefix="/api/models", tags=["models"])


class SharingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    visibility: Literal["private", "shared", "tenant"]
    members: list[str] = Field(default_factory=list, max_length=1000, description="Usernames, with 'shared'")


def sharing_object(sharing: models.Sharing) -> dict[str, Any]:
    return {
        "object": "model.sharing",
        "model": sharing.adapter.id,
        "visibility": sharing.adapter.visibility,
        "members": sharing.members,
        "created_by": sharing.adapter.created_by,
    }


@router.get("/{model_id}/sharing")
def get_sharing(model_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        return sharing_object(models.get_sharing(s, who, model_id))


@router.put("/{model_id}/sharing")
def set_sharing(
    model_id: str, body: SharingBody, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict:
    """private: its creator (and tenant admins); shared: also the named members; tenant: every member."""
    with p.db.tenant(who.tenant_id) as s:
        before = models.get_sharing(s, who, model_id).adapter.visibility
        sharing, added, removed = models.set_sharing(s, who, model_id, visibility=body.visibility, members=body.members)
        detail = {"visibility": {"from": before, "to": sharing.adapter.visibility}}
        if added:
            audit.record(s, who, "model.share", target=model_id, detail={**detail, "members": added})
        if removed:
            audit.record(s, who, "model.unshare", target=model_id, detail={**detail, "members": removed})
        if before != sharing.adapter.visibility and not (added or removed):
            audit.record(s, who, "model.visibility", target=model_id, detail=detail)
        return sharing_object(sharing)
