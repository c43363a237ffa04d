"""The data model. Every object a tenant owns carries `tenant_id` through `TenantOwned`."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class TenantOwned:
    """Mixin of tenant-owned rows; `db.tenancy` filters every query on them by the caller's tenant."""

    @declared_attr
    def tenant_id(cls) -> Mapped[str]:  # noqa: N805 - SQLAlchemy's declared_attr convention
        return mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), index=True)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    # The person may administer the platform, in a step-up (sessions) or with a platform key; never by default.
    is_platform_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    password_changed_at: Mapped[float | None] = mapped_column(Float)


class SignInThrottle(Base):
    """Failed sign-ins counted per (account, source), per source and per account, with an exponential lock."""

    __tablename__ = "sign_in_throttles"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class SignInDevice(Base):
    """A browser a person signed in from with their password: the account-wide and per-source sign-in locks
    do not apply to it, so a guesser elsewhere cannot lock the person out of their own browser."""

    __tablename__ = "sign_in_devices"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)


class Invitation(TenantOwned, Base):
    """An existing person asked to join a tenant: a membership only once they accept while signed in, with the
    one-time link the inviting admin passed them (usernames are platform-wide: the account may not be the person
    the admin meant). Only the hash of the link's token is kept; None: an invitation from before links."""

    __tablename__ = "invitations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    invited_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)
    token_hash: Mapped[str | None] = mapped_column(String(64))


class Membership(TenantOwned, Base):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("tenant_id", "user_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ApiKey(TenantOwned, Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    environment: Mapped[str] = mapped_column(String(16), default="dev")
    secret_hash: Mapped[str] = mapped_column(String(64))
    redacted: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    last_used_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)
    scopes: Mapped[list[Any] | None] = mapped_column(JSON)  # None: every scope (keys made before scopes)
    allowed_models: Mapped[list[Any] | None] = mapped_column(JSON)  # None: every model the tenant may use
    previous_secret_hash: Mapped[str | None] = mapped_column(String(64))  # still valid during a rotation's overlap
    previous_secret_expires_at: Mapped[float | None] = mapped_column(Float)
    rotated_at: Mapped[float | None] = mapped_column(Float)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    concurrent_streams: Mapped[int | None] = mapped_column(Integer)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger)
    platform: Mapped[bool] = mapped_column(Boolean, default=False)  # carries its person's platform-admin power


class LoginToken(TenantOwned, Base):
    """A one-time sign-in link; only the hash of its token is kept."""

    __tablename__ = "login_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)
    # "setup": a new person's first sign-in, void once they have a password; "reset": asked for by the person
    # (through the platform operator) to set a new password.
    purpose: Mapped[str] = mapped_column(String(16), default="setup")


class WebSession(TenantOwned, Base):
    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)
    via_link: Mapped[bool] = mapped_column(Boolean, default=False)  # opened by a one-time link, not a password
    platform_until: Mapped[float | None] = mapped_column(Float)  # platform administration (step-up) until then
    # How the person proved who they are: password, link or sso (None: before SSO existed, read as password).
    sign_in_method: Mapped[str | None] = mapped_column(String(16))
    identity_provider_id: Mapped[str | None] = mapped_column(
        String(40), ForeignKey("identity_providers.id", ondelete="CASCADE")
    )
    id_token: Mapped[str | None] = mapped_column(Text)  # the provider's ID token: the hint of RP-initiated logout


class File(TenantOwned, Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    records: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class BaseModel(Base):
    """A shared base model every tenant may use; `ref` is a local path or a hub id."""

    __tablename__ = "base_models"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    ref: Mapped[str] = mapped_column(Text)
    display_name: Mapped[str] = mapped_column(String(255), default="")
    finetune_defaults: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class FineTuningJob(TenantOwned, Base):
    __tablename__ = "fine_tuning_jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(128))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    next_event_seq: Mapped[int] = mapped_column(Integer, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # within its tenant: higher leases first
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    leased_at: Mapped[float | None] = mapped_column(Float)  # last lease: the tenants' round-robin turn
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"kind", "parent_job", "checkpoint"}
    init_adapter: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # start from these adapter blobs (name -> sha)


