"""Shared fixtures: a database per test run (SQLite, and PostgreSQL when configured), the demo model
built once, platforms in-process, and real server processes."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from adaptery.db.session import Database, normalise_url
from adaptery.engine.demo_model import DEMO_MODEL_ID, build_demo_model

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CHAT = REPO / "adaptery" / "samples" / "demo-chat.jsonl"
PG_URL = os.environ.get("ADAPTERY_TEST_DATABASE_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base model, built once per test session (deterministic, a few seconds)."""
    return build_demo_model(tmp_path_factory.mktemp("models") / DEMO_MODEL_ID)


class PostgresDatabases:
    """Each test gets a fresh database on the configured server, dropped afterwards.

    A migrated one is cloned from a template migrated once per test process (`CREATE DATABASE ... TEMPLATE`, about
    0.1 s against 0.6 s for creating and migrating one); `migrated=False` gives an empty one (the migration tests)."""

    def __init__(self, url: str) -> None:
        self.admin_url = normalise_url(url)
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0
        self._template: str | None = None

    def _admin(self):  # noqa: ANN202 - a psycopg connection
        import psycopg

        return psycopg.connect(self.admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

    def _url(self, name: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def create(self, migrated: bool = True) -> str:
        if migrated and self._template is None:
            template = f"adaptery_test_{self.run_id}_template"
            with self._admin() as conn:
                conn.execute(f'CREATE DATABASE "{template}"')
            database = Database(self._url(template))
            database.migrate()
            database.dispose()  # a template takes no connections while it is copied
            self._template = template
        self.count += 1
        name = f"adaptery_test_{self.run_id}_{self.count}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{self._template}"' if migrated else ""))
        return self._url(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._template is not None:
            self.drop(self._url(self._template))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases | None]:
    databases = PostgresDatabases(PG_URL) if PG_URL else None
    yield databases
    if databases is not None:
        databases.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once per test process; each test gets a copy (0.3 s of migrations saved)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "adaptery.db"
    database = Database(f"sqlite:///{path}")
    database.migrate()
    database.dispose()  # the last connection checkpoints the write-ahead log into the file
    assert not path.with_name(path.name + "-wal").exists() or not path.with_name(path.name + "-wal").stat().st_size
    return path


@pytest.fixture(params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresDatabases | None, sqlite_template: Path
) -> Iterator[str]:
    """A fresh database of the test's own, already migrated to the newest schema (the migrations themselves are
    tested from empty databases in tests/integration/test_migrations.py)."""
    if request.param == "sqlite":
        shutil.copyfile(sqlite_template, tmp_path / "adaptery.db")
        yield f"sqlite:///{tmp_path / 'adaptery.db'}"
        return
    url = postgres.create()
    yield url
    postgres.drop(url)


@pytest.fixture(params=BACKENDS)
def empty_database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresDatabases | None
) -> Iterator[str]:
    """A fresh database with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    url = postgres.create(migrated=False)
    yield url
    postgres.drop(url)


def prepare_data_dir(data_dir: Path, demo_model_dir: Path) -> Path:
    """A data dir with the prebuilt demo model in place, so a platform start skips the build."""
    target = data_dir / "models" / DEMO_MODEL_ID
    if not target.exists():
        shutil.copytree(demo_model_dir, target)
    return data_dir


def link_token(url: str) -> str:
    """The token of a one-time link (sign-in or accept)."""
    return parse_qs(urlsplit(url).query)["token"][0]


def use_sign_in_link(client: httpx.Client, url: str) -> httpx.Response:
    """What the button on a sign-in link's page does (opening the link itself spends nothing)."""
    return client.post("/api/auth/link", json={"token": link_token(url)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    api_key: str
    login_url: str
    data_dir: Path
    database_url: str
    log_path: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "ADAPTERY_DATA_DIR": str(self.data_dir), "ADAPTERY_DATABASE_URL": self.database_url}

    def cli(self, *args: str, key: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**self.env(), "ADAPTERY_BASE_URL": self.url, "ADAPTERY_API_KEY": key or self.api_key, "COLUMNS": "250"}
        return subprocess.run(
            [sys.executable, "-m", "adaptery.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(data_dir: Path, database_url: str, *, extra_env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    log_path = data_dir.parent / f"server-{port}.log"
    env = {
        **os.environ,
        "ADAPTERY_DATA_DIR": str(data_dir),
        "ADAPTERY_DATABASE_URL": database_url,
        "ADAPTERY_PORT": str(port),
        "ADAPTERY_JOB_HEARTBEAT_SECONDS": "1",
        "ADAPTERY_AGENT_POLL_SECONDS": "0.3",
        **(extra_env or {}),
    }
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "adaptery.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # a loaded machine took over 120 s to start a server (empty log)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        process.kill()
        raise RuntimeError(f"server did not answer in time:\n{log_path.read_text()}")
    text = log_path.read_text()
    key = re.search(r"^ADAPTERY_API_KEY=(\S+)$", text, re.M)
    login = re.search(r"^ADAPTERY_LOGIN_URL=(\S+)$", text, re.M)
    return ServerProcess(
        process, url, key.group(1) if key else "", login.group(1) if login else "", data_dir, database_url, log_path
    )


def stop_server(server: ServerProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture
def server(tmp_path: Path, database_url: str, demo_model_dir: Path) -> Iterator[ServerProcess]:
    """A real `adaptery serve` process on a free loopback port, with a fresh data dir and database."""
    data_dir = prepare_data_dir(tmp_path / "data", demo_model_dir)
    running = start_server(data_dir, database_url)
    yield running
    stop_server(running)


@functools.cache
def ca_pem() -> str:
    """A self-signed CA certificate in PEM: what a coordinator publishes as its SuperLink's CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()
