"""The one home of configuration: every option is an `ADAPTERY_*` environment variable."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


class KernelSettings(BaseSettings):
    """What the engine's fused LoRA kernel reads when it is built: read on its own, so an engine used as a library
    does not fail on another setting's bad value (Settings has these too)."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERY_", env_file=None, extra="ignore")

    lora_kernel: bool = Field(True, description="Use the fused C LoRA kernel (built on first use); false: PyTorch.")
    kernel_cache: Path = Field(
        default_factory=lambda: _user_cache_dir() / "adaptery" / "kernels",
        description="Where built kernels are kept; default: $XDG_CACHE_HOME/adaptery/kernels.",
    )
    c_compiler: str | None = Field(
        None,
        validation_alias=AliasChoices("ADAPTERY_CC", "CC"),
        description="The C compiler that builds the kernel (ADAPTERY_CC or CC); default: gcc, then cc.",
    )


class ClientSettings(BaseSettings):
    """What the CLI's HTTP-client commands read: where the platform is and the caller's key."""

    model_config = SettingsConfigDict(env_prefix="ADAPTERY_", env_file=None, extra="ignore")

    base_url: str = Field("http://127.0.0.1:8000", description="The platform the CLI talks to (a trailing /v1 is ok).")
    api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ADAPTERY_API_KEY", "OPENAI_API_KEY"), description="The caller's API key."
    )


