"""tenant limits: a per-tenant maximum upload size (below the platform's own limit)

Revision ID: 0007_tenant_upload_limit
Revises: 0006_encryption
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_tenant_upload_limit"
down_revision = "0006_encryption"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenant_limits", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_upload_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenant_limits", schema=None) as batch_op:
        batch_op.drop_column("max_upload_bytes")
