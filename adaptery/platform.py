"""The composition root: one object that owns the database, blob store, engines and agent."""

from __future__ import annotations

import functools
import logging
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from adaptery.agent.link import AgentLink
from adaptery.agent.worker import Agent
from adaptery.auth.agent_ca import CertificateAuthority
from adaptery.auth.tls import ensure_ca, ensure_server_certificate
from adaptery.auth.transfers import TransferSigner, load_key
from adaptery.data.chat_template import TemplateBudget
from adaptery.data.formats import make_token_counter
from adaptery.data.untrusted import RecordLimits
from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.engine.demo_model import DEMO_MODEL_ID, ensure_demo_model
from adaptery.engine.embeddings import EmbeddingModel
from adaptery.engine.generation import InferenceEngine
from adaptery.engine.loading import load_tokenizer
from adaptery.messaging.credentials import parse_token
from adaptery.messaging.server import CONTROL_USER, FabricListener, NatsServer
from adaptery.services import agents as agent_records
from adaptery.services import blob_refs, datasets, enrollment, finetuning, models, sso, tenants
from adaptery.services.base_files import BaseFiles
from adaptery.services.control_plane import ControlPlane
from adaptery.services.errors import NotFound
from adaptery.services.evaluation_queue import EvaluationQueue
from adaptery.services.fair_tasks import FairTasks
from adaptery.services.inference import Inference
from adaptery.services.inference_router import InferenceRouter
from adaptery.services.oidc import OidcClient
from adaptery.services.queue import JobQueue
from adaptery.settings import Settings
from adaptery.storage.blobs import BlobStore
from adaptery.storage.crypto import LocalKeyProvider
from adaptery.storage.keys import Keyring
from adaptery.storage.modes import make_scratch, private_dir

log = logging.getLogger("adaptery")
RECOVERY_INTERVAL_SECONDS = 5.0
AGENT_SYNC_SECONDS = 1.0  # an agent enrolled or revoked from the CLI takes effect within this