class JobEvent(TenantOwned, Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class JobCheckpoint(TenantOwned, Base):
    __tablename__ = "job_checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    epoch: Mapped[float | None] = mapped_column(Float)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # file name -> blob sha256
    resumable: Mapped[bool] = mapped_column(Boolean, default=False)  # holds optimizer, schedule and RNG state


class Agent(Base):
    """An enrolled training agent: its NATS user is its id, its password is stored only as a bcrypt hash
    (the form nats-server checks). Not tenant-owned: an agent serves the platform, or one tenant if scoped."""

    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    tenant_scope: Mapped[str | None] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"))
    embedded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    last_seen_at: Mapped[float | None] = mapped_column(Float)
    current_job_id: Mapped[str | None] = mapped_column(String(40))
    revoked_at: Mapped[float | None] = mapped_column(Float)
    # Enrolled by certificate (issue 16): the island it joined, what it may do, and whether it is an island's
    # leaf node rather than an agent. A certificate agent has no secret (secret_hash is empty).
    island: Mapped[str | None] = mapped_column(String(64))
    roles: Mapped[list[Any] | None] = mapped_column(JSON)
    kind: Mapped[str] = mapped_column(String(16), default="agent", server_default="agent")


class EnrollmentToken(Base):
    """A one-time, expiring invitation for a machine to join as an agent or an island's leaf node (its `kind`:
    a token enrolls only that), bound to a scope (the platform, or one tenant), an island and roles (an agent's;
    a leaf's has none). Only the token's sha256 is stored."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_scope: Mapped[str | None] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"))
    island: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="agent", server_default="agent")
    roles: Mapped[list[Any]] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)
    agent_id: Mapped[str | None] = mapped_column(String(40))


class AgentCertificate(Base):
    """A client certificate the platform CA issued to an agent: renewal names it, revocation refuses it."""

    __tablename__ = "agent_certificates"
    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # hex
    agent_id: Mapped[str] = mapped_column(String(40), ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    subject: Mapped[str] = mapped_column(String(255))
    issued_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class Adapter(TenantOwned, Base):
    """A fine-tuned PEFT adapter; its files are blobs listed in `manifest` (name -> sha256)."""

    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the model id, ft:<base>:<tenant>:...
    base_model: Mapped[str] = mapped_column(String(128), ForeignKey("base_models.id"))
    job_id: Mapped[str | None] = mapped_column(String(40))
    method: Mapped[str] = mapped_column(String(16), default="lora")
    rank: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    visibility: Mapped[str] = mapped_column(String(16), default="tenant")
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Dataset(TenantOwned, Base):
    """A named dataset and its card; its content lives in immutable versions."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(Text, default="")
    license: Mapped[str] = mapped_column(String(128), default="")
    contains_protected_data: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class DatasetVersion(TenantOwned, Base):
    """One immutable state of a dataset: normalised records (a blob), how they were made, reports."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "number"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(40), ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    parent_number: Mapped[int | None] = mapped_column(Integer)
    operation: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="processing")
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    format: Mapped[str | None] = mapped_column(String(32))
    source_filename: Mapped[str | None] = mapped_column(String(255))
    source_sha256: Mapped[str | None] = mapped_column(String(64))
    source_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    records: Mapped[int | None] = mapped_column(Integer)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float)


class AdapterShare(TenantOwned, Base):
    """A member an adapter of visibility `shared` is shared with."""

    __tablename__ = "adapter_shares"
    __table_args__ = (UniqueConstraint("adapter_id", "user_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(255), ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class AuditEvent(Base):
    """One security-relevant action; rows form a hash chain (`services.audit`), never updated or deleted.

    Not `TenantOwned`: some events have no tenant (a failed sign-in of an unknown user), and the chain spans
    the platform. `services.audit.list_events` narrows reads to the caller's tenant.
    """

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[float] = mapped_column(Float)
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    actor_user_id: Mapped[str | None] = mapped_column(String(40))
    actor: Mapped[str | None] = mapped_column(String(64))
    actor_key_id: Mapped[str | None] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    ip: Mapped[str | None] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's last link, one row: appenders lock it, so concurrent writers (any process) queue up."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class TenantLimits(Base):
    """Limits a platform admin sets on a tenant (None: unlimited)."""

    __tablename__ = "tenant_limits"
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    concurrent_streams: Mapped[int | None] = mapped_column(Integer)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    max_upload_bytes: Mapped[int | None] = mapped_column(BigInteger)  # below the platform's own limit
    monthly_cost: Mapped[float | None] = mapped_column(Float)  # in Settings.usage_currency, at the platform's prices
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class SpentTransferNonce(Base):
    """An upload URL that was used (`services.transfers`): its nonce's SHA-256, kept until the URL expires, so a
    replay is refused after a restart and by every control-plane process (the key is unique: one use wins)."""

    __tablename__ = "spent_transfer_nonces"
    nonce_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class UsageCounter(Base):
    """The usage ledger: one row per subject (`key:<id>`, `tenant:<id>`) and period (a minute, a month,
    `streams`); limits are conditional updates of these rows, so they hold across server processes."""

    __tablename__ = "usage_counters"
    subject: Mapped[str] = mapped_column(String(96), primary_key=True)
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageRecord(Base):
    """The accounting ledger (`services.usage`): what was used, summed per day and per who/what/where.

    One row per (day, tenant, user, key, model, agent, kind); a dimension that does not apply is "" (not NULL,
    so the row's key is unique on every database). `kind`: completions, embeddings, fine_tuning or compute.
    Rows only ever grow (an upsert adds to them), so the ledger is exact across processes."""

    __tablename__ = "usage_records"
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    tenant_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    user_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    failed_requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    accelerator_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    wall_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class UsageReservation(Base):
    """A request's worst case held against the ledger until it settles (or expires, if its process died)."""

    __tablename__ = "usage_reservations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    holds: Mapped[list[Any]] = mapped_column(JSON)  # [[subject, period, column, amount], ...]
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Conversation(TenantOwned, Base):
    """A saved chat of one user (`services.conversations` also filters by the owning user)."""

    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(Text, default="")  # sealed (services.conversations): longer than 200
    model: Mapped[str | None] = mapped_column(String(255))
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # temperature, max_tokens, top_p
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now, index=True)


class ChatMessage(TenantOwned, Base):
    __tablename__ = "chat_messages"
    __table_args__ = (UniqueConstraint("conversation_id", "seq"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(255))  # the model that wrote an assistant message
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)  # the user stopped it mid-stream
    # the chat completion (chatcmpl-…) that wrote an assistant message: API feedback names the same answer by it
    completion_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class TenantKey(Base):
    """A tenant's data key, wrapped by the master key `master_key_id` (see `storage.crypto`)."""

    __tablename__ = "tenant_keys"
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    master_key_id: Mapped[str] = mapped_column(String(32), index=True)
    wrapped: Mapped[str] = mapped_column(Text)  # base64
    created_at: Mapped[float] = mapped_column(Float, default=now)
    rewrapped_at: Mapped[float | None] = mapped_column(Float)


class Federation(TenantOwned, Base):
    """A federated fine-tuning of the coordinating tenant: its sites' identity keys form the roster."""

    __tablename__ = "federations"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(String(255))
    threshold: Mapped[int | None] = mapped_column(Integer)  # None: a majority of the sites
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # What the coordinator reports (`adaptery federated coordinator --federation`): where sites dial, the sites
    # the run admits, and how far it got. created -> running -> done | failed.
    status: Mapped[str] = mapped_column(String(16), default="created")
    superlink: Mapped[str | None] = mapped_column(String(255))  # HOST:PORT of the coordinator's SuperLink
    superlink_ca: Mapped[str | None] = mapped_column(Text)  # PEM: the CA its TLS certificate chains to
    members: Mapped[list[Any] | None] = mapped_column(JSON)  # the site numbers the coordinator's roster holds
    rounds: Mapped[int | None] = mapped_column(Integer)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the latest stage: {"round", "stage", ...}
    adapter: Mapped[str | None] = mapped_column(String(255))  # the resulting model id, once imported
    error: Mapped[str | None] = mapped_column(Text)


class FederationInvitation(TenantOwned, Base):
    """A one-time, expiring invitation for a site to join a federation with its own key (`adaptery fed join`).
    Only the token's sha256 is stored, as for enrollment tokens."""

    __tablename__ = "federation_invitations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    federation_id: Mapped[str] = mapped_column(String(40), ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))  # the site's name once joined
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float)
    site_id: Mapped[str | None] = mapped_column(String(40))


