"""encryption: tenants' wrapped data keys; conversation titles are stored sealed (longer than 200 characters)

Revision ID: 0006_encryption
Revises: 0005_security
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_encryption"
down_revision = "0005_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_keys",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("master_key_id", sa.String(length=32), nullable=False),
        sa.Column("wrapped", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("rewrapped_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    with op.batch_alter_table("tenant_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tenant_keys_master_key_id"), ["master_key_id"], unique=False)
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.alter_column("title", existing_type=sa.String(length=200), type_=sa.Text(), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.alter_column("title", existing_type=sa.Text(), type_=sa.String(length=200), existing_nullable=False)
    op.drop_table("tenant_keys")
