"""evaluations: evaluation runs on the job queue, tenants' lm-eval tasks, evaluation sets beside adapters

Revision ID: 0012_evaluations
Revises: 0010_usage_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_evaluations"
down_revision = "0011_feedback"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("base_model", sa.String(length=128), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("api_key_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("tenant_id", "job_id", "model", "status", "created_at"):
        op.create_index(op.f(f"ix_evaluations_{column}"), "evaluations", [column], unique=False)
    op.create_table(
        "evaluation_tasks",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("data_sha256", sa.String(length=64), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_index(op.f("ix_evaluation_tasks_tenant_id"), "evaluation_tasks", ["tenant_id"], unique=False)
    op.create_table(
        "adapter_evaluation_sets",
        sa.Column("model_id", sa.String(length=255), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id"),
    )
    op.create_index(
        op.f("ix_adapter_evaluation_sets_tenant_id"), "adapter_evaluation_sets", ["tenant_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_adapter_evaluation_sets_tenant_id"), table_name="adapter_evaluation_sets")
    op.drop_table("adapter_evaluation_sets")
    op.drop_index(op.f("ix_evaluation_tasks_tenant_id"), table_name="evaluation_tasks")
    op.drop_table("evaluation_tasks")
    for column in ("created_at", "status", "model", "job_id", "tenant_id"):
        op.drop_index(op.f(f"ix_evaluations_{column}"), table_name="evaluations")
    op.drop_table("evaluations")
