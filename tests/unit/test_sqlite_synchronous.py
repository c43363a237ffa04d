"""SQLite syncs its log as the settings say (NORMAL by default under WAL); nothing else is accepted."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from adaptery.db.session import Database
from adaptery.settings import Settings

SYNCHRONOUS = {1: "NORMAL", 2: "FULL"}  # what PRAGMA synchronous reads back


def pragmas(db: Database) -> tuple[str, str]:
    with db.engine.connect() as connection:
        journal = connection.execute(text("PRAGMA journal_mode")).scalar()
        synchronous = connection.execute(text("PRAGMA synchronous")).scalar()
    return journal, SYNCHRONOUS[synchronous]


def test_the_default_is_normal_under_wal(tmp_path):
    setting = Settings(data_dir=tmp_path).sqlite_synchronous
    assert setting == "NORMAL"
    assert pragmas(Database(f"sqlite:///{tmp_path / 'a.db'}", sqlite_synchronous=setting)) == ("wal", "NORMAL")


def test_full_syncs_every_commit_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERY_SQLITE_SYNCHRONOUS", "FULL")
    setting = Settings(data_dir=tmp_path).sqlite_synchronous
    assert pragmas(Database(f"sqlite:///{tmp_path / 'a.db'}", sqlite_synchronous=setting)) == ("wal", "FULL")


def test_another_value_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERY_SQLITE_SYNCHRONOUS", "OFF")
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        Settings(data_dir=tmp_path)
    with pytest.raises(ValueError, match="must be NORMAL or FULL, not 'OFF'"):
        Database(f"sqlite:///{tmp_path / 'a.db'}", sqlite_synchronous="OFF")
