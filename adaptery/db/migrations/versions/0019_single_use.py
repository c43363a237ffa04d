"""single use that holds across restarts and processes: spent upload URLs, a site's last check-in, and the
lm-eval keys' evaluations found by key

Revision ID: 0019_single_use
Revises: 0018_federation_sites
"""

import sqlalchemy as sa
from alembic import op

revision = "0019_single_use"
down_revision = "0018_federation_sites"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spent_transfer_nonces",
        sa.Column("nonce_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("nonce_hash"),
    )
    with op.batch_alter_table("spent_transfer_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_spent_transfer_nonces_expires_at"), ["expires_at"], unique=False)
    with op.batch_alter_table("federation_sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_check_in", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluations_api_key_id"), ["api_key_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluations_api_key_id"))
    with op.batch_alter_table("federation_sites", schema=None) as batch_op:
        batch_op.drop_column("last_check_in")
    op.drop_table("spent_transfer_nonces")
