"""/api/evaluations, /api/evaluation_tasks and each job's and adapter's evaluation report.

Evaluations run as jobs on the queue (services/evaluations.py); these routes queue them and read their results.
Another tenant's job, adapter, evaluation or task is a 404, as one that does not exist.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import Positive, platform, principal
from adaptery.auth import policy
from adaptery.auth.policy import require
from adaptery.auth.principal import Principal
from adaptery.data.untrusted import RecordLimits
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.services import audit, evaluation_tasks, evaluations, limits

router = APIRouter(tags=["evaluations"])


class CreateEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The adapter to evaluate (its predecessor and base are scored beside it)")
    kind: Literal["held_out", "lm_eval"] = "held_out"
    file_id: str | None = Field(None, description="held_out: a chat JSONL file; default: the job's held-out set")
    task: str | None = Field(None, description="lm_eval: the name of an uploaded evaluation task")
    limit: Positive | None = Field(None, description="lm_eval: score at most this many documents")


class CreateTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str = Field(description="The task's YAML (task, doc_to_text, doc_to_target, generation_kwargs, ...)")
    data: str = Field(description="The task's documents: JSONL, one object per line")


class EvaluationSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_id: str


class EvaluationObject(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    kind: str
    status: str
    fine_tuning_job_id: str | None
    model: str
    models: list[dict[str, Any]]
    source: dict[str, Any]
    progress: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationObject]


class TaskObject(BaseModel):
    id: str
    object: Literal["evaluation.task"] = "evaluation.task"
    name: str
    config: dict[str, Any]
    records: int
    created_at: float


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskObject]


class Report(BaseModel):
    object: Literal["evaluation.report"] = "evaluation.report"
    fine_tuning_job_id: str | None
    model: str | None
    models: list[dict[str, Any]]
    predecessor_rule: str
    hidden_models: list[str] = Field(description="Labels left out: models you may not see (a private predecessor)")
    evaluations: list[EvaluationObject]
    held_out: dict[str, Any] | None
    lm_eval: list[dict[str, Any]]
    changes: dict[str, Any]
    examples: list[dict[str, Any]] = []
    recommendation: dict[str, Any] | None = Field(
        None, description="promote (true/false) over `against` (predecessor, else base), and the reason"
    )
    model_name: dict[str, Any] | None = Field(
        None, description="the stable name this adapter is a version of: name, id, version, current_version"
    )


def _task_object(task: m.EvaluationTask) -> TaskObject:
    return TaskObject(id=task.id, name=task.name, config=task.config, records=task.records, created_at=task.created_at)


@router.post("/api/evaluations")
def create_evaluation(
    body: CreateEvaluation, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> EvaluationObject:
    """Queue an evaluation of one of your adapters: held-out metrics, or an lm-eval task through the API. Its
    models generate answers, so it needs the inference scope and the base model, and this month's budget left (429
    when spent); a held-out run holds its worst case against the key's and the organization's budgets until it
    ends, then is charged what it used."""
    require(who, "fine_tune")
    policy.authorize(who, policy.INFER)  # its models generate answers: a key needs the inference scope too
    limits.check_training(p.db, who)
    with p.db.tenant(who.tenant_id) as s:
        if body.kind == "lm_eval":  # its calls go through /v1, each reserved there against the same budgets
            evaluation = evaluations.create_lm_eval(s, who, body.model, body.task, limit=body.limit)
        else:
            record_limits = RecordLimits.from_settings(p.settings)
            evaluation = evaluations.create_held_out(s, p.blobs, who, body.model, body.file_id, record_limits)
            limits.hold_evaluation(
                s, who, evaluation.id, evaluations.worst_case(s, evaluation),
                [entry["model"] for entry in evaluation.models], limits.clock(), p.settings.usage_prices,
            )  # fmt: skip
        audit.record(s, who, "evaluation.create", target=evaluation.id,
                     detail={"model": body.model, "kind": body.kind})  # fmt: skip
        return EvaluationObject(**evaluations.visible_object(s, who, evaluation))


@router.get("/api/evaluations")
def list_evaluations(
    model: str | None = Query(None),
    job_id: str | None = Query(None),
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> EvaluationList:
    with p.db.tenant(who.tenant_id) as s:
        rows = evaluations.list_evaluations(s, who, model=model, job_id=job_id)
        return EvaluationList(data=[EvaluationObject(**evaluations.visible_object(s, who, r)) for r in rows])


@router.get("/api/evaluations/{evaluation_id}")
def get_evaluation(
    evaluation_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> EvaluationObject:
    with p.db.tenant(who.tenant_id) as s:
        return EvaluationObject(**evaluations.visible_object(s, who, evaluations.get(s, who, evaluation_id)))


@router.get("/api/fine_tuning/jobs/{job_id}/evaluation")
def job_report(job_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Report:
    """The job's evaluation report: its adapter, predecessor and base side by side."""
    with p.db.tenant(who.tenant_id) as s:
        return Report(**evaluations.report(s, who, job_id=job_id))


@router.get("/api/models/{model_id}/evaluation")
def model_report(model_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> Report:
    with p.db.tenant(who.tenant_id) as s:
        return Report(**evaluations.report(s, who, model=model_id))


@router.put("/api/models/{model_id}/evaluation_set")
def set_evaluation_set(
    model_id: str, body: EvaluationSet, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> dict[str, str]:
    """Keep an evaluation set beside the adapter: it and the adapters that follow it are evaluated on it."""
    require(who, "fine_tune")
    with p.db.tenant(who.tenant_id) as s:
        limits = RecordLimits.from_settings(p.settings)
        kept = evaluations.set_evaluation_set(s, p.blobs, who, model_id, body.file_id, limits)
        audit.record(s, who, "evaluation.set", target=model_id, detail={"file_id": body.file_id})
        return {"model": kept.model_id, "file_id": kept.file_id}


@router.post("/api/evaluation_tasks")
def create_task(body: CreateTask, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> TaskObject:
    """Upload an lm-evaluation-harness task: a YAML (a checked subset: no code, no hub) and its JSONL documents."""
    require(who, "fine_tune")
    with p.db.tenant(who.tenant_id) as s:
        limits = RecordLimits.from_settings(p.settings)
        task = evaluation_tasks.create_task(s, p.blobs, who, body.config, body.data.encode(), limits)
        audit.record(s, who, "evaluation.task.create", target=task.id, detail={"name": task.name})
        return _task_object(task)


@router.get("/api/evaluation_tasks")
def list_tasks(who: Principal = Depends(principal), p: Platform = Depends(platform)) -> TaskList:
    with p.db.tenant(who.tenant_id) as s:
        return TaskList(data=[_task_object(t) for t in evaluation_tasks.list_tasks(s)])
