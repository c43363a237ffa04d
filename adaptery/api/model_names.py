"""/api/model_names: stable names clients call, their versions, promotion, rollback, canary, history, and a
fine-tune that continues from a name's current version (every change audited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from adaptery.api.deps import DB_INT_MAX, Positive, platform, principal
from adaptery.api.openai.objects import job_object
from adaptery.auth import policy
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, limits, model_names, models

router = APIRouter(prefix="/api/model_names", tags=["models"])


class CreateName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The name's own part (lab-assistant); clients call ft:<base>:<tenant>:<name>")
    version: str = Field(description="The adapter (ft:…) it answers from first, as its version 1")


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Positive | str = Field(description="A version number of the name, or an adapter id (numbered next)")


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Positive | str = Field(description="The candidate: a version number or an adapter id")
    share: float = Field(ge=0, le=100, description="Percent of the name's requests the candidate answers")


class FineTune(BaseModel):
    model_config = ConfigDict(extra="forbid")
    training_file: str | None = Field(None, description="A fine-tune file (file-…); or give dataset instead")
    dataset: str | None = Field(None, description="A dataset (id or name) whose version is trained on")
    dataset_version: Positive | None = Field(None, description="Its version number; default: the latest")
    validation_file: str | None = None
    method: dict[str, Any] | None = Field(None, description="OpenAI's method object: supervised (default) or dpo")
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=DB_INT_MAX)


def name_object(session: Session, name: Any, viewer: Principal) -> dict[str, Any]:
    """A name as `viewer` may see it: a version whose adapter is private to someone else (an admin may promote one)
    is listed by number only, without its adapter's id or job."""
    current = model_names.state(session, name)
    shared = models.shared_with(session, viewer)

    def shown(version: Any) -> bool:
        return version.adapter is None or models.sees_version(viewer, version.adapter, shared)

    # the counts of each version (a canary's apart from the current one's) are for whoever decides what it answers
    owner = policy.may_share_adapter(viewer, created_by=name.created_by)
    tallies = model_names.tallies(session, name) if owner else {}

    return {
        "object": "model.name",
        "id": name.id,
        "name": name.name,
        "base_model": name.base_model,
        "current_version": name.current_version,
        "canary": (
            {"version": name.canary_version, "share": name.canary_share} if name.canary_version is not None else None
        ),
        "created_at": int(name.created_at),
        "updated_at": int(name.updated_at),
        "versions": [
            {
                "version": v.number,
                "model": v.adapter_id if shown(v) else None,
                "hidden": not shown(v),
                "deleted": v.adapter is None,
                "fine_tuning_job": v.job_id if shown(v) else None,
                "created_at": int(v.created_at),
                "feedback": tallies[v.number].as_dict() if v.number in tallies else None,
            }
            for v in current.versions
        ],
        "history": [
            {
                "action": row.action,
                "from_version": row.from_version,
                "to_version": row.to_version,
                "share": row.canary_share,
                "actor": row.actor,
                "created_at": row.created_at,
            }
            for row in current.history
        ],
    }


@router.get("")
def list_names(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        return {"object": "list", "data": [name_object(s, name, who) for name in model_names.list_names(s, who)]}


@router.post("")
def create_name(body: CreateName, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """A stable name answering from `version` (an adapter of your workspace)."""
    with p.db.tenant(who.tenant_id) as s:
        name = model_names.create_name(s, who, name=body.name, version=body.version)
        audit.record(s, who, "model_name.create", target=name.id, detail={"version": 1, "model": body.version})
        return name_object(s, name, who)


@router.get("/{name}")
def get_name(name: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """The name, its versions and its history of promotions, rollbacks and canaries."""
    with p.db.tenant(who.tenant_id) as s:
        return name_object(s, model_names.get_name(s, name, who), who)


@router.delete("/{name}")
def delete_name(name: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """The name goes; the adapters that were its versions stay."""
    with p.db.tenant(who.tenant_id) as s:
        gone = model_names.delete_name(s, who, name)
        audit.record(s, who, "model_name.delete", target=gone.id)
        return {"id": gone.id, "object": "model.name", "deleted": True}


@router.post("/{name}/promote")
def promote(name: str, body: Promote, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Clients of the name are answered by `version` from their next request on."""
    with p.db.tenant(who.tenant_id) as s:
        row, before = model_names.promote(s, who, name, body.version)
        detail = {"from_version": before, "to_version": row.current_version}
        audit.record(s, who, "model_name.promote", target=row.id, detail=detail)
        return name_object(s, row, who)


@router.post("/{name}/rollback")
def rollback(name: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """Back to the version the latest promotion replaced."""
    with p.db.tenant(who.tenant_id) as s:
        row, before = model_names.rollback(s, who, name)
        detail = {"from_version": before, "to_version": row.current_version}
        audit.record(s, who, "model_name.rollback", target=row.id, detail=detail)
        return name_object(s, row, who)


@router.put("/{name}/canary")
def set_canary(name: str, body: Canary, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    """`share` % of the name's requests (chosen by request id, deterministically) go to `version`."""
    with p.db.tenant(who.tenant_id) as s:
        row = model_names.set_canary(s, who, name, body.version, body.share)
        detail = {"version": row.canary_version, "share": row.canary_share}
        audit.record(s, who, "model_name.canary", target=row.id, detail=detail)
        return name_object(s, row, who)


@router.delete("/{name}/canary")
def end_canary(name: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        row, ended = model_names.end_canary(s, who, name)
        audit.record(s, who, "model_name.canary_end", target=row.id, detail={"version": ended})
        return name_object(s, row, who)


@router.post("/{name}/fine_tune")
def fine_tune(
    name: str,
    body: FineTune,
    background: BackgroundTasks,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """A fine-tune (SFT or DPO) that starts from the weights of the name's current version; its adapter becomes
    the name's next version when it succeeds (promote it when its evaluation says so)."""
    require(who, "fine_tune")
    limits.check_training(p.db, who)
    with p.db.tenant(who.tenant_id) as s:
        job = model_names.fine_tune(s, who, name, **body.model_dump(), settings=p.settings)
        created = {**job_object(job), "lineage": job.lineage}
        detail = {"model": job.model, "from": job.lineage["adapter"], "model_name": job.lineage["model_name"]}
        audit.record(s, who, "job.create", target=job.id, detail=detail)
    background.add_task(p.validate_job, who.tenant_id, created["id"])
    return created
