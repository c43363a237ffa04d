"""OpenAI's object shapes, built from our rows. Field names and nullability follow the official spec."""

from __future__ import annotations

from typing import Any

from adaptery.db import models as m
from adaptery.services import job_requirements
from adaptery.services.models import ModelRef


def model_object(ref: ModelRef) -> dict[str, Any]:
    return {"id": ref.id, "object": "model", "created": int(ref.created_at), "owned_by": ref.owned_by}


def file_object(record: m.File) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def job_object(job: m.FineTuningJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": int(job.created_at),
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "hyperparameters": job.hyperparameters,
        "model": job.model,
        "organization_id": job.tenant_id,
        "result_files": [],
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "integrations": None,
        "seed": job.seed,
        "estimated_finish": None,
        "method": {key: value for key, value in (job.method or {}).items() if key != "requirements"},
        "metadata": job.metadata_,
        "user_provided_suffix": job.suffix,
        "requirements": job_requirements.of(job) or None,  # Adaptery: what the machine that trains it must have
    }


def event_object(event: m.JobEvent) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": event.id,
        "created_at": int(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data or {},
    }


def checkpoint_object(checkpoint: m.JobCheckpoint) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": checkpoint.id,
        "created_at": int(checkpoint.created_at),
        "fine_tuned_model_checkpoint": checkpoint.model_name,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": {k: v for k, v in checkpoint.metrics.items() if v is not None},
        "step_number": checkpoint.step,
    }


def page(items: list[dict[str, Any]], has_more: bool, *, with_ids: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": items, "has_more": has_more}
    if with_ids:  # the spec wants strings here even for an empty page
        body["first_id"] = items[0]["id"] if items else ""
        body["last_id"] = items[-1]["id"] if items else ""
    return body