class FederationRound(TenantOwned, Base):
    """One finished round as the coordinator reported it: the mean loss (None under differential privacy), who
    survived and who dropped, its wall time, and the privacy spent so far."""

    __tablename__ = "federation_rounds"
    __table_args__ = (UniqueConstraint("federation_id", "number"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    federation_id: Mapped[str] = mapped_column(String(40), ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    survivors: Mapped[list[Any]] = mapped_column(JSON)
    seconds: Mapped[float] = mapped_column(Float)
    epsilon: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Evaluation(TenantOwned, Base):
    """An evaluation run: a job on the queue, leased by agents like fine-tuning, whose result is the report's."""

    __tablename__ = "evaluations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # evaljob-...
    user_id: Mapped[str | None] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(16))  # held_out, lm_eval
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)  # the fine-tuning job evaluated
    model: Mapped[str] = mapped_column(String(255), index=True)  # the model evaluated (the candidate)
    base_model: Mapped[str] = mapped_column(String(128))
    models: Mapped[list[Any]] = mapped_column(JSON)  # [{"label": candidate|predecessor|base, "model"}]
    source: Mapped[dict[str, Any]] = mapped_column(JSON)  # what it is evaluated on, and why that
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued, running, succeeded, failed
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"done", "total", "message"}
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    # lm_eval: the short-lived key it calls the API with (indexed: its calls are found to be the evaluation's)
    api_key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    # the API key it was asked for with (None: a browser session, or the platform's own after training): its
    # tokens spend that key's budget as well as the tenant's
    requester_key_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class EvaluationTask(TenantOwned, Base):
    """An lm-evaluation-harness task a tenant uploaded: its checked YAML (as JSON) and its JSONL data (a blob)."""

    __tablename__ = "evaluation_tasks"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # evtask-...
    name: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    data_sha256: Mapped[str] = mapped_column(String(64))
    records: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class FederationSite(TenantOwned, Base):
    """One site of a federation: its number in the roster and its identity public key (OpenSSH, EC NIST)."""

    __tablename__ = "federation_sites"
    __table_args__ = (UniqueConstraint("federation_id", "number"), UniqueConstraint("federation_id", "fingerprint"))
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    federation_id: Mapped[str] = mapped_column(String(40), ForeignKey("federations.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the key's wire bytes, hex: compare out of band
    created_at: Mapped[float] = mapped_column(Float, default=now)
    joined: Mapped[bool] = mapped_column(Boolean, default=False)  # by invitation token (else added out of band)
    last_seen: Mapped[float | None] = mapped_column(Float)  # its last signed check-in (`fed join` keeps them up)
    # the signed time (Unix milliseconds) of that check-in: a check-in must be newer, so none can be replayed
    last_check_in: Mapped[int | None] = mapped_column(BigInteger)


class IdentityProvider(Base):
    """An OpenID Connect provider people sign in with (`services.sso`). Platform-wide: platform admins add
    them (or `ADAPTERY_OIDC_PROVIDERS` does, `managed_by_settings`), and bind each to the tenants that trust it.
    A client secret given through the API is kept sealed under the master key; a settings one stays there."""

    __tablename__ = "identity_providers"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    issuer: Mapped[str] = mapped_column(String(512))
    client_id: Mapped[str] = mapped_column(String(255))
    secret_sealed: Mapped[str | None] = mapped_column(Text)  # base64 of AES-GCM under the master key
    secret_key_id: Mapped[str | None] = mapped_column(String(32))  # which master key sealed it
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    groups_claim: Mapped[str] = mapped_column(String(64), default="groups")
    username_claim: Mapped[str] = mapped_column(String(64), default="preferred_username")
    managed_by_settings: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class TenantIdentityProvider(TenantOwned, Base):
    """A tenant trusts a provider: its people may sign in there, by the tenant's role rules."""

    __tablename__ = "tenant_identity_providers"
    __table_args__ = (UniqueConstraint("tenant_id", "provider_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(String(40), ForeignKey("identity_providers.id", ondelete="CASCADE"))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class SsoRoleRule(TenantOwned, Base):
    """A tenant admin's rule: people whose provider lists this group get this role (the highest rule wins)."""

    __tablename__ = "sso_role_rules"
    __table_args__ = (UniqueConstraint("tenant_id", "provider_id", "group_name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(String(40), ForeignKey("identity_providers.id", ondelete="CASCADE"))
    group_name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class SsoIdentity(Base):
    """A person as a provider knows them: (provider, subject) is the only thing that links a sign-in to a
    user; an email or username the provider asserts never does."""

    __tablename__ = "sso_identities"
    __table_args__ = (UniqueConstraint("provider_id", "subject"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_id: Mapped[str] = mapped_column(String(40), ForeignKey("identity_providers.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(40), ForeignKey("users.id", ondelete="CASCADE"), index=True)
    email: Mapped[str | None] = mapped_column(String(320))  # as last asserted: shown, never trusted
    groups: Mapped[list[Any] | None] = mapped_column(JSON)  # as last asserted
    created_at: Mapped[float] = mapped_column(Float, default=now)
    last_sign_in_at: Mapped[float | None] = mapped_column(Float)


class OidcSignIn(Base):
    """A sign-in on its way through a provider: the `state` (hashed) it must come back with, the browser it
    must come back to (the hash of a cookie), the `nonce` the ID token must carry and the PKCE verifier.
    Used once; expires in minutes."""

    __tablename__ = "oidc_sign_ins"
    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    browser_hash: Mapped[str] = mapped_column(String(64))
    provider_id: Mapped[str] = mapped_column(String(40), ForeignKey("identity_providers.id", ondelete="CASCADE"))
    tenant_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"))
    nonce: Mapped[str] = mapped_column(String(64))
    code_verifier: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class TenantSignInPolicy(Base):
    """How a tenant's people may sign in to it besides its providers (no row: passwords and links allowed)."""

    __tablename__ = "tenant_sign_in_policies"
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    password_sign_in: Mapped[bool] = mapped_column(Boolean, default=True)
    link_sign_in: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class FeedbackPolicy(Base):
    """What a tenant collects of its chats and who reads it (`services.feedback`); no row: nothing collected."""

    __tablename__ = "feedback_policies"
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    collect: Mapped[str] = mapped_column(String(16), default="off")  # off, feedback, all
    readers: Mapped[str] = mapped_column(String(16), default="owners")  # admins, owners, members
    updated_by: Mapped[str | None] = mapped_column(String(40))
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class Completion(TenantOwned, Base):
    """A chat completion the platform kept (policy `all`) so feedback can name it by its `chatcmpl-` id.
    `prompt` (canonical messages, JSON) and `answers` (one text per choice, JSON) are sealed with the tenant's key."""

    __tablename__ = "completions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(40))
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(255))
    prompt: Mapped[str] = mapped_column(Text)
    answers: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)


class Feedback(TenantOwned, Base):
    """One person's word on one answer: a rating (+1/-1) with a reason, a corrected answer, or both.

    The answer it is about is kept beside it (`prompt`, `answer`, sealed), with its lineage: the kept
    completion, or the web chat's conversation and message. One row per person and answer: giving feedback
    again updates it."""

    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(40), index=True)
    completion_id: Mapped[str | None] = mapped_column(String(64), index=True)
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    conversation_id: Mapped[str | None] = mapped_column(String(40))
    message_id: Mapped[str | None] = mapped_column(String(40), index=True)
    battle_id: Mapped[str | None] = mapped_column(String(40), index=True)  # a rating of an arena answer
    model: Mapped[str] = mapped_column(String(255), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    rating: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text, default="")
    correction: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class ArenaBattle(TenantOwned, Base):
    """One prompt answered blind by two models of one base; `winner` a, b or tie once the person votes."""

    __tablename__ = "arena_battles"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(40), index=True)
    base_model: Mapped[str] = mapped_column(String(128), index=True)
    model_a: Mapped[str] = mapped_column(String(255))
    model_b: Mapped[str] = mapped_column(String(255))
    prompt: Mapped[str] = mapped_column(Text)  # sealed canonical messages
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    answer_a: Mapped[str | None] = mapped_column(Text)  # sealed, once its stream ended
    answer_b: Mapped[str | None] = mapped_column(Text)
    completion_a: Mapped[str | None] = mapped_column(String(64))  # each side's chat completion id
    completion_b: Mapped[str | None] = mapped_column(String(64))
    answered_a: Mapped[str | None] = mapped_column(String(255))  # the adapter that answered (a name's version)
    answered_b: Mapped[str | None] = mapped_column(String(255))
    winner: Mapped[str | None] = mapped_column(String(8))
    voted_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)


class AdapterEvaluationSet(TenantOwned, Base):
    """The evaluation set an owner keeps beside an adapter: its later versions are evaluated on it too."""

    __tablename__ = "adapter_evaluation_sets"
    model_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ModelName(TenantOwned, Base):
    """A stable model id clients call (`ft:<base>:<tenant>:<name>`); it answers from its current version, and
    a canary share of its requests from a candidate version (`services.model_names`)."""

    __tablename__ = "model_names"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(String(128), ForeignKey("base_models.id"))
    current_version: Mapped[int | None] = mapped_column(Integer)
    canary_version: Mapped[int | None] = mapped_column(Integer)
    canary_share: Mapped[float] = mapped_column(Float, default=0.0)  # percent of requests, 0-100
    created_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class ModelNameVersion(TenantOwned, Base):
    """An adapter numbered as a version of a name. No foreign key to the adapter: a deleted adapter's version
    stays in the list (and says so) rather than vanishing from the name's history."""

    __tablename__ = "model_name_versions"
    __table_args__ = (UniqueConstraint("name_id", "number"), UniqueConstraint("name_id", "adapter_id"))
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_id: Mapped[str] = mapped_column(String(255), ForeignKey("model_names.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    adapter_id: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[str | None] = mapped_column(String(40))  # the job that trained it from the name, if one did
    added_by: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ModelNamePromotion(TenantOwned, Base):
    """One change of what a name answers from: create, promote, rollback, canary, canary_end (its history)."""

    __tablename__ = "model_name_promotions"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_id: Mapped[str] = mapped_column(String(255), ForeignKey("model_names.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    canary_share: Mapped[float | None] = mapped_column(Float)
    actor_user_id: Mapped[str | None] = mapped_column(String(40))
    actor: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ModelNameRequest(TenantOwned, Base):
    """Which version of a name answered one completion (its id, `chatcmpl-…`/`cmpl-…`): feedback and usage of a
    canary are counted apart from the current version's through it."""

    __tablename__ = "model_name_requests"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name_id: Mapped[str] = mapped_column(String(255), ForeignKey("model_names.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    adapter_id: Mapped[str] = mapped_column(String(255))
    canary: Mapped[bool] = mapped_column(Boolean, default=False)
    user_id: Mapped[str | None] = mapped_column(String(40))  # who asked: a web message may claim only its own
    created_at: Mapped[float] = mapped_column(Float, default=now)
