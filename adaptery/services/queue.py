"""The job queue as the control plane runs it for agents: lease, heartbeat, report, checkpoint, finish.

The database is the state of record; agents reach these methods only through the control plane's
NATS responder (`services.control_plane`). A lease is a claim that lasts `lease_seconds` unless
heartbeated; a job whose agent stopped heartbeating goes back to the queue with its attempt count,
and fails with a clear error after `max_attempts`.

A lease is fenced by agent and attempt: the assignment names its attempt, and an agent that sends it back
(heartbeat, events, checkpoint, finish) is refused once that attempt is over, even when the job was leased
again to the same agent id (a restarted agent, or one whose lease lapsed during a partition). Recovery runs
in every server process every few seconds; it moves each stale job in its own transaction with a guarded
UPDATE (still running, same owner and attempt, lease still expired), so a heartbeat committed after it
read the job wins, and one job's error is logged without holding up the others.

Leasing is fair: a tenant never runs more than `tenant_concurrency` jobs at once, tenants take
turns (the one leased least recently goes first), and within a tenant higher `priority` goes first,
then the oldest job. Priority never lets one tenant jump another's turn.

A job's `requirements` (accelerator, memory, "only my tenant's island": `services.job_requirements`) are matched
against what the asking agent says it has: an agent is handed the first job of the tenant in turn that it can run,
and a job it cannot run stays queued for another, with one event per reason ("waiting for an agent with cuda") so
its owner sees why it waits.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.messaging.protocol import ADAPTER_FILES, Assignment, BlobRef, CheckpointRef
from adaptery.services import (
    blob_refs,
    evaluations,
    faults,
    finetuning,
    job_requirements,
    limits,
    model_names,
    models,
    usage,
)
from adaptery.services.errors import InvalidRequest
from adaptery.storage.blobs import BlobStore

Verdict = Literal["continue", "cancel", "pause", "lost"]
# What a run says it is doing (training.runner's protocol); the job page shows the latest.
# A trained token is at least a byte of the training file: its text's tokens are a byte or more each, and the chat
# template's own tokens are fewer than the JSON around each message. Twice that covers a preference pair's prompt,
# trained with both answers, and any template's default system prompt.
TRAINED_TOKENS_PER_FILE_BYTE = 2
RUN_PHASES = ("starting", "loading_base", "preparing_data", "first_step", "saving")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Agent:
    """Who asks for a job: its id, the tenant it was enrolled for (None: platform-wide), what it has."""

    id: str
    tenant_scope: str | None
    capabilities: dict[str, Any]


class _Unstartable(Exception):
    """A job was claimed but its assignment could not be put together; the claim is rolled back."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(reason)
        self.job_id = job_id
        self.reason = reason


def agent_label(s: Session, agent_id: str | None) -> str:
    """How events name an agent: its enrolled name where it has one."""
    agent = s.get(m.Agent, agent_id) if agent_id else None
    return agent.name if agent is not None else str(agent_id)


SEEN_RESOLUTION_SECONDS = 5.0
COMPUTE_SECONDS = ("cpu", "accelerator", "wall")  # what an agent measures of each attempt (`charge_compute`)


