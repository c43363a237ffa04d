"""The migrations build exactly the schema the models declare, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from adaptery.db import models as m
from adaptery.db.session import Database, alembic_config


def test_one_linear_history_with_a_single_head():
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1, script.get_heads()
    assert [rev.revision for rev in script.walk_revisions()][-1] == "0001"


def test_migrated_schema_matches_the_models(empty_database_url):
    database = Database(empty_database_url)
    database.migrate()
    database.dispose()
    engine = create_engine(empty_database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": False})
            differences = compare_metadata(context, m.Base.metadata)
    finally:
        engine.dispose()
    # Indexes and constraints are compared too; any table or column drift is listed here.
    assert differences == [], differences
