"""Fine-tuning jobs as OpenAI defines them: create, validate, list, cancel, events, checkpoints.

Statuses: validating_files → queued → running → succeeded | failed | cancelled. The agents that
run jobs go through `services.queue`; this module is what the API's callers may do.

Who sees a job. A job leads to weights: its adapter once it has one, and before that (its checkpoints) the
adapter it started from, the parent job's for a job that `services.lineage` derived. So a caller sees a job
exactly when they would see those weights (`models.sees_adapter`): by its adapter's visibility once that
exists (a deleted adapter counts as private to the job's creator); until then by its parent job's, in turn;
a job from a base model without an adapter yet is the tenant's. A job the caller may not see is not found
by any lookup here, as if it did not exist (404, never 403): retrieve, list, events, checkpoints, cancel,
pause, resume, and extend, continue or fork (which start from its weights). `viewer=None` is the platform
itself (validating files in the background).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from adaptery.auth import policy
from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.engine.loading import ModelNotAvailable, resolve_model_path
from adaptery.messaging.protocol import ADAPTER_FILES
from adaptery.services import faults, files, job_requirements, limits, models
from adaptery.services.datasets import TokenBudget, check_chat_file
from adaptery.services.errors import InvalidRequest, NotFound
from adaptery.storage.blobs import BlobStore
from adaptery.training.data import DatasetError, read_preference_records
from adaptery.training.methods import ConfigurationError, check_configuration, module_inventory
from adaptery.training.options import OPENAI_KEYS, OPTION_KEYS, resolve_options
from adaptery.training.spec import DEFAULT_KEEP_CHECKPOINTS, MAX_SEED, LoraHyperparameters

if TYPE_CHECKING:
    from adaptery.settings import Settings

TERMINAL = ("succeeded", "failed", "cancelled")
# A job's files are validated by whoever claims it first: the request's background task or any server's recovery
# loop. The claim lives in the lease columns (no agent holds a job before it is queued) and outlasts validating
# the largest file; the claim of a validator that died or failed lapses, and another takes the job over.
VALIDATION_CLAIM_SECONDS = 300.0
_SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Used where neither the request nor the base model says otherwise.
GENERIC_DEFAULTS: dict[str, Any] = {
    "n_epochs": 3,
    "batch_size": 4,
    "learning_rate": 2e-4,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
}


def _check_range(value: Any, name: str, *, low: float, high: float | None, integer: bool) -> Any:
    if value is None or value == "auto":
        return "auto"
    kind_ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not kind_ok or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"greater than {low}"
        raise InvalidRequest(
            f"{name} must be 'auto' or {'an integer' if integer else 'a number'} {bounds}",
            param=f"hyperparameters.{name}",
        )
    return value


def resolve_hyperparameters(
    requested: dict[str, Any] | None, base_defaults: dict[str, Any], method: str = "supervised"
) -> dict[str, Any]:
    """OpenAI's knobs ('auto' or a value) resolved against the base model's recommended defaults.

    Our own options (training.options) may sit beside them; they are resolved by `resolve_options`.
    """
    requested = dict(requested or {})
    unknown = set(requested) - {*OPENAI_KEYS[method], *OPTION_KEYS}
    if unknown:
        raise InvalidRequest(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}", param="hyperparameters")
    defaults = {**GENERIC_DEFAULTS, **base_defaults}
    n_epochs = _check_range(requested.get("n_epochs"), "n_epochs", low=1, high=50, integer=True)
    batch_size = _check_range(requested.get("batch_size"), "batch_size", low=1, high=256, integer=True)
    multiplier = requested.get("learning_rate_multiplier")
    if multiplier not in (None, "auto") and (
        isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or multiplier <= 0
    ):
        raise InvalidRequest(
            "learning_rate_multiplier must be 'auto' or a number greater than 0",
            param="hyperparameters.learning_rate_multiplier",
        )
    resolved = {
        "n_epochs": defaults["n_epochs"] if n_epochs == "auto" else n_epochs,
        "batch_size": defaults["batch_size"] if batch_size == "auto" else batch_size,
        "learning_rate_multiplier": 1.0 if multiplier in (None, "auto") else float(multiplier),
    }
    if method == "dpo":
        beta = requested.get("beta")
        if beta not in (None, "auto") and (
            isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= 2
        ):
            raise InvalidRequest("beta must be 'auto' or a number above 0 and at most 2", param="hyperparameters.beta")
        resolved["beta"] = defaults.get("beta", 0.1) if beta in (None, "auto") else float(beta)
    return resolved


def training_method(job: m.FineTuningJob) -> str:
    """'supervised' or 'dpo': the TrainingSpec's `method`."""
    return (job.method or {}).get("type") or "supervised"


