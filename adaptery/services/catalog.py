"""What the web page shows about models: the catalog (base models' defaults and observed training speed;
adapters' method, rank, training job, data and final metrics) and the names behind the engine's adapter keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.services import models


def observed_speed(session: Session) -> dict[str, float]:
    """Tokens per second of the session's tenant's finished jobs, per base model: what a time estimate rests on."""
    tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for job in session.scalars(select(m.FineTuningJob).where(m.FineTuningJob.status == "succeeded")):
        if job.trained_tokens and job.started_at and job.finished_at and job.finished_at > job.started_at:
            tokens[job.model] = tokens.get(job.model, 0) + job.trained_tokens
            seconds[job.model] = seconds.get(job.model, 0) + job.finished_at - job.started_at
    return {model: tokens[model] / seconds[model] for model in tokens}


def adapter_details(session: Session, adapter: m.Adapter) -> dict[str, Any]:
    job = session.get(m.FineTuningJob, adapter.job_id) if adapter.job_id else None
    details: dict[str, Any] = {
        "method": adapter.method,
        "rank": adapter.rank,
        "sha256": adapter.sha256,
        "visibility": adapter.visibility,
        "created_by": None,
        "job": None,
    }
    if adapter.created_by and (creator := session.get(m.User, adapter.created_by)) is not None:
        details["created_by"] = creator.username
    if job is not None:
        training = session.get(m.File, job.training_file)
        method = job.method or {}  # its hyperparameters hold every option the run used, the top level OpenAI's three
        checkpoint = session.scalars(
            select(m.JobCheckpoint).where(m.JobCheckpoint.job_id == job.id).order_by(m.JobCheckpoint.step.desc())
        ).first()
        details["job"] = {
            "id": job.id,
            "training_file": job.training_file,
            "training_filename": training.filename if training else None,
            "hyperparameters": method.get(method.get("type", ""), {}).get("hyperparameters") or job.hyperparameters,
            "trained_tokens": job.trained_tokens,
            "metrics": {k: v for k, v in (checkpoint.metrics if checkpoint else {}).items() if v is not None},
        }
    return details


def model_catalog(session: Session, viewer: Principal) -> list[dict[str, Any]]:
    """The models `viewer` may use, each with what the web page shows about it."""
    speed = observed_speed(session)
    data = []
    for ref in models.list_models(session, viewer=viewer):
        body: dict[str, Any] = {
            "id": ref.id,
            "object": "model",
            "kind": "name" if ref.name else "adapter" if ref.adapter else "base",
            "base_model": ref.base.id,
            "display_name": ref.base.display_name or ref.base.id,
            "owned_by": ref.owned_by,
            "created": int(ref.created_at),
        }
        if ref.adapter is None:
            body["finetune_defaults"] = ref.base.finetune_defaults
            body["observed_tokens_per_second"] = speed.get(ref.id)
        else:
            body.update(adapter_details(session, ref.adapter))
        if ref.name is not None:  # a stable name: what it answers from now
            body.update(current_version=ref.name.current_version, version_model=ref.adapter.id)
        data.append(body)
    return data


@dataclass(frozen=True)
class AdapterKey:
    model_id: str
    sha256: str  # the engine's key for the adapter
    base_model: str


def adapter_keys(session: Session) -> list[AdapterKey]:
    """Every adapter the session sees (a tenant's session: its own; the system session: all), by engine key."""
    rows = session.execute(select(m.Adapter.id, m.Adapter.sha256, m.Adapter.base_model).order_by(m.Adapter.id))
    return [AdapterKey(model_id, sha, base) for model_id, sha, base in rows]