@dataclass(frozen=True)
class FirstStart:
    tenant: str
    username: str
    api_key: str
    login_url: str


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The data dir and what it keeps are the platform's alone (`storage.modes`). blobs/, keys/ and tls/ are
        # made 0700 where they are made; any left open to others by an older version is tightened, as are the rest.
        for directory in (settings.data_dir, settings.models_dir):
            private_dir(directory)
        for made_before in (settings.master_key_file.parent, settings.tls_dir, settings.nats_dir, settings.work_dir):
            if made_before.is_dir():
                private_dir(made_before)
        self.db = Database(settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous)
        self.master_keys = LocalKeyProvider.from_settings(settings)
        self.keyring = Keyring(self.db, self.master_keys)
        # Transient plaintext (unpacked adapters, files being parsed, the embedded agent's job files) lives in
        # a 0700 directory of this process outside the data dir, removed when it stops or exits.
        self.scratch = make_scratch()
        self.blobs = BlobStore(settings.blobs_dir, self.keyring, self.scratch)
        self.engine = InferenceEngine.from_settings(settings)
        self.router = InferenceRouter(missed=settings.agent_announce_missed, policy=settings.inference_routing)
        # Requests go to an infer agent serving their base when there is one, else to the embedded engine.
        self.inference = Inference(
            self.engine,
            self.router,
            lambda: self.control,
            idle_seconds=settings.inference_stream_idle_seconds,
            first_token_seconds=settings.inference_first_token_seconds,
            stall_seconds=settings.engine_request_timeout_seconds,
            max_bytes_per_token=settings.engine_max_bytes_per_token,
        )
        self.embeddings = EmbeddingModel(
            settings.embedding_model, max_bytes_per_token=settings.engine_max_bytes_per_token
        )
        self.queue = JobQueue(
            self.db,
            self.blobs,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            tenant_concurrency=settings.job_tenant_concurrency,
            checkpoint_every_steps=settings.job_checkpoint_every_steps,
        )
        # OpenID Connect providers' discovery documents and keys, cached for every sign-in of this process
        self.oidc = OidcClient(
            functools.partial(httpx.Client, timeout=settings.oidc_http_timeout_seconds),
            clock_skew_seconds=settings.oidc_clock_skew_seconds,
            metadata_seconds=settings.oidc_metadata_seconds,
            jwks_refresh_seconds=settings.oidc_jwks_refresh_seconds,
        )
        self.evaluations = EvaluationQueue(
            self.db,
            self.blobs,
            lease_seconds=settings.job_lease_seconds,
            max_attempts=settings.job_max_attempts,
            api_base=settings.base_url,
            record_limits=RecordLimits.from_settings(settings),
            prices=settings.usage_prices,
        )
        # Presigned URLs for the artifacts enrolled agents move over HTTPS (auth/transfers.py)
        secret = settings.transfer_key.get_secret_value() if settings.transfer_key else None
        self.transfers = TransferSigner(load_key(secret, settings.transfer_key_file), settings.transfer_url_seconds)
        self.nats: NatsServer | None = None
        self.control: ControlPlane | None = None
        self._agent_link: AgentLink | None = None
        self.dataset_tasks = FairTasks(settings.dataset_workers, "adaptery-dataset")
        self._tokenizers: dict[str, datasets.TokenBudget] = {}
        self._tokenizers_lock = threading.Lock()
        self._agent: Agent | None = None
        self._agent_ca: CertificateAuthority | None = None
        self._sync_lock = threading.Lock()  # the sync loop and the enroll/revoke routes apply changes one at a time
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def prepare(self) -> FirstStart | None:
        """Migrate, register base models and, on the very first start, create the owner's tenant."""
        self.db.migrate()
        with self.db.system() as s:
            sso.sync_settings_providers(s, self.settings.oidc_providers)
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
                invitation_days=self.settings.invitation_days,
                platform_admin=True,  # the first person in runs the platform (sets tenant limits)
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
        self.resume_dataset_work()
        # The embedded agent's credentials exist before our NATS server starts, so its first configuration
        # admits it: adding a user later is a reload (SIGHUP) the server applies in its own time, and an agent
        # connecting before that would be refused.
        embedded = None
        if self.settings.embedded_agent and self.settings.nats_url is None:
            with self.db.system() as s:
                embedded = agent_records.embedded_agent(s, self.settings.port)
        self._start_messaging()
        if self.settings.embedded_agent:
            self._start_embedded_agent(embedded)

    def _start_messaging(self) -> None:
        """The agents' NATS server (our own unless one is configured) and the control plane answering on it."""
        settings = self.settings
        url, user, password = settings.nats_url, settings.nats_user, settings.nats_password
        if url is None:
            self.nats = NatsServer(
                settings.nats_dir, host=settings.nats_host, port=settings.nats_port, fabric=self._fabric_listener()
            )
            with self.db.system() as s:
                self.nats.start(agent_records.password_agents(s), enrollment.members(s))
            url, user, password = self.nats.url, CONTROL_USER, self.nats.control_password
        self.control = ControlPlane(
            self.queue,
            self.blobs,
            self.scratch / "uploads",
            url=url,
            user=user,
            password=password,
            max_upload_bytes=settings.max_upload_bytes,
            router=self.router,
            announce_seconds=settings.agent_announce_seconds,
            requests_per_second=settings.agent_requests_per_second,
            request_burst=settings.agent_request_burst,
            requests_in_flight=settings.agent_requests_in_flight,
            evaluations=self.evaluations,
            transfers=self.transfers,
            base_files=BaseFiles(self.db, offline=settings.offline),
        )
        self.sync_agents()
        self.control.start()
        self._spawn("agent-sync", self._agent_sync_loop)

    @property
    def agent_ca(self) -> CertificateAuthority:
        """The CA that signs agents' and islands' certificates (the platform's own, made on first use, or the
        external one the settings name)."""
        if self._agent_ca is None:
            settings = self.settings
            self._agent_ca = CertificateAuthority.load(settings.tls_dir, settings.ca_cert, settings.ca_key)
        return self._agent_ca

    def trust_pem(self) -> bytes:
        """What an enrolled machine trusts: the agents' CA, and the platform CA that signs the hub's servers."""
        own, _ = ensure_ca(self.settings.tls_dir)
        own_pem = own.public_bytes(serialization.Encoding.PEM)
        return self.agent_ca.pem + (b"" if own_pem == self.agent_ca.pem else own_pem)

    def _fabric_listener(self) -> FabricListener | None:
        settings = self.settings
        if not settings.fabric_enabled:
            return None
        cert, key = ensure_server_certificate(settings.tls_dir, settings.host, settings.server_names)
        return FabricListener(
            host=settings.fabric_host,
            port=settings.fabric_port or None,
            leaf_port=settings.fabric_leaf_port or None,
            cert_file=cert,
            key_file=key,
            ca_file=self.agent_ca.file(settings.tls_dir),
        )

    def fabric_urls(self) -> dict[str, str | None]:
        """Where an enrolled machine dials: agents the fabric port, islands the leafnode port."""
        settings, host = self.settings, self.settings.fabric_dial_host
        return {
            "nats_url": f"tls://{host}:{settings.fabric_port}" if settings.fabric_port else None,
            "leaf_url": f"tls://{host}:{settings.fabric_leaf_port}" if settings.fabric_leaf_port else None,
        }

    def _agent_sync_loop(self) -> None:
        while not self._stopping.wait(AGENT_SYNC_SECONDS):
            try:
                self.sync_agents()
            except Exception:
                log.exception("applying agent credentials failed")

    def sync_agents(self) -> None:
        """Apply enrolled and revoked agents to the NATS server's authorization and the control plane."""
        with self._sync_lock:
            self._sync_agents()

    def _sync_agents(self) -> None:
        with self.db.system() as s:
            active = agent_records.active_agents(s)
            hashes = agent_records.password_agents(s)
            members = enrollment.members(s)
            scopes = {a.id: a.tenant_scope for a in active}
            not_training = {a.id for a in active if a.roles is not None and "train" not in a.roles}
            not_inferring = {a.id for a in active if a.roles is not None and "infer" not in a.roles}
            certified = {a.id for a in active if not a.secret_hash}
        self.router.scopes = scopes
        if self.control is not None:
            self.control.agent_scope = scopes
            self.control.not_training = not_training
            self.control.not_inferring = not_inferring
            self.control.certified = certified
        if self.nats is not None:
            self.nats.sync_agents(hashes, members)

    def _start_embedded_agent(self, creds: agent_records.AgentCredentials | None) -> None:
        """The agent inside serve talks to the control plane over NATS like any other."""
        settings = self.settings
        if self.nats is None and not settings.agent_credentials:
            log.warning("no embedded agent: with an external NATS server, set ADAPTERY_AGENT_CREDENTIALS for it")
            return
        if self.nats is not None and creds is not None:
            agent_id, secret, name, url = creds.agent_id, creds.secret, creds.name, self.nats.url
            # This server's previous embedded agent died with it: its jobs need not wait for their leases.
            self.queue.release_all(agent_id, "the server restarted")
        else:
            agent_id, secret = parse_token(settings.agent_credentials)
            name, url = agent_id, settings.nats_url
        self._agent_link = AgentLink(url, agent_id, secret)
        self._agent_link.connect()
        self._agent = Agent(
            self._agent_link,
            self.scratch / "agent",
            name=name,
            heartbeat_seconds=settings.job_heartbeat_seconds,
            poll_seconds=settings.agent_poll_seconds,
            models_dir=settings.models_dir,
        )
        self._spawn("agent", self._agent.run)

    def notify_agent(self, agent_id: str | None, job_id: str, action: str) -> None:
        """Tell the agent running `job_id` that it was cancelled or paused, so it acts within a second."""
        if agent_id and self.control is not None:
            self.control.notify(agent_id, job_id, action)

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, name=f"adaptery-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _recovery_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.queue.recover()
                self.evaluations.recover()
                finetuning.validate_waiting(self.db, self.blobs, self.token_budget)
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
                self._tokenizers[base_id] = datasets.TokenBudget(
                    base_id,
                    make_token_counter(tokenizer, TemplateBudget.from_settings(self.settings)),
                    context,
                    RecordLimits.from_settings(self.settings),
                )
            return self._tokenizers[base_id]

    def submit_version(self, tenant_id: str, version_id: str) -> Future[None]:
        """Run a dataset version's work in the background; the future is done when it is."""
        done: Future[None] = Future()

        def work() -> None:
            try:
                datasets.run_version(self.db, self.blobs, tenant_id, version_id, self.token_budget)
            finally:
                done.set_result(None)  # run_version records its own failures on the version

        if not self.dataset_tasks.submit(tenant_id, work):
            done.set_exception(RuntimeError("the server is shutting down; the version is processed at its next start"))
        return done

    def resume_dataset_work(self) -> list[Future[str | None]]:
        """Run again the dataset versions a stopped server left processing. A server stopped while an upload
        created its dataset: that dataset is made whole or not at all, as if the upload had answered. Each future
        is done once its dataset is settled, with why it was removed (None: it stays)."""
        with self.db.system() as s:
            pending = datasets.pending_versions(s)
        return [
            self._settle_creation(self.submit_version(tenant_id, version_id), tenant_id, dataset_id)
            for tenant_id, version_id, dataset_id in pending
        ]

    def _settle_creation(self, done: Future[None], tenant_id: str, dataset_id: str) -> Future[str | None]:
        """Once `done`, `undo_failed_creation` of the dataset; the future it returns has the outcome."""
        outcome: Future[str | None] = Future()

        def settle(_: Future[None]) -> None:
            try:
                outcome.set_result(self.undo_failed_creation(tenant_id, dataset_id))
            except Exception as exc:  # noqa: BLE001 - logged, and handed to whoever waits on it
                log.exception("settling dataset %s after a restart failed", dataset_id)
                outcome.set_exception(exc)

        done.add_done_callback(settle)
        return outcome

    def undo_failed_creation(self, tenant_id: str, dataset_id: str) -> str | None:
        """Remove a dataset whose creating upload gave no record, with its blobs; returns why (None: it stays)."""
        with self.db.tenant(tenant_id) as s:
            undone = datasets.undo_failed_creation(s, self.keyring.data_key(tenant_id), dataset_id)
        if undone is None:
            return None
        reason, shas = undone
        with self.db.system() as system:
            for sha256 in set(shas):
                blob_refs.release(system, self.blobs, tenant_id, sha256)
        return reason

    def validate_job(self, tenant_id: str, job_id: str) -> None:
        finetuning.validate_job(self.db, self.blobs, tenant_id, job_id, self.token_budget)

    def adapter_dir(self, adapter: m.Adapter) -> Path:
        return models.materialize_adapter(self.blobs, adapter, self.scratch / "adapters")

    def stop(self) -> None:
        self._stopping.set()
        self.engine.stop()
        self.dataset_tasks.shutdown()
        if self._agent is not None:
            self._agent.stop()
        for thread in self._threads:
            thread.join(timeout=15)
        if self._agent_link is not None:
            self._agent_link.close()
        if self.control is not None:
            self.control.stop()
        if self.nats is not None:
            self.nats.stop()
        self.oidc.close()
        self.db.dispose()
        shutil.rmtree(self.scratch, ignore_errors=True)