def training_arguments(job: m.FineTuningJob, base: m.BaseModel) -> dict[str, Any]:
    """The TrainingSpec's `hyperparameters` (every key a LoraHyperparameters field), from the job and its base."""
    defaults = {**GENERIC_DEFAULTS, **base.finetune_defaults}
    hp = job.hyperparameters
    method = training_method(job)
    # Jobs record every option they resolved in their method object; older jobs fall back to defaults.
    chosen = ((job.method or {}).get(method) or {}).get("hyperparameters") or {}
    options = {name: chosen.get(name, defaults.get(name)) for name in OPTION_KEYS if name in chosen or name in defaults}
    arguments = {
        **options,
        "n_epochs": hp["n_epochs"],
        "batch_size": hp["batch_size"],
        "learning_rate": options.get("learning_rate", defaults["learning_rate"]) * hp["learning_rate_multiplier"],
        "seed": job.seed,
    }
    if method == "dpo":
        arguments["beta"] = hp.get("beta", 0.1)
    return arguments


def checkpoints_to_keep(job: m.FineTuningJob) -> int:
    """How many of the job's latest checkpoints the platform keeps (its `keep_checkpoints` option)."""
    chosen = ((job.method or {}).get(training_method(job)) or {}).get("hyperparameters") or {}
    return int(chosen.get("keep_checkpoints") or DEFAULT_KEEP_CHECKPOINTS)


def _method_hyperparameters(method: dict[str, Any] | None) -> dict[str, Any] | None:
    if method is None:
        return None
    kind = method.get("type")
    if kind not in ("supervised", "dpo"):
        raise InvalidRequest(f"method.type {kind!r} is not supported; use 'supervised' or 'dpo'", param="method.type")
    body = method.get(kind) or {}
    if not isinstance(body, dict) or not isinstance(body.get("hyperparameters") or {}, dict):
        raise InvalidRequest(f"method.{kind}.hyperparameters must be an object", param=f"method.{kind}.hyperparameters")
    return body.get("hyperparameters")


def _training_options(
    requested: dict[str, Any] | None,
    base: m.BaseModel,
    *,
    method: str,
    has_validation_file: bool,
    settings: Settings | None,
) -> dict[str, Any]:
    """Our options, resolved and refused (400) before any compute when the platform could not train or
    serve the result: rank above the engine's maximum, modules the base does not have, 4-bit without a GPU."""
    defaults = {**GENERIC_DEFAULTS, **base.finetune_defaults}
    try:
        options = resolve_options(
            dict(requested or {}), defaults, method=method, has_validation_file=has_validation_file
        )
        if settings is not None:
            try:
                model_dir = resolve_model_path(base.ref, offline=settings.offline)
            except ModelNotAvailable as exc:
                raise InvalidRequest(f"the base model's files are not available: {exc}", param="model") from exc
            hp = LoraHyperparameters(**{**options, "n_epochs": 1, "batch_size": options.get("processes", 1)})
            check_configuration(hp, module_inventory(model_dir), max_rank=settings.max_lora_rank)
    except ConfigurationError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    return options


def _fine_tune_file(session: Session, file_id: str | None, param: str) -> m.File:
    if not file_id:
        raise InvalidRequest(f"{param} is required", param=param)
    try:
        record = files.get(session, file_id)
    except NotFound:
        raise InvalidRequest(f"invalid {param}: no such file '{file_id}'", param=param) from None
    if record.purpose != "fine-tune":
        raise InvalidRequest(
            f"invalid {param}: file '{file_id}' has purpose '{record.purpose}', expected 'fine-tune'", param=param
        )
    return record