class OidcProviderSettings(BaseModel):
    """An OpenID Connect provider from the settings (`ADAPTERY_OIDC_PROVIDERS`, a JSON list of these)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name: the sign-in URL's /auth/oidc/<name>/start, and what tenants bind.")
    issuer: str = Field(description="The provider's issuer URL (its discovery document is <issuer>/.well-known/…).")
    client_id: str
    client_secret: SecretStr | None = Field(None, description="None: a public client (PKCE alone).")
    display_name: str = Field("", description="What the sign-in button says; default: the name.")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile", "groups"])
    groups_claim: str = Field("groups", description="The claim listing the person's groups.")
    username_claim: str = Field("preferred_username", description="The claim a new person's username comes from.")


class Settings(KernelSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERY_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("data"), description="Database (SQLite default), blobs, models, job work dirs.")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(None, description="How users reach the server; defaults to http://host:port.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in the data dir.")
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite only (PostgreSQL is unaffected): NORMAL, SQLite's advice under WAL, syncs the log at "
        "checkpoints, not at every commit; the database stays consistent through any crash, and only the last "
        "transactions before a power loss or OS crash (not a process crash) can be lost. FULL syncs every commit "
        "(about 7 ms each here under load, two or three per inference request).",
    )
    tls: bool = Field(False, description="Serve HTTPS with a certificate from the platform's own CA.")
    tls_cert: Path | None = Field(None, description="Serve HTTPS with this certificate (chain) instead.")
    tls_key: Path | None = None
    insecure_listen: bool = Field(
        False, description="Allow plain HTTP on a non-loopback address (only behind a TLS-terminating proxy)."
    )

    embedded_agent: bool = Field(True, description="Run a training agent inside `serve`.")
    demo_model: bool = Field(True, description="Build and serve the offline demo base model.")
    base_models: list[str] = Field(default_factory=list, description="Extra base models: hub ids or paths.")
    offline: bool = Field(True, description="Never reach a model hub; hub ids must already be cached.")
    embedding_model: str = "all-MiniLM-L6-v2"
    embeddings_max_request_tokens: int = Field(
        65536,
        description="The most tokens one /v1/embeddings request may hold after each input is cut to what the model "
        "reads (OpenAI allows 300k; ~10 s of this CPU's time), so one request cannot occupy the model for minutes.",
    )
    device: str = "auto"
    engine_dtype: str = Field("auto", description="Inference dtype: auto (bf16 if the CPU has it), float32, bfloat16.")
    engine_kv_cache_mb: int = Field(512, ge=1, description="KV-cache memory budget per base model (MiB).")
    engine_adapter_cache_mb: int = Field(1024, ge=1, description="Memory budget of prepared adapters per base (MiB).")
    engine_max_batch: int = Field(32, ge=1, description="Sequences in one running batch (and adapters in it).")
    engine_request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="A generation still in the engine this long after it was submitted (queued or running) is "
        "ended with an error, and its batch slot and KV blocks freed.",
    )
    engine_max_bytes_per_token: int = Field(
        32,
        ge=1,
        description="A prompt of more bytes than the model's context × this is refused before it is tokenised "
        "(text averages a few bytes a token).",
    )
    engine_quantize: Literal["none", "int8"] = Field(
        "none", description="Base weights of the native path: none, or int8 via torchao (the extra adaptery[int8])."
    )
    allocator: str = Field(
        "auto",
        description="The serving process's memory allocator, preloaded at start: auto (tcmalloc, else jemalloc, "
        "else the system's), tcmalloc, jemalloc, system, or a library's path.",
    )
    engine_adapter_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Adapters in memory on the fused kernel: auto (bfloat16: half the memory and of what each "
        "distinct adapter streams per step; for a float32 engine the adapter weights are rounded to bf16 and "
        "computed with fp32 accumulation, bench/adapter_dtype.py measures the effect), float32 (exact), or "
        "bfloat16. The PyTorch path (no compiler) always computes adapters in fp32.",
    )
    train_threads: int | None = Field(
        None, ge=1, description="Torch threads of a training process; default: all usable CPUs but one."
    )

    master_key: SecretStr | None = Field(
        None,
        description="Master key(s) as base64, newest first (`new,old`); default: the 0600 key file in the data dir.",
    )
    new_master_key: SecretStr | None = Field(
        None, description="`keys rotate-master` with ADAPTERY_MASTER_KEY: the new key (default: one made and printed)."
    )

    bootstrap_tenant: str = "default"
    bootstrap_username: str = "owner"

    max_upload_bytes: int = 512 * 1024 * 1024
    max_adapter_bytes: int = Field(
        4 * 1024 * 1024 * 1024, ge=1, description="Largest imported adapter zip once unpacked (all its files together)."
    )
    max_record_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Largest dataset record in bytes (a JSONL line, JSON array element, CSV row, text line or "
        "document): a longer one is reported as invalid without being parsed.",
    )
    dataset_workers: int = Field(
        2, ge=1, description="Threads processing dataset versions: tenants in turn, at most one version per tenant."
    )
    chat_template_max_chars: int = Field(
        2_000_000, ge=1, description="Longest text a chat template may render, or build on the way to it."
    )
    chat_template_max_steps: int = Field(
        1_000_000, ge=1, description="Loop iterations, calls and operations one rendering of a chat template may take."
    )
    chat_template_seconds: float = Field(2.0, gt=0, description="Longest one rendering of a chat template may run.")
    max_lora_rank: int = 64
    max_output_tokens: int = 2048
    job_lease_seconds: float = 60.0
    job_heartbeat_seconds: float = 5.0
    job_max_attempts: int = 3
    agent_poll_seconds: float = 1.0
    job_checkpoint_every_steps: int = Field(
        100, ge=1, description="Training checkpoints every this many steps (and at every epoch's end)."
    )
    job_tenant_concurrency: int | None = Field(
        2, ge=1, description="Fine-tuning jobs one tenant may run at once (fairness); None: no limit."
    )
    nats_url: str | None = Field(
        None,
        description="The agents' NATS server. serve: use this external one instead of starting its own; "
        "agent: where to dial (default: the URL a serve on this data dir wrote).",
    )
    nats_user: str | None = Field(None, description="The control plane's user on an external NATS server.")
    nats_password: str | None = None
    nats_host: str = Field("127.0.0.1", description="Where serve's own NATS server listens (0.0.0.0: other hosts).")
    nats_port: int = Field(0, ge=0, description="Port of serve's own NATS server; 0: a free one, kept across restarts.")
    agent_backend: Literal["local", "slurm"] = Field(
        "local", description="Where a standalone agent trains: on its own machine, or through Slurm (a login node)."
    )
    slurm_partition: str | None = Field(None, description="Slurm backend: the partition jobs go to (sbatch default).")
    slurm_account: str | None = Field(None, description="Slurm backend: the account jobs are charged to.")
    slurm_time_limit: str | None = Field(None, description="Slurm backend: each job's time limit (e.g. 1-00:00:00).")
    slurm_memory: str | None = Field(None, description="Slurm backend: memory per node (sbatch --mem, e.g. 64G).")
    slurm_gpus: bool = Field(False, description="Slurm backend: one GPU per training process (--gpus-per-node).")
    slurm_cpus_per_process: int = Field(1, ge=1, description="Slurm backend: CPUs per training process.")
    slurm_extra_options: list[str] = Field(
        default_factory=list, description='Slurm backend: more sbatch options, as JSON (["--qos=high"]).'
    )
    slurm_python: str | None = Field(
        None, description="Slurm backend: the Python on the compute nodes with adaptery; default: the agent's."
    )
    slurm_poll_seconds: float = Field(2.0, gt=0, description="Slurm backend: how often squeue is asked.")
    agent_credentials: str | None = Field(
        None, description="A standalone agent's 'agent-…:secret', printed once by `adaptery agents create`."
    )
    agent_roles: str = Field("train", description="A standalone agent's roles, comma-separated: train, infer.")
    agent_bases: list[str] = Field(
        default_factory=list, description="An infer agent's base models: local paths ([ID=]PATH); none: the demo model."
    )
    agent_max_adapters: int = Field(32, ge=1, description="Adapters an infer agent keeps downloaded (LRU).")
    agent_torch_threads: int | None = Field(None, ge=1, description="An agent's torch threads (default: torch's).")
    agent_engine: Literal["native", "vllm"] = Field(
        "native",
        description="What an infer agent serves with: Adaptery's own engine, or vLLM (`vllm serve`, from its own "
        "environment at `vllm_env`, built on first use).",
    )
    vllm_env: Path = Field(
        default_factory=lambda: _user_cache_dir() / "adaptery" / "vllm-env",
        description="vLLM's virtualenv (`make vllm-env` builds it); default: $XDG_CACHE_HOME/adaptery/vllm-env.",
    )
    vllm_max_loras: int = Field(4, ge=1, description="vLLM: adapters in one running batch (--max-loras).")
    vllm_tensor_parallel_size: int | None = Field(
        None, ge=1, description="vLLM: GPUs one base is split across; default: every GPU of the machine."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM: the share of GPU memory it may take, split between the agent's bases."
    )
    vllm_start_timeout_seconds: float = Field(
        900.0, gt=0, description="vLLM: how long its server may take to become healthy before the agent gives up."
    )
    vllm_extra_args: list[str] = Field(
        default_factory=list, description='vLLM: more `vllm serve` options, as JSON (["--enforce-eager"]).'
    )
    agent_announce_seconds: float = Field(
        2.0, gt=0, description="An infer agent announces its state this often (and at once on a change)."
    )
    agent_announce_missed: int = Field(3, ge=1, description="Announcements an infer agent may miss before it is lost.")
    agent_stream_coalesce_seconds: float = Field(
        0.02,
        ge=0,
        le=1,
        description="An infer agent sends a request's first delta at once and the ones that follow within this "
        "window as one message (texts joined, token counts added; a finishing delta at once): each message costs "
        "the control plane and NATS about the same whatever it carries. 0: one message per engine delta.",
    )
    inference_stream_idle_seconds: float = Field(
        3.0, gt=0, description="An infer agent's stream silent this long (keepalives come every 0.5 s): it is lost."
    )
    inference_first_token_seconds: float = Field(
        30.0,
        gt=0,
        description="An infer agent that accepted a request and sends only keepalives, no token, for this long: "
        "the request is retried on another agent (the client sees nothing) and this agent is taken as lost until "
        "it announces again.",
    )
    agent_requests_per_second: float = Field(
        200.0, gt=0, description="Requests one agent may make of the control plane per second (sustained)."
    )
    agent_request_burst: int = Field(
        400, ge=1, description="Requests one agent may make at once above its rate; beyond, they are shed."
    )
    agent_requests_in_flight: int = Field(
        4, ge=1, description="Requests of one agent the control plane works on at once; beyond, they are shed."
    )
    inference_routing: Literal["affinity", "random"] = Field(
        "affinity", description="How requests are placed on infer agents (random: only to measure against)."
    )
    # The fabric (issue 16): agents and islands on other machines, by certificate over mutual TLS.
    fabric_port: int | None = Field(
        None,
        ge=0,
        description="serve: where enrolled agents dial the hub's NATS over mutual TLS (a second nats-server in a "
        "cluster with the loopback one); None: no fabric, agents by password on loopback only.",
    )
    fabric_leaf_port: int | None = Field(
        None, ge=0, description="serve: where islands' leaf nodes dial the hub over mutual TLS; None: no islands."
    )
    fabric_host: str = Field("0.0.0.0", description="serve: the address the fabric's two ports listen on.")
    fabric_public_host: str | None = Field(
        None, description="The host agents and islands dial (told at enrollment); default: the public URL's host."
    )
    tls_names: list[str] = Field(
        default_factory=list, description="Extra DNS names or IP addresses the platform's server certificate covers."
    )
    ca_cert: Path | None = Field(None, description="An external CA's certificate (PEM) to sign agents with.")
    ca_key: Path | None = Field(None, description="That CA's private key (PEM, unencrypted, kept 0600).")
    agent_certificate_hours: float = Field(
        24.0, gt=0, description="Lifetime of an agent's client certificate; it renews at 2/3 of it."
    )
    transfer_key: SecretStr | None = Field(
        None, description="Signs the presigned URLs agents move artifacts with (default: a 0600 file in the data dir)"
    )
    transfer_url_seconds: float = Field(
        300.0, gt=0, le=3600, description="How long a presigned artifact URL handed to an agent stays usable."
    )
    enrollment_token_max_hours: float = Field(
        168.0, gt=0, description="The longest an enrollment token may stay usable."
    )
    agent_identity: Path | None = Field(
        None, description="agent: the directory `adaptery agent enroll --dir` wrote (key, certificate, CA)."
    )
    session_hours: float = 12.0
    login_link_hours: float = 24.0
    login_max_failures: int = Field(5, description="Failed sign-ins from one source to one account before a lock.")
    login_lockout_seconds: float = Field(300.0, description="First lock; each further failure doubles it.")
    login_max_lockout_seconds: float = Field(3600.0, description="The longest a lock lasts.")
    login_max_failures_per_source: int = Field(30, description="Failures from one source, any accounts, before a lock.")
    login_max_failures_per_account: int = Field(
        200, description="Failures on one account from every source before it locks (a distributed guess)."
    )
    sign_in_device_days: float = Field(
        180.0, description="How long a browser that signed in with a password is spared the wider sign-in locks."
    )
    login_failure_window_seconds: float = Field(3600.0, description="Failures older than this are forgotten.")
    platform_session_minutes: float = Field(15.0, description="How long a platform-administration step-up lasts.")
    oidc_providers: list[OidcProviderSettings] = Field(
        default_factory=list,
        description='OpenID Connect providers, as JSON: [{"name", "issuer", "client_id", "client_secret", ...}]. '
        "Platform admins add more through the API; either way a provider signs people in to a tenant only once "
        "a platform admin binds it to that tenant.",
    )
    oidc_sign_in_minutes: float = Field(10.0, gt=0, description="How long a person has to finish at their provider.")
    oidc_clock_skew_seconds: float = Field(
        60.0, ge=0, description="Clock difference allowed when an ID token's expiry and issue time are checked."
    )
    oidc_metadata_seconds: float = Field(
        3600.0, gt=0, description="How long a provider's discovery document and keys are kept before a refetch."
    )
    oidc_jwks_refresh_seconds: float = Field(
        30.0,
        ge=0,
        description="An ID token signed with a key we do not know refetches the provider's keys (its key rotation), "
        "at most this often.",
    )
    oidc_http_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of each request to a provider.")
    invitation_days: float = Field(14.0, description="How long an existing person has to accept an invitation.")
    max_json_bytes: int = Field(
        16 * 1024 * 1024,
        description="Largest JSON request body (uploads are not JSON), or JSON file of an imported adapter.",
    )
    max_json_depth: int = Field(
        64,
        description="Deepest nesting of arrays/objects accepted in JSON from outside: a request body, a dataset "
        "record, an imported adapter's config.",
    )
    usage_prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Prices that turn the usage ledger into cost (set by platform admins): model or base model id -> "
        '{"prompt": .., "completion": .., "embedding": .., "trained": ..} in `usage_currency` per million tokens; '
        'and the key "compute" -> {"cpu": .., "accelerator": ..} per hour. An adapter costs what its base does '
        "unless it is listed itself.",
    )
    usage_currency: str = Field("usd", description="The currency of `usage_prices` (a label only).")
    request_body_timeout_seconds: float = Field(
        60.0, description="A client that sends nothing of its request body for this long is cut off."
    )

    @property
    def inference_hold_seconds(self) -> float:
        """How long an inference call's hold on the limits (its tokens and its concurrency slot) outlives a process
        that died before settling it: the engine's deadline, and a minute to hand the answer back."""
        return self.engine_request_timeout_seconds + 60

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'adaptery.db'}"

    @property
    def serves_tls(self) -> bool:
        return self.tls or self.tls_cert is not None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.serves_tls else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return (self.public_url or f"{scheme}://{host}:{self.port}").rstrip("/")

    @property
    def fabric_enabled(self) -> bool:
        return self.fabric_port is not None or self.fabric_leaf_port is not None

    @property
    def fabric_dial_host(self) -> str:
        """The host agents and islands are told to dial."""
        if self.fabric_public_host:
            return self.fabric_public_host
        return urlsplit(self.base_url).hostname or "127.0.0.1"

    @property
    def server_names(self) -> tuple[str, ...]:
        """What the platform's server certificate covers beyond the listen host: HTTPS and the fabric alike."""
        names = tuple(self.tls_names)
        if self.fabric_enabled:
            names += (self.fabric_dial_host,)
            if self.fabric_host not in ("0.0.0.0", "::"):
                names += (self.fabric_host,)
        return names

    @cached_property
    def tls_dir(self) -> Path:
        return self.data_dir.resolve() / "tls"

    @cached_property
    def blobs_dir(self) -> Path:
        return self.data_dir.resolve() / "blobs"

    @cached_property
    def master_key_file(self) -> Path:
        """The master key (0600, made on first start) unless ADAPTERY_MASTER_KEY gives it."""
        return self.data_dir.resolve() / "keys" / "master.key"

    @cached_property
    def agent_key_file(self) -> Path:
        """A standalone agent's own key (0600, made on first start): seals the adapters and bases it keeps."""
        return self.data_dir.resolve() / "keys" / "agent.key"

    @cached_property
    def transfer_key_file(self) -> Path:
        """The key presigned artifact URLs are signed with (0600, made on first start) unless transfer_key is set."""
        return self.data_dir.resolve() / "keys" / "transfer.key"

    @cached_property
    def models_dir(self) -> Path:
        return self.data_dir.resolve() / "models"

    @cached_property
    def nats_dir(self) -> Path:
        """serve's own NATS server: its generated configuration (0600), port and log."""
        return self.data_dir.resolve() / "nats"

    @cached_property
    def work_dir(self) -> Path:
        """Scratch space of a standalone agent's jobs; safe to delete when stopped. (serve keeps its transient
        plaintext, such as unpacked adapters and the embedded agent's jobs, in a 0700 temp dir outside the data dir.)"""
        return self.data_dir.resolve() / "work"
