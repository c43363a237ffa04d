"""The composition root: one object that owns the database, blob store, engines and agent."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from adaptery.agent.worker import Agent, default_agent_id
from adaptery.data.formats import make_token_counter
from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.engine.demo_model import DEMO_MODEL_ID, ensure_demo_model
from adaptery.engine.embeddings import EmbeddingModel
from adaptery.engine.generation import InferenceEngine
from adaptery.engine.loading import load_tokenizer
from adaptery.services import datasets, finetuning, models, tenants
from adaptery.services.errors import NotFound
from adaptery.services.queue import JobQueue
from adaptery.settings import Settings
from adaptery.storage.blobs import BlobStore

log = logging.getLogger("adaptery")
RECOVERY_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class FirstStart:
    tenant: str
    username: str
    api_key: str
    login_url: str


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.resolved_database_url)
        self.blobs = BlobStore(settings.blobs_dir)
        self.engine = InferenceEngine(settings.device)
        self.embeddings = EmbeddingModel(settings.embedding_model)
        self.queue = JobQueue(
            self.db, self.blobs, lease_seconds=settings.job_lease_seconds, max_attempts=settings.job_max_attempts
        )
        self.tasks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptery-task")
        self._tokenizers: dict[str, datasets.TokenBudget] = {}
        self._tokenizers_lock = threading.Lock()
        self._agent: Agent | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def prepare(self) -> FirstStart | None:
        """Migrate, register base models and, on the very first start, create the owner's tenant."""
        self.db.migrate()
        with self.db.system() as s:
            if self.settings.demo_model:
                path = ensure_demo_model(self.settings.models_dir)
                models.register_base_model(s, DEMO_MODEL_ID, str(path), offline=True)
            for ref in self.settings.base_models:
                models.register_base_model(s, models.base_model_id(ref), ref, offline=self.settings.offline)
            if tenants.has_any_tenant(s):
                return None
            created = tenants.create_tenant(
                s,
                self.settings.bootstrap_tenant,
                self.settings.bootstrap_username,
                login_link_hours=self.settings.login_link_hours,
            )
            return FirstStart(
                tenant=created.tenant.name,
                username=created.owner.username,
                api_key=created.api_key,
                login_url=f"{self.settings.base_url}/auth/link?token={created.login_token}",
            )

    def start_background(self) -> None:
        """Job recovery, unfinished dataset work, and (unless disabled) the embedded agent."""
        self._spawn("recovery", self._recovery_loop)
        with self.db.system() as s:
            for tenant_id, version_id in datasets.pending_versions(s):
                self.submit_version(tenant_id, version_id)
        if self.settings.embedded_agent:
            self._agent = Agent(
                self.queue,
                self.settings.work_dir,
                agent_id=default_agent_id("embedded"),
                heartbeat_seconds=self.settings.job_heartbeat_seconds,
                poll_seconds=self.settings.agent_poll_seconds,
            )
            self._spawn("agent", self._agent.run)

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, name=f"adaptery-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _recovery_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.queue.recover()
                with self.db.system() as s:
                    waiting = finetuning.jobs_validating(s)
                for tenant_id, job_id in waiting:
                    self.validate_job(tenant_id, job_id)
            except Exception:
                log.exception("job recovery failed")
            self._stopping.wait(RECOVERY_INTERVAL_SECONDS)

    def token_budget(self, model: str | None) -> datasets.TokenBudget:
        """How to count tokens for `model` (default: the first base model), loaded once per model."""
        with self.db.system() as s:
            base = (
                s.get(m.BaseModel, model) if model else s.scalar(select(m.BaseModel).order_by(m.BaseModel.created_at))
            )
            if base is None:
                raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
            base_id, ref = base.id, base.ref
        with self._tokenizers_lock:
            if base_id not in self._tokenizers:
                tokenizer, context = load_tokenizer(ref, offline=self.settings.offline)
                self._tokenizers[base_id] = datasets.TokenBudget(base_id, make_token_counter(tokenizer), context)
            return self._tokenizers[base_id]

    def submit_version(self, tenant_id: str, version_id: str) -> None:
        """Run a dataset version's work in the background."""
        self.tasks.submit(datasets.run_version, self.db, self.blobs, tenant_id, version_id, self.token_budget)

    def validate_job(self, tenant_id: str, job_id: str) -> None:
        with self.db.tenant(tenant_id) as s:
            job = finetuning.get_job(s, job_id)
            finetuning.validate_files(s, self.blobs, job, self.token_budget(job.model))

    def adapter_dir(self, adapter: m.Adapter) -> Path:
        return models.materialize_adapter(self.blobs, adapter, self.settings.work_dir / "adapters")

    def stop(self) -> None:
        self._stopping.set()
        self.tasks.shutdown(wait=False, cancel_futures=True)
        if self._agent is not None:
            self._agent.stop()
        for thread in self._threads:
            thread.join(timeout=15)
        self.db.dispose()