def create_job(
    session: Session,
    principal: Principal,
    *,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    suffix: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    method: dict[str, Any] | None = None,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
    settings: Settings | None = None,
    start_from: m.Adapter | None = None,
    lineage: dict[str, Any] | None = None,
    requirements: Any = None,
) -> m.FineTuningJob:
    """`settings`: where given, the options are also checked against what this platform can train and serve.
    A model `principal` may not see or use is not found, as one that does not exist.

    `start_from`: an adapter of `model` whose weights the new LoRA starts from (its shape kept), recorded in the
    job's `lineage` (a stable name's fine-tune, `services.model_names`).

    `requirements`: what the machine that trains it must have (`services.job_requirements`), kept in `method`."""
    ref = models.get_model(session, model, viewer=principal)
    if ref.name is not None:
        raise InvalidRequest(
            f"'{model}' is a stable name: fine-tune from it with POST /api/model_names/{ref.name.name}/fine_tune, "
            "which starts from its current version",
            param="model",
        )
    if ref.adapter is not None:
        raise InvalidRequest(
            "fine-tuning an already fine-tuned model is not supported yet; start from its base model", param="model"
        )
    _fine_tune_file(session, training_file, "training_file")
    if validation_file:
        _fine_tune_file(session, validation_file, "validation_file")
    if suffix is not None and not _SUFFIX.match(suffix):
        raise InvalidRequest("suffix must be 1-64 letters, digits, '-', '_' or '.'", param="suffix")
    method_hp = _method_hyperparameters(method)
    if method_hp is not None and hyperparameters:
        raise InvalidRequest("give hyperparameters either at the top level or in method, not both", param="method")
    kind = (method or {}).get("type") or "supervised"
    requested = method_hp if method_hp is not None else hyperparameters
    resolved = resolve_hyperparameters(requested, ref.base.finetune_defaults, kind)
    options = _training_options(
        requested, ref.base, method=kind, has_validation_file=bool(validation_file), settings=settings
    )
    init_adapter = None
    if start_from is not None:
        init_adapter = {name: sha for name, sha in start_from.manifest.items() if name in ADAPTER_FILES}
        if len(init_adapter) != len(ADAPTER_FILES) or start_from.base_model != ref.base.id:
            raise InvalidRequest(f"The adapter {start_from.id} cannot be trained further here", param="model")
        options["lora_r"] = start_from.rank or options.get("lora_r")  # its LoRA's shape is the run's
    processes = options.get("processes", 1)
    if resolved["batch_size"] % processes:
        raise InvalidRequest(
            f"batch_size {resolved['batch_size']} does not split evenly among {processes} processes: "
            "use a multiple of processes",
            param="hyperparameters.batch_size",
        )
    needs = job_requirements.parse(requirements)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InvalidRequest(f"seed must be an integer between 0 and {MAX_SEED}", param="seed")
    job = m.FineTuningJob(
        id=new_id("ftjob-"),
        user_id=principal.user_id,
        model=ref.id,
        training_file=training_file,
        validation_file=validation_file,
        suffix=suffix,
        seed=seed if seed is not None else secrets.randbelow(MAX_SEED + 1),
        hyperparameters=resolved,
        method={
            "type": kind,
            kind: {"hyperparameters": {**resolved, **options}},
            **({"requirements": needs} if needs else {}),
        },
        metadata_=metadata,
        status="validating_files",
        init_adapter=init_adapter,
        lineage=lineage,
    )
    session.add(job)
    session.flush()
    if start_from is not None:
        add_event(session, job, f"Training starts from the weights of {start_from.id}")
    add_event(session, job, f"Validating training file: {training_file}")
    return job


