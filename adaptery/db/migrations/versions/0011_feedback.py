"""feedback loop, collect: the tenant's feedback policy, kept completions, feedback on answers, arena battles

Revision ID: 0011_feedback
Revises: 0010_usage_ledger
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_feedback"
down_revision = "0010_usage_ledger"
branch_labels = None
depends_on = None


def _tenant(table: str) -> list:
    return [
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    ]


def upgrade() -> None:
    op.create_table(
        "feedback_policies",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("collect", sa.String(length=16), nullable=False),
        sa.Column("readers", sa.String(length=16), nullable=False),
        sa.Column("updated_by", sa.String(length=40), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "completions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("api_key_id", sa.String(length=40), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("answers", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        *_tenant("completions"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_completions_tenant_id"), "completions", ["tenant_id"], unique=False)
    op.create_index(op.f("ix_completions_created_at"), "completions", ["created_at"], unique=False)
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("completion_id", sa.String(length=64), nullable=True),
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=True),
        sa.Column("message_id", sa.String(length=40), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        *_tenant("feedback"),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("tenant_id", "user_id", "completion_id", "message_id", "model", "created_at"):
        op.create_index(op.f(f"ix_feedback_{column}"), "feedback", [column], unique=False)
    op.create_table(
        "arena_battles",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=True),
        sa.Column("base_model", sa.String(length=128), nullable=False),
        sa.Column("model_a", sa.String(length=255), nullable=False),
        sa.Column("model_b", sa.String(length=255), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("answer_a", sa.Text(), nullable=True),
        sa.Column("answer_b", sa.Text(), nullable=True),
        sa.Column("winner", sa.String(length=8), nullable=True),
        sa.Column("voted_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        *_tenant("arena_battles"),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("tenant_id", "user_id", "base_model", "created_at"):
        op.create_index(op.f(f"ix_arena_battles_{column}"), "arena_battles", [column], unique=False)


def downgrade() -> None:
    op.drop_table("arena_battles")
    op.drop_table("feedback")
    op.drop_table("completions")
    op.drop_table("feedback_policies")
