"""Evaluations as agents lease, heartbeat, report and finish them, through the control plane.

As for fine-tuning jobs (services/queue.py): a lease lasts `lease_seconds` unless heartbeated, is fenced by agent
and attempt, and one that lapses puts the evaluation back in the queue (failed after `max_attempts`). An agent gets
an evaluation only when it asks for them (`protocol.EVALUATION_KIND`) and no fine-tuning job waits for it, oldest
first. An lm-eval run is handed a key minted at lease time for exactly its models, revoked when the run ends or its
lease lapses: its secret is never stored.

What an evaluation generates is charged like inference. An lm-eval run calls /v1 with its minted key, so its calls
are reserved and settled there (the key's and the tenant's budgets), marked `evaluations` in the ledger
(`limits.reserve` knows the key). A held-out run generates on the agent: its result says what each model used
(`usage`: requests, prompt and completion tokens) and `finish` charges it once, in the transaction that ends the
evaluation (`limits.charge_evaluation`); a result without it is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from adaptery.data.untrusted import RecordLimits
from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.messaging.protocol import ADAPTER_FILES, BlobRef
from adaptery.services import keys, limits
from adaptery.services.errors import InvalidRequest, NotFound
from adaptery.storage.blobs import BlobStore

log = logging.getLogger(__name__)

HELD_OUT_MAX_EXAMPLES = 200
HELD_OUT_MAX_NEW_TOKENS = 128
LM_EVAL_KEY_SECONDS = 6 * 3600
MAX_REPORTED = 10**9  # tokens or requests an agent may report for one model of one evaluation


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
        prices: dict[str, dict[str, float]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.blobs = db, blobs
        self.lease_seconds, self.max_attempts = lease_seconds, max_attempts
        self.api_base = api_base.rstrip("/") + "/v1"
        self.record_limits = record_limits
        self.prices = prices or {}
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
                    with s.begin_nested():  # what it wrote (a key) goes if it fails
                        return self._assignment(s, evaluation)
                except Exception as exc:  # noqa: BLE001 - one bad evaluation fails alone; the lease goes on
                    log.warning("evaluation %s could not be started", evaluation_id, exc_info=True)
                    s.refresh(evaluation)
                    self._end(s, evaluation, "failed", f"The evaluation could not be started: {_why(exc)}")
                    continue
        return None

    def _assignment(self, s: Session, evaluation: m.Evaluation) -> dict[str, Any]:
        self._check_requester(s, evaluation)
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

    def _check_requester(self, s: Session, evaluation: m.Evaluation) -> None:
        """An evaluation runs only while whoever asked for it still may: the key it was asked with not revoked or
        expired, its person still a member of the tenant (else it fails, saying why, and nothing is charged)."""
        if evaluation.requester_key_id:
            key = s.get(m.ApiKey, evaluation.requester_key_id)
            if key is None or key.revoked_at is not None:
                raise NotFound("the API key that asked for it was revoked")
            if key.expires_at is not None and key.expires_at <= self.clock():
                raise NotFound("the API key that asked for it has expired")
        if evaluation.user_id:
            member = s.scalar(
                select(m.Membership.user_id).where(
                    m.Membership.tenant_id == evaluation.tenant_id, m.Membership.user_id == evaluation.user_id
                )
            )
            if member is None:
                raise NotFound("whoever asked for it is no longer a member of the organization")

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

    def holds(self, evaluation_id: str, agent_id: str, attempt: int | None = None) -> bool:
        with self.db.system() as s:
            return self._held(s, evaluation_id, agent_id, attempt) is not None

    def tenant_of(self, evaluation_id: str) -> str | None:
        with self.db.system() as s:
            evaluation = s.get(m.Evaluation, evaluation_id)
            return evaluation.tenant_id if evaluation is not None else None

    def job_blobs(self, evaluation_id: str, agent_id: str, attempt: int | None = None) -> set[str]:
        """What the agent holding the evaluation (under `attempt`) may fetch: its data, and its adapters' files."""
        with self.db.system() as s:
            evaluation = self._held(s, evaluation_id, agent_id, attempt)
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
                if evaluation.kind == "held_out":  # an lm-eval run's calls were charged at /v1
                    limits.charge_evaluation(s, evaluation, result["usage"], agent_id, self.clock(), self.prices)
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
        limits.release_evaluation(s, evaluation.id)  # what it used is charged by the caller (succeeded) or not at all

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


def _why(exc: Exception) -> str:
    """What an agent's user may read: never a path on the control plane's disk."""
    if isinstance(exc, FileNotFoundError):
        return "a file it needs is missing from storage"
    if isinstance(exc, NotFound | InvalidRequest):
        return str(exc)[:500]
    return f"{type(exc).__name__} while preparing it"


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
    if evaluation.kind == "held_out":
        used = result.get("usage")
        if not isinstance(used, dict) or set(used) != labels:
            raise InvalidRequest(f"result.usage must give the tokens of exactly {sorted(labels)}")
        for label in sorted(labels):
            for name in limits.EVALUATION_COUNTS:
                value = used[label].get(name) if isinstance(used[label], dict) else None
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPORTED:
                    raise InvalidRequest(f"result.usage.{label}.{name} must be an integer from 0 to {MAX_REPORTED}")
    json.dumps(result, allow_nan=False)
