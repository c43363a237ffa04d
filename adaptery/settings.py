"""The one home of configuration: every option is an `ADAPTERY_*` environment variable."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTERY_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("data"), description="Database (SQLite default), blobs, models, job work dirs.")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(None, description="How users reach the server; defaults to http://host:port.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in the data dir.")
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
    device: str = "auto"
    train_threads: int | None = Field(
        None, ge=1, description="Torch threads of a training process; default: all usable CPUs but one."
    )

    bootstrap_tenant: str = "default"
    bootstrap_username: str = "owner"

    max_upload_bytes: int = 512 * 1024 * 1024
    max_lora_rank: int = 64
    max_output_tokens: int = 2048
    job_lease_seconds: float = 60.0
    job_heartbeat_seconds: float = 5.0
    job_max_attempts: int = 3
    agent_poll_seconds: float = 1.0
    session_hours: float = 12.0
    login_link_hours: float = 24.0
    login_max_failures: int = 5
    login_lockout_seconds: float = 300.0

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

    @cached_property
    def tls_dir(self) -> Path:
        return self.data_dir.resolve() / "tls"

    @cached_property
    def blobs_dir(self) -> Path:
        return self.data_dir.resolve() / "blobs"

    @cached_property
    def models_dir(self) -> Path:
        return self.data_dir.resolve() / "models"

    @cached_property
    def work_dir(self) -> Path:
        """Scratch space of running jobs and unpacked adapters; safe to delete when stopped."""
        return self.data_dir.resolve() / "work"
