"""the feedback loop's links: a web chat answer's completion id, who made a name's request, which completion and
version answered each arena side, and the battle an arena answer's rating is about

Revision ID: 0016_loop_canary
Revises: 0015_federations
"""

import sqlalchemy as sa
from alembic import op

revision = "0016_loop_canary"
down_revision = "0015_federations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chat_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completion_id", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_chat_messages_completion_id"), ["completion_id"], unique=False)
    with op.batch_alter_table("model_name_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_id", sa.String(length=40), nullable=True))
    with op.batch_alter_table("arena_battles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("completion_a", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("completion_b", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("answered_a", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("answered_b", sa.String(length=255), nullable=True))
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.add_column(sa.Column("battle_id", sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f("ix_feedback_battle_id"), ["battle_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feedback_battle_id"))
        batch_op.drop_column("battle_id")
    with op.batch_alter_table("arena_battles", schema=None) as batch_op:
        for column in ("answered_b", "answered_a", "completion_b", "completion_a"):
            batch_op.drop_column(column)
    with op.batch_alter_table("model_name_requests", schema=None) as batch_op:
        batch_op.drop_column("user_id")
    with op.batch_alter_table("chat_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chat_messages_completion_id"))
        batch_op.drop_column("completion_id")
