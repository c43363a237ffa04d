"""the queue over NATS: agents, priorities, pause, resumable checkpoints, lineage

Revision ID: 0003_queue
Revises: 0002
Create Date: 2026-11-23 12:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_queue"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=128), nullable=False),
        sa.Column("tenant_scope", sa.String(length=40), nullable=True),
        sa.Column("embedded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=True),
        sa.Column("current_job_id", sa.String(length=40), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_scope"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("leased_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("lineage", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("init_adapter", sa.JSON(), nullable=True))
    with op.batch_alter_table("job_checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("epoch", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("manifest", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("resumable", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("job_checkpoints", schema=None) as batch_op:
        batch_op.drop_column("resumable")
        batch_op.drop_column("manifest")
        batch_op.drop_column("epoch")
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.drop_column("init_adapter")
        batch_op.drop_column("lineage")
        batch_op.drop_column("leased_at")
        batch_op.drop_column("pause_requested")
        batch_op.drop_column("priority")
    op.drop_table("agents")
