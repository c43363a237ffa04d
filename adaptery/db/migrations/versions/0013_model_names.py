"""stable model names: versions, promotion history, and which version answered each request

Revision ID: 0013_model_names
Revises: 0010_usage_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_model_names"
down_revision = "0012_evaluations"
branch_labels = None
depends_on = None


def _tenant_column() -> sa.Column:
    return sa.Column("tenant_id", sa.String(length=40), nullable=False)


def _name_column() -> sa.Column:
    return sa.Column("name_id", sa.String(length=255), nullable=False)


def upgrade() -> None:
    op.create_table(
        "model_names",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("base_model", sa.String(length=128), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=True),
        sa.Column("canary_version", sa.Integer(), nullable=True),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        _tenant_column(),
        sa.ForeignKeyConstraint(["base_model"], ["base_models.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_index(op.f("ix_model_names_tenant_id"), "model_names", ["tenant_id"], unique=False)
    op.create_table(
        "model_name_versions",
        sa.Column("id", sa.String(length=40), nullable=False),
        _name_column(),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.String(length=255), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("added_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        _tenant_column(),
        sa.ForeignKeyConstraint(["name_id"], ["model_names.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name_id", "adapter_id"),
        sa.UniqueConstraint("name_id", "number"),
    )
    op.create_index(op.f("ix_model_name_versions_name_id"), "model_name_versions", ["name_id"], unique=False)
    op.create_index(op.f("ix_model_name_versions_tenant_id"), "model_name_versions", ["tenant_id"], unique=False)
    op.create_table(
        "model_name_promotions",
        sa.Column("id", sa.String(length=40), nullable=False),
        _name_column(),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("canary_share", sa.Float(), nullable=True),
        sa.Column("actor_user_id", sa.String(length=40), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        _tenant_column(),
        sa.ForeignKeyConstraint(["name_id"], ["model_names.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_model_name_promotions_name_id"), "model_name_promotions", ["name_id"], unique=False)
    op.create_index(op.f("ix_model_name_promotions_tenant_id"), "model_name_promotions", ["tenant_id"], unique=False)
    op.create_table(
        "model_name_requests",
        sa.Column("id", sa.String(length=40), nullable=False),
        _name_column(),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.String(length=255), nullable=False),
        sa.Column("canary", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        _tenant_column(),
        sa.ForeignKeyConstraint(["name_id"], ["model_names.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_model_name_requests_name_id"), "model_name_requests", ["name_id"], unique=False)
    op.create_index(op.f("ix_model_name_requests_tenant_id"), "model_name_requests", ["tenant_id"], unique=False)


def downgrade() -> None:
    for table in ("model_name_requests", "model_name_promotions", "model_name_versions"):
        op.drop_index(op.f(f"ix_{table}_tenant_id"), table_name=table)
        op.drop_index(op.f(f"ix_{table}_name_id"), table_name=table)
        op.drop_table(table)
    op.drop_index(op.f("ix_model_names_tenant_id"), table_name="model_names")
    op.drop_table("model_names")
