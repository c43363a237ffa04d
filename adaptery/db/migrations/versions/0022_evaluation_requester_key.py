"""an evaluation remembers the API key it was asked for with: its tokens spend that key's budget too, not only the
tenant's (an lm-eval run's calls came with a key minted for it, held-out runs with none, so a key kept to a small
budget could spend a large one through evaluations); evaluations made before have none

Revision ID: 0022_evaluation_requester_key
Revises: 0021_token_kind
"""

import sqlalchemy as sa
from alembic import op

revision = "0022_evaluation_requester_key"
down_revision = "0021_token_kind"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requester_key_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_column("requester_key_id")
