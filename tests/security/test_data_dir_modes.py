"""The data dir is the platform's alone: another local user can read neither the SQLite database (hashes of keys
and sessions, every row's metadata) nor the sealed blobs, the master key, the models or the TLS keys."""

from __future__ import annotations

import logging
import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import select

from adaptery.auth.tls import ensure_server_certificate
from adaptery.db import models as m
from adaptery.platform import Platform
from adaptery.settings import Settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def master_key_in_the_data_dir(monkeypatch):
    monkeypatch.delenv("ADAPTERY_MASTER_KEY", raising=False)


def test_a_fresh_data_dir_is_readable_by_its_owner_only(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url=None, demo_model=False)  # SQLite in the data dir
    platform = Platform(settings)
    try:
        platform.prepare()
        ensure_server_certificate(settings.tls_dir, "127.0.0.1")  # what `serve --tls` makes
        with platform.db.system() as s:  # the database is open (in WAL mode: its -wal and -shm files exist)
            tenant_id = s.scalar(select(m.Tenant.id))
        blob = platform.blobs.path(tenant_id, platform.blobs.put_stream(tenant_id, [b"sealed"]).sha256)
        data = settings.data_dir
        assert mode(data) == 0o700
        assert {name: mode(data / name) for name in ("blobs", "models", "keys", "tls")} == dict.fromkeys(
            ("blobs", "models", "keys", "tls"), 0o700
        )
        database = ("adaptery.db", "adaptery.db-wal", "adaptery.db-shm")
        assert {name: mode(data / name) for name in database} == dict.fromkeys(database, 0o600)
        assert mode(blob) & 0o077 == 0
        assert mode(data / "keys" / "master.key") == mode(data / "tls" / "ca.key") == 0o600
    finally:
        platform.stop()


def test_an_existing_data_dir_open_to_others_is_tightened_and_said_so(tmp_path, caplog):
    """As a data dir made by an older version (or by hand) lies: 0755, with a 0644 database."""
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    with closing(sqlite3.connect(data / "adaptery.db")) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE leftover (x)")
    for path, old in ((data, 0o755), (data / "models", 0o755), (data / "adaptery.db", 0o644)):
        path.chmod(old)
    caplog.set_level(logging.WARNING)
    platform = Platform(Settings(data_dir=data, database_url=None, demo_model=False))
    try:
        platform.prepare()
        assert (mode(data), mode(data / "models"), mode(data / "adaptery.db")) == (0o700, 0o700, 0o600)
        assert {f.name: mode(f) for f in data.glob("adaptery.db*")} == dict.fromkeys(
            ("adaptery.db", "adaptery.db-wal", "adaptery.db-shm"), 0o600
        )  # SQLite's -wal and -shm files take the database's mode
    finally:
        platform.stop()
    said = " ".join(record.getMessage() for record in caplog.records)
    assert f"{data} was open to others (mode 755)" in said and f"{data / 'adaptery.db'} was open" in said
