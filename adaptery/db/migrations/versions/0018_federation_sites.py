"""federation invitations, rounds, and what the coordinator reports

Revision ID: 0018_federation_sites
Revises: 0015_federations
"""

import sqlalchemy as sa
from alembic import op

revision = "0018_federation_sites"
down_revision = "0016_loop_canary"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("federations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status", sa.String(length=16), nullable=False, server_default="created"))
        batch_op.add_column(sa.Column("superlink", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("superlink_ca", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("members", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("rounds", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("progress", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("adapter", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("federation_sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("joined", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("last_seen", sa.Float(), nullable=True))

    op.create_table(
        "federation_invitations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("federation_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
        sa.Column("site_id", sa.String(length=40), nullable=True),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    with op.batch_alter_table("federation_invitations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_federation_invitations_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_federation_invitations_federation_id"), ["federation_id"], unique=False)

    op.create_table(
        "federation_rounds",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("federation_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("survivors", sa.JSON(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("federation_id", "number"),
    )
    with op.batch_alter_table("federation_rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_federation_rounds_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_federation_rounds_federation_id"), ["federation_id"], unique=False)


def downgrade() -> None:
    op.drop_table("federation_rounds")
    op.drop_table("federation_invitations")
    with op.batch_alter_table("federation_sites", schema=None) as batch_op:
        batch_op.drop_column("last_seen")
        batch_op.drop_column("joined")
    with op.batch_alter_table("federations", schema=None) as batch_op:
        for column in ("error", "adapter", "progress", "rounds", "members", "superlink_ca", "superlink", "status"):
            batch_op.drop_column(column)