class JobQueue:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        lease_seconds: float,
        max_attempts: int,
        tenant_concurrency: int | None = None,
        checkpoint_every_steps: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        # Every lease time (expiry, last seen) reads this clock: tests advance it instead of sleeping.
        self.clock = clock
        self.blobs = blobs
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.tenant_concurrency = tenant_concurrency
        self.checkpoint_every_steps = checkpoint_every_steps
        # Counting a tenant's running jobs and claiming one must not interleave within this process;
        # across processes on PostgreSQL a transaction-scoped advisory lock per tenant does the same.
        self._lease_lock = threading.Lock()
        self._waiting_said: set[tuple[str, str]] = set()  # (job, why it waits) already in its events

    # --- leasing ---------------------------------------------------------------------------------

    def lease(
        self, agent_id: str, *, tenant_scope: str | None = None, capabilities: dict[str, Any] | None = None
    ) -> Assignment | None:
        """Claim the next job by the fairness rules. FOR UPDATE SKIP LOCKED on PostgreSQL; on SQLite the
        guarded UPDATE is the compare-and-set that makes two agents never hold the same job.

        A job that cannot be started (its base model or a file of it gone) fails with the reason, so the
        queue behind it moves on instead of every agent's lease failing on it. A transient fault meanwhile (the
        database locked or restarting) is raised instead and leaves the job queued as it was.

        `capabilities`: what the agent's training device has (protocol); None (an agent that does not say) gets only
        jobs that ask for no accelerator and no memory.
        """
        agent = Agent(agent_id, tenant_scope, job_requirements.capabilities(capabilities))
        try:
            return self._lease(agent)
        except _Unstartable as exc:
            log.error("job %s cannot be started: %s", exc.job_id, exc.reason, exc_info=exc.__cause__)
            with self.db.system() as s:
                job = s.get(m.FineTuningJob, exc.job_id)
                if job is not None and job.status == "queued":
                    message = f"The job could not be started: {exc.reason}"
                    finetuning.finish(
                        s, job, "failed", error={"code": "job_unstartable", "message": message, "param": None}
                    )
                    finetuning.add_event(s, job, f"Job failed: {message}", level="error")
            return None

    def _lease(self, agent: Agent) -> Assignment | None:
        with self._lease_lock, self.db.system() as s:
            for tenant_id in self._tenants_in_turn(s, agent.tenant_scope):
                if self.db.engine.dialect.name == "postgresql":
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(tenant_id.encode())})
                if self.tenant_concurrency is not None:
                    running = s.scalar(
                        select(func.count())
                        .select_from(m.FineTuningJob)
                        .where(m.FineTuningJob.tenant_id == tenant_id, m.FineTuningJob.status == "running")
                    )
                    if running >= self.tenant_concurrency:
                        continue
                assignment = self._claim_head(s, tenant_id, agent)
                if assignment is not None:
                    return assignment
        return None

    def _tenants_in_turn(self, s: Session, tenant_scope: str | None) -> list[str]:
        """Tenants with queued jobs, the one whose last lease is oldest (or never) first."""
        queued = select(m.FineTuningJob.tenant_id).where(m.FineTuningJob.status == "queued").distinct()
        if tenant_scope is not None:
            queued = queued.where(m.FineTuningJob.tenant_id == tenant_scope)
        tenants = list(s.scalars(queued))
        if not tenants:
            return []
        last = dict(
            s.execute(
                select(m.FineTuningJob.tenant_id, func.max(m.FineTuningJob.leased_at))
                .where(m.FineTuningJob.tenant_id.in_(tenants))
                .group_by(m.FineTuningJob.tenant_id)
            ).all()
        )
        return sorted(tenants, key=lambda t: (last.get(t) or 0.0, t))

    def _runnable_head(self, s: Session, tenant_id: str, agent: Agent) -> str | None:
        """The first of the tenant's queued jobs, in order, that `agent` can run; each one it cannot run before it
        says why in its events (once per reason)."""
        queued = s.execute(
            select(m.FineTuningJob.id, m.FineTuningJob.method)
            .where(m.FineTuningJob.status == "queued", m.FineTuningJob.tenant_id == tenant_id)
            .order_by(m.FineTuningJob.priority.desc(), m.FineTuningJob.created_at, m.FineTuningJob.id)
        ).all()
        for job_id, method in queued:
            needs = job_requirements.of_method(method)
            lacking = job_requirements.shortfall(
                needs, agent.capabilities, agent_scope=agent.tenant_scope, tenant_id=tenant_id
            )
            if lacking is None:
                return job_id
            self._say_waiting(s, job_id, f"Waiting for {lacking}", lacking)
        return None

    def _say_waiting(self, s: Session, job_id: str, message: str, lacking: str) -> None:
        """One event per job and reason, however many agents ask: looked up in the job's events, and remembered
        here once seen there (committed: a lease rolled back after writing it does not count)."""
        if (job_id, message) in self._waiting_said:
            return
        said = s.scalar(select(m.JobEvent.id).where(m.JobEvent.job_id == job_id, m.JobEvent.message == message))
        if said is None:
            job = s.get(m.FineTuningJob, job_id)
            finetuning.add_event(s, job, message, level="warn", data={"waiting_for": lacking})
        else:
            self._waiting_said.add((job_id, message))

    def _claim_head(self, s: Session, tenant_id: str, agent: Agent) -> Assignment | None:
        runnable = self._runnable_head(s, tenant_id, agent)
        if runnable is None:
            return None
        candidates = s.scalars(
            select(m.FineTuningJob.id)
            .where(m.FineTuningJob.id == runnable, m.FineTuningJob.status == "queued")
            .with_for_update(skip_locked=True)
        ).all()
        if not candidates:
            return None
        job_id = candidates[0]
        agent_id = agent.id
        now = self.clock()
        claimed = s.execute(
            update(m.FineTuningJob)
            .where(m.FineTuningJob.id == job_id, m.FineTuningJob.status == "queued")
            .values(
                status="running",
                lease_owner=agent_id,
                lease_expires_at=now + self.lease_seconds,
                attempts=m.FineTuningJob.attempts + 1,
                started_at=func.coalesce(m.FineTuningJob.started_at, now),
                leased_at=now,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != 1:
            return None
        job = s.get(m.FineTuningJob, job_id)
        s.refresh(job)
        try:
            return self._assignment(s, job, agent_id)
        except _Unstartable:
            raise
        except Exception as exc:
            if faults.is_transient(exc):
                raise  # the claim is rolled back: the job stays queued for a later lease
            raise _Unstartable(job_id, f"{type(exc).__name__}: {exc}") from exc

    def _assignment(self, s: Session, job: m.FineTuningJob, agent_id: str) -> Assignment:
        base = s.get(m.BaseModel, job.model)
        if base is None:
            raise _Unstartable(job.id, f"the base model '{job.model}' is no longer registered")
        checkpoint = self._latest_resumable(s, job.id, repair=job)
        resumed = f", resuming from step {checkpoint.step}" if checkpoint else ""
        finetuning.add_event(
            s,
            job,
            f"Fine-tuning job started (attempt {job.attempts}, agent {agent_label(s, agent_id)}{resumed})",
            data={"phase": "started", "attempt": job.attempts},
        )
        self._mark_agent(s, agent_id, job.id)
        return Assignment(
            job_id=job.id,
            tenant_id=job.tenant_id,
            attempt=job.attempts,
            base_model=base.id,
            base_model_ref=base.ref,
            training_file=self._file_blob(s, job.training_file),
            validation_file=self._file_blob(s, job.validation_file) if job.validation_file else None,
            arguments=finetuning.training_arguments(job, base),
            method=finetuning.training_method(job),
            checkpoint_every_steps=self.checkpoint_every_steps,
            lease_seconds=self.lease_seconds,
            checkpoint=checkpoint,
            init_adapter=self._blobs_of(job.tenant_id, job.init_adapter),
        )

    def _blobs_of(self, tenant_id: str, manifest: dict[str, str] | None) -> dict[str, BlobRef] | None:
        if not manifest:
            return None
        return {name: BlobRef(sha, self.blobs.size(tenant_id, sha)) for name, sha in manifest.items()}

    def _latest_resumable(
        self, s: Session, job_id: str, *, repair: m.FineTuningJob | None = None
    ) -> CheckpointRef | None:
        """The newest checkpoint whose files are all in storage. With `repair` (the job, as it is leased), one
        whose files are gone (a disk restored from an older backup, a hand-deleted blob) stops being resumable,
        with an event that says so, and the job resumes from an older one or starts over."""
        rows = s.scalars(
            select(m.JobCheckpoint)
            .where(m.JobCheckpoint.job_id == job_id, m.JobCheckpoint.resumable.is_(True))
            .order_by(m.JobCheckpoint.step.desc())
        ).all()
        for row in rows:
            if not row.manifest:
                continue
            missing = sorted(name for name, sha in row.manifest.items() if not self.blobs.exists(row.tenant_id, sha))
            if not missing:
                return CheckpointRef(id=row.id, step=row.step, files=self._blobs_of(row.tenant_id, row.manifest))
            if repair is not None:
                row.resumable = False
                finetuning.add_event(
                    s,
                    repair,
                    f"Checkpoint at step {row.step} cannot be resumed: {', '.join(missing)} missing from storage",
                    level="warn",
                )
        return None

    def _file_blob(self, s: Session, file_id: str) -> BlobRef:
        record = s.get(m.File, file_id)
        return BlobRef(record.sha256, record.bytes)

    def _mark_agent(self, s: Session, agent_id: str, job_id: str | None) -> None:
        agent = s.get(m.Agent, agent_id) if agent_id else None
        if agent is not None:
            agent.last_seen_at = self.clock()
            agent.current_job_id = job_id

    def seen(self, agent_id: str, *, idle: bool = False) -> None:
        """An agent asked for work: it is alive (and, asking, holds no job)."""
        with self.db.system() as s:
            agent = s.get(m.Agent, agent_id)
            now = self.clock()
            # Idle agents ask every second or so: write only when it changes what an admin would see.
            if agent is None:
                return
            if now - (agent.last_seen_at or 0) < SEEN_RESOLUTION_SECONDS and agent.current_job_id is None:
                return
            agent.last_seen_at = now
            if idle:
                agent.current_job_id = None

    # --- while a job runs ------------------------------------------------------------------------

    @staticmethod
    def _lease_of(job_id: str, agent_id: str, attempt: int | None) -> list[Any]:
        """The job is running under this agent's lease (and this attempt's, where the agent names it: an agent
        from before attempt numbers were sent is fenced by its id alone)."""
        held = [
            m.FineTuningJob.id == job_id,
            m.FineTuningJob.status == "running",
            m.FineTuningJob.lease_owner == agent_id,
        ]
        if attempt is not None:
            held.append(m.FineTuningJob.attempts == attempt)
        return held

    def _held(
        self, s: Session, job_id: str, agent_id: str, attempt: int | None = None, *, lock: bool = False
    ) -> m.FineTuningJob | None:
        """The job if this lease holds it. `lock` (for a write) keeps its row until the commit on PostgreSQL,
        so recovery cannot requeue it in between; on SQLite the write itself takes the database's lock."""
        query = select(m.FineTuningJob).where(*self._lease_of(job_id, agent_id, attempt))
        return s.scalars(query.with_for_update() if lock else query).one_or_none()

    def holds(self, job_id: str, agent_id: str, attempt: int | None = None) -> bool:
        with self.db.system() as s:
            return self._held(s, job_id, agent_id, attempt) is not None

    def tenant_of(self, job_id: str) -> str | None:
        """The tenant whose data key seals the job's blobs."""
        with self.db.system() as s:
            job = s.get(m.FineTuningJob, job_id)
            return job.tenant_id if job is not None else None

    def job_blobs(self, job_id: str, agent_id: str) -> set[str]:
        """The blobs the agent holding `job_id` may fetch: its files and its latest checkpoint."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id)
            if job is None:
                return set()
            wanted = {self._file_blob(s, job.training_file).sha256}
            if job.validation_file:
                wanted.add(self._file_blob(s, job.validation_file).sha256)
            checkpoint = self._latest_resumable(s, job.id)
            if checkpoint is not None:
                wanted |= {blob.sha256 for blob in checkpoint.files.values()}
            wanted |= set((job.init_adapter or {}).values())
            return wanted

    def heartbeat(self, job_id: str, agent_id: str, attempt: int | None = None) -> Verdict:
        with self.db.system() as s:
            job = s.get(m.FineTuningJob, job_id)
            if job is None or job.cancel_requested or job.status == "cancelled":
                return "cancel"
            # A compare-and-set, not a write by id: recovery may have requeued the job since it was read.
            renewed = s.execute(
                update(m.FineTuningJob)
                .where(*self._lease_of(job_id, agent_id, attempt))
                .values(lease_expires_at=self.clock() + self.lease_seconds)
                .execution_options(synchronize_session=False)
            ).rowcount
            if renewed != 1:
                return "lost"
            self._mark_agent(s, agent_id, job_id)
            return "pause" if job.pause_requested else "continue"

    def report(self, job_id: str, agent_id: str, events: list[dict[str, Any]], attempt: int | None = None) -> None:
        """Turn the trainer's events into OpenAI job events."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt)
            if job is None:
                return
            for event in events:
                if event.get("type") == "metrics":
                    data = {k: v for k, v in event.items() if k != "type"}
                    loss = event.get("train_loss")
                    shown = f"{loss:.4f}" if isinstance(loss, int | float) else "not a number"
                    message = f"Step {event.get('step')}/{event.get('total_steps')}: training loss={shown}"
                    finetuning.add_event(s, job, message, type="metrics", data=data)
                elif event.get("type") == "message":
                    phase = event.get("phase")
                    data = {"phase": phase} if phase in RUN_PHASES else None
                    finetuning.add_event(s, job, str(event.get("message")), level=event.get("level", "info"), data=data)

    def record_checkpoint(
        self,
        job_id: str,
        agent_id: str,
        *,
        step: int,
        epoch: float | None,
        metrics: dict[str, Any],
        manifest: dict[str, str],
        attempt: int | None = None,
    ) -> str | None:
        """Keep an uploaded checkpoint (its files are blobs already); older ones keep only their adapter.

        The files the older ones drop are deleted only once the new checkpoint is committed: a server killed
        in between leaves at worst an unreferenced blob, never a checkpoint of record whose files are gone.
        """
        dropped: set[str] = set()
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt, lock=True)
            if job is None:
                return None
            tenant_id = job.tenant_id
            missing = [sha for sha in manifest.values() if not self.blobs.exists(job.tenant_id, sha)]
            if missing or not all(name in manifest for name in ADAPTER_FILES):
                raise ValueError("the checkpoint is incomplete: upload its adapter files first")
            checkpoint_id = f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}"
            tenant = s.get(m.Tenant, job.tenant_id)
            base_name = models.fine_tuned_model_name(job.model, tenant.name, job.suffix, job.id)
            row = s.get(m.JobCheckpoint, checkpoint_id)
            if row is None:
                row = m.JobCheckpoint(id=checkpoint_id, tenant_id=job.tenant_id, job_id=job.id, step=step)
                s.add(row)
            row.epoch = epoch
            row.metrics = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
            if "eval_loss" in row.metrics:
                row.metrics.setdefault("valid_loss", row.metrics["eval_loss"])
            row.model_name = f"{base_name}:ckpt-step-{step}"
            row.manifest = dict(manifest)
            row.resumable = "trainer_state.json" in manifest
            epoch_text = f" (epoch {epoch:g})" if epoch is not None else ""
            finetuning.add_event(s, job, f"Checkpoint saved at step {step}{epoch_text}")
            s.flush()
            if row.resumable:
                dropped = self._prune_older(s, job.id, step)
            dropped |= self._retire_beyond(s, job)
        if dropped:
            with self.db.system() as s:
                for sha in dropped:
                    blob_refs.release(s, self.blobs, tenant_id, sha)
        return checkpoint_id

    @staticmethod
    def _prune_older(s: Session, job_id: str, step: int) -> set[str]:
        """Older checkpoints keep their adapter only; returns the blobs they no longer name."""
        older = s.scalars(
            select(m.JobCheckpoint).where(
                m.JobCheckpoint.job_id == job_id, m.JobCheckpoint.resumable.is_(True), m.JobCheckpoint.step < step
            )
        ).all()
        dropped: set[str] = set()
        for row in older:
            dropped |= {sha for name, sha in row.manifest.items() if name not in ADAPTER_FILES}
            row.manifest = {name: sha for name, sha in row.manifest.items() if name in ADAPTER_FILES}
            row.resumable = False
        return dropped

    @staticmethod
    def _retire_beyond(s: Session, job: m.FineTuningJob) -> set[str]:
        """Delete the job's checkpoints beyond its `keep_checkpoints` latest and its best; returns their blobs.

        The best is the lowest validation loss where any checkpoint was evaluated, else the lowest training
        loss. A short job writes a checkpoint every epoch, so without this 20-50 of them pile up."""
        rows = s.scalars(
            select(m.JobCheckpoint).where(m.JobCheckpoint.job_id == job.id).order_by(m.JobCheckpoint.step.desc())
        ).all()
        keep = finetuning.checkpoints_to_keep(job)
        if len(rows) <= keep:
            return set()

        def loss(row: m.JobCheckpoint, name: str) -> float | None:
            value = (row.metrics or {}).get(name)
            return float(value) if isinstance(value, int | float) and value == value else None

        measure = "valid_loss" if any(loss(row, "valid_loss") is not None for row in rows) else "train_loss"
        measured = [row for row in rows if loss(row, measure) is not None]
        best = min(measured, key=lambda row: (loss(row, measure), -row.step)) if measured else None
        retired = [row for row in rows[keep:] if row is not best]
        dropped = {sha for row in retired for sha in (row.manifest or {}).values()}
        for row in retired:  # no event each time: it would flood the job's events as the checkpoints did its list
            s.delete(row)
        return dropped

    def charge_compute(self, job_id: str, agent_id: str, compute: Any, attempt: int | None = None) -> None:
        """Account the seconds an agent measured for its attempt of a job (CPU, accelerator, wall) to the
        job's tenant, user and base model in the usage ledger (its adapter does not exist yet): once per attempt
        however often the agent reports its end, and only from the agent the attempt belongs to (its lease, or a
        cancelled job it was running)."""
        if not isinstance(compute, dict):
            return
        try:
            seconds = {f"{name}_seconds": float(compute.get(f"{name}_seconds") or 0.0) for name in COMPUTE_SECONDS}
        except (TypeError, ValueError):
            return
        if not all(0 <= value < 366 * 86400 for value in seconds.values()):
            return  # not a measurement: nothing is charged
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt, lock=True)
            if job is None:
                agent = s.get(m.Agent, agent_id)
                job = s.get(m.FineTuningJob, job_id)
                if job is None or agent is None or agent.current_job_id != job_id or job.status != "cancelled":
                    return
            if not limits.claim_once(s, f"job:{job.id}", f"compute:{job.attempts}"):
                return
            use = usage.Use(
                job.tenant_id, "compute", user_id=job.user_id or "", model=job.model,
                agent_id=agent_id,
            )  # fmt: skip
            usage.add(s, use, self.clock(), requests=1, **seconds)

    # --- the end of an attempt -------------------------------------------------------------------

    def check_result(self, job_id: str, result: dict[str, Any]) -> None:
        """InvalidRequest (final) if `result` is not one job `job_id` can have produced (`_checked_result`)."""
        with self.db.system() as s:
            job = s.get(m.FineTuningJob, job_id)
            if job is not None:
                _checked_result(s, job, result)

    def succeed(
        self, job_id: str, agent_id: str, adapter_dir: Path, result: dict[str, Any], attempt: int | None = None
    ) -> str | None:
        """Register the adapter and finish the job; returns the model id, or None if the lease was lost.
        InvalidRequest (final) for a result the job cannot have produced (`_checked_result`): nothing changes."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt, lock=True)
            if job is None:
                return None
            trained_tokens, step = _checked_result(s, job, result)
            tenant = s.get(m.Tenant, job.tenant_id)
            model_id = models.fine_tuned_model_name(job.model, tenant.name, job.suffix, job.id)
            adapter = models.register_adapter(
                s,
                self.blobs,
                tenant_id=job.tenant_id,
                model_id=model_id,
                base_model=job.model,
                job_id=job.id,
                adapter_dir=adapter_dir,
            )
            job.fine_tuned_model = model_id
            versioned = model_names.version_from_job(s, job, adapter)
            job.trained_tokens = trained_tokens
            checkpoint_id = f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}"
            final = s.get(m.JobCheckpoint, checkpoint_id)
            if final is not None:
                final.model_name = model_id  # the last checkpoint is the result: it is served by that name
            else:
                s.add(
                    m.JobCheckpoint(
                        id=checkpoint_id,
                        tenant_id=job.tenant_id,
                        job_id=job.id,
                        step=step,
                        metrics={"step": step, "train_loss": result.get("train_loss")},
                        model_name=model_id,
                    )
                )
            finetuning.add_event(s, job, f"New fine-tuned model created: {model_id}")
            if versioned is not None:
                name, number = versioned
                predecessor = (job.lineage or {}).get("adapter")
                finetuning.add_event(
                    s, job, f"Added as version {number} of {name} (trained on from {predecessor}); not promoted yet"
                )
            evaluations.enqueue_for_job(s, job)  # its event before the last: OpenAI's jobs end with "completed"
            finetuning.finish(s, job, "succeeded")
            finetuning.add_event(s, job, "The job has successfully completed")
            self._mark_agent(s, agent_id, None)
            return model_id

    def fail(
        self, job_id: str, agent_id: str, message: str, *, code: str = "training_error", attempt: int | None = None
    ) -> None:
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt, lock=True)
            if job is None:
                return
            finetuning.finish(s, job, "failed", error={"code": code, "message": message, "param": None})
            finetuning.add_event(s, job, f"Job failed: {message}", level="error")
            self._mark_agent(s, agent_id, None)

    def paused(self, job_id: str, agent_id: str, attempt: int | None = None) -> None:
        """The agent stopped the job at a checkpoint, as asked; it waits for `resume`."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt, lock=True)
            if job is None:
                return
            job.status = "paused"
            job.lease_owner = None
            job.lease_expires_at = None
            checkpoint = self._latest_resumable(s, job.id)
            where = f" at step {checkpoint.step}" if checkpoint else ""
            finetuning.add_event(s, job, f"Job paused{where}")
            self._mark_agent(s, agent_id, None)

    def release(
        self, job_id: str, agent_id: str, reason: str, attempt: int | None = None, *, fault: bool = False
    ) -> None:
        """Give a job back to the queue without spending its attempt's outcome (agent shutting down). With `fault`
        (the agent could not put the job together: its disk, the link) the attempt counts: after `max_attempts`
        the job fails with the last reason rather than go round the agents for ever."""
        with self.db.system() as s:
            job = self._held(s, job_id, agent_id, attempt, lock=True)
            if job is None:
                return
            if fault and job.attempts >= self.max_attempts:
                message = f"The job could not be prepared in {job.attempts} attempts (last: {reason})"
                error = {"code": "job_unstartable", "message": message, "param": None}
                finetuning.finish(s, job, "failed", error=error)
                finetuning.add_event(s, job, f"Job failed: {message}", level="error")
                self._mark_agent(s, agent_id, None)
                return
            job.status = "queued"
            job.lease_owner = None
            job.lease_expires_at = None
            finetuning.add_event(s, job, f"Job returned to the queue: {reason}", level="warn")
            self._mark_agent(s, agent_id, None)

    def release_all(self, agent_id: str, reason: str) -> int:
        """Requeue every job `agent_id` holds (it is known to be gone: the server restarted)."""
        with self.db.system() as s:
            held = s.scalars(
                select(m.FineTuningJob.id).where(
                    m.FineTuningJob.status == "running", m.FineTuningJob.lease_owner == agent_id
                )
            ).all()
        for job_id in held:
            self.release(job_id, agent_id, reason)
        return len(held)

    def recover(self) -> int:
        """Requeue (or fail) running jobs whose lease expired; returns how many moved. Each job moves in its own
        transaction, and an error on one is logged while the others go on."""
        now = self.clock()
        with self.db.system() as s:
            stale = s.execute(
                select(m.FineTuningJob.id, m.FineTuningJob.lease_owner, m.FineTuningJob.attempts).where(
                    m.FineTuningJob.status == "running", m.FineTuningJob.lease_expires_at < now
                )
            ).all()
        recovered = 0
        for job_id, owner, attempt in stale:
            try:
                recovered += self._recover_one(job_id, owner, attempt, now)
            except Exception:
                log.exception("recovering job %s failed; the next pass tries again", job_id)
        return recovered

    def _recover_one(self, job_id: str, owner: str | None, attempt: int, now: float) -> bool:
        with self.db.system() as s:
            # Guarded by what was read: a heartbeat (or a finish) committed since then matches nothing, and wins.
            # The UPDATE also holds the row (PostgreSQL) or the database (SQLite) until this commit.
            taken = s.execute(
                update(m.FineTuningJob)
                .where(
                    m.FineTuningJob.id == job_id,
                    m.FineTuningJob.status == "running",
                    m.FineTuningJob.lease_owner == owner,
                    m.FineTuningJob.attempts == attempt,
                    m.FineTuningJob.lease_expires_at < now,
                )
                .values(lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            ).rowcount
            if taken != 1:
                return False
            job = s.get(m.FineTuningJob, job_id)
            agent = agent_label(s, owner)
            self._mark_agent(s, owner, None)
            if job.attempts >= self.max_attempts:
                message = f"The job's worker stopped responding {job.attempts} times (last: agent {agent}); giving up."
                finetuning.finish(s, job, "failed", error={"code": "worker_lost", "message": message, "param": None})
                finetuning.add_event(s, job, message, level="error")
            else:
                # One that was pausing waits for `resume`; either continues from its latest checkpoint.
                job.status = "paused" if job.pause_requested else "queued"
                outcome = "paused" if job.pause_requested else "requeued"
                finetuning.add_event(s, job, f"Agent {agent} stopped heartbeating; job {outcome}", level="warn")
        return True


def trained_tokens_bound(session: Session, job: m.FineTuningJob) -> int:
    """The most tokens `job` can have trained: its training file's bytes × TRAINED_TOKENS_PER_FILE_BYTE × its
    epochs × its processes (generous: the processes of a group split the data rather than each train it all)."""
    size = session.scalar(select(m.File.bytes).where(m.File.id == job.training_file, m.File.tenant_id == job.tenant_id))
    hp = job.hyperparameters or {}
    factors = [hp.get("n_epochs"), hp.get("processes")]
    epochs, processes = (f if isinstance(f, int) and not isinstance(f, bool) and f >= 1 else 1 for f in factors)
    return int(size or 0) * TRAINED_TOKENS_PER_FILE_BYTE * epochs * processes


def _checked_result(session: Session, job: m.FineTuningJob, result: dict[str, Any]) -> tuple[int, int]:
    """(trained_tokens, steps) of an agent's result: non-negative integers, trained_tokens at most what the job's
    training file can hold (`trained_tokens_bound`); the agent's word is billed, so anything else is refused."""
    values = []
    for name in ("trained_tokens", "steps"):
        value = result.get(name, 0)
        if value is None:
            value = 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"result.{name} must be a non-negative integer, not {value!r}")
        values.append(value)
    bound = trained_tokens_bound(session, job)
    if values[0] > bound:
        raise InvalidRequest(
            f"result.trained_tokens {values[0]} is more than job {job.id} can have trained (at most {bound})"
        )
    return values[0], values[1]
