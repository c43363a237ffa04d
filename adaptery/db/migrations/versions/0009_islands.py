"""islands: agents enrolled by certificate (island, roles, leaf or agent), one-time enrollment tokens, and the
client certificates the platform CA issued

Revision ID: 0009_islands
Revises: 0008_identity
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_islands"
down_revision = "0008_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("island", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("roles", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="agent"))
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("tenant_scope", sa.String(length=40), nullable=True),
        sa.Column("island", sa.String(length=64), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(["tenant_scope"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "agent_certificates",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index(op.f("ix_agent_certificates_agent_id"), "agent_certificates", ["agent_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_agent_certificates_agent_id"), table_name="agent_certificates")
    op.drop_table("agent_certificates")
    op.drop_table("enrollment_tokens")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("kind")
        batch_op.drop_column("roles")
        batch_op.drop_column("island")
