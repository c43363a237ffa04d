"""usage ledger: what each tenant, user, key, model and agent used, per day (accounting, not limits); a
tenant's monthly cost budget

Revision ID: 0010_usage_ledger
Revises: 0009_islands
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_usage_ledger"
down_revision = "0009_islands"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("failed_requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cpu_seconds", sa.Float(), nullable=False),
        sa.Column("accelerator_seconds", sa.Float(), nullable=False),
        sa.Column("wall_seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("day", "tenant_id", "user_id", "api_key_id", "model", "agent_id", "kind"),
    )
    op.create_index(op.f("ix_usage_records_tenant_id"), "usage_records", ["tenant_id"], unique=False)
    with op.batch_alter_table("tenant_limits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("monthly_cost", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenant_limits", schema=None) as batch_op:
        batch_op.drop_column("monthly_cost")
    op.drop_index(op.f("ix_usage_records_tenant_id"), table_name="usage_records")
    op.drop_table("usage_records")
