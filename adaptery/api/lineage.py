"""/api/fine_tuning/jobs/{id}/extend|continue|fork: new jobs from old ones, with their lineage."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Depends
from pydantic import BaseModel, ConfigDict

from adaptery.api.deps import Positive, platform, principal
from adaptery.api.openai.objects import job_object
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import audit, limits, lineage

router = APIRouter(prefix="/api/fine_tuning", tags=["fine-tuning"])


class ExtendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Positive  # how many more epochs to train


class ContinueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    n_epochs: Positive | None = None


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    training_file: str
    validation_file: str | None = None
    n_epochs: Positive | None = None


def _derive(kind: str, job_id: str, fields: dict, who: Principal, p: Platform, background: BackgroundTasks) -> dict:
    require(who, "fine_tune")
    limits.check_training(p.db, who)
    with p.db.tenant(who.tenant_id) as s:
        job = lineage.derive_job(s, who, job_id, kind, **fields)
        created = {**job_object(job), "lineage": job.lineage}
        audit.record(s, who, f"job.{kind}", target=job.id, detail={"parent_job": job_id})
    background.add_task(p.validate_job, who.tenant_id, created["id"])
    return created


@router.post("/jobs/{job_id}/extend")
def extend_job(
    job_id: str,
    body: ExtendRequest,
    background: BackgroundTasks,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """Train a finished job's adapter for `n_epochs` more epochs, as a new job."""
    return _derive("extend", job_id, body.model_dump(), who, p, background)


@router.post("/jobs/{job_id}/continue")
def continue_job(
    job_id: str,
    body: ContinueRequest,
    background: BackgroundTasks,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """A new job starting from one of the job's checkpoints."""
    return _derive("continue", job_id, body.model_dump(), who, p, background)


@router.post("/jobs/{job_id}/fork")
def fork_job(
    job_id: str,
    body: ForkRequest,
    background: BackgroundTasks,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> dict:
    """A new job starting from a finished job's adapter, trained on another file."""
    return _derive("fork", job_id, body.model_dump(), who, p, background)