def add_event(
    session: Session,
    job: m.FineTuningJob,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> m.JobEvent:
    # The counter is taken in the database, not from the loaded row: the API (a pause, a cancel) and the
    # worker's session write events for the same job at once, and two copies of the row would hand out the
    # same number. The UPDATE locks the row (PostgreSQL) or the database (SQLite) until this commit.
    taken = session.execute(
        update(m.FineTuningJob)
        .where(m.FineTuningJob.id == job.id)
        .values(next_event_seq=m.FineTuningJob.next_event_seq + 1)
        .returning(m.FineTuningJob.next_event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    set_committed_value(job, "next_event_seq", taken)
    event = m.JobEvent(
        id=new_id("ftevent-"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        seq=taken - 1,
        level=level,
        type=type,
        message=message,
        data=data,
    )
    session.add(event)
    return event


def finish(session: Session, job: m.FineTuningJob, status: str, *, error: dict[str, Any] | None = None) -> None:
    agent_id = job.lease_owner if job.status == "running" else None  # who trained it, for the ledger
    job.status = status
    job.finished_at = time.time()
    job.error = error
    job.lease_owner = None
    job.lease_expires_at = None
    session.flush()
    limits.settle_training(session, job, agent_id)


log = logging.getLogger(__name__)


def validate_waiting(db: Database, blobs: BlobStore, budget_for: Callable[[str], TokenBudget]) -> None:
    """Validate every job waiting in validating_files (after a restart, or a validator that died), each on its
    own: one whose validation raises (a locked database, a fault of ours) is logged, the rest go on."""
    with db.system() as system:
        waiting = jobs_validating(system)
    for tenant_id, job_id in waiting:
        try:
            validate_job(db, blobs, tenant_id, job_id, budget_for)
        except Exception:
            log.exception("validating job %s failed; tried again once its claim lapses", job_id)


def validate_job(
    db: Database, blobs: BlobStore, tenant_id: str, job_id: str, budget_for: Callable[[str], TokenBudget]
) -> None:
    """Validate a job's files unless another validator holds it: only the claimant validates, so the job's
    hold on the monthly budget is taken once. A job whose base model is gone (unregistered since the job was
    created), or whose tokenizer is refused for good, fails with the reason rather than wait in validation."""
    claim = _claim_validation(db, tenant_id, job_id)
    if claim is None:
        return
    with db.tenant(tenant_id) as session:
        job = get_job(session, job_id, viewer=None)  # the platform itself
        if session.get(m.BaseModel, job.model) is None:
            message = f"The base model '{job.model}' is no longer registered, so the job cannot be trained."
            _fail_unvalidated(session, job, claim, {"code": "model_not_found", "message": message, "param": "model"})
            return
        try:
            budget = budget_for(job.model)
        except Exception as exc:
            if not faults.is_refusal(exc):
                raise  # a fault that may pass: the claim lapses and the next validator tries again
            # Asking again gets the same answer: the job fails with it instead of waiting in validation for ever.
            error = {"code": exc.code or "invalid_model", "message": exc.message, "param": exc.param or "model"}
            _fail_unvalidated(session, job, claim, error)
            return
        validate_files(session, blobs, job, budget, claim=claim)


def _fail_unvalidated(session: Session, job: m.FineTuningJob, claim: str, error: dict[str, Any]) -> None:
    """Fail a job whose files cannot be validated at all, if `claim` still holds it."""
    if _keep_claim(session, job, claim):
        finish(session, job, "failed", error=error)
        add_event(session, job, f"Job failed: {error['message']}", level="error")


def _claim_validation(db: Database, tenant_id: str, job_id: str) -> str | None:
    """A claim on a job in validating_files, committed before the work starts; None if another validator holds one."""
    claim = f"validator-{secrets.token_hex(8)}"
    now = time.time()
    job = m.FineTuningJob
    with db.tenant(tenant_id) as session:
        claimed = session.execute(
            update(job)
            .where(
                job.id == job_id,
                job.status == "validating_files",
                job.lease_owner.is_(None) | (job.lease_expires_at < now),
            )
            .values(lease_owner=claim, lease_expires_at=now + VALIDATION_CLAIM_SECONDS)
            .execution_options(synchronize_session=False)
        ).rowcount
    return claim if claimed == 1 else None


def _keep_claim(session: Session, job: m.FineTuningJob, claim: str) -> bool:
    """Whether `claim` still holds the job, ending it if so. The UPDATE holds the row (PostgreSQL) or the database
    (SQLite) until the outcome commits, so no other validator's claim lands in between."""
    kept = session.execute(
        update(m.FineTuningJob)
        .where(
            m.FineTuningJob.id == job.id,
            m.FineTuningJob.status == "validating_files",
            m.FineTuningJob.lease_owner == claim,
        )
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    set_committed_value(job, "lease_owner", None)
    set_committed_value(job, "lease_expires_at", None)
    return kept == 1


def validate_files(
    session: Session, blobs: BlobStore, job: m.FineTuningJob, budget: TokenBudget, *, claim: str
) -> None:
    """validating_files → queued, or → failed with the file's problems in `error` (as OpenAI does).

    Records are checked as at upload, and also against the base model's context, counted with its
    tokenizer. The outcome is written only while `claim` (`validate_job`'s) still holds the job.
    """
    if job.status != "validating_files":
        return
    counted = [0]  # the training file's tokens, for the job's hold on the monthly budget

    def count(record: dict[str, Any]) -> int:
        tokens = budget.count(record)
        counted[0] += tokens
        return tokens

    problem = None
    for param in ("training_file", "validation_file"):
        training = param == "training_file"
        file_id = getattr(job, param)
        if not file_id:
            continue
        record = session.scalar(select(m.File).where(m.File.id == file_id, m.File.tenant_id == job.tenant_id))
        problem = None
        if record is None:
            problem = f"The file {file_id} was deleted before the job could start."
        elif training_method(job) == "dpo":
            try:
                with blobs.plaintext(job.tenant_id, record.sha256) as path:
                    pairs = read_preference_records(path)
                if training:
                    for pair in pairs:  # DPO trains on both answers of each pair
                        count({"messages": pair["prompt"] + pair["chosen"]})
                        count({"messages": pair["prompt"] + pair["rejected"]})
            except DatasetError as exc:
                problem = f"The {param.replace('_', ' ')} {file_id} is not valid preference data: {exc}"
        else:
            counting = replace(budget, count=count) if training else budget
            report = check_chat_file(blobs, job.tenant_id, record.sha256, counting)
            if not report.ok:
                problem = f"The {param.replace('_', ' ')} {file_id} is invalid for {job.model}: {report.summary()}"
        if problem:
            break
    if not _keep_claim(session, job, claim):
        return  # this validator outlived its claim: the one that took the job over writes the outcome
    if problem:
        finish(session, job, "failed", error={"code": f"invalid_{param}", "message": problem, "param": param})
        add_event(session, job, problem, level="error")
        return
    estimate = counted[0] * int(job.hyperparameters.get("n_epochs") or 1)
    refused = limits.hold_training(session, job.tenant_id, job.id, estimate, time.time())
    if refused:
        finish(session, job, "failed", error={"code": "insufficient_quota", "message": refused, "param": None})
        add_event(session, job, refused, level="error")
        return
    job.status = "queued"
    add_event(session, job, "Files validated, moving job to queued state")


def jobs_validating(system: Session) -> list[tuple[str, str]]:
    """(tenant, job) of jobs waiting in validating_files (e.g. after a restart)."""
    rows = system.execute(
        select(m.FineTuningJob.tenant_id, m.FineTuningJob.id).where(m.FineTuningJob.status == "validating_files")
    )
    return [tuple(row) for row in rows]


class _Sight:
    """Which jobs one caller sees (the rule in the module's docstring), remembered across a listing's lineage."""

    def __init__(self, session: Session, viewer: Principal) -> None:
        self.session = session
        self.viewer = viewer
        self.shared = models.shared_with(session, viewer)
        self.known: dict[str, bool] = {}

    def sees(self, job: m.FineTuningJob) -> bool:
        if job.id not in self.known:
            self.known[job.id] = False  # a lineage that loops (never made) hides its jobs instead of recursing
            self.known[job.id] = self._sees(job)
        return self.known[job.id]

    def _sees(self, job: m.FineTuningJob) -> bool:
        if job.fine_tuned_model:
            adapter = self.session.get(m.Adapter, job.fine_tuned_model)
            if adapter is not None:
                return models.sees_adapter(self.viewer, adapter, self.shared)
            return self._private_to_creator(job, job.fine_tuned_model)
        parent_id = (job.lineage or {}).get("parent_job")
        if not parent_id:
            return True
        parent = self.session.get(m.FineTuningJob, parent_id)
        return self.sees(parent) if parent is not None else self._private_to_creator(job, job.id)

    def _private_to_creator(self, job: m.FineTuningJob, model_id: str) -> bool:
        """Weights whose adapter is gone: seen as a private adapter of the job's creator would be."""
        return policy.may_use_model(self.viewer, model_id) and policy.can_see_adapter(
            self.viewer, visibility="private", created_by=job.user_id, shared_with=set()
        )


def get_job(session: Session, job_id: str, *, viewer: Principal | None) -> m.FineTuningJob:
    """A job of the session's tenant that `viewer` may see; another's, or one it may not see, is not found."""
    job = session.scalar(select(m.FineTuningJob).where(m.FineTuningJob.id == job_id))
    if job is None or (viewer is not None and not _Sight(session, viewer).sees(job)):
        raise NotFound(f"No fine-tuning job found with id '{job_id}'", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session, *, viewer: Principal, after: str | None, limit: int
) -> tuple[list[m.FineTuningJob], bool]:
    """The newest jobs `viewer` may see, `limit` at most, and whether more follow."""
    query = select(m.FineTuningJob)
    if after:
        cursor = get_job(session, after, viewer=viewer)
        query = query.where(
            (m.FineTuningJob.created_at < cursor.created_at)
            | ((m.FineTuningJob.created_at == cursor.created_at) & (m.FineTuningJob.id < cursor.id))
        )
    query = query.order_by(m.FineTuningJob.created_at.desc(), m.FineTuningJob.id.desc())
    sight = _Sight(session, viewer)
    rows: list[m.FineTuningJob] = []
    batch, offset = max(limit + 1, 100), 0
    while len(rows) <= limit:
        fetched = list(session.scalars(query.offset(offset).limit(batch)))
        rows += [job for job in fetched if sight.sees(job)]
        if len(fetched) < batch:
            break
        offset += batch
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, job_id: str, *, viewer: Principal) -> m.FineTuningJob:
    """Cancelled at once for the caller; a running agent sees the flag at its next heartbeat."""
    job = get_job(session, job_id, viewer=viewer)
    if job.status in TERMINAL:
        raise InvalidRequest(
            f"Job {job_id} has already {job.status}; it cannot be cancelled.", param="fine_tuning_job_id"
        )
    job.cancel_requested = True
    finish(session, job, "cancelled")
    add_event(session, job, "Job cancelled at the user's request")
    return job


def pause_job(session: Session, job_id: str, *, viewer: Principal) -> m.FineTuningJob:
    """A queued job waits at once; a running one stops at its next step with a checkpoint (its agent
    reports it paused), and `resume_job` continues it from there."""
    job = get_job(session, job_id, viewer=viewer)
    if job.status not in ("queued", "running"):
        raise InvalidRequest(
            f"Job {job_id} is {job.status}; only a queued or running job can be paused.", param="fine_tuning_job_id"
        )
    if job.status == "queued":
        job.status = "paused"
        add_event(session, job, "Job paused at the user's request")
    elif not job.pause_requested:
        job.pause_requested = True
        add_event(session, job, "Pausing at the user's request: saving a checkpoint")
    return job


def resume_job(session: Session, job_id: str, *, viewer: Principal) -> m.FineTuningJob:
    job = get_job(session, job_id, viewer=viewer)
    if job.status != "paused":
        raise InvalidRequest(
            f"Job {job_id} is {job.status}; only a paused job can be resumed.", param="fine_tuning_job_id"
        )
    job.status = "queued"
    job.pause_requested = False
    add_event(session, job, "Job resumed: queued to continue from its latest checkpoint")
    return job


def list_events(
    session: Session, job_id: str, *, viewer: Principal, after: str | None, limit: int
) -> tuple[list[m.JobEvent], bool]:
    job = get_job(session, job_id, viewer=viewer)
    query = select(m.JobEvent).where(m.JobEvent.job_id == job.id)
    if after:
        cursor = session.scalar(select(m.JobEvent).where(m.JobEvent.id == after, m.JobEvent.job_id == job.id))
        if cursor is None:
            raise NotFound(f"No event '{after}' in job '{job_id}'", param="after")
        query = query.where(m.JobEvent.seq < cursor.seq)
    rows = list(session.scalars(query.order_by(m.JobEvent.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_checkpoints(
    session: Session, job_id: str, *, viewer: Principal, after: str | None, limit: int
) -> tuple[list[m.JobCheckpoint], bool]:
    job = get_job(session, job_id, viewer=viewer)
    query = select(m.JobCheckpoint).where(m.JobCheckpoint.job_id == job.id)
    if after:
        cursor = session.scalar(query.where(m.JobCheckpoint.id == after))
        if cursor is None:
            raise NotFound(f"No checkpoint '{after}' in job '{job_id}'", param="after")
        query = query.where(m.JobCheckpoint.step < cursor.step)
    rows = list(session.scalars(query.order_by(m.JobCheckpoint.step.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
