"""federations and their sites' identity keys

Revision ID: 0015_federations
Revises: 0010_usage_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_federations"
down_revision = "0014_identity_providers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("base_model", sa.String(length=255), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    with op.batch_alter_table("federations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_federations_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "federation_sites",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("federation_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("federation_id", "number"),
        sa.UniqueConstraint("federation_id", "fingerprint"),
    )
    with op.batch_alter_table("federation_sites", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_federation_sites_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_federation_sites_federation_id"), ["federation_id"], unique=False)


def downgrade() -> None:
    op.drop_table("federation_sites")
    op.drop_table("federations")
