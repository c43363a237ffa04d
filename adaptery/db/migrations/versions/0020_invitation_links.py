"""invitations are accepted with a one-time link from the inviting admin: the hash of its token

Revision ID: 0020_invitation_links
Revises: 0019_single_use
"""

import sqlalchemy as sa
from alembic import op

revision = "0020_invitation_links"
down_revision = "0019_single_use"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Invitations from before have no link: an admin issues one (`POST /api/admin/members/{username}/link`).
    with op.batch_alter_table("invitations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("invitations", schema=None) as batch_op:
        batch_op.drop_column("token_hash")
