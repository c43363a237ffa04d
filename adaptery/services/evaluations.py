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
(`create_task`: a YAML of the checked subset below and a JSONL of documents), against the models through the
platform's own OpenAI-compatible API with a short-lived key minted at lease time for exactly those models and
revoked when the run ends (its secret is never stored: only the agent holding the lease receives it).

A lease, heartbeats, recovery of a lapsed lease and attempts work as for fine-tuning jobs (services/queue.py),
fenced by agent and attempt. Evaluations are leased only by agents that say they run them, and only when no
fine-tuning job is waiting for that agent.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import yaml
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from adaptery.auth import policy
from adaptery.auth.principal import Principal
from adaptery.data.chat import validate_lines
from adaptery.data.untrusted import LineTooLong, RecordLimits, UntrustedJSONError, bounded_lines, loads
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.messaging.protocol import ADAPTER_FILES, BlobRef
from adaptery.services import files, finetuning, keys, models
from adaptery.services.errors import InvalidRequest, NotFound, PermissionDenied
from adaptery.storage.blobs import BlobStore

log = logging.getLogger(__name__)

LABELS = ("candidate", "predecessor", "base")
HELD_OUT_MAX_EXAMPLES = 200
HELD_OUT_MAX_NEW_TOKENS = 128
LM_EVAL_KEY_SECONDS = 6 * 3600
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
# The templates a tenant's task may use: text with {{ field }} placeholders, nothing else (the harness renders
# them with an unsandboxed Jinja environment, so no expression, filter or statement may reach it).
PLACEHOLDER = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")
TASK_KEYS = {
    "task", "output_type", "doc_to_text", "doc_to_target", "description", "target_delimiter",
    "generation_kwargs", "metric_list",
}  # fmt: skip
METRICS = {"exact_match"}
METRIC_OPTIONS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation"}
GENERATION_OPTIONS = {"until", "max_gen_toks"}
MAX_TASK_YAML_BYTES = 64 * 1024
MAX_TASK_RECORDS = 10_000


# --- what is evaluated, on what -------------------------------------------------------------------------


