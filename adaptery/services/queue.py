"""The job queue as agents see it: lease, heartbeat, report, finish.

The database is the state of record. A lease is a claim that lasts `lease_seconds` unless
heartbeated; a job whose agent stopped heartbeating goes back to the queue with its attempt
count, and fails with a clear error after `max_attempts`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select, update

from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.services import finetuning, models
from adaptery.storage.blobs import BlobStore


@dataclass(frozen=True)
class Assignment:
    job_id: str
    tenant_id: str
    attempt: int
    base_model: str
    base_model_ref: str
    training_file: Path
    validation_file: Path | None
    arguments: dict[str, Any]


class JobQueue:
    def __init__(self, db: Database, blobs: BlobStore, *, lease_seconds: float, max_attempts: int) -> None:
        self.db = db
        self.blobs = blobs
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts

    def lease(self, agent_id: str) -> Assignment | None:
        """Claim the oldest queued job. FOR UPDATE SKIP LOCKED on PostgreSQL; on SQLite the guarded
        UPDATE below is the compare-and-set that makes two agents never hold the same job."""
        with self.db.system() as s:
            candidates = s.scalars(
                select(m.FineTuningJob.id)
                .where(m.FineTuningJob.status == "queued")
                .order_by(m.FineTuningJob.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).all()
            if not candidates:
                return None
            job_id = candidates[0]
            now = time.time()
            claimed = s.execute(
                update(m.FineTuningJob)
                .where(m.FineTuningJob.id == job_id, m.FineTuningJob.status == "queued")
                .values(
                    status="running",
                    lease_owner=agent_id,
                    lease_expires_at=now + self.lease_seconds,
                    attempts=m.FineTuningJob.attempts + 1,
                    started_at=now,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if claimed != 1:
                return None
            job = s.get(m.FineTuningJob, job_id)
            s.refresh(job)
            base = s.get(m.BaseModel, job.model)
            finetuning.add_event(s, job, f"Fine-tuning job started (attempt {job.attempts}, agent {agent_id})")
            return Assignment(
                job_id=job.id,
                tenant_id=job.tenant_id,
                attempt=job.attempts,
                base_model=base.id,
                base_model_ref=base.ref,
                training_file=self._file_path(s, job.training_file),
                validation_file=self._file_path(s, job.validation_file) if job.validation_file else None,
                arguments=finetuning.training_arguments(job, base),
            )

    def _file_path(self, s: Any, file_id: str) -> Path:
        record = s.get(m.File, file_id)
        return self.blobs.path(record.sha256)

    def _held(self, s: Any, job_id: str, agent_id: str) -> m.FineTuningJob | None:
        job = s.get(m.FineTuningJob, job_id)
        if job is None or job.status != "running" or job.lease_owner != agent_id:
            return None
        return job

    def heartbeat(self, job_id: str, agent_id: str) -> Literal["continue", "cancel", "lost"]:
        with self.db.system() as s:
            job = s.get(m.FineTuningJob, job_id)
            if job is None or job.cancel_requested or job.status == "cancelled":
                return "cancel"
            if job.status != "running" or job.lease_owner != agent_id:
                return "lost"
            job.lease_expires_at = time.time() + self.lease_seconds
            return "continue"

    def report(self, job_id: str, agent_id: str, events: list[dict[str, Any]]) -> None:
        """Turn the trainer's events into OpenAI job events."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id)
            if job is None:
                return
            for event in events:
                if event.get("type") == "metrics":
                    data = {k: v for k, v in event.items() if k != "type"}
                    loss = event.get("train_loss")
                    shown = f"{loss:.4f}" if isinstance(loss, int | float) else "not a number"
                    message = f"Step {event['step']}/{event['total_steps']}: training loss={shown}"
                    finetuning.add_event(s, job, message, type="metrics", data=data)
                elif event.get("type") == "message":
                    finetuning.add_event(s, job, event["message"], level=event.get("level", "info"))

    def succeed(self, job_id: str, agent_id: str, adapter_dir: Path, result: dict[str, Any]) -> str | None:
        """Register the adapter and finish the job; returns the model id, or None if the lease was lost."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id)
            if job is None:
                return None
            tenant = s.get(m.Tenant, job.tenant_id)
            model_id = models.fine_tuned_model_name(job.model, tenant.name, job.suffix, job.id)
            models.register_adapter(
                s,
                self.blobs,
                tenant_id=job.tenant_id,
                model_id=model_id,
                base_model=job.model,
                job_id=job.id,
                adapter_dir=adapter_dir,
            )
            job.fine_tuned_model = model_id
            job.trained_tokens = int(result.get("trained_tokens") or 0)
            metrics = {"step": result.get("steps"), "train_loss": result.get("train_loss")}
            s.add(
                m.JobCheckpoint(
                    id=f"ftckpt-{job.id.removeprefix('ftjob-')}-{result.get('steps', 0)}",
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    step=int(result.get("steps") or 0),
                    metrics=metrics,
                    model_name=model_id,
                )
            )
            finetuning.add_event(s, job, f"New fine-tuned model created: {model_id}")
            finetuning.finish(s, job, "succeeded")
            finetuning.add_event(s, job, "The job has successfully completed")
            return model_id

    def fail(self, job_id: str, agent_id: str, message: str, *, code: str = "training_error") -> None:
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id)
            if job is None:
                return
            finetuning.finish(s, job, "failed", error={"code": code, "message": message, "param": None})
            finetuning.add_event(s, job, f"Job failed: {message}", level="error")

    def release(self, job_id: str, agent_id: str, reason: str) -> None:
        """Give a job back to the queue without spending its attempt's outcome (agent shutting down)."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id)
            if job is None:
                return
            job.status = "queued"
            job.lease_owner = None
            job.lease_expires_at = None
            finetuning.add_event(s, job, f"Job returned to the queue: {reason}", level="warn")

    def recover(self) -> int:
        """Requeue (or fail) running jobs whose lease expired."""
        recovered = 0
        with self.db.system() as s:
            now = time.time()
            stale = s.scalars(
                select(m.FineTuningJob).where(
                    m.FineTuningJob.status == "running", m.FineTuningJob.lease_expires_at < now
                )
            ).all()
            for job in stale:
                recovered += 1
                if job.attempts >= self.max_attempts:
                    message = (
                        f"The job's worker stopped responding {job.attempts} times "
                        f"(last: agent {job.lease_owner}); giving up."
                    )
                    finetuning.finish(
                        s, job, "failed", error={"code": "worker_lost", "message": message, "param": None}
                    )
                    finetuning.add_event(s, job, message, level="error")
                else:
                    job.status = "queued"
                    finetuning.add_event(
                        s, job, f"Agent {job.lease_owner} stopped heartbeating; job requeued", level="warn"
                    )
                    job.lease_owner = None
                    job.lease_expires_at = None
        return recovered
