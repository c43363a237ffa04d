"""/v1/models: the base models and the caller's tenant's adapters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from adaptery.api.deps import platform, principal
from adaptery.api.openai.objects import model_object
from adaptery.auth.policy import may_use_model, require
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, blob_refs, models

router = APIRouter(prefix="/v1", tags=["models"])


def _embedding_model(p: Platform) -> dict[str, Any]:
    return {"id": p.embeddings.name, "object": "model", "created": 0, "owned_by": "adaptery"}


@router.get("/models")
def list_models(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict[str, Any]:
    with p.db.tenant(who.tenant_id) as s:
        data = [model_object(ref) for ref in models.list_models(s, viewer=who)]
    return {"object": "list", "data": [*data, _embedding_model(p)] if may_use_model(who, p.embeddings.name) else data}


@router.get("/models/{model_id:path}")
def retrieve_model(model_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    if model_id == p.embeddings.name and may_use_model(who, model_id):
        return _embedding_model(p)
    with p.db.tenant(who.tenant_id) as s:
        return model_object(models.get_model(s, model_id, viewer=who))


@router.delete("/models/{model_id:path}")
def delete_model(model_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "delete_model")
    with p.db.tenant(who.tenant_id) as s:
        adapter = models.delete_adapter(s, model_id, viewer=who)
        audit.record(s, who, "model.delete", target=model_id)
    with p.db.system() as system:
        for sha256 in adapter.manifest.values():
            blob_refs.release(system, p.blobs, adapter.tenant_id, sha256)
    return {"id": adapter.id, "object": "model", "deleted": True}
