"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API, unchanged for its clients."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.api.openai.objects import checkpoint_object, event_object, job_object, page
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, finetuning, limits
from adaptery.services.errors import InvalidRequest

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    priority: int = Field(0, ge=-10, le=10, description="Adaptery: within the tenant's jobs, higher leases first.")
    requirements: Any = Field(
        None,
        description="Adaptery: what the machine that trains it must have: memory_gb, accelerator ('cpu' or 'cuda'), "
        "island ('tenant': only agents of your own island).",
    )


@router.post("/jobs")
def create_job(
    body: CreateJobRequest,
    background: BackgroundTasks,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    require(who, "fine_tune")
    if body.integrations:
        raise InvalidRequest("integrations are not supported on this server", param="integrations")
    limits.check_training(p.db, who)
    with p.db.tenant(who.tenant_id) as s:
        job = finetuning.create_job(
            s,
            who,
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            hyperparameters=body.hyperparameters,
            method=body.method,
            seed=body.seed,
            metadata=body.metadata,
            settings=p.settings,  # refuse what the platform could not train or serve, before any compute
            requirements=body.requirements,
        )
        job.priority = body.priority
        created = job_object(job)
        audit.record(s, who, "job.create", target=job.id, detail={"model": job.model})
    background.add_task(p.validate_job, who.tenant_id, job.id)
    return created


@router.get("/jobs")
def list_jobs(
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        rows, has_more = finetuning.list_jobs(s, viewer=who, after=after, limit=limit)
        return page([job_object(j) for j in rows], has_more)


@router.get("/jobs/{job_id}")
def retrieve_job(job_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        return job_object(finetuning.get_job(s, job_id, viewer=who))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "fine_tune")
    with p.db.tenant(who.tenant_id) as s:
        audit.record(s, who, "job.cancel", target=job_id)
        agent = finetuning.get_job(s, job_id, viewer=who).lease_owner
        cancelled = job_object(finetuning.cancel_job(s, job_id, viewer=who))
    p.notify_agent(agent, job_id, "cancel")
    return cancelled


@router.post("/jobs/{job_id}/pause")
def pause_job(job_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "fine_tune")
    with p.db.tenant(who.tenant_id) as s:
        job = finetuning.pause_job(s, job_id, viewer=who)
        audit.record(s, who, "job.pause", target=job_id)
        agent, paused = job.lease_owner, job_object(job)
    p.notify_agent(agent, job_id, "pause")
    return paused


@router.post("/jobs/{job_id}/resume")
def resume_job(job_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> dict:
    require(who, "fine_tune")
    with p.db.tenant(who.tenant_id) as s:
        resumed = job_object(finetuning.resume_job(s, job_id, viewer=who))
        audit.record(s, who, "job.resume", target=job_id)
        return resumed


@router.get("/jobs/{job_id}/events")
def list_events(
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        rows, has_more = finetuning.list_events(s, job_id, viewer=who, after=after, limit=limit)
        return page([event_object(e) for e in rows], has_more)


@router.get("/jobs/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    with p.db.tenant(who.tenant_id) as s:
        rows, has_more = finetuning.list_checkpoints(s, job_id, viewer=who, after=after, limit=limit)
        return page([checkpoint_object(c) for c in rows], has_more, with_ids=True)
