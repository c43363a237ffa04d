"""enrollment tokens have a kind: a token made for an agent no longer enrolls an island's leaf node, nor the other
way round (finding F2); tokens made before are agents' tokens

Revision ID: 0021_token_kind
Revises: 0020_invitation_links
"""

import sqlalchemy as sa
from alembic import op

revision = "0021_token_kind"
down_revision = "0020_invitation_links"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="agent"))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.drop_column("kind")
