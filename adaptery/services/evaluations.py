"""Evaluation of fine-tuned adapters: runs on the job queue, leased by agents like fine-tuning, and one report.

Every job that succeeds is evaluated on a held-out set, chosen in this order: its validation file; else the
split it set aside itself (`validation_split`: the trainer's own seeded split, reproduced by the evaluation);
else the evaluation set its owner keeps beside the predecessor adapter (`set_evaluation_set`). A job with none
of them is not evaluated, and its events say so. Three models are scored on the same examples: the new adapter
(`candidate`), its `predecessor` and the `base` model.

The predecessor is the adapter the job continued from where it has lineage (extend, continue, fork: the parent
job's adapter, or for `continue` the parent's checkpoint the job started from), else the adapter of the most
recent earlier succeeded job of the same tenant on the same base model and the same training data (by content
hash): the adapter this one would replace.

An `lm_eval` evaluation runs EleutherAI's lm-evaluation-harness on a task the tenant uploaded
(services/evaluation_tasks.py) against the models, through the platform's own OpenAI-compatible API.
Agents lease and finish evaluations through services/evaluation_queue.py.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth import policy
from adaptery.auth.principal import Principal, Role
from adaptery.data.chat import validate_lines
from adaptery.data.untrusted import RecordLimits, bounded_lines
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.services import evaluation_tasks, files, finetuning, model_names, models
from adaptery.services.errors import InvalidRequest, NotFound, PermissionDenied
from adaptery.storage.blobs import BlobStore

log = logging.getLogger(__name__)

LABELS = ("candidate", "predecessor", "base")
TEMPLATE_TOKENS = 256  # what a chat template may add to one example's prompt, beyond its text (roles, markers)


# --- what is evaluated, on what -------------------------------------------------------------------------


def predecessor(session: Session, job: m.FineTuningJob) -> str | None:
    """The model the job's adapter would replace (the module's docstring says which), or None. Only ever an adapter
    of the job's own tenant that its creator may see: the session may be the system's (a job's end)."""
    lineage = job.lineage or {}
    parent = session.get(m.FineTuningJob, lineage.get("parent_job")) if lineage.get("parent_job") else None
    if parent is not None and parent.tenant_id == job.tenant_id:
        if lineage.get("kind") == "continue" and lineage.get("checkpoint"):
            checkpoint = session.get(m.JobCheckpoint, lineage["checkpoint"])
            if checkpoint is not None and _usable_by(session, job, session.get(m.Adapter, checkpoint.model_name)):
                return checkpoint.model_name
        if parent.fine_tuned_model and _usable_by(session, job, session.get(m.Adapter, parent.fine_tuned_model)):
            return parent.fine_tuned_model
    training = session.get(m.File, job.training_file)
    if training is None or training.tenant_id != job.tenant_id:
        return None
    same_data = select(m.File.id).where(m.File.tenant_id == job.tenant_id, m.File.sha256 == training.sha256)
    earlier = session.scalars(
        select(m.FineTuningJob)
        .where(
            m.FineTuningJob.tenant_id == job.tenant_id,
            m.FineTuningJob.id != job.id,
            m.FineTuningJob.status == "succeeded",
            m.FineTuningJob.model == job.model,
            m.FineTuningJob.training_file.in_(same_data),
            m.FineTuningJob.created_at <= job.created_at,
        )
        .order_by(m.FineTuningJob.created_at.desc(), m.FineTuningJob.id.desc())
    ).all()
    for row in earlier:
        adapter = session.get(m.Adapter, row.fine_tuned_model) if row.fine_tuned_model else None
        if _usable_by(session, job, adapter):
            return adapter.id
    return None


def _usable_by(session: Session, job: m.FineTuningJob, adapter: m.Adapter | None) -> bool:
    """Whether `adapter` is of the job's tenant and its creator may see it (its own, the tenant's, or shared with
    it): a report never compares with an adapter its owner could not otherwise see."""
    if adapter is None or adapter.tenant_id != job.tenant_id:
        return False
    user_id = job.user_id
    if adapter.visibility == "tenant" or (user_id is not None and adapter.created_by == user_id):
        return True
    if adapter.visibility != "shared" or user_id is None:
        return False
    share = select(m.AdapterShare.id).where(m.AdapterShare.adapter_id == adapter.id, m.AdapterShare.user_id == user_id)
    return session.scalar(share) is not None


def _models(candidate: str, previous: str | None, base: str) -> list[dict[str, str]]:
    chosen = [{"label": "candidate", "model": candidate}]
    if previous is not None and previous != candidate:
        chosen.append({"label": "predecessor", "model": previous})
    chosen.append({"label": "base", "model": base})
    return chosen


def held_out_source(session: Session, job: m.FineTuningJob, previous: str | None) -> dict[str, Any] | None:
    if job.validation_file:
        return {"kind": "validation_file", "file_id": job.validation_file}
    split = (job.hyperparameters or {}).get("validation_split") or 0
    if isinstance(split, int | float) and 0 < split < 1:
        seed = (job.hyperparameters or {}).get("seed", job.seed)
        return {"kind": "validation_split", "file_id": job.training_file, "fraction": split, "seed": seed}
    kept = session.get(m.AdapterEvaluationSet, previous) if previous else None
    record = session.get(m.File, kept.file_id) if kept is not None else None
    if record is not None and record.tenant_id == job.tenant_id:
        return {"kind": "evaluation_set", "file_id": kept.file_id, "beside": previous}
    return None


def enqueue_for_job(session: Session, job: m.FineTuningJob) -> m.Evaluation | None:
    """Queue the held-out evaluation of a job that just succeeded (in the transaction that finishes it)."""
    previous = predecessor(session, job)
    source = held_out_source(session, job, previous)
    if source is None:
        finetuning.add_event(
            session,
            job,
            "Not evaluated: the job has no validation file or split, and no evaluation set is kept beside "
            "its predecessor",
        )
        return None
    evaluation = m.Evaluation(
        id=new_id("evaljob-"),
        tenant_id=job.tenant_id,
        user_id=job.user_id,
        kind="held_out",
        job_id=job.id,
        model=job.fine_tuned_model,
        base_model=job.model,
        models=_models(job.fine_tuned_model, previous, job.model),
        source=source,
        status="queued",
        attempts=0,
    )
    session.add(evaluation)
    session.flush()
    against = f"{previous} and the base model" if previous else "the base model"
    finetuning.add_event(session, job, f"Evaluation {evaluation.id} queued: against {against} ({source['kind']})")
    return evaluation


def _own_adapter(session: Session, who: Principal, model_id: str) -> m.Adapter:
    ref = models.get_model(session, model_id, viewer=who)
    if ref.adapter is None or ref.adapter.tenant_id != who.tenant_id:
        raise NotFound(f"No adapter '{model_id}' of yours to evaluate", param="model", code="model_not_found")
    return ref.adapter


def _check_base(session: Session, who: Principal, adapter: m.Adapter) -> None:
    """An evaluation generates with the base model too: the caller must be allowed to use it (a key kept to the
    adapter alone may not have the base's answers to prompts of its choosing)."""
    if not _sees_model(session, who, adapter.base_model):
        raise PermissionDenied(
            f"An evaluation scores the base model '{adapter.base_model}' beside the adapter, and you may not use it "
            "(this API key's allowed models): evaluate with a key allowed both",
            code="model_not_allowed",
        )


def worst_case(session: Session, evaluation: m.Evaluation) -> tuple[int, int]:
    """The most prompt and completion tokens one model of a held-out evaluation may use: each example's prompt
    (a token is at least one byte of the file, plus its chat template's), and its longest answer."""
    from adaptery.services.evaluation_queue import HELD_OUT_MAX_EXAMPLES, HELD_OUT_MAX_NEW_TOKENS

    record = session.get(m.File, evaluation.source["file_id"])
    examples = min(HELD_OUT_MAX_EXAMPLES, (record.records if record is not None else None) or HELD_OUT_MAX_EXAMPLES)
    prompt = (record.bytes if record is not None else 0) + examples * TEMPLATE_TOKENS
    return prompt, examples * HELD_OUT_MAX_NEW_TOKENS


def _evaluation_file(session: Session, file_id: str, param: str, blobs: BlobStore, limits: RecordLimits) -> m.File:
    """A chat JSONL file to evaluate on; one uploaded for `evals` (not checked at upload, as a fine-tune file is)
    is checked here, and its first bad lines named."""
    try:
        record = files.get(session, file_id)
    except NotFound:
        raise NotFound(f"No file '{file_id}'", param=param) from None
    if record.purpose not in ("fine-tune", "evals"):
        raise InvalidRequest(f"File '{file_id}' has purpose '{record.purpose}'; upload a chat JSONL", param=param)
    if record.purpose == "evals":
        with blobs.open(record.tenant_id, record.sha256) as handle:
            checked = validate_lines(bounded_lines(handle, limits.max_bytes), limits)
        if not checked.ok or not checked.records:
            problem = checked.summary() if not checked.ok else "no records"
            raise InvalidRequest(f"File '{file_id}' is not a usable evaluation set: {problem}", param=param)
    return record


def _candidate_and_predecessor(session: Session, adapter: m.Adapter) -> str | None:
    job = session.get(m.FineTuningJob, adapter.job_id) if adapter.job_id else None
    return predecessor(session, job) if job is not None else None


def create_held_out(
    session: Session, blobs: BlobStore, who: Principal, model_id: str, file_id: str | None, limits: RecordLimits
) -> m.Evaluation:
    """An evaluation of one of the tenant's adapters on `file_id` (else on its job's held-out set)."""
    adapter = _own_adapter(session, who, model_id)
    _check_base(session, who, adapter)
    job = session.get(m.FineTuningJob, adapter.job_id) if adapter.job_id else None
    previous = _candidate_and_predecessor(session, adapter)
    if previous is not None and not _sees_model(session, who, previous):
        previous = None  # its answers would be generated for a caller who may not use it
    if file_id is not None:
        source = {"kind": "file", "file_id": _evaluation_file(session, file_id, "file_id", blobs, limits).id}
    else:
        source = held_out_source(session, job, previous) if job is not None else None
        kept = session.get(m.AdapterEvaluationSet, adapter.id)
        if source is None and kept is not None:
            source = {"kind": "evaluation_set", "file_id": kept.file_id, "beside": adapter.id}
        if source is None:
            raise InvalidRequest(
                f"{model_id} has no held-out set (validation file, split or evaluation set): name a file_id",
                param="file_id",
            )
    evaluation = m.Evaluation(
        id=new_id("evaljob-"),
        user_id=who.user_id,
        requester_key_id=who.api_key_id,
        kind="held_out",
        job_id=adapter.job_id,
        model=adapter.id,
        base_model=adapter.base_model,
        models=_models(adapter.id, previous, adapter.base_model),
        source=source,
        status="queued",
        attempts=0,
    )
    session.add(evaluation)
    session.flush()
    return evaluation


def create_lm_eval(
    session: Session, who: Principal, model_id: str, task_name: str | None, *, limit: int | None = None
) -> m.Evaluation:
    if not task_name:
        raise InvalidRequest("an lm_eval evaluation names its task", param="task")
    adapter = _own_adapter(session, who, model_id)
    _check_base(session, who, adapter)
    task = evaluation_tasks.get_task(session, task_name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000):
        raise InvalidRequest("limit must be an integer between 1 and 10000", param="limit")
    previous = _candidate_and_predecessor(session, adapter)
    if previous is not None and not _sees_model(session, who, previous):
        previous = None  # the key minted for the run answers as the requester: only models they may see
    evaluation = m.Evaluation(
        id=new_id("evaljob-"),
        user_id=who.user_id,
        requester_key_id=who.api_key_id,
        kind="lm_eval",
        job_id=adapter.job_id,
        model=adapter.id,
        base_model=adapter.base_model,
        models=_models(adapter.id, previous, adapter.base_model),
        source={"kind": "task", "task_id": task.id, "task": task.name, "limit": limit},
        status="queued",
        attempts=0,
    )
    session.add(evaluation)
    session.flush()
    return evaluation


def set_evaluation_set(
    session: Session, blobs: BlobStore, who: Principal, model_id: str, file_id: str, limits: RecordLimits
) -> m.AdapterEvaluationSet:
    """Like who sees it: only the adapter's creator or a tenant admin decides what it is measured on."""
    adapter = _own_adapter(session, who, model_id)
    if not policy.may_share_adapter(who, created_by=adapter.created_by):
        raise PermissionDenied("Only the adapter's creator or a tenant admin may choose its evaluation set.")
    record = _evaluation_file(session, file_id, "file_id", blobs, limits)
    kept = session.get(m.AdapterEvaluationSet, adapter.id)
    if kept is None:
        kept = m.AdapterEvaluationSet(model_id=adapter.id, file_id=record.id)
        session.add(kept)
    kept.file_id = record.id
    session.flush()
    return kept


# --- reading ----------------------------------------------------------------------------------------------


def get(session: Session, who: Principal, evaluation_id: str) -> m.Evaluation:
    evaluation = session.get(m.Evaluation, evaluation_id)
    if evaluation is None or not _sees(session, who, evaluation):
        raise NotFound(f"No evaluation '{evaluation_id}'", param="evaluation_id")
    return evaluation


def _sees_model(session: Session, who: Principal, model_id: str) -> bool:
    try:
        models.get_model(session, model_id, viewer=who)
    except NotFound:
        return False
    return True


def _sees(session: Session, who: Principal, evaluation: m.Evaluation) -> bool:
    """An evaluation is seen as the adapter it evaluates (and so as the job that trained it)."""
    return _sees_model(session, who, evaluation.model)


def list_evaluations(
    session: Session, who: Principal, *, model: str | None = None, job_id: str | None = None, limit: int = 50
) -> list[m.Evaluation]:
    query = select(m.Evaluation).order_by(m.Evaluation.created_at.desc(), m.Evaluation.id.desc()).limit(limit)
    if model is not None:
        query = query.where(m.Evaluation.model == model)
    if job_id is not None:
        query = query.where(m.Evaluation.job_id == job_id)
    return [row for row in session.scalars(query) if _sees(session, who, row)]


def visible_object(session: Session, who: Principal, evaluation: m.Evaluation) -> dict[str, Any]:
    """The evaluation as `who` may read it (`_Seen`)."""
    return {**evaluation_object(evaluation), "models": _redacted(session, who, evaluation).models}


def evaluation_object(evaluation: m.Evaluation) -> dict[str, Any]:
    return {
        "id": evaluation.id,
        "object": "evaluation",
        "kind": evaluation.kind,
        "status": evaluation.status,
        "fine_tuning_job_id": evaluation.job_id,
        "model": evaluation.model,
        "models": evaluation.models,
        "source": evaluation.source,
        "progress": evaluation.progress,
        "error": evaluation.error,
        "attempts": evaluation.attempts,
        "created_at": evaluation.created_at,
        "started_at": evaluation.started_at,
        "finished_at": evaluation.finished_at,
    }


def report(session: Session, who: Principal, *, job_id: str | None = None, model: str | None = None) -> dict[str, Any]:
    """One report for a job (or an adapter): the latest held-out run's table and examples that got better and
    worse, every lm-eval task's latest scores, each for the candidate, its predecessor and the base."""
    from adaptery.evaluation.heldout import changes, recommendation  # torch-free; keep the API's import light

    if job_id is not None:
        job = finetuning.get_job(session, job_id, viewer=who)
        rows = list_evaluations(session, who, job_id=job.id, limit=200)
        subject = {"fine_tuning_job_id": job.id, "model": job.fine_tuned_model}
    elif model is not None:
        adapter = _own_adapter(session, who, model)
        rows = list_evaluations(session, who, model=adapter.id, limit=200)
        subject = {"fine_tuning_job_id": adapter.job_id, "model": adapter.id}
    else:
        raise InvalidRequest("name a fine-tuning job or a model", param="job_id")
    governors = _governors(session, who.tenant_id, subject)
    rows = [_redacted(session, who, row) for row in rows if row.user_id in governors or row.user_id == who.user_id]
    held_out = next((r for r in rows if r.kind == "held_out" and r.status == "succeeded"), None)
    latest = rows[0] if rows else None
    out: dict[str, Any] = {
        "object": "evaluation.report",
        "hidden_models": sorted({label for row in rows for label in row.hidden}),
        **subject,
        "models": (held_out or latest).models if (held_out or latest) else [],
        "predecessor_rule": "the adapter the job continued from (lineage), else the latest earlier succeeded job's "
        "adapter on the same base model and training data",
        "evaluations": [{**evaluation_object(r.row), "models": r.models} for r in rows],
        "held_out": None,
        "lm_eval": [],
        "changes": {"better": [], "worse": []},
        "recommendation": None,
        "model_name": _name_version(session, who, subject["model"]),
    }
    if held_out is not None:
        result = held_out.result or {}
        out["held_out"] = {"evaluation_id": held_out.id, "source": held_out.source, "table": result.get("models", {})}
        against = "predecessor" if "predecessor" in result.get("models", {}) else "base"
        out["examples"] = result.get("examples", [])
        if against in result.get("models", {}):  # else neither is one the reader may see: nothing to compare with
            out["changes"] = {"against": against, **changes(result.get("examples", []), "candidate", against)}
            out["recommendation"] = recommendation(result.get("models", {}), against)
    seen: set[str] = set()
    for row in rows:
        if row.kind == "lm_eval" and row.status == "succeeded" and row.source.get("task") not in seen:
            seen.add(row.source.get("task"))
            out["lm_eval"].append({"evaluation_id": row.id, "task": row.source.get("task"),
                                   "scores": (row.result or {}).get("models", {})})  # fmt: skip
    return out


def _governors(session: Session, tenant_id: str, subject: dict[str, Any]) -> set[str | None]:
    """Whose evaluations make an adapter's report (its held-out table and promote advice): the system's (a job's
    own, automatic one), the adapter's and its job's creator's and the tenant admins'. Anyone who may use the
    adapter may evaluate it, but only in their own report: never in place of what its owner sees."""
    adapter = session.get(m.Adapter, subject["model"]) if subject["model"] else None
    job = session.get(m.FineTuningJob, subject["fine_tuning_job_id"]) if subject["fine_tuning_job_id"] else None
    admins = select(m.Membership.user_id).where(
        m.Membership.tenant_id == tenant_id, m.Membership.role.in_((Role.OWNER.value, Role.ADMIN.value))
    )
    return {None, *session.scalars(admins)} | {
        row.created_by if isinstance(row, m.Adapter) else row.user_id for row in (adapter, job) if row is not None
    }


def _name_version(session: Session, who: Principal, model: str | None) -> dict[str, Any] | None:
    """The stable name this adapter is a version of (a fine-tune from a name's feedback becomes its next one), so
    the report's recommendation says what promoting means: {name, version, current_version}."""
    row = session.scalar(
        select(m.ModelNameVersion).where(m.ModelNameVersion.adapter_id == model).order_by(m.ModelNameVersion.number)
    ) if model else None  # fmt: skip
    if row is None:
        return None
    try:
        name = model_names.get_name(session, row.name_id, who)  # one the reader may see, as on the Models page
    except NotFound:
        return None
    return {"name": name.name, "id": name.id, "version": row.number, "current_version": name.current_version}


class _Seen:
    """An evaluation as one viewer may read it: without the models (a predecessor) it may not see."""

    def __init__(self, row: m.Evaluation, hidden: set[str]) -> None:
        self.row, self.hidden = row, hidden
        self.id, self.kind, self.status, self.source = row.id, row.kind, row.status, row.source
        self.models = [entry for entry in row.models if entry["label"] not in hidden]
        result = dict(row.result or {})
        if hidden and result:
            result["models"] = {k: v for k, v in (result.get("models") or {}).items() if k not in hidden}
            result["examples"] = [
                {**example, "models": {k: v for k, v in example["models"].items() if k not in hidden}}
                for example in result.get("examples") or []
            ]
        self.result = result


def _redacted(session: Session, who: Principal, row: m.Evaluation) -> _Seen:
    hidden = {e["label"] for e in row.models if not _sees_model(session, who, e["model"])}
    return _Seen(row, hidden)
