"""In-process platforms behind FastAPI's TestClient: real database, blobs, engine and agent."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from adaptery.api.app import create_app
from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.platform import FirstStart, Platform
from adaptery.services import tenants
from adaptery.settings import Settings
from tests.conftest import prepare_data_dir


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A migrated database of the test's own, for tests below the API (queue, tenancy, storage)."""
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


@dataclass
class Running:
    platform: Platform
    client: TestClient
    first: FirstStart

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.first.api_key}"}

    @property
    def tenant_id(self) -> str:
        """The first tenant's id (blobs are stored per tenant)."""
        with self.platform.db.system() as s:
            return s.scalar(select(m.Tenant.id).where(m.Tenant.name == self.first.tenant))

    def new_tenant(self, name: str, owner: str) -> tenants.NewTenant:
        with self.platform.db.system() as s:
            return tenants.create_tenant(s, name, owner, login_link_hours=1, invitation_days=1)


def make_settings(tmp_path: Path, database_url: str, demo_model_dir: Path, **overrides: object) -> Settings:
    return Settings(
        data_dir=prepare_data_dir(tmp_path / "data", demo_model_dir),
        database_url=database_url,
        job_heartbeat_seconds=0.5,
        agent_poll_seconds=0.2,
        **overrides,
    )


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {}


@pytest.fixture
def running(
    tmp_path: Path, database_url: str, demo_model_dir: Path, settings_overrides: dict[str, object]
) -> Iterator[Running]:
    platform = Platform(make_settings(tmp_path, database_url, demo_model_dir, **settings_overrides))
    first = platform.prepare()
    with TestClient(create_app(platform)) as client:
        yield Running(platform, client, first)
