"""New jobs from old ones, with their lineage: extend a finished job (more epochs), continue from any
of its checkpoints, or fork it with a new training file. Each starts from the parent's adapter weights
(a fresh optimizer and schedule) and records where it came from."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.messaging.protocol import ADAPTER_FILES
from adaptery.services import files, finetuning
from adaptery.services.errors import InvalidRequest, NotFound

KINDS = ("extend", "continue", "fork")


def _adapter_manifest(manifest: dict[str, str] | None) -> dict[str, str] | None:
    kept = {name: sha for name, sha in (manifest or {}).items() if name in ADAPTER_FILES}
    return kept if len(kept) == len(ADAPTER_FILES) else None


def _final_adapter(session: Session, parent: m.FineTuningJob, kind: str) -> dict[str, str]:
    if parent.status != "succeeded" or not parent.fine_tuned_model:
        raise InvalidRequest(
            f"Job {parent.id} is {parent.status}: only a succeeded job can be {kind}ed "
            "(continue from one of its checkpoints instead).",
            param="fine_tuning_job_id",
        )
    adapter = session.get(m.Adapter, parent.fine_tuned_model)
    manifest = _adapter_manifest(adapter.manifest if adapter else None)
    if manifest is None:
        raise InvalidRequest(f"The model of job {parent.id} was deleted; nothing to start from.", param="model")
    return manifest


def _checkpoint_adapter(session: Session, parent: m.FineTuningJob, checkpoint_id: str | None) -> dict[str, str]:
    if not checkpoint_id:
        raise InvalidRequest("checkpoint is required: the id of one of the job's checkpoints", param="checkpoint")
    row = session.scalar(
        select(m.JobCheckpoint).where(m.JobCheckpoint.id == checkpoint_id, m.JobCheckpoint.job_id == parent.id)
    )
    if row is None:
        raise NotFound(f"No checkpoint '{checkpoint_id}' in job '{parent.id}'", param="checkpoint")
    manifest = _adapter_manifest(row.manifest)
    if manifest is None and row.model_name == parent.fine_tuned_model:  # the final step: the job's own model
        return _final_adapter(session, parent, "continu")
    if manifest is None:
        raise InvalidRequest(f"Checkpoint {checkpoint_id} kept no adapter to continue from.", param="checkpoint")
    return manifest


def _epochs(n_epochs: Any, *, required: bool) -> int | None:
    if n_epochs is None and not required:
        return None
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or not 1 <= n_epochs <= 50:
        raise InvalidRequest("n_epochs must be an integer between 1 and 50", param="n_epochs")
    return n_epochs


def _training_file(session: Session, file_id: Any, param: str) -> str:
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest(f"{param} is required", param=param)
    try:
        record = files.get(session, file_id)
    except NotFound:
        raise InvalidRequest(f"invalid {param}: no such file '{file_id}'", param=param) from None
    if record.purpose != "fine-tune":
        raise InvalidRequest(f"invalid {param}: file '{file_id}' has purpose '{record.purpose}'", param=param)
    return record.id


def derive_job(
    session: Session,
    principal: Principal,
    parent_id: str,
    kind: str,
    *,
    n_epochs: int | None = None,
    checkpoint: str | None = None,
    training_file: str | None = None,
    validation_file: str | None = None,
) -> m.FineTuningJob:
    """A new job (validating_files) starting from `parent_id`'s weights. A parent `principal` may not see (another
    tenant's, or one whose adapter is hidden from them: `finetuning`'s docstring) is a 404, as a missing one."""
    parent = finetuning.get_job(session, parent_id, viewer=principal)
    if kind == "extend":
        epochs = _epochs(n_epochs, required=True)
        start = _final_adapter(session, parent, "extend")
    elif kind == "continue":
        epochs = _epochs(n_epochs, required=False)
        start = _checkpoint_adapter(session, parent, checkpoint)
    elif kind == "fork":
        epochs = _epochs(n_epochs, required=False)
        start = _final_adapter(session, parent, "fork")
        training_file = _training_file(session, training_file, "training_file")
        if validation_file is not None:
            validation_file = _training_file(session, validation_file, "validation_file")
    else:
        raise InvalidRequest(f"unknown lineage kind {kind!r}; use one of {', '.join(KINDS)}", param="kind")
    hyperparameters = dict(parent.hyperparameters)
    if epochs is not None:
        hyperparameters["n_epochs"] = epochs
    method = dict(parent.method)
    section = method.get(method.get("type", ""))
    if isinstance(section, dict) and isinstance(section.get("hyperparameters"), dict):
        method[method["type"]] = {**section, "hyperparameters": {**section["hyperparameters"], **hyperparameters}}
    job = m.FineTuningJob(
        id=new_id("ftjob-"),
        user_id=principal.user_id,
        model=parent.model,
        training_file=training_file if kind == "fork" else parent.training_file,
        validation_file=validation_file if kind == "fork" else parent.validation_file,
        suffix=parent.suffix,
        seed=parent.seed,
        hyperparameters=hyperparameters,
        method=method,
        metadata_=parent.metadata_,
        status="validating_files",
        priority=parent.priority,
        lineage={"kind": kind, "parent_job": parent.id, "checkpoint": checkpoint if kind == "continue" else None},
        init_adapter=start,
    )
    session.add(job)
    session.flush()
    origin = f"checkpoint {checkpoint} of {parent.id}" if kind == "continue" else parent.id
    finetuning.add_event(session, job, f"Created by {kind} of {origin}; training starts from its adapter")
    finetuning.add_event(session, job, f"Validating training file: {job.training_file}")
    return job
