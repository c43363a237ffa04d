"""security: key scopes, allowed models, rotation and limits; adapter owners and sharing; the audit chain;
tenant limits and the usage ledger

Revision ID: 0005_security
Revises: 0004_conversations
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_security"
down_revision = "0004_conversations"
branch_labels = None
depends_on = None

GENESIS_HASH = "0" * 64
_APPEND_ONLY = "the audit log is append-only"


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scopes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("allowed_models", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_expires_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rotated_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("requests_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("concurrent_streams", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("monthly_tokens", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_by", sa.String(length=40), nullable=True))

    op.create_table(
        "adapter_shares",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("adapter_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("adapter_id", "user_id"),
    )
    with op.batch_alter_table("adapter_shares", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapter_shares_adapter_id"), ["adapter_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_adapter_shares_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=True),
        sa.Column("actor_user_id", sa.String(length=40), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.Column("actor_key_id", sa.String(length=40), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_tenant_id"), ["tenant_id"], unique=False)
    audit_head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(audit_head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])

    op.create_table(
        "tenant_limits",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("concurrent_streams", sa.Integer(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "usage_counters",
        sa.Column("subject", sa.String(length=96), nullable=False),
        sa.Column("period", sa.String(length=32), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subject", "period"),
    )
    op.create_table(
        "usage_reservations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("holds", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("usage_reservations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_usage_reservations_expires_at"), ["expires_at"], unique=False)

    # The database itself refuses to rewrite history, whichever code path (or person) tries.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION adaptery_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION adaptery_audit_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS adaptery_audit_append_only()")
    op.drop_table("usage_reservations")
    op.drop_table("usage_counters")
    op.drop_table("tenant_limits")
    op.drop_table("audit_head")
    op.drop_table("audit_events")
    op.drop_table("adapter_shares")
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_column("created_by")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        for column in (
            "monthly_tokens",
            "concurrent_streams",
            "tokens_per_minute",
            "requests_per_minute",
            "rotated_at",
            "previous_secret_expires_at",
            "previous_secret_hash",
            "allowed_models",
            "scopes",
        ):
            batch_op.drop_column(column)
