"""Engine, sessions and migrations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from adaptery.db import tenancy  # noqa: F401 - registers the tenant filter on every Session
from adaptery.storage.modes import PRIVATE_FILE, tighten

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and use the psycopg 3 driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def private_sqlite_file(url: str) -> None:
    """Make the database file readable by its owner only before SQLite opens it, and tighten one of ours.

    SQLite creates the file under the process's umask (0644 as a rule) and gives its -wal, -shm and -journal
    files the database file's own mode: a 0600 database keeps them all 0600.
    """
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))  # an empty file: an empty db
    except FileExistsError:
        for suffix in ("", "-wal", "-shm", "-journal"):
            tighten(path.with_name(path.name + suffix), PRIVATE_FILE)
    except FileNotFoundError:
        pass  # no such directory: SQLite says so when it connects


def make_engine(url: str, sqlite_synchronous: str | None = None) -> Engine:
    """`sqlite_synchronous` (NORMAL or FULL; None: SQLite's own default, FULL): see `Settings.sqlite_synchronous`."""
    url = normalise_url(url)
    if sqlite_synchronous not in (None, "NORMAL", "FULL"):
        raise ValueError(f"sqlite_synchronous must be NORMAL or FULL, not {sqlite_synchronous!r}")
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        database = make_url(url).database
        pool: dict[str, int] = {}
        if database and database != ":memory:" and not database.startswith("file:"):
            # Connections kept open for the server's concurrency (SQLAlchemy's default keeps 5): every connection
            # opened past the pool pays the pragmas below and is closed again, ~1 ms a request under load.
            pool = {"pool_size": 20, "max_overflow": 40}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            if sqlite_synchronous is not None:
                cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")  # one of two names, checked above
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


class Database:
    def __init__(self, url: str, *, sqlite_synchronous: str | None = None) -> None:
        self.url = normalise_url(url)
        self.engine = make_engine(self.url, sqlite_synchronous)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (run at every start; a no-op when current)."""
        config = alembic_config(self.url)
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def tenant(self, tenant_id: str) -> Iterator[Session]:
        """A session that sees and writes only `tenant_id`'s rows; commits on success."""
        with self._session(tenant_id=tenant_id) as session:
            yield session

    @contextmanager
    def system(self) -> Iterator[Session]:
        """A session of the platform itself (agents, bootstrap, sign-in lookups): no tenant filter."""
        with self._session(system=True) as session:
            yield session

    @contextmanager
    def _session(self, **info: object) -> Iterator[Session]:
        session = self._sessions(info=dict(info))
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