def predecessor(session: Session, job: m.FineTuningJob) -> str | None:
    """The model the job's adapter would replace (the module's docstring says which), or None."""
    lineage = job.lineage or {}
    parent = session.get(m.FineTuningJob, lineage.get("parent_job")) if lineage.get("parent_job") else None
    if parent is not None:
        if lineage.get("kind") == "continue" and lineage.get("checkpoint"):
            checkpoint = session.get(m.JobCheckpoint, lineage["checkpoint"])
            if checkpoint is not None and session.get(m.Adapter, checkpoint.model_name) is not None:
                return checkpoint.model_name
        if parent.fine_tuned_model and session.get(m.Adapter, parent.fine_tuned_model) is not None:
            return parent.fine_tuned_model
    training = session.get(m.File, job.training_file)
    if training is None:
        return None
    same_data = select(m.File.id).where(m.File.sha256 == training.sha256)
    earlier = session.scalars(
        select(m.FineTuningJob)
        .where(
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
        if adapter is not None and _usable_by(session, adapter, job.user_id):
            return adapter.id
    return None


def _usable_by(session: Session, adapter: m.Adapter, user_id: str | None) -> bool:
    """Whether the job's creator may see `adapter` (its own, the tenant's, or shared with it): a report never
    compares with an adapter its owner could not otherwise see."""
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
    if kept is not None and session.get(m.File, kept.file_id) is not None:
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
    job = session.get(m.FineTuningJob, adapter.job_id) if adapter.job_id else None
    previous = _candidate_and_predecessor(session, adapter)
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
    task = get_task(session, task_name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000):
        raise InvalidRequest("limit must be an integer between 1 and 10000", param="limit")
    previous = _candidate_and_predecessor(session, adapter)
    evaluation = m.Evaluation(
        id=new_id("evaljob-"),
        user_id=who.user_id,
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


# --- lm-eval tasks ----------------------------------------------------------------------------------------


def _placeholders(template: Any, key: str) -> set[str]:
    if not isinstance(template, str) or not template.strip():
        raise InvalidRequest(f"task file: '{key}' must be a text template", param="config")
    if "{%" in template or "{#" in template or PLACEHOLDER.sub("", template).count("{{"):
        raise InvalidRequest(
            f"task file: '{key}' may only use {{{{ field }}}} placeholders (no expressions, filters or statements)",
            param="config",
        )
    return set(PLACEHOLDER.findall(template))


def check_task(text: str) -> tuple[dict[str, Any], set[str]]:
    """The checked task configuration of a YAML task file, and the fields its templates read."""
    if len(text.encode()) > MAX_TASK_YAML_BYTES:
        raise InvalidRequest(f"task file: larger than {MAX_TASK_YAML_BYTES} bytes", param="config")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # !function and other tags are refused here too: safe_load knows none
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise InvalidRequest(f"task file is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}",
                             param="config") from None  # fmt: skip
    if not isinstance(config, dict):
        raise InvalidRequest("task file: expected a YAML mapping (task:, doc_to_text:, ...)", param="config")
    unknown = sorted(set(config) - TASK_KEYS)
    if unknown:
        raise InvalidRequest(
            f"task file: unsupported key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(TASK_KEYS))} "
            "(the data comes from the uploaded JSONL, never from a hub)",
            param="config",
        )
    name = config.get("task")
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise InvalidRequest(
            "task file: 'task' must be a name of letters, digits, _ and - (at most 64)", param="config"
        )
    if config.get("output_type", "generate_until") != "generate_until":
        raise InvalidRequest(
            "task file: only output_type generate_until is supported (answers come from chat completions)",
            param="config",
        )
    fields = _placeholders(config.get("doc_to_text"), "doc_to_text") | _placeholders(
        config.get("doc_to_target"), "doc_to_target"
    )
    for key in ("description", "target_delimiter"):
        if key in config and not isinstance(config[key], str):
            raise InvalidRequest(f"task file: '{key}' must be text", param="config")
    if "description" in config:
        fields |= _placeholders(config["description"] or " ", "description") if "{" in config["description"] else set()
    generation = config.get("generation_kwargs", {})
    if not isinstance(generation, dict) or set(generation) - GENERATION_OPTIONS:
        raise InvalidRequest(f"task file: generation_kwargs may set {', '.join(sorted(GENERATION_OPTIONS))}",
                             param="config")  # fmt: skip
    until = generation.get("until", [])
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise InvalidRequest("task file: generation_kwargs.until must be a list of strings", param="config")
    max_gen = generation.get("max_gen_toks", 64)
    if isinstance(max_gen, bool) or not isinstance(max_gen, int) or not 1 <= max_gen <= 1024:
        raise InvalidRequest("task file: generation_kwargs.max_gen_toks must be 1..1024", param="config")
    metric_list = config.get("metric_list", [{"metric": "exact_match"}])
    if not isinstance(metric_list, list) or not metric_list:
        raise InvalidRequest("task file: metric_list must be a non-empty list", param="config")
    for metric in metric_list:
        if not isinstance(metric, dict) or metric.get("metric") not in METRICS or set(metric) - METRIC_OPTIONS:
            raise InvalidRequest(
                f"task file: each metric is {{metric: {'|'.join(sorted(METRICS))}}} with "
                f"{', '.join(sorted(METRIC_OPTIONS - {'metric'}))}",
                param="config",
            )
        if metric.get("aggregation", "mean") != "mean":
            raise InvalidRequest("task file: a metric's aggregation must be mean", param="config")
    checked = {
        "task": name,
        "output_type": "generate_until",
        "doc_to_text": config["doc_to_text"],
        "doc_to_target": config["doc_to_target"],
        "generation_kwargs": {"until": until, "max_gen_toks": max_gen, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"aggregation": "mean", "higher_is_better": True, **metric} for metric in metric_list],
    }
    for key in ("description", "target_delimiter"):
        if key in config:
            checked[key] = config[key]
    return checked, fields


def check_task_data(data: bytes, fields: set[str], limits: RecordLimits) -> int:
    """How many documents a task's JSONL holds; an error names the line and the field."""
    count = 0
    for number, raw in enumerate(bounded_lines(io.BytesIO(data), limits.max_bytes), start=1):
        if isinstance(raw, LineTooLong):
            raise InvalidRequest(f"data line {number}: {limits.too_large(raw.size)}", param="data")
        if not raw.strip():
            continue
        try:
            record = loads(raw.rstrip(b"\r\n"), max_depth=limits.max_depth)
        except UntrustedJSONError as exc:
            raise InvalidRequest(f"data line {number}: {exc}", param="data") from None
        if not isinstance(record, dict):
            raise InvalidRequest(f"data line {number}: each line must be a JSON object", param="data")
        for name in sorted(fields):
            if not isinstance(record.get(name), str | int | float) or isinstance(record.get(name), bool):
                raise InvalidRequest(f"data line {number}: field '{name}' (used by the task) is missing or not "
                                     "text", param="data")  # fmt: skip
        count += 1
        if count > MAX_TASK_RECORDS:
            raise InvalidRequest(f"data: more than {MAX_TASK_RECORDS} documents", param="data")
    if count == 0:
        raise InvalidRequest("data: no documents (one JSON object per line)", param="data")
    return count


def create_task(
    session: Session, blobs: BlobStore, who: Principal, config_text: str, data: bytes, limits: RecordLimits
) -> m.EvaluationTask:
    config, fields = check_task(config_text)
    records = check_task_data(data, fields, limits)
    if session.scalar(select(m.EvaluationTask).where(m.EvaluationTask.name == config["task"])) is not None:
        raise InvalidRequest(f"a task named '{config['task']}' exists already; name this one differently",
                             param="config", code="conflict")  # fmt: skip
    stored = blobs.put_stream(who.tenant_id, [data])
    task = m.EvaluationTask(
        id=new_id("evtask-"),
        name=config["task"],
        config=config,
        data_sha256=stored.sha256,
        records=records,
        created_by=who.user_id,
    )
    session.add(task)
    session.flush()
    return task


def get_task(session: Session, name_or_id: str) -> m.EvaluationTask:
    task = session.scalar(
        select(m.EvaluationTask).where((m.EvaluationTask.name == name_or_id) | (m.EvaluationTask.id == name_or_id))
    )
    if task is None:
        raise NotFound(f"No evaluation task '{name_or_id}'", param="task")
    return task


def list_tasks(session: Session) -> list[m.EvaluationTask]:
    return list(session.scalars(select(m.EvaluationTask).order_by(m.EvaluationTask.created_at.desc())))


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
    from adaptery.evaluation.heldout import changes  # torch-free, but keep the API's import light

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
    rows = [_redacted(session, who, row) for row in rows]
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
    }
    if held_out is not None:
        result = held_out.result or {}
        out["held_out"] = {"evaluation_id": held_out.id, "source": held_out.source, "table": result.get("models", {})}
        against = "predecessor" if "predecessor" in result.get("models", {}) else "base"
        out["changes"] = {"against": against, **changes(result.get("examples", []), "candidate", against)}
        out["examples"] = result.get("examples", [])
    seen: set[str] = set()
    for row in rows:
        if row.kind == "lm_eval" and row.status == "succeeded" and row.source.get("task") not in seen:
            seen.add(row.source.get("task"))
            out["lm_eval"].append({"evaluation_id": row.id, "task": row.source.get("task"),
                                   "scores": (row.result or {}).get("models", {})})  # fmt: skip
    return out


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
    hidden = {e["label"] for e in row.models if e["label"] != "base" and not _sees_model(session, who, e["model"])}
    return _Seen(row, hidden)


# --- the queue: leased by agents ---------------------------------------------------------------------------


class EvaluationQueue:
    """Evaluations as agents lease and finish them (through the control plane), fenced by agent and attempt."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        lease_seconds: float,
        max_attempts: int,
        api_base: str,
        record_limits: RecordLimits,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.blobs = db, blobs
        self.lease_seconds, self.max_attempts = lease_seconds, max_attempts
        self.api_base = api_base.rstrip("/") + "/v1"
        self.record_limits = record_limits
        self.clock = clock

    def lease(self, agent_id: str, *, tenant_scope: str | None = None) -> dict[str, Any] | None:
        with self.db.system() as s:
            query = select(m.Evaluation.id).where(m.Evaluation.status == "queued")
            if tenant_scope is not None:
                query = query.where(m.Evaluation.tenant_id == tenant_scope)
            for evaluation_id in s.scalars(query.order_by(m.Evaluation.created_at, m.Evaluation.id).limit(5)).all():
                now = self.clock()
                claimed = s.execute(
                    update(m.Evaluation)
                    .where(m.Evaluation.id == evaluation_id, m.Evaluation.status == "queued")
                    .values(
                        status="running",
                        lease_owner=agent_id,
                        lease_expires_at=now + self.lease_seconds,
                        attempts=m.Evaluation.attempts + 1,
                        started_at=func.coalesce(m.Evaluation.started_at, now),
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount
                if claimed != 1:
                    continue
                evaluation = s.get(m.Evaluation, evaluation_id)
                s.refresh(evaluation)
                try:
                    return self._assignment(s, evaluation)
                except (NotFound, InvalidRequest, KeyError) as exc:
                    self._end(s, evaluation, "failed", f"The evaluation could not be started: {exc}")
                    return None
        return None

    def _assignment(self, s: Session, evaluation: m.Evaluation) -> dict[str, Any]:
        base = s.get(m.BaseModel, evaluation.base_model)
        if base is None:
            raise NotFound(f"the base model '{evaluation.base_model}' is no longer registered")
        entries = []
        for entry in evaluation.models:
            adapter = s.get(m.Adapter, entry["model"]) if entry["model"].startswith("ft:") else None
            if entry["model"].startswith("ft:") and adapter is None:
                raise NotFound(f"the model {entry['model']} was deleted")
            files_of = None
            if adapter is not None and evaluation.kind == "held_out":
                files_of = {name: self._blob(evaluation.tenant_id, sha) for name, sha in adapter.manifest.items()
                            if name in ADAPTER_FILES}  # fmt: skip
            entries.append({**entry, "files": files_of})
        assignment: dict[str, Any] = {
            "evaluation_id": evaluation.id,
            "tenant_id": evaluation.tenant_id,
            "attempt": evaluation.attempts,
            "kind": evaluation.kind,
            "base_model": base.id,
            "base_model_ref": base.ref,
            "models": entries,
            "lease_seconds": self.lease_seconds,
        }
        if evaluation.kind == "held_out":
            source = evaluation.source
            record = s.get(m.File, source["file_id"])
            if record is None:
                raise NotFound(f"the evaluation file {source['file_id']} was deleted")
            job = s.get(m.FineTuningJob, evaluation.job_id) if evaluation.job_id else None
            assignment["evaluation_file"] = self._blob(evaluation.tenant_id, record.sha256)
            assignment["split"] = (
                {"fraction": source["fraction"], "seed": source["seed"]}
                if source["kind"] == "validation_split"
                else None
            )
            assignment["params"] = {
                "max_new_tokens": HELD_OUT_MAX_NEW_TOKENS,
                "max_seq_length": _max_seq_length(job, base),
                "max_examples": HELD_OUT_MAX_EXAMPLES,
                "record_limits": {"max_bytes": self.record_limits.max_bytes, "max_depth": self.record_limits.max_depth},
            }
        else:
            task = s.get(m.EvaluationTask, evaluation.source["task_id"])
            if task is None:
                raise NotFound(f"the task {evaluation.source.get('task')} was deleted")
            self._revoke_key(s, evaluation)
            user_id = evaluation.user_id or ""
            minted = keys.create_key(
                s,
                tenant_id=evaluation.tenant_id,
                user_id=user_id,
                name=f"lm-eval {evaluation.id}",
                expires_at=self.clock() + LM_EVAL_KEY_SECONDS,
                scopes=["inference"],
                allowed_models=[entry["model"] for entry in evaluation.models],
            )
            evaluation.api_key_id = minted.record.id
            assignment["task"] = {
                "name": task.name,
                "config": task.config,
                "data": self._blob(evaluation.tenant_id, task.data_sha256),
                "limit": evaluation.source.get("limit"),
            }
            assignment["api_base"] = self.api_base
            assignment["api_key"] = minted.secret
        return assignment

    def _blob(self, tenant_id: str, sha: str) -> dict[str, Any]:
        return BlobRef(sha, self.blobs.size(tenant_id, sha)).__dict__.copy()

    def _revoke_key(self, s: Session, evaluation: m.Evaluation) -> None:
        if evaluation.api_key_id:
            record = s.get(m.ApiKey, evaluation.api_key_id)
            if record is not None and record.revoked_at is None:
                record.revoked_at = self.clock()

    def _held(self, s: Session, evaluation_id: str, agent_id: str, attempt: int | None) -> m.Evaluation | None:
        query = select(m.Evaluation).where(
            m.Evaluation.id == evaluation_id, m.Evaluation.status == "running", m.Evaluation.lease_owner == agent_id
        )
        if attempt is not None:
            query = query.where(m.Evaluation.attempts == attempt)
        return s.scalars(query).one_or_none()

    def holds(self, evaluation_id: str, agent_id: str) -> bool:
        with self.db.system() as s:
            return self._held(s, evaluation_id, agent_id, None) is not None

    def tenant_of(self, evaluation_id: str) -> str | None:
        with self.db.system() as s:
            evaluation = s.get(m.Evaluation, evaluation_id)
            return evaluation.tenant_id if evaluation is not None else None

    def job_blobs(self, evaluation_id: str, agent_id: str) -> set[str]:
        """What the agent holding the evaluation may fetch: its data, and its adapters' files."""
        with self.db.system() as s:
            evaluation = self._held(s, evaluation_id, agent_id, None)
            if evaluation is None:
                return set()
            wanted: set[str] = set()
            if evaluation.kind == "held_out":
                record = s.get(m.File, evaluation.source.get("file_id"))
                wanted |= {record.sha256} if record is not None else set()
                for entry in evaluation.models:
                    adapter = s.get(m.Adapter, entry["model"])
                    if adapter is not None:
                        wanted |= {sha for name, sha in adapter.manifest.items() if name in ADAPTER_FILES}
            else:
                task = s.get(m.EvaluationTask, evaluation.source.get("task_id"))
                wanted |= {task.data_sha256} if task is not None else set()
            return wanted

    def heartbeat(self, evaluation_id: str, agent_id: str, attempt: int | None = None) -> str:
        with self.db.system() as s:
            renewed = s.execute(
                update(m.Evaluation)
                .where(
                    m.Evaluation.id == evaluation_id,
                    m.Evaluation.status == "running",
                    m.Evaluation.lease_owner == agent_id,
                    *([m.Evaluation.attempts == attempt] if attempt is not None else []),
                )
                .values(lease_expires_at=self.clock() + self.lease_seconds)
                .execution_options(synchronize_session=False)
            ).rowcount
            return "continue" if renewed == 1 else "lost"

    def report(self, evaluation_id: str, agent_id: str, events: list[dict[str, Any]], attempt: int | None) -> None:
        """Progress for the page: the latest count of scored examples and the latest message."""
        with self.db.system() as s:
            evaluation = self._held(s, evaluation_id, agent_id, attempt)
            if evaluation is None:
                return
            progress = dict(evaluation.progress or {})
            for event in events:
                if event.get("type") == "progress":
                    for key in ("done", "total"):
                        if isinstance(event.get(key), int) and not isinstance(event.get(key), bool):
                            progress[key] = event[key]
                elif event.get("type") == "message":
                    progress["message"] = str(event.get("message", ""))[:500]
            evaluation.progress = progress

    def finish(self, evaluation_id: str, agent_id: str, body: dict[str, Any]) -> None:
        attempt = body.get("attempt")
        with self.db.system() as s:
            evaluation = self._held(s, evaluation_id, agent_id, attempt)
            if evaluation is None:
                return
            state = body.get("state")
            if state == "succeeded":
                result = body.get("result")
                try:
                    _check_result(evaluation, result)
                except InvalidRequest as exc:  # the same run would send it again: it fails, saying why
                    self._end(s, evaluation, "failed", f"the agent's result was refused: {exc}")
                    return
                evaluation.result = result
                evaluation.progress = {**(evaluation.progress or {}), "message": "done"}
                self._end(s, evaluation, "succeeded", None)
            elif state == "released" and evaluation.attempts < self.max_attempts:
                evaluation.status, evaluation.lease_owner, evaluation.lease_expires_at = "queued", None, None
                self._revoke_key(s, evaluation)
            else:
                self._end(s, evaluation, "failed", str(body.get("message") or "the evaluation failed")[:2000])

    def _end(self, s: Session, evaluation: m.Evaluation, status: str, error: str | None) -> None:
        evaluation.status = status
        evaluation.error = error
        evaluation.finished_at = self.clock()
        evaluation.lease_owner = None
        evaluation.lease_expires_at = None
        self._revoke_key(s, evaluation)  # a finished job's events end with its completion: nothing is added there

    def recover(self) -> int:
        """Requeue (or fail, after max_attempts) running evaluations whose lease lapsed."""
        now = self.clock()
        moved = 0
        with self.db.system() as s:
            stale = s.scalars(
                select(m.Evaluation).where(m.Evaluation.status == "running", m.Evaluation.lease_expires_at < now)
            ).all()
            for evaluation in stale:
                if evaluation.attempts >= self.max_attempts:
                    self._end(s, evaluation, "failed", f"its agent stopped responding {evaluation.attempts} times")
                else:
                    evaluation.status, evaluation.lease_owner, evaluation.lease_expires_at = "queued", None, None
                    self._revoke_key(s, evaluation)
                moved += 1
        return moved


def _max_seq_length(job: m.FineTuningJob | None, base: m.BaseModel) -> int:
    """The length the job trained at (its method's resolved options), else its base's default."""
    method = (job.method or {}) if job is not None else {}
    chosen = (method.get(method.get("type") or "supervised") or {}).get("hyperparameters") or {}
    value = chosen.get("max_seq_length") or (base.finetune_defaults or {}).get("max_seq_length") or 1024
    return int(value)


def _check_result(evaluation: m.Evaluation, result: Any) -> None:
    """An agent's result names exactly the evaluation's models, with numbers where numbers belong."""
    if not isinstance(result, dict) or result.get("kind") != evaluation.kind:
        raise InvalidRequest("result must be the evaluation runner's result object")
    labels = {entry["label"] for entry in evaluation.models}
    scored = result.get("models")
    if not isinstance(scored, dict) or set(scored) != labels:
        raise InvalidRequest(f"result.models must score exactly {sorted(labels)}")
    if evaluation.kind == "held_out" and not isinstance(result.get("examples"), list):
        raise InvalidRequest("result.examples must be a list")
    json.dumps(result, allow_nan=False)
